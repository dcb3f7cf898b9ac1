"""A plain Job through the box: a killed container's message falls back to its last log lines."""

from __future__ import annotations

import signal
from pathlib import Path

from finetune.operator import k8s
from tests.integration.podbox.builders import (
    JOBS,
    NS,
    SLOW,
    container,
    events,
    get,
    pod_spec,
    terminated,
    true_condition,
)
from tests.podbox import PodBox

CHATTY = """
import time
for i in range(100):
    print(f"line {i:03d} " + "x" * 30, flush=True)
print("ready", flush=True)
time.sleep(600)
"""


async def test_a_sigkilled_container_reports_its_last_log_lines(box: PodBox, api: k8s.Api) -> None:
    trainer = container(CHATTY, terminationMessagePolicy="FallbackToLogsOnError")
    await api.create({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "chatty", "namespace": NS},
        "spec": {"completionMode": "Indexed", "completions": 1, "parallelism": 1, "backoffLimit": 0,
                 "template": {"spec": pod_spec(trainer)}},
    })  # fmt: skip
    [pod] = await box.wait_for(lambda: box.pods("chatty-0-"), SLOW, "the pod")
    pod_name = pod["metadata"]["name"]
    await box.wait_for(lambda: "ready\n" in box.log(pod_name), SLOW, "the log written")

    await box.kill(pod_name, signal.SIGKILL)
    done = await box.wait_for(lambda: _terminated(box, pod_name), SLOW, "the pod terminated")
    assert (done["exitCode"], done["reason"]) == (137, "Error")
    lines = box.log(pod_name).splitlines(keepends=True)
    assert len(lines) == 101
    # The kubelet's fallback: the last 80 lines, then at most their last 2048 bytes.
    expected = "".join(lines[-80:])[-2048:]
    assert len(expected) == 2048 and done["message"] == expected

    failed = await box.wait_for(lambda: _failed(api), SLOW, "Job Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == "Job has reached the specified backoff limit"
    job = await get(api, f"{JOBS}/chatty")
    assert (job["status"]["failed"], job["status"]["active"]) == (1, 0)
    assert true_condition(job, "FailureTarget") is not None
    assert ("Warning", "BackoffLimitExceeded", failed["message"]) in await events(api, "chatty")
    assert box.errors == []


def _terminated(box: PodBox, pod_name: str) -> dict[str, object] | None:
    pods = [p for p in box.pods(pod_name) if p["status"].get("phase") == "Failed"]
    return terminated(pods[0]) if pods else None


async def _failed(api: k8s.Api) -> dict[str, object] | None:
    return true_condition(await api.get(f"{JOBS}/chatty"), "Failed")


def job(name: str, code: str, **spec: object) -> dict[str, object]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS},
            "spec": {"completionMode": "Indexed", "completions": 1, "parallelism": 1,
                     "template": {"spec": pod_spec(container(code))}, **spec}}  # fmt: skip


async def test_a_pod_deleted_by_someone_else_dies_counts_as_failed_and_is_replaced(box: PodBox,
                                                                                    api: k8s.Api) -> None:  # fmt: skip
    await api.create(job("del", "import time; time.sleep(600)", backoffLimit=1))
    [first] = await box.wait_for(lambda: [p for p in box.pods("del-0-") if p["status"].get("phase") == "Running"],
                                 SLOW, "the pod running")  # fmt: skip
    first_name = first["metadata"]["name"]
    pid = box.processes()[first_name]

    await api.delete(f"/api/v1/namespaces/{NS}/pods/{first_name}")
    [second] = await box.wait_for(lambda: [p for p in box.pods("del-0-") if p["metadata"]["name"] != first_name
                                           and p["status"].get("phase") == "Running"], SLOW, "a new pod")  # fmt: skip
    await box.wait_for(lambda: not Path(f"/proc/{pid}").exists(), SLOW, "the old process gone")
    assert second["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
    status = (await get(api, f"{JOBS}/del"))["status"]
    assert (status["failed"], status["active"]) == (1, 1)
    assert box.errors == []


async def test_active_deadline_fails_the_job(box: PodBox, api: k8s.Api) -> None:
    await api.create(job("late", "import time; time.sleep(600)", activeDeadlineSeconds=1))
    failed = await box.wait_for(lambda: _condition(api, "late", "Failed"), SLOW, "Job Failed")
    assert failed["reason"] == "DeadlineExceeded"
    assert failed["message"] == "Job was active longer than specified deadline"
    await box.wait_for(lambda: not box.processes() and not box.pods("late-"), SLOW, "the pod killed and deleted")
    assert box.errors == []


async def _condition(api: k8s.Api, name: str, kind: str) -> dict[str, object] | None:
    return true_condition(await api.get(f"{JOBS}/{name}"), kind)
