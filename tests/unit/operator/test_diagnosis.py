"""Diagnosis from pods and Workloads: the first failed rank, pods that cannot start, Kueue's words."""

from __future__ import annotations

from typing import Any

from finetune.contracts import one_line
from finetune.operator import diagnosis, naming, observe


def trainer_pod(
    name: str,
    index: int,
    *,
    attempt: int = 0,
    phase: str = "Failed",
    code: int | None = None,
    message: str = "",
    finished: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    waiting: dict[str, str] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if code is not None:
        state["terminated"] = {"exitCode": code, "reason": "Error" if code else "Completed", "message": message,
                               **({"finishedAt": finished} if finished else {})}
    if waiting is not None:
        state["waiting"] = waiting
    return {
        "metadata": {"name": name, "labels": {naming.JOBSET_RESTART_LABEL: str(attempt)},
                     "annotations": {naming.COMPLETION_INDEX: str(index)}},
        "status": {"phase": phase, "conditions": conditions or [],
                   "containerStatuses": [{"name": "trainer", "image": "img:1", "state": state}]},
    }


# Termination messages and logs are real runs' (tests/real_runs.py, the `trained` session fixture); only
# what the kubelet and the scheduler would write around them (times, conditions, states) is written here.


def shown(line: str) -> str:
    return one_line(line, diagnosis.LOG_LINE_CHARS)


def test_a_permanent_error_keeps_the_trainers_own_line(trained) -> None:
    failure = diagnosis.pod_failure(trainer_pod("p-0", 0, code=2, message=trained.bad_data))
    assert failure is not None
    assert failure.reason == "PermanentError" and failure.exit_code == 2 and failure.node_rank == 0
    assert failure.message.startswith("dataset.labelColumn: column 'stars' not found")
    expected_tail = trained.message("bad_data").log_tail[-diagnosis.LOG_LINES:]
    assert failure.log_tail and failure.log_tail == [shown(line) for line in expected_tail]
    assert failure.counts_against_budget


def test_a_killed_pod_without_a_message_shows_its_last_log_lines(trained) -> None:
    failure = diagnosis.pod_failure(trainer_pod("p-1", 1, code=137, message=trained.killed_log))
    assert failure is not None
    lines = [line for line in trained.killed_log.splitlines() if line.strip()]
    assert failure.message == "exited with code 137" and failure.log_tail[-1] == shown(lines[-1])
    assert len(failure.log_tail) == min(diagnosis.LOG_LINES, len(lines))


def test_a_disruption_does_not_count() -> None:
    disrupted = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                  "message": "Preempted in order to admit critical pod", "lastTransitionTime": "2026-01-01T00:00:05Z"}]
    failure = diagnosis.pod_failure(trainer_pod("p-0", 0, code=143, conditions=disrupted))
    assert failure is not None
    assert failure.reason == "PreemptionByScheduler" and not failure.counts_against_budget
    assert "Preempted in order to admit critical pod" in failure.message
    assert diagnosis.pod_failure(trainer_pod("p-0", 0, phase="Running")) is None
    assert diagnosis.pod_failure(trainer_pod("p-0", 0, phase="Succeeded", code=0)) is None


def test_the_first_failure_of_each_attempt_wins_by_time(trained) -> None:
    victim = trainer_pod("p-0", 0, code=76, message=trained.peer_lost, finished="2026-01-01T00:00:09Z")
    cause = trainer_pod("p-1", 1, code=137, message=trained.killed_log, finished="2026-01-01T00:00:03Z")
    later = trainer_pod("q-1", 1, attempt=1, code=137, message=trained.killed_log, finished="2026-01-01T00:01:00Z")
    # Seen in any order: the victim first, then the root cause, then the next attempt's failure.
    known = diagnosis.merge_failures([], [victim])
    assert [f.pod for f in known] == ["p-0"]
    known = diagnosis.merge_failures(known, [cause, victim])
    assert [f.pod for f in known] == ["p-1"]
    known = diagnosis.merge_failures(known, [later])  # the first attempt's pods are gone by now
    assert [(f.attempt, f.pod) for f in known] == [(0, "p-1"), (1, "q-1")]
    assert "pod p-1 (rank 1) exited with code 137" in diagnosis.describe(known[0])


def test_failures_are_capped() -> None:
    pods = [trainer_pod(f"p{i}", 0, attempt=i, code=1, finished=f"2026-01-01T00:{i:02d}:00Z") for i in range(15)]
    kept = diagnosis.merge_failures([], pods)
    assert len(kept) == diagnosis.KEPT_FAILURES and kept[-1].attempt == 14


def test_pods_that_cannot_start() -> None:
    pending = trainer_pod("p-1", 1, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    problem = diagnosis.pod_problem([pending], attempt=0)
    assert problem is not None and problem.reason == "Unschedulable"
    assert "p-1 cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in problem.message
    pulling = trainer_pod("p-0", 0, phase="Pending", waiting={
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "img:1"'})
    problem = diagnosis.pod_problem([pending, pulling], attempt=0)
    assert problem is not None and problem.reason == "ImagePullBackOff" and "(image img:1)" in problem.message
    assert diagnosis.pod_problem([pending], attempt=1) is None  # an old attempt's pod says nothing now
    assert diagnosis.pod_problem([trainer_pod("p-0", 0, phase="Running")], attempt=0) is None


def test_kueue_says_why_it_waits() -> None:
    workload = {
        "metadata": {"name": "jobset-sst2-train-1-3f2a1",
                     "ownerReferences": [{"kind": "JobSet", "name": "sst2-train-1"}]},
        "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                   "message": "couldn't assign flavors to pod set node: insufficient unused quota "
                                              "for nvidia.com/gpu in flavor h100, 8 more needed"}]},
    }
    other = {**workload, "metadata": {"name": "x", "ownerReferences": [{"kind": "JobSet", "name": "other"}]}}
    text = diagnosis.kueue_message([other, workload], "sst2-train-1")
    assert text is not None and "insufficient unused quota for nvidia.com/gpu" in text
    assert diagnosis.kueue_message([other], "sst2-train-1") is None


def test_failed_messages(trained) -> None:
    permanent = diagnosis.merge_failures([], [trainer_pod("p-0", 0, code=2, message=trained.bad_data)])
    state = observe.TrainerState("failed", 0, 0, "FailJobSetFailurePolicyAction", "applying FailJobSet")
    reason, text = diagnosis.failed_message(state, permanent, 3, "j-train-1", "PodFailurePolicy")
    assert reason == "PermanentError"
    assert "column 'stars' not found" in text and "retry cannot fix" in text and "kubectl logs p-0" in text
    crashes = diagnosis.merge_failures([], [trainer_pod("p-1", 1, code=137, message="")])
    state = observe.TrainerState("failed", 3, 3, "ReachedMaxRestarts", "jobset failed due to reaching max")
    reason, text = diagnosis.failed_message(state, crashes, 3, "j-train-1", "BackoffLimitExceeded")
    assert reason == "BackoffLimitExceeded" and "failed 4 times" in text and "allows 3 restart(s)" in text
    state = observe.TrainerState("failed", 0, 0, "FailJobSetFailurePolicyAction", "")
    reason, text = diagnosis.failed_message(state, crashes, 3, "j-train-1", "DeadlineExceeded")
    assert reason == "DeadlineExceeded" and "activeDeadlineSeconds" in text
    note = diagnosis.restart_note(2, 1, 3, crashes)
    assert note.startswith("restart 2 (1 of 3 allowed failure restarts used) after pod p-1 (rank 1)")


def test_victims_never_hide_the_cause(trained) -> None:
    """A rank that lost its peer (exit 76) or was stopped by a deletion ends first at times, or in the
    same second, or on a node whose clock runs ahead: the cause still wins."""
    lost = trainer_pod("p-0", 0, code=76, message=trained.peer_lost, finished="2026-01-01T00:00:01Z")
    stopped = trainer_pod("p-2", 2, code=143, finished="2026-01-01T00:00:01Z")
    stopped["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    cause = trainer_pod("p-1", 1, code=137, message=trained.killed_log, finished="2026-01-01T00:00:04Z")
    for order in ([lost, stopped, cause], [cause, lost, stopped], [stopped, cause, lost]):
        [first] = diagnosis.merge_failures([], order)
        assert first.pod == "p-1", [diagnosis.pod_failure(p) for p in order]
    [victim] = diagnosis.merge_failures([], [lost])
    assert victim.reason == "PeerLost"  # alone, it is still shown (nothing better is known)


def test_a_permanent_error_wins_over_an_earlier_failure(trained) -> None:
    early = trainer_pod("p-1", 1, code=137, message=trained.killed_log, finished="2026-01-01T00:00:01Z")
    permanent = trainer_pod("p-0", 0, code=2, message=trained.bad_data, finished="2026-01-01T00:00:09Z")
    [first] = diagnosis.merge_failures([], [early, permanent])
    assert first.reason == "PermanentError"


def test_a_pod_the_kubelet_rejected_says_why() -> None:
    rejected = {"metadata": {"name": "p-0", "annotations": {naming.COMPLETION_INDEX: "0"}},
                "status": {"phase": "Failed", "reason": "OutOfnvidia.com/gpu",
                           "message": "Pod Node didn't have enough resource: nvidia.com/gpu"}}
    failure = diagnosis.pod_failure(rejected)
    assert failure is not None and failure.reason == "OutOfnvidia.com/gpu"
    assert "didn't have enough resource" in failure.message
