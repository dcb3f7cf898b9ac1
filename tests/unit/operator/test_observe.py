"""Reading the trainer Job, the rank-0 result and the Deployment rollout."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune.operator import naming, observe


def job(spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    return {"spec": {"completions": 2, **(spec or {})}, "status": status}


@pytest.mark.parametrize(
    ("obj", "phase"),
    [
        (job({"suspend": True}), "queued"),
        (job(active=2), "running"),
        (job(active=1, succeeded=1), "running"),
        (job(succeeded=2), "succeeded"),
        (job(conditions=[{"type": "Complete", "status": "True"}]), "succeeded"),
        (job(conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]), "failed"),
        (job(active=1, conditions=[{"type": "FailureTarget", "status": "True"}]), "failed"),
        (job(conditions=[{"type": "Failed", "status": "False"}], active=1), "running"),
    ],
)
def test_trainer_state(obj: dict[str, Any], phase: str) -> None:
    assert observe.trainer_state(obj).phase == phase


def pod(index: str, phase: str, message: str | None = None, code: int = 0) -> dict[str, Any]:
    terminated = {"exitCode": code, **({"message": message} if message is not None else {})}
    return {
        "metadata": {"name": f"p-{index}-{phase}", "annotations": {naming.COMPLETION_INDEX: index}},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


def test_result_of_rank_zero() -> None:
    metrics = {"f1": 0.9, "n": "x", "nan": float("nan")}
    message = json.dumps({"modelPath": "/workspace/a/run-1", "metrics": metrics, "headlineMetric": "f1"})
    result = observe.trainer_result([pod("1", "Succeeded", "{}"), pod("0", "Succeeded", message)])
    assert isinstance(result, observe.TrainerResult)
    assert result.model_path == "/workspace/a/run-1"
    assert result.metrics == {"f1": 0.9}
    assert result.headline_metric == "f1"


@pytest.mark.parametrize(
    ("pods", "fragment"),
    [
        ([], "gone"),
        ([pod("0", "Succeeded", "")], "without a JSON result"),
        ([pod("0", "Succeeded", "Traceback: boom")], "Traceback: boom"),
        ([pod("1", "Succeeded", '{"modelPath": "/x"}')], "gone"),
    ],
)
def test_missing_result_is_explained(pods: list[dict[str, Any]], fragment: str) -> None:
    result = observe.trainer_result(pods)
    assert isinstance(result, str) and fragment in result


def test_failure_message_names_the_cause_and_the_pod() -> None:
    state = observe.TrainerState("failed", failed=1, reason="PodFailurePolicy", message="exit code 2")
    text = observe.failure_message(state, [pod("0", "Failed", "column 'label' not found", 2)], 3, "j-train-1")
    assert "exited with code 2" in text and "spec or the data is wrong" in text
    assert "column 'label' not found" in text and "kubectl logs job/j-train-1" in text
    state = observe.TrainerState("failed", failed=4, reason="BackoffLimitExceeded")
    assert "backoffLimit (3)" in observe.failure_message(state, [], 3, "j")


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
