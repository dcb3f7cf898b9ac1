"""Reading the trainer JobSet, the node-0 result and the Deployment rollout."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune.contracts import TrainerResult
from finetune.operator import naming, observe


def jobset(spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    return {"spec": {"suspend": False, **(spec or {})}, "status": status}


def cond(type_: str, status: str = "True", **more: str) -> dict[str, str]:
    return {"type": type_, "status": status, **more}


@pytest.mark.parametrize(
    ("obj", "phase"),
    [
        (jobset({"suspend": True}), "queued"),
        (jobset(), "running"),
        (jobset(restarts=1, conditions=[cond("RestartingJobSet")]), "running"),
        (jobset(conditions=[cond("Completed", reason="AllJobsCompleted")]), "succeeded"),
        (jobset(conditions=[cond("Failed", reason="FailJobSetFailurePolicyAction")]), "failed"),
        (jobset(conditions=[cond("Failed", "False")]), "running"),
    ],
)
def test_trainer_state(obj: dict[str, Any], phase: str) -> None:
    assert observe.trainer_state(obj).phase == phase


def test_restart_counts() -> None:
    state = observe.trainer_state(jobset(restarts=3, restartsCountTowardsMax=1))
    assert (state.restarts, state.restarts_counted) == (3, 1)


def pod(index: str, phase: str, message: str | None = None, code: int = 0, attempt: int = 0) -> dict[str, Any]:
    terminated = {"exitCode": code, **({"message": message} if message is not None else {})}
    return {
        "metadata": {"name": f"p-{index}-{phase}-{attempt}", "annotations": {naming.COMPLETION_INDEX: index},
                     "labels": {naming.JOBSET_RESTART_LABEL: str(attempt)}},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


def test_result_of_node_zero_of_the_last_attempt(trained) -> None:
    """Real messages (tests/real_runs.py): node 1's has no result; an older attempt's node 0 is not read."""
    pods = [pod("1", "Succeeded", trained.good_node1), pod("0", "Succeeded", trained.weak),
            pod("0", "Succeeded", trained.good, attempt=1)]
    assert observe.trainer_result(pods) == trained.result("good")
    assert trained.result("good").world_size == 2 and "f1" in trained.result("good").metrics


def test_metrics_keep_finite_numbers_only(trained) -> None:
    """A real run's result, with what a hostile or broken writer could add to its metrics."""
    doc = json.loads(trained.good)
    real = dict(doc["result"]["metrics"])
    doc["result"]["metrics"] |= {"n": "x", "nan": float("nan"), "flag": True}
    result = TrainerResult.model_validate(doc["result"])
    assert result.metrics == real and "f1" in real


@pytest.mark.parametrize(
    ("pods", "fragment"),
    [
        ([], "gone"),
        ([("0", "")], "without a result"),
        ([("0", "killed_log")], "killed_log"),  # the kubelet's fallback: the last log lines, no JSON
        ([("0", "good_node1")], "without a result"),
        ([("1", "good")], "gone"),
    ],
)
def test_missing_result_is_explained(trained, pods: list[tuple[str, str]], fragment: str) -> None:
    """`pods`: (completion index, termination message or the name of a real run's message)."""
    found = [pod(index, "Succeeded", getattr(trained, text, text)) for index, text in pods]
    result = observe.trainer_result(found)
    # The log is quoted (its start, white space collapsed) as what was found instead of a result.
    expected = " ".join(trained.killed_log.split())[:60] if fragment == "killed_log" else fragment
    assert isinstance(result, str) and expected in result


@pytest.mark.parametrize(
    ("meta", "status", "replicas", "ready"),
    [
        ({}, {"updatedReplicas": 2, "availableReplicas": 2}, 2, True),
        ({}, {"updatedReplicas": 1, "availableReplicas": 2}, 2, False),
        ({"generation": 3}, {"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 2}, 2, False),
        ({"generation": 3}, {"observedGeneration": 3, "updatedReplicas": 2, "availableReplicas": 2}, 2, True),
        ({}, {}, 0, True),
    ],
)
def test_deployment_ready(meta: dict[str, Any], status: dict[str, Any], replicas: int, ready: bool) -> None:
    assert observe.deployment_ready({"metadata": meta, "status": status}, replicas) is ready


def test_rollout_problem() -> None:
    stuck = {"status": {"conditions": [
        {"type": "Available", "status": "True"},
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "s-1" has timed out progressing.'},
    ]}}  # fmt: skip
    assert observe.rollout_problem(stuck) == 'ProgressDeadlineExceeded: ReplicaSet "s-1" has timed out progressing.'
    fine = {"status": {"conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}}
    assert observe.rollout_problem(fine) is None
    assert observe.rollout_problem({}) is None
