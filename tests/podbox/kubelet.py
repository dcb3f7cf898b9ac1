"""The kubelet (and the scheduler's binding): runs each container of the box's pods as a local process group.

See the package docstring for how a container's paths, host names and ports map onto this machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.podbox.kube import CONFIGMAPS, JSON, NODE_NAME, PODS, SECRETS, Core, Snapshot, labels, log, name, namespace
from tests.podbox.kube import now as timestamp
from tests.podbox.kube import uid as uid_of
from tests.podbox.mapping import LOOPBACK, Rewriter, expand, resource_value

RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_MESSAGE = 4096  # kubecontainer.MaxContainerTerminationMessageLength: the file's last 4 KiB
MAX_LOG_MESSAGE = 2048  # MaxContainerTerminationMessageLogLength
MAX_LOG_LINES = 80  # MaxContainerTerminationMessageLogLines
MAX_BACKOFF = 300.0  # the kubelet's CrashLoopBackOff cap
PodCheck = Callable[[JSON], bool]


class NotStartable(Exception):
    """The pod cannot start yet (a missing ConfigMap, a claim without a folder); retried on the next tick."""

    def __init__(self, reason: str, message: str, unschedulable: bool = False) -> None:
        super().__init__(message)
        self.reason, self.message, self.unschedulable = reason, message, unschedulable


@dataclass
class Container:
    """One container of a running pod: how to start it, and what the kubelet reports about it."""

    spec: JSON
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    message_path: Path
    proc: subprocess.Popen[bytes] | None = None
    container_id: str = ""
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    probe_ready: bool = False
    restart_at: float | None = None
    rewriter: Rewriter | None = None  # how its view maps onto this machine (and back, for its message)
    probe: asyncio.Task[None] | None = None
    group_alive: bool = False  # the process group may still have members: only then is it signalled

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def ready(self) -> bool:
        return self.running and (self.probe_ready or not self.spec.get("readinessProbe"))

    @property
    def final(self) -> bool:
        """Terminated with no restart coming."""
        return "terminated" in self.state and self.restart_at is None


@dataclass
class PodRun:
    pod: JSON
    folder: Path
    containers: list[Container]
    grace: float
    started: str = field(default_factory=timestamp)
    extra_conditions: list[JSON] = field(default_factory=list)
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    stopping: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    written: JSON | None = None

    @property
    def uid(self) -> str:
        return uid_of(self.pod)

    @property
    def restart_policy(self) -> str:
        return str(self.pod.get("spec", {}).get("restartPolicy") or "Always")


def base_environment() -> dict[str, str]:
    """The "image's" environment: this process's, minus the API server's in-cluster variables, with the venv's
    scripts first on PATH so that `finetune` is the console script of this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def exit_code(returncode: int) -> int:
    """A signal N shows as 128+N, as the container runtime reports it."""
    return returncode if returncode >= 0 else 128 - returncode


def read_tail(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read()
    except OSError:
        return b""


def termination_message(container: Container, code: int) -> str:
    """The file's last 4 KiB; with FallbackToLogsOnError, an empty file and a failure: the log's tail."""
    message = read_tail(container.message_path, MAX_MESSAGE)
    policy = container.spec.get("terminationMessagePolicy") or "File"
    if not message and policy == "FallbackToLogsOnError" and code != 0:
        lines = read_tail(container.log_path, 1 << 20).splitlines(keepends=True)[-MAX_LOG_LINES:]
        message = b"".join(lines)[-MAX_LOG_MESSAGE:]
    text = message.decode("utf-8", errors="replace")
    return container.rewriter.back(text) if container.rewriter is not None else text


def signal_group(container: Container, sig: int) -> None:
    """Signal the container's process group; never once it is gone, so a reused pid is never hit."""
    if container.proc is None or not container.group_alive:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(container.proc.pid, sig)


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port


def field_value(pod: JSON, path: str) -> str:
    """A downward-API `fieldRef.fieldPath`, as the kubelet resolves it for this pod on this node."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path == prefix:
            values = meta.get(source) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((meta.get(source) or {}).get(path[len(prefix) + 2 : -2], ""))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName") or NODE_NAME,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": LOOPBACK, "status.podIPs": LOOPBACK, "status.hostIP": LOOPBACK, "status.hostIPs": LOOPBACK,
    }  # fmt: skip
    if path not in simple:
        raise NotStartable("CreateContainerConfigError", f"unsupported fieldPath {path!r}")
    return str(simple[path] or "")


class Sources:
    """ConfigMaps and Secrets read for one pod start (each fetched once)."""

    def __init__(self, core: Core, ns: str) -> None:
        self.core, self.ns = core, ns
        self.cache: dict[tuple[str, str], JSON | None] = {}

    async def get(self, kind: str, source_name: str, optional: bool) -> JSON | None:
        key = (kind, source_name)
        if key not in self.cache:
            resource = CONFIGMAPS if kind == "configmap" else SECRETS
            self.cache[key] = await self.core.api.get(f"{resource.collection(self.ns)}/{source_name}")
        found = self.cache[key]
        if found is None and not optional:
            raise NotStartable("CreateContainerConfigError", f'{kind} "{source_name}" not found')
        return found

    async def data(self, kind: str, source_name: str, optional: bool) -> dict[str, bytes]:
        """The object's keys as bytes: a Secret's `data` base64-decoded (and `stringData`, which the emulator keeps)."""
        found = await self.get(kind, source_name, optional) or {}
        if kind == "secret":
            values = {k: base64.b64decode(v) for k, v in (found.get("data") or {}).items()}
            values.update({k: str(v).encode() for k, v in (found.get("stringData") or {}).items()})
            return values
        values = {k: str(v).encode() for k, v in (found.get("data") or {}).items()}
        values.update({k: base64.b64decode(v) for k, v in (found.get("binaryData") or {}).items()})
        return values

    async def key(self, kind: str, ref: Mapping[str, Any]) -> str | None:
        values = await self.data(kind, str(ref["name"]), bool(ref.get("optional")))
        if ref["key"] not in values:
            if ref.get("optional"):
                return None
            label = "ConfigMap" if kind == "configmap" else "Secret"
            raise NotStartable("CreateContainerConfigError", f"couldn't find key {ref['key']} in {label} "
                                                             f"{self.ns}/{ref['name']}")
        return values[ref["key"]].decode("utf-8", errors="replace")


class Kubelet:
    """Starts, watches, probes and stops the processes of the pods the box's controllers created."""

    def __init__(self, core: Core, root: Path, claims: Mapping[str, Path], grace: float, backoff: float) -> None:
        self.core, self.root, self.claims = core, root, {k: Path(v) for k, v in claims.items()}
        self.grace, self.backoff = grace, backoff
        self.runs: dict[str, PodRun] = {}
        self.owned: set[str] = set()  # pods the box's controllers created: the only ones it runs
        self.terminating: set[str] = set()  # pods being killed: neither active nor replaceable yet
        self.removed: set[str] = set()  # pods the box deleted itself (the Job controller does not count them)
        self.holds: list[PodCheck] = []
        self.ports: dict[tuple[str, str, str, int], int] = {}
        self.waiting: dict[str, JSON] = {}  # last status written for a pod that could not start yet
        self.base_env = base_environment()
        self.warned: set[str] = set()

    # --- the tick ---------------------------------------------------------------------------------------------------

    async def sync(self, snap: Snapshot) -> None:
        live = {uid_of(p): p for p in snap.of(PODS)}
        for pod_uid, run in list(self.runs.items()):
            if pod_uid not in live:
                self._gone(run)
            else:
                run.pod = live[pod_uid]
                await self.write(run)
        for pod_uid, pod in live.items():
            if pod_uid in self.owned and pod_uid not in self.runs and self._startable(pod):
                await self.start(pod, snap)

    def _startable(self, pod: JSON) -> bool:
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        return phase == "Pending" and uid_of(pod) not in self.terminating and not self.held(pod)

    def _gone(self, run: PodRun) -> None:
        """The pod object was deleted by someone else: kill its processes, as the kubelet does."""
        if not run.stopping:
            self.core.spawn(f"stop/{run.uid}", self._stop_gone(run))

    async def _stop_gone(self, run: PodRun) -> None:
        await self.stop(run, write=False)
        self.runs.pop(run.uid, None)

    def held(self, pod: JSON) -> bool:
        return any(check(pod) for check in self.holds)

    # --- starting ---------------------------------------------------------------------------------------------------

    async def start(self, pod: JSON, snap: Snapshot) -> None:
        try:
            if pod.get("spec", {}).get("initContainers"):
                raise NotStartable("CreateContainerConfigError", "podbox runs no initContainers")
            await self._bind(pod)
            run = await self._prepare(pod, snap)
        except NotStartable as err:
            await self._write_waiting(pod, err)
            return
        self.waiting.pop(uid_of(pod), None)
        self.runs[run.uid] = run
        for container in run.containers:
            self._launch(run, container)
        await self.write(run)

    async def _bind(self, pod: JSON) -> None:
        """The scheduler's binding: the pod lands on this machine's one node."""
        if not pod.get("spec", {}).get("nodeName"):
            await self.core.patch(PODS.path(pod), {"spec": {"nodeName": NODE_NAME}})
            pod.setdefault("spec", {})["nodeName"] = NODE_NAME

    async def _write_waiting(self, pod: JSON, err: NotStartable) -> None:
        conditions = [{"type": "PodScheduled", "status": "False" if err.unschedulable else "True",
                       **({"reason": "Unschedulable", "message": err.message} if err.unschedulable else {})}]
        statuses = [{"name": c["name"], "image": c.get("image", ""), "ready": False, "restartCount": 0,
                     "state": {"waiting": {"reason": err.reason, "message": err.message}}}
                    for c in pod.get("spec", {}).get("containers") or []]  # fmt: skip
        status = {"phase": "Pending", "conditions": conditions,
                  **({} if err.unschedulable else {"containerStatuses": statuses})}
        if self.waiting.get(uid_of(pod)) != status:
            log.warning("podbox: pod %s/%s cannot start: %s", namespace(pod), name(pod), err.message)
            await self.core.patch_status(PODS, pod, status)
            self.waiting[uid_of(pod)] = status

    async def _prepare(self, pod: JSON, snap: Snapshot) -> PodRun:
        spec, ns = pod.get("spec") or {}, namespace(pod)
        folder = self.root / ns / name(pod)
        (folder / "cwd").mkdir(parents=True, exist_ok=True)
        volumes = self._volume_folders(pod, folder)
        sources = Sources(self.core, ns)
        containers: list[Container] = []
        rewriters: dict[str, Rewriter] = {}
        for spec_c in spec.get("containers") or []:
            rewriter = self._rewriter(pod, spec_c, volumes, folder, snap)
            for mount in spec_c.get("volumeMounts") or []:
                rewriters.setdefault(mount["name"], rewriter)
            containers.append(await self._container(pod, spec_c, rewriter, folder, sources))
        await self._fill_volumes(pod, volumes, rewriters, sources)
        grace = spec.get("terminationGracePeriodSeconds")
        return PodRun(pod=pod, folder=folder, containers=containers,
                      grace=float(grace) if grace is not None else self.grace)

    def _volume_folders(self, pod: JSON, folder: Path) -> dict[str, Path]:
        """Each volume's local folder: the claim's folder the test passed in, a host path as is, else per pod."""
        found: dict[str, Path] = {}
        for volume in pod.get("spec", {}).get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise NotStartable("Unschedulable", f'podbox has no folder for persistentvolumeclaim "{claim}"'
                                                        " (pass claims={...} to PodBox)", unschedulable=True)
                found[volume["name"]] = self.claims[claim]
            elif "hostPath" in volume:
                found[volume["name"]] = Path(volume["hostPath"]["path"])
            else:
                found[volume["name"]] = folder / "volumes" / volume["name"]
            found[volume["name"]].mkdir(parents=True, exist_ok=True)
        return found

    def _rewriter(self, pod: JSON, spec_c: JSON, volumes: Mapping[str, Path], folder: Path, snap: Snapshot
                  ) -> Rewriter:  # fmt: skip
        paths: dict[str, Path] = {}
        for mount in spec_c.get("volumeMounts") or []:
            local = volumes.get(mount["name"])
            if local is None:
                raise NotStartable("CreateContainerConfigError", f'volume "{mount["name"]}" not found')
            paths[mount["mountPath"]] = local / mount["subPath"] if mount.get("subPath") else local
        message_file = folder / f"{spec_c['name']}.termination-log"
        paths[spec_c.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH] = message_file
        # The containers of a pod share one network namespace: any container's declared port maps for all.
        declared = frozenset(int(port["containerPort"]) for c in pod.get("spec", {}).get("containers") or []
                             for port in c.get("ports") or [])  # fmt: skip
        pods = [*snap.of(PODS), pod]
        subdomains = frozenset(s for p in pods if (s := p.get("spec", {}).get("subdomain")))
        return Rewriter(paths=paths, subdomains=subdomains, namespace=namespace(pod), declared=declared,
                        port_for=lambda ns, sub, port: self._peer_port(pod, ns, sub, port),
                        own_port=lambda port: self.port(pod, port))  # fmt: skip

    async def _container(self, pod: JSON, spec_c: JSON, rewriter: Rewriter, folder: Path, sources: Sources
                         ) -> Container:  # fmt: skip
        env = await self._env(pod, spec_c, sources)
        words = [*(spec_c.get("command") or []), *(spec_c.get("args") or [])]
        argv = [rewriter.value(expand(str(w), env)) for w in words]
        working = spec_c.get("workingDir")
        mapped = Path(rewriter.path(working)) if working else None
        cwd = mapped if mapped is not None and mapped != Path(working or "") else folder / "cwd"
        full_env = {**self.base_env, "HOSTNAME": self._hostname(pod), **{k: rewriter.value(v) for k, v in env.items()}}
        return Container(spec=spec_c, argv=argv, env=full_env, cwd=cwd, log_path=folder / f"{spec_c['name']}.log",
                         message_path=folder / f"{spec_c['name']}.termination-log", rewriter=rewriter)  # fmt: skip

    @staticmethod
    def _hostname(pod: JSON) -> str:
        return str(pod.get("spec", {}).get("hostname") or name(pod))[:63]

    async def _env(self, pod: JSON, spec_c: JSON, sources: Sources) -> dict[str, str]:
        """The container's own variables in the kubelet's order: envFrom, then env, each `value` expanded
        against the variables before it."""
        env: dict[str, str] = {}
        for source in spec_c.get("envFrom") or []:
            kind, ref = ("configmap", source["configMapRef"]) if "configMapRef" in source else ("secret",
                                                                                               source["secretRef"])
            values = await sources.data(kind, ref["name"], bool(ref.get("optional")))
            for key, raw in values.items():
                env[source.get("prefix", "") + key] = raw.decode("utf-8", errors="replace")
        for var in spec_c.get("env") or []:
            value = await self._env_value(pod, spec_c, var, env, sources)
            if value is not None:
                env[var["name"]] = value
        return env

    async def _env_value(self, pod: JSON, spec_c: JSON, var: JSON, env: Mapping[str, str], sources: Sources
                         ) -> str | None:  # fmt: skip
        source = var.get("valueFrom")
        if not source:
            return expand(str(var.get("value", "")), env)
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            target = ref.get("containerName") or spec_c["name"]
            container = next((c for c in pod["spec"]["containers"] if c["name"] == target), spec_c)
            return resource_value(container, ref)
        if "configMapKeyRef" in source:
            return await sources.key("configmap", source["configMapKeyRef"])
        if "secretKeyRef" in source:
            return await sources.key("secret", source["secretKeyRef"])
        raise NotStartable("CreateContainerConfigError", f"unsupported valueFrom in env {var['name']}")

    async def _fill_volumes(self, pod: JSON, volumes: Mapping[str, Path], rewriters: Mapping[str, Rewriter],
                            sources: Sources) -> None:  # fmt: skip
        """ConfigMap and Secret volumes become files (a ConfigMap's text with its container paths rewritten);
        downwardAPI items are written too; other volume kinds are empty folders."""
        for volume in pod.get("spec", {}).get("volumes") or []:
            folder, vol = volumes[volume["name"]], volume["name"]
            if "configMap" in volume or "secret" in volume:
                kind = "configmap" if "configMap" in volume else "secret"
                src = volume.get("configMap") or volume.get("secret") or {}
                source_name = str(src.get("name") or src.get("secretName") or "")
                values = await sources.data(kind, source_name, bool(src.get("optional")))
                rewrite = rewriters[vol].path if kind == "configmap" and vol in rewriters else None
                self._write_items(folder, values, src, rewrite)
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"].get("items") or []:
                    value = field_value(pod, item["fieldRef"]["fieldPath"]) if "fieldRef" in item else ""
                    self._write_file(folder / item["path"], value.encode(), item.get("mode"))
            elif not {"persistentVolumeClaim", "hostPath", "emptyDir"} & volume.keys() and vol not in self.warned:
                self.warned.add(vol)
                log.warning("podbox: volume %s of pod %s is mounted as an empty folder", vol, name(pod))

    def _write_items(self, folder: Path, values: Mapping[str, bytes], src: JSON,
                     rewrite: Callable[[str], str] | None) -> None:  # fmt: skip
        items = src.get("items") or [{"key": k, "path": k} for k in values]
        for item in items:
            if item["key"] not in values:
                continue
            data = values[item["key"]]
            if rewrite is not None:
                with contextlib.suppress(UnicodeDecodeError):
                    data = rewrite(data.decode("utf-8")).encode("utf-8")
            self._write_file(folder / item["path"], data, item.get("mode", src.get("defaultMode")))

    @staticmethod
    def _write_file(path: Path, data: bytes, mode: int | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(int(mode) if mode is not None else 0o644)

    # --- processes --------------------------------------------------------------------------------------------------

    def _launch(self, run: PodRun, container: Container) -> None:
        container.message_path.write_bytes(b"")  # a fresh, empty termination-message file per instance
        container.container_id = f"podbox://{uuid.uuid4().hex}"
        container.restart_at = None
        started = timestamp()
        try:
            with open(container.log_path, "ab") as out:
                container.proc = subprocess.Popen(
                    container.argv, cwd=container.cwd, env=container.env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        except (OSError, ValueError) as err:
            container.proc = None
            message = f"failed to start container {container.name}: {err}"
            container.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                              "startedAt": started, "finishedAt": started,
                                              "containerID": container.container_id}}  # fmt: skip
            self._schedule_restart(run, container, 128)
            return
        container.group_alive = True
        container.state = {"running": {"startedAt": started}}
        container.probe_ready = False
        container.probe = asyncio.get_running_loop().create_task(self._probe_loop(run, container))

    def refresh(self, run: PodRun) -> None:
        """Notice exited processes and restarts that are due."""
        for container in run.containers:
            if container.running and container.proc is not None and container.proc.poll() is not None:
                self._exited(run, container)
            if container.restart_at is not None and time.monotonic() >= container.restart_at and not run.stopping:
                container.last_state = {"terminated": container.state.get("terminated")
                                        or container.last_state.get("terminated")}
                container.restart_count += 1
                self._launch(run, container)

    def _exited(self, run: PodRun, container: Container) -> None:
        assert container.proc is not None
        code = exit_code(container.proc.returncode)
        signal_group(container, signal.SIGKILL)  # the container's end takes all of its processes along
        container.group_alive = False
        if container.probe is not None:
            container.probe.cancel()
        terminated: JSON = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                            "startedAt": container.state["running"]["startedAt"], "finishedAt": timestamp(),
                            "containerID": container.container_id}  # fmt: skip
        if message := termination_message(container, code):
            terminated["message"] = message
        container.state = {"terminated": terminated}
        self._schedule_restart(run, container, code)

    def _schedule_restart(self, run: PodRun, container: Container, code: int) -> None:
        policy = run.restart_policy
        if run.stopping or policy == "Never" or (policy == "OnFailure" and code == 0):
            return
        # The first restart is immediate; then CrashLoopBackOff doubles from `backoff` (10 s in a real kubelet).
        delay = 0.0 if container.restart_count == 0 else min(self.backoff * 2 ** (container.restart_count - 1),
                                                             MAX_BACKOFF)
        container.restart_at = time.monotonic() + delay
        if delay > 0:
            container.last_state = {"terminated": container.state["terminated"]}
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                f"back-off {delay:g}s restarting failed container={container.name} "
                f"pod={name(run.pod)}_{namespace(run.pod)}({run.uid})")}}

    def live(self, run: PodRun) -> list[Container]:
        return [c for c in run.containers if c.proc is not None and c.proc.poll() is None]

    # --- readiness --------------------------------------------------------------------------------------------------

    async def _probe_loop(self, run: PodRun, container: Container) -> None:
        """readinessProbe: polled quickly until it first passes, then about every second (not periodSeconds)."""
        probe = container.spec.get("readinessProbe")
        if not probe:
            return
        try:
            await self._probe_until_exit(run, container, probe)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("podbox: the readiness probe of %s/%s failed", name(run.pod), container.name)

    async def _probe_until_exit(self, run: PodRun, container: Container, probe: JSON) -> None:
        await asyncio.sleep(float(probe.get("initialDelaySeconds") or 0))
        passes = fails = 0
        while container.running:
            ok = await self._probe_once(run, container, probe)
            passes, fails = (passes + 1, 0) if ok else (0, fails + 1)
            if ok and passes >= int(probe.get("successThreshold") or 1):
                container.probe_ready = True
            if not ok and fails >= int(probe.get("failureThreshold") or 3):
                container.probe_ready = False
            await asyncio.sleep(0.2 if not container.probe_ready else min(float(probe.get("periodSeconds") or 10), 1))

    async def _probe_once(self, run: PodRun, container: Container, probe: JSON) -> bool:
        handler = probe.get("httpGet") or probe.get("tcpSocket")
        if handler is None:  # exec and grpc probes are not run: they pass
            return True
        port = self._named_port(run, container, handler.get("port"))
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "tcpSocket" in probe:
                _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
                writer.close()
                return True
            return await asyncio.wait_for(self._http_get(port, handler), timeout)
        except (TimeoutError, OSError, ValueError):
            return False

    def _named_port(self, run: PodRun, container: Container, port: Any) -> int:
        number = next((p["containerPort"] for p in container.spec.get("ports") or [] if p.get("name") == port), port)
        return self.port(run.pod, int(number))

    @staticmethod
    async def _http_get(port: int, handler: JSON) -> bool:
        context = ssl._create_unverified_context() if str(handler.get("scheme", "")).upper() == "HTTPS" else None
        reader, writer = await asyncio.open_connection(LOOPBACK, port, ssl=context)
        try:
            path = handler.get("path") or "/"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUser-Agent: kube-probe/podbox\r\n"
                         "Connection: close\r\n\r\n".encode())  # fmt: skip
            await writer.drain()
            status_line = (await reader.readline()).decode("latin-1").split()
            return len(status_line) >= 2 and 200 <= int(status_line[1]) < 400
        finally:
            writer.close()

    # --- status -----------------------------------------------------------------------------------------------------

    async def write(self, run: PodRun) -> None:
        """Refresh and write the pod's status if it changed; one writer at a time, so it never goes back."""
        async with run.lock:
            self.refresh(run)
            status = self._status(run)
            if status != run.written:
                await self.core.patch_status(PODS, run.pod, status)
                run.written = status

    def phase(self, run: PodRun) -> str:
        if all(c.final for c in run.containers):
            codes = [c.state["terminated"]["exitCode"] for c in run.containers]
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        return "Running" if any("waiting" not in c.state or c.restart_count for c in run.containers) else "Pending"

    def _status(self, run: PodRun) -> JSON:
        phase = self.phase(run)
        ready = phase == "Running" and all(c.ready for c in run.containers)
        unready = [c.name for c in run.containers if not c.ready]
        reason = {"reason": "PodCompleted"} if phase in ("Succeeded", "Failed") else {
            "reason": "ContainersNotReady", "message": f"containers with unready status: [{' '.join(unready)}]"}
        conditions = [
            self._condition(run, "PodReadyToStartContainers", phase in ("Pending", "Running")),
            self._condition(run, "Initialized", True),
            self._condition(run, "Ready", ready, {} if ready else reason),
            self._condition(run, "ContainersReady", ready, {} if ready else reason),
            self._condition(run, "PodScheduled", True),
            *run.extra_conditions,
        ]
        ips = [{"ip": LOOPBACK}]
        return {"phase": phase, "conditions": conditions, "hostIP": LOOPBACK, "hostIPs": ips, "podIP": LOOPBACK,
                "podIPs": ips, "startTime": run.started,
                "containerStatuses": [self._container_status(c) for c in run.containers]}  # fmt: skip

    def _condition(self, run: PodRun, kind: str, true: bool, extra: Mapping[str, str] | None = None) -> JSON:
        status = "True" if true else "False"
        previous = run.transitions.get(kind)
        if previous is None or previous[0] != status:
            run.transitions[kind] = (status, timestamp())
        return {"type": kind, "status": status, "lastProbeTime": None,
                "lastTransitionTime": run.transitions[kind][1], **(extra or {})}  # fmt: skip

    @staticmethod
    def _container_status(c: Container) -> JSON:
        return {"name": c.name, "image": c.spec.get("image", ""), "imageID": "", "containerID": c.container_id,
                "ready": c.ready, "started": c.running, "restartCount": c.restart_count, "state": c.state,
                "lastState": c.last_state}  # fmt: skip

    # --- stopping ---------------------------------------------------------------------------------------------------

    async def stop(self, run: PodRun, grace: float | None = None, conditions: list[JSON] | None = None,
                   write: bool = True) -> None:  # fmt: skip
        """Graceful termination: conditions first, SIGTERM to every container's group, SIGKILL after the grace
        period, then the final status (Failed or Succeeded by the exit codes)."""
        run.stopping = True  # (a pod being deleted is also in `terminating`; one that is only stopped is not)
        for cond in conditions or []:
            run.extra_conditions = [c for c in run.extra_conditions if c["type"] != cond["type"]] + [cond]
        if write and conditions:
            await self.write(run)
        for container in run.containers:
            if container.restart_at is not None:  # a container waiting to restart stays terminated
                container.restart_at = None
                container.state = {"terminated": (container.state.get("terminated")
                                                  or container.last_state.get("terminated"))}
            signal_group(container, signal.SIGTERM)
        await self._wait_exit(run, run.grace if grace is None else grace)
        for container in self.live(run):
            signal_group(container, signal.SIGKILL)
        await self._wait_exit(run, 60.0)
        if write:
            await self.write(run)
        else:
            self.refresh(run)

    async def _wait_exit(self, run: PodRun, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.live(run) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def begin_delete(self, pod: JSON) -> None:
        """Start a graceful delete in the background; the pod stops counting as active at once."""
        self.terminating.add(uid_of(pod))
        self.removed.add(uid_of(pod))
        self.core.spawn(f"delete/{uid_of(pod)}", self.delete_pod(pod))

    async def delete_pod(self, pod: JSON, grace: float | None = None) -> None:
        """A graceful delete: the processes end first, then the object goes (the box's own deletions)."""
        pod_uid = uid_of(pod)
        self.terminating.add(pod_uid)
        self.removed.add(pod_uid)
        run = self.runs.get(pod_uid)
        if run is not None:
            await self.stop(run, grace)
        await self.core.delete(PODS, pod)
        self.runs.pop(pod_uid, None)
        self.terminating.discard(pod_uid)

    async def kill_all(self) -> None:
        """On the box's exit: SIGKILL every group it started and reap them."""
        for run in self.runs.values():
            run.stopping = True
            for container in run.containers:
                if container.probe is not None:
                    container.probe.cancel()
                signal_group(container, signal.SIGKILL)
        for run in self.runs.values():
            for container in run.containers:
                if container.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        await asyncio.to_thread(container.proc.wait, 30)

    # --- ports ------------------------------------------------------------------------------------------------------

    def port(self, pod: JSON, container_port: int) -> int:
        """The loopback port in place of `container_port`, shared by one gang attempt (same subdomain and
        restart attempt) or, for a pod without a subdomain, by that pod alone."""
        spec = pod.get("spec") or {}
        key = (namespace(pod), str(spec.get("subdomain") or name(pod)), labels(pod).get(RESTART_ATTEMPT, ""),
               int(container_port))  # fmt: skip
        if key not in self.ports:
            self.ports[key] = free_port(set(self.ports.values()))
        return self.ports[key]

    def _peer_port(self, pod: JSON, ns: str, subdomain: str, container_port: int) -> int:
        """A port on `<host>.<subdomain>`: the same attempt as this pod when it is this pod's own gang."""
        if subdomain == pod.get("spec", {}).get("subdomain") and ns == namespace(pod):
            attempt = labels(pod).get(RESTART_ATTEMPT, "")
        else:
            peers = [p for p in self.core.snapshot.of(PODS)
                     if namespace(p) == ns and p.get("spec", {}).get("subdomain") == subdomain]  # fmt: skip
            attempts = sorted((labels(p).get(RESTART_ATTEMPT, "") for p in peers), key=lambda a: (len(a), a))
            attempt = attempts[-1] if attempts else ""
        key = (ns, subdomain, attempt, container_port)
        if key not in self.ports:
            self.ports[key] = free_port(set(self.ports.values()))
        return self.ports[key]
