"""Conditions keep their transition time; status patches send exactly what was set."""

from __future__ import annotations

from finetune.operator import phases
from finetune.status import Trainer


def test_transition_time_moves_only_on_a_status_change() -> None:
    first = phases.with_condition([], "Trained", "Unknown", "NewRun")
    first[0] = first[0].model_copy(update={"last_transition_time": "2020-01-01T00:00:00Z"})
    same = phases.with_condition(first, "Trained", "Unknown", "StillRunning", "msg")
    assert same[0].last_transition_time == "2020-01-01T00:00:00Z" and same[0].reason == "StillRunning"
    moved = phases.with_condition(first, "Trained", "True", "TrainerSucceeded")
    assert moved[0].last_transition_time != "2020-01-01T00:00:00Z"
    assert [c.type for c in phases.with_condition(moved, "Ready", "False", "Training")] == ["Trained", "Ready"]


def test_status_patch_sends_set_fields_and_nulls() -> None:
    patch = phases.status_patch(phase="Training", training=None, trainer=Trainer(job_set_name="j", run=2))
    assert patch == {
        "status": {
            "phase": "Training",
            "training": None,
            "trainer": {"jobSetName": "j", "run": 2, "active": 0, "succeeded": 0, "failed": 0, "restarts": 0,
                        "restartsCounted": 0, "restartBudget": 0, "failures": []},
        }
    }


def test_conditions_drop_empty_fields() -> None:
    conditions = phases.with_condition([], "Ready", "False", "Training")
    patch = phases.status_patch(conditions=conditions)
    assert "observedGeneration" not in patch["status"]["conditions"][0]


def test_read_status_survives_foreign_and_broken_fields() -> None:
    status = phases.read_status(
        {"phase": "Training", "kopf": {"progress": {}}, "progress": "3/10", "metrics": {"f1": "not a number"}}
    )
    assert status.phase == "Training" and status.progress == "3/10" and status.metrics == {}
    assert phases.read_status(None).phase is None


def test_event_manifest_is_a_valid_event() -> None:
    import kubernetes_validate

    body = {"metadata": {"name": "sst2", "namespace": "ml", "uid": "u1"}}
    first = phases.event_manifest(body, "Warning", "Rejected", "f1=0.7 is below 0.8", "op-0")
    second = phases.event_manifest(body, "Normal", "Serving", "x" * 5000, "op-0")
    kubernetes_validate.validate(first, "1.31", strict=True)
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["involvedObject"] == {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "sst2", "namespace": "ml", "uid": "u1",
    }
    assert len(second["message"]) == 1024
