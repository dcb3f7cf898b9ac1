"""JobSets through the box: real processes, their exit codes and messages, the failure policy's verdicts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finetune.operator import k8s
from tests.integration.podbox.builders import (
    CONFIGMAPS,
    JOBS,
    JOBSETS,
    NS,
    SLOW,
    container,
    ended,
    events,
    get,
    jobset,
    label,
    pod_spec,
    present,
    true_condition,
)
from tests.podbox import RESTART_ATTEMPT, PodBox

POD_NAME = re.compile(r"^ok-node-0-[01]-[bcdfghjklmnpqrstvwxz2456789]{5}$")
READ_JOB_FILE = """
import os, pathlib, sys
job_file, message_file = sys.argv[1], sys.argv[2]
spec = dict(line.split(": ", 1) for line in pathlib.Path(job_file).read_text().splitlines())
text = pathlib.Path(spec["train"]).read_text().strip()
index, pod = os.environ["JOB_COMPLETION_INDEX"], os.environ["POD_NAME"]
print(f"index={index} pod={pod} train={spec['train']} cpus={os.environ['CPUS']}", flush=True)
pathlib.Path(message_file).write_text(f"rank {index} of {pod} read {text}")
"""
SLEEP = "import time; time.sleep(600)"
DISRUPTION_RULE: dict[str, Any] = {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget",
                                                                             "status": "True"}]}
EXIT_2_RULE: dict[str, Any] = {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                                    "values": [2]}}


def running(box: PodBox, prefix: str, attempt: str, count: int) -> list[dict[str, Any]] | None:
    """The gang's pods of one restart attempt, once all `count` of them run."""
    pods = [p for p in box.pods(prefix) if label(p, RESTART_ATTEMPT) == attempt]
    up = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    return up if len(up) == count else None


async def test_indexed_jobset_completes_with_the_pods_own_messages(box: PodBox, api: k8s.Api,
                                                                   workspace: Path) -> None:  # fmt: skip
    (workspace / "data").mkdir()
    (workspace / "data" / "train.tsv").write_text("hello\n")
    await api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ok-spec", "namespace": NS},
                      "data": {"job.yaml": "train: /workspace/data/train.tsv\n"}})  # fmt: skip
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}}]
    trainer = container(READ_JOB_FILE, "/etc/finetune/job.yaml", "/dev/termination-log", env=env,
                        resources={"limits": {"cpu": "1500m"}})  # fmt: skip
    trainer["volumeMounts"].append({"name": "job-spec", "mountPath": "/etc/finetune", "readOnly": True})
    spec = pod_spec(trainer, volumes=[{"name": "job-spec", "configMap": {"name": "ok-spec"}}])
    await api.create(jobset("ok", spec, pods=2))

    done = await box.wait_for(lambda: _finished(api, "ok", "Completed"), SLOW, "JobSet ok Completed")
    assert (done["reason"], done["message"]) == ("AllJobsCompleted", "jobset completed successfully")
    pods = box.pods("ok-node-0-")
    assert [p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods] in (
        ["0", "1"], ["1", "0"])  # fmt: skip
    for pod in pods:
        pod_name, index = pod["metadata"]["name"], pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]
        assert POD_NAME.match(pod_name)
        assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == (f"ok-node-0-{index}", "ok")
        assert pod["status"]["phase"] == "Succeeded"
        assert ended(pod)["exitCode"] == 0 and ended(pod)["reason"] == "Completed"
        assert ended(pod)["message"] == f"rank {index} of {pod_name} read hello"
        assert f"index={index} pod={pod_name} train={workspace}/data/train.tsv cpus=2" in box.log(pod_name)
        assert label(pod, "jobset.sigs.k8s.io/jobset-name") == "ok" and label(pod, RESTART_ATTEMPT) == "0"
    job = await get(api, f"{JOBS}/ok-node-0")
    assert (job["status"]["succeeded"], job["status"]["completedIndexes"]) == (2, "0-1")
    assert true_condition(job, "SuccessCriteriaMet") and true_condition(job, "Complete")
    status = (await get(api, f"{JOBSETS}/ok"))["status"]
    assert status["replicatedJobsStatus"] == [{"name": "node", "ready": 0, "succeeded": 1, "failed": 0,
                                               "active": 0, "suspended": 0}]  # fmt: skip
    assert (status["restarts"], status["terminalState"]) == (0, "Completed")
    service = await get(api, f"/api/v1/namespaces/{NS}/services/ok")
    assert service["spec"]["clusterIP"] == "None"
    assert (await get(api, f"{CONFIGMAPS}/ok-spec"))["data"]["job.yaml"] == "train: /workspace/data/train.tsv\n"
    assert box.errors == []


async def _finished(api: k8s.Api, name: str, kind: str) -> dict[str, Any] | None:
    return true_condition(await api.get(f"{JOBSETS}/{name}"), kind)


async def test_exit_code_2_fails_the_jobset_without_a_restart(box: PodBox, api: k8s.Api) -> None:
    code = ("import os, sys, time\n"
            "if os.environ['JOB_COMPLETION_INDEX'] == '0':\n"
            "    open(sys.argv[1], 'w').write('bad data: no label column'); sys.exit(2)\n"
            "time.sleep(600)")  # fmt: skip
    policy = {"maxRestarts": 3, "rules": [{
        "name": "Permanent", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
        "onJobFailureMessagePatterns": ["failed with exit code 2 matching FailJob rule"]}]}  # fmt: skip
    spec = pod_spec(container(code, "/dev/termination-log"))
    await api.create(jobset("bad", spec, pods=2, failure_policy=policy,
                            pod_failure_policy={"rules": [DISRUPTION_RULE, EXIT_2_RULE]}))  # fmt: skip

    failed = await box.wait_for(lambda: _finished(api, "bad", "Failed"), SLOW, "JobSet bad Failed")
    assert (failed["reason"], failed["message"]) == (
        "FailJobSetFailurePolicyAction", "applying FailJobSet failure policy action (first failed job: bad-node-0)")
    status = (await get(api, f"{JOBSETS}/bad"))["status"]
    assert (status["restarts"], status["restartsCountTowardsMax"], status["terminalState"]) == (0, 0, "Failed")
    [rank0] = [p for p in box.pods("bad-node-0-0-")]
    assert ended(rank0)["exitCode"] == 2
    assert ended(rank0)["message"] == "bad data: no label column"
    job = await get(api, f"{JOBS}/bad-node-0")
    expected = (f"Container trainer for pod {NS}/{rank0['metadata']['name']} failed with exit code 2 matching "
                "FailJob rule at index 1")  # fmt: skip
    for kind in ("FailureTarget", "Failed"):
        cond = true_condition(job, kind)
        assert cond is not None and (cond["reason"], cond["message"]) == ("PodFailurePolicy", expected)
    # Rank 1 was terminated (SIGTERM) and deleted by the Job controller, and counted as failed.
    await box.wait_for(lambda: not box.pods("bad-node-0-1-") and not box.processes(), SLOW, "rank 1 gone")
    assert job["status"]["failed"] == 2
    assert ("Warning", "FailJobSetFailurePolicyAction", failed["message"]) in await events(api, "bad")
    assert box.errors == []


RESTARTING = """
import os, pathlib, sys, time
attempt = os.environ["ATTEMPT"]
print("port", os.environ["PORT"], flush=True)
go = pathlib.Path(sys.argv[1]) / f"go-{attempt}"
while not go.exists():
    time.sleep(0.05)
sys.exit(1)
"""


async def test_a_failure_restarts_the_gang_then_reaches_max_restarts(box: PodBox, api: k8s.Api,
                                                                     workspace: Path) -> None:  # fmt: skip
    env = [{"name": "ATTEMPT", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{RESTART_ATTEMPT}']"}}},
           {"name": "PORT", "value": "29500"}]
    trainer = container(RESTARTING, "/workspace", env=env, ports=[{"name": "rendezvous", "containerPort": 29500}])
    # A rule that does not match (the Job fails by its backoffLimit): the default action, RestartJobSet, applies.
    policy = {"maxRestarts": 1, "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]}
    await api.create(jobset("rs", pod_spec(trainer), pods=2, failure_policy=policy))

    first = await box.wait_for(lambda: running(box, "rs-node-0-", "0", 2), SLOW, "attempt 0 running")
    port0 = box.port(first[0]["metadata"]["name"], 29500)
    await box.wait_for(lambda: f"port {port0}" in box.log(first[0]["metadata"]["name"]), SLOW, "port printed")
    (workspace / "go-0").touch()

    second = await box.wait_for(lambda: running(box, "rs-node-0-", "1", 2), SLOW, "attempt 1 running")
    assert not [p for p in box.pods("rs-node-0-") if label(p, RESTART_ATTEMPT) == "0"]
    status = (await get(api, f"{JOBSETS}/rs"))["status"]
    assert (status["restarts"], status["restartsCountTowardsMax"]) == (1, 1)
    message = "applying RestartJobSet failure policy action (first failed job: rs-node-0)"
    assert ("Warning", "RestartJobSetFailurePolicyAction", message) in await events(api, "rs")
    assert ("Warning", "DefaultFailurePolicy", message) in await events(api, "rs")
    port1 = box.port(second[0]["metadata"]["name"], 29500)
    assert port1 != port0 and box.port(second[1]["metadata"]["name"], 29500) == port1
    await box.wait_for(lambda: f"port {port1}" in box.log(second[0]["metadata"]["name"]), SLOW, "new port")
    # Both pods of the new attempt are Ready: the restart is over.
    restarting = await box.wait_for(lambda: _restarting_false(api), SLOW, "RestartingJobSet False")
    assert (restarting["reason"], restarting["message"]) == ("JobsReady", "all jobs are ready")
    (workspace / "go-1").touch()

    failed = await box.wait_for(lambda: _finished(api, "rs", "Failed"), SLOW, "JobSet rs Failed")
    assert (failed["reason"], failed["message"]) == (
        "ReachedMaxRestarts", "jobset failed due to reaching max number of restarts (first failed job: rs-node-0)")
    assert (await get(api, f"{JOBSETS}/rs"))["status"]["restarts"] == 1
    job = await get(api, f"{JOBS}/rs-node-0")
    assert present(true_condition(job, "Failed"))["reason"] == "BackoffLimitExceeded"
    assert box.errors == []


async def _restarting_false(api: k8s.Api) -> dict[str, Any] | None:
    js = await api.get(f"{JOBSETS}/rs")
    cond = next((c for c in (js or {}).get("status", {}).get("conditions", []) if c["type"] == "RestartingJobSet"),
                None)  # fmt: skip
    return cond if cond is not None and cond["status"] == "False" else None


async def test_a_disruption_restarts_without_using_the_restart_budget(box: PodBox, api: k8s.Api) -> None:
    policy = {"maxRestarts": 0, "rules": [{
        "name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
        "onJobFailureReasons": ["PodFailurePolicy"],
        "onJobFailureMessagePatterns": ["has condition DisruptionTarget matching FailJob rule"]}]}  # fmt: skip
    await api.create(jobset("dis", pod_spec(container(SLEEP)), pods=2, failure_policy=policy,
                            pod_failure_policy={"rules": [DISRUPTION_RULE, EXIT_2_RULE]}))  # fmt: skip
    first = await box.wait_for(lambda: running(box, "dis-node-0-", "0", 2), SLOW, "attempt 0 running")
    victim = next(p["metadata"]["name"] for p in first if p["metadata"]["name"].startswith("dis-node-0-0-"))

    await box.disrupt(victim)
    pod = await get(api, f"/api/v1/namespaces/{NS}/pods/{victim}")
    assert pod["status"]["phase"] == "Failed"
    target = true_condition(pod, "DisruptionTarget")
    assert target is not None and target["reason"] == "PreemptionByScheduler"
    assert ended(pod)["exitCode"] == 143  # SIGTERM

    await box.wait_for(lambda: running(box, "dis-node-0-", "1", 2), SLOW, "attempt 1 running")
    status = (await get(api, f"{JOBSETS}/dis"))["status"]
    assert (status["restarts"], status["restartsCountTowardsMax"]) == (1, 0)
    restarting = next(c for c in status["conditions"] if c["type"] == "RestartingJobSet")
    assert restarting["reason"] == "FailurePolicy_Disruption"
    expected = f"Pod {NS}/{victim} has condition DisruptionTarget matching FailJob rule at index 0"
    assert ("Warning", "PodFailurePolicy", expected) in await events(api, "dis-node-0")
    assert box.errors == []


GANG = """
import os, socket, sys, time
print("rendezvous", sys.argv[1], flush=True)
host, port = sys.argv[1].rsplit(":", 1)
if os.environ["JOB_COMPLETION_INDEX"] == "0":
    server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
    conn, _ = server.accept()
    conn.sendall(b"welcome")
    open(sys.argv[2], "w").write("got " + conn.recv(100).decode())
else:
    deadline = time.monotonic() + 100
    while True:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    conn.sendall(b"hello from 1")
    open(sys.argv[2], "w").write("reply " + conn.recv(100).decode())
"""


async def test_two_pods_of_a_gang_meet_through_the_rendezvous_host(box: PodBox, api: k8s.Api) -> None:
    env = [{"name": "MASTER", "value": f"net-node-0-0.net.{NS}.svc.cluster.local"}, {"name": "PORT", "value": "29500"}]
    trainer = container(GANG, "$(MASTER):$(PORT)", "/dev/termination-log", env=env,
                        ports=[{"name": "rendezvous", "containerPort": 29500}])  # fmt: skip
    await api.create(jobset("net", pod_spec(trainer), pods=2))

    await box.wait_for(lambda: _finished(api, "net", "Completed"), SLOW, "JobSet net Completed")
    [rank0] = box.pods("net-node-0-0-")
    [rank1] = box.pods("net-node-0-1-")
    assert ended(rank0)["message"] == "got hello from 1"
    assert ended(rank1)["message"] == "reply welcome"
    port = box.port(rank0["metadata"]["name"], 29500)
    assert port != 29500 and f"rendezvous 127.0.0.1:{port}" in box.log(rank1["metadata"]["name"])
    assert box.errors == []


async def test_deleting_a_jobset_kills_its_processes(box: PodBox, api: k8s.Api) -> None:
    await api.create(jobset("gone", pod_spec(container(SLEEP)), pods=2))
    await box.wait_for(lambda: running(box, "gone-node-0-", "0", 2), SLOW, "pods running")
    pids = set(box.processes().values())
    assert len(pids) == 2

    await api.delete(f"{JOBSETS}/gone")
    await box.wait_for(lambda: not box.processes() and not box.pods("gone-"), SLOW, "processes and pods gone")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    await box.wait_for(lambda: _gone(api, f"{JOBS}/gone-node-0"), SLOW, "Job gone")
    await box.wait_for(lambda: _gone(api, f"/api/v1/namespaces/{NS}/services/gone"), SLOW, "Service gone")
    assert box.errors == []


async def _gone(api: k8s.Api, path: str) -> bool:
    return await api.get(path) is None


async def test_a_held_pod_waits_until_released(box: PodBox, api: k8s.Api) -> None:
    handle = box.hold("held-")
    await api.create(jobset("held", pod_spec(container("print('ran')")), pods=1))
    [pod] = await box.wait_for(lambda: box.pods("held-node-0-0-"), SLOW, "the pod")
    pod_name = pod["metadata"]["name"]
    # As the scheduler would when no node fits; the box leaves a held pod's status to the test.
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}  # fmt: skip
    await api.merge_patch(f"/api/v1/namespaces/{NS}/pods/{pod_name}/status",
                          {"status": {"phase": "Pending", "conditions": [unschedulable]}})
    await box.wait_for(lambda: box.pods("held-node-0-0-")[0].get("status", {}).get("conditions"), SLOW, "patched")
    assert pod_name not in box.processes() and box.log(pod_name) == ""
    assert box.pods("held-node-0-0-")[0]["status"]["conditions"] == [unschedulable]

    box.release(handle)
    await box.wait_for(lambda: _finished(api, "held", "Completed"), SLOW, "JobSet held Completed")
    assert box.log(pod_name) == "ran\n"


async def test_a_suspended_jobset_runs_nothing_until_resumed(box: PodBox, api: k8s.Api) -> None:
    body = jobset("later", pod_spec(container("print('ran')")), pods=2)
    body["spec"]["suspend"] = True
    await api.create(body)
    job = await box.wait_for(lambda: api.get(f"{JOBS}/later-node-0"), SLOW, "the suspended Job")
    assert job["spec"]["suspend"] is True
    suspended = await box.wait_for(lambda: _finished(api, "later", "Suspended"), SLOW, "JobSet Suspended")
    assert suspended["reason"] == "SuspendedJobs"
    await box.wait_for(lambda: _job_suspended(api), SLOW, "the Job's Suspended condition")
    assert box.pods("later-") == []

    await api.merge_patch(f"{JOBSETS}/later", {"spec": {"suspend": False}})
    await box.wait_for(lambda: _finished(api, "later", "Completed"), SLOW, "JobSet Completed")
    assert [box.log(p["metadata"]["name"]) for p in box.pods("later-")] == ["ran\n", "ran\n"]
    js = await get(api, f"{JOBSETS}/later")
    resumed = next(c for c in js["status"]["conditions"] if c["type"] == "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "ResumeJobs")
    assert box.errors == []


async def _job_suspended(api: k8s.Api) -> dict[str, Any] | None:
    return true_condition(await api.get(f"{JOBS}/later-node-0"), "Suspended")
