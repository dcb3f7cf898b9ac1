"""Pods in a box: the cluster's controllers and kubelet on top of kmock's API emulator, for integration tests
that run the operator, the trainer and the server together without a cluster.

The emulator stores objects and serves them over HTTP but runs no controllers. `PodBox` plays them, over
HTTP like the real ones, as asyncio tasks in the test's event loop (it lists the emulator every 50 ms):

- the JobSet controller (child Jobs, headless Service, failure policy and gang restarts, success policy);
- the Job controller (pods per completion index, podFailurePolicy, backoffLimit, activeDeadlineSeconds);
- the Deployment controller (pods of the current template, rolling updates, status and conditions);
- the garbage collector (objects whose owners are gone);
- the scheduler's binding and the kubelet: each container of each pod those controllers create runs as a local
  process group, and its real exit code, termination message and readiness are written back to the pod.

    async with PodBox(api, root=tmp_path / "box", claims={"data": tmp_path / "ws"}) as box:
        ...  # create a JobSet / let the operator create one
        await box.wait_for(lambda: box.pods("train-"), what="trainer pods")
        box.log(pod), box.port(pod, 8080), await box.kill(pod), await box.disrupt(pod), box.hold(prefix)

How a container's world maps onto this machine (what bind mounts and a pod network do for a real container):

- Files. Each volume has a local folder: a persistentVolumeClaim the folder passed in `claims` for its
  claimName (shared by every pod, as a ReadWriteMany volume is), a hostPath the path itself, a configMap or
  secret a per-pod folder holding its keys as files (a secret's data base64-decoded, `items`, `mode` and
  `defaultMode` honoured), an emptyDir (or anything else) a fresh per-pod folder. Each volumeMount's mountPath
  (plus subPath) stands for its volume's folder, and the container's terminationMessagePath (default
  /dev/termination-log) for a per-pod file. Every argument, command word and env value of the container is
  rewritten by replacing the longest matching mountPath at a path boundary with its local folder:
  `/workspace/data/x.tsv` → `<claim folder>/data/x.tsv`, `--out=/workspace` too; `/workspaces` and
  `/a/workspace` are left alone. The text of mounted ConfigMap files is rewritten the same way, so a job file
  in a ConfigMap that names /workspace/data/train.tsv points into the claim's folder. Paths a program has
  built in (not in its args, env or mounted files) are not rewritten: there is no chroot. The other way
  round, a termination message is reported in the container's terms: local folders in it become their
  mountPaths again (a trainer that wrote `<claim folder>/job/run-1` is reported as `/workspace/job/run-1`).
- Network. Every pod's address is 127.0.0.1. A host name `<label>.<subdomain>` (optionally followed by
  `.<namespace>`, `.<namespace>.svc` or `.<namespace>.svc.cluster.local`) whose subdomain is some pod's
  spec.subdomain is rewritten to 127.0.0.1 in args and env. Each declared containerPort gets a free loopback
  port, allocated once per (namespace, subdomain — or the pod's name without one —, JobSet restart attempt,
  containerPort): all pods of one gang attempt agree on the rendezvous port, a new attempt gets fresh ones.
  An env value or arg equal to a declared containerPort, a `<host>.<subdomain>:<port>` and a
  `localhost:<port>` / `127.0.0.1:<port>` of a declared port are rewritten to the allocated port;
  `box.port(pod, containerPort)` returns it, so a test can call a pod. (Only one pod of a gang can listen on
  a given containerPort, as the ports are per gang; Service names are not mapped.)
- Environment. The image's environment is this process's (minus KUBERNETES_*), with the directory of
  sys.executable first on PATH so `finetune` is this checkout's console script, plus HOSTNAME; then the
  container's envFrom and env in order: values with `$(VAR)` expanded as Kubernetes does, the downward API
  (metadata.name/namespace/uid/labels['k']/annotations['k'], spec.nodeName, spec.serviceAccountName,
  status.podIP/hostIP = 127.0.0.1), resourceFieldRef (a missing limit is this machine's capacity, CPU rounded
  up), configMapKeyRef and secretKeyRef. `$(VAR)` in command and args expands from the container's own env.
- Processes. One process group per container (start_new_session), cwd a per-pod folder (or workingDir when it
  is under a mount), stdout and stderr appended to `<root>/<namespace>/<pod>/<container>.log` (`box.log`).
  When the main process exits its whole group is killed, as a container's end kills everything in it.
"""

from tests.podbox.box import PodBox
from tests.podbox.kubelet import RESTART_ATTEMPT

__all__ = ["RESTART_ATTEMPT", "PodBox"]
