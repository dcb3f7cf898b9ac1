"""Fixtures for the integration tests: kmock's fast emulator, small data files and job files (the tiny
BERT and the real trainer runs are session fixtures in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from finetune.operator import k8s
from finetune.operator.testing import FastEmulator, declare, server_url
from tests.integration.synthetic import synthetic_rows, write_tsv


@pytest.fixture()
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """kmock's `kmock` fixture, with the emulator that stays fast for hundreds of objects."""
    return {**kmock_options, "cls": FastEmulator}


NS = "ml"


@pytest.fixture()
def cluster(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    """The emulator with every resource the operator uses, the namespace `ml` and its claim `data`."""
    declare(kmock, namespaces=(NS,))
    kmock.objects["v1/persistentvolumeclaims", NS, "data"] = {"metadata": {"name": "data", "namespace": NS}}
    return kmock


@pytest.fixture()
async def api(cluster: kmock.KubernetesEmulator) -> AsyncIterator[k8s.Api]:
    """Our own client, used by the tests to act as controllers and the user."""
    async with k8s.Api(k8s.Cluster(server=server_url(cluster))) as client:
        yield client


@pytest.fixture
def synthetic_data(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "train.tsv", synthetic_rows(400, seed=1), ("review", "sentiment", "locale"))


@pytest.fixture
def write_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a FineTuneJob YAML for the tiny model; keyword arguments override spec sections."""

    def write(model_path: Path, train_path: Path, name: str = "tiny", **sections: Any) -> Path:
        spec: dict[str, Any] = {
            "task": "text-classification",
            "model": {"path": str(model_path)},
            "dataset": {"train": {"path": str(train_path)}, "textColumn": "review", "labelColumn": "sentiment"},
            "training": {"epochs": 4, "batchSize": 16, "learningRate": 3e-3, "maxLength": 32, "logSteps": 5,
                         "warmupRatio": 0.0},
        }
        for key, value in sections.items():
            spec[key] = {**spec.get(key, {}), **value}
        job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
               "spec": spec}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    return write
