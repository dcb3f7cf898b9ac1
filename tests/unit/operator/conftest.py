"""A small fixture builder for typed FineTuneJobs (JobSet's test wrappers, in Python)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from finetune.spec import FineTuneJob, ObjectMeta, parse_spec

BASE_SPEC: dict[str, Any] = {
    "task": "text-classification",
    "model": {"name": "distilbert-base-uncased"},
    "dataset": {"train": {"path": "/workspace/data/train.tsv"}},
    "storage": {"claimName": "data"},
}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_job(name: str = "sst2", namespace: str = "ml", **changes: Any) -> FineTuneJob:
    """A valid FineTuneJob; keyword arguments deep-merge into the spec (camelCase keys)."""
    return FineTuneJob(metadata=ObjectMeta(name=name, namespace=namespace), spec=parse_spec(merge(BASE_SPEC, changes)))


@pytest.fixture()
def job_builder() -> Callable[..., FineTuneJob]:
    return make_job
