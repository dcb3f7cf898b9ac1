"""A spec that can never run in a cluster fails with a message that says what to fix."""

from __future__ import annotations

from typing import Any

import pytest

from finetune.operator.validation import validate_job
from finetune.spec import SpecError


def body(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "sst2", "namespace": "ml"}, "spec": spec}


GOOD: dict[str, Any] = {
    "task": "text-classification",
    "model": {"name": "bert-base-uncased"},
    "dataset": {"train": {"path": "/workspace/data/train.tsv"}},
    "storage": {"claimName": "data"},
}


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"task": "translation"}, ["spec.task", "text-classification"]),
        ({"resources": {"nodes": 0}}, ["spec.resources.nodes", "greater than or equal to 1"]),
        ({"storage": {}}, ["spec.storage.claimName", "PersistentVolumeClaim"]),
        ({"dataset": {"train": {"path": "/data/train.tsv"}}}, ["spec.dataset.train.path", "outside", "/workspace"]),
        ({"dataset": {"train": {"path": "data/train.tsv"}}}, ["relative", "/workspace/data/train.tsv"]),
        ({"dataset": {"train": {"path": "/workspace/../etc/passwd.csv"}}}, ["outside"]),
        ({"model": {"path": "/models/bert"}}, ["spec.model.path", "outside"]),
        ({"storage": {"claimName": "d", "outputPath": "/out"}}, ["spec.storage.outputPath"]),
        ({"dataset": {"train": {"path": "/workspace/train.txt"}}}, ["dataset.format"]),
        ({"model": {}}, ["model.name", "model.path"]),
    ],
)
def test_semantic_errors_say_what_to_fix(changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        validate_job(body({**GOOD, **changes}))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_good_spec_passes() -> None:
    job = validate_job(body({**GOOD, "model": {"path": "/workspace/models/bert"}}))
    assert job.metadata.name == "sst2" and job.metadata.namespace == "ml"
    assert job.spec.model.path == "/workspace/models/bert"


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SpecError) as err:
        validate_job(body({**GOOD, "storage": {}, "dataset": {"train": {"path": "/tmp/t.csv"}}}))
    assert "claimName" in str(err.value) and "dataset.train.path" in str(err.value)


def test_a_name_that_starts_with_a_digit_is_refused_with_a_fix() -> None:
    """`7b-lora` is a valid object name, but the JobSet and the Service it names must be DNS-1035 labels:
    JobSet's webhook (and the API server, for the Service) would refuse them on every retry."""
    with pytest.raises(SpecError, match="metadata.name: '7b-lora' must start with a letter.*'m-7b-lora'"):
        validate_job({"metadata": {"name": "7b-lora", "namespace": "ml"}, "spec": GOOD})
