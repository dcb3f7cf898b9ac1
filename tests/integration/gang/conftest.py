"""Operator, trainer and server together, without a cluster: kopf for real against kmock's emulator, and
the pods the operator's JobSet and Deployment imply run for real by the pods-in-a-box harness
(tests/podbox): each trainer pod is the exact container command and env of the built JobSet, the server
is the Deployment's command. Nothing the operator reads is written by a test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest

from finetune.operator import k8s, naming
from finetune.operator.testing import FAST_CONFIG, running_operator
from tests.integration.synthetic import synthetic_rows, write_tsv
from tests.podbox import PodBox

NS = "ml"
FTJS = f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs"
# Every scenario runs real training processes on 2 shared cores: bounds are generous, never tight.
RUN_BOUND = 600.0



@pytest.fixture()
def workspace(tmp_path: Path, tiny_bert: Path) -> Path:
    """The `data` claim's folder: a base model and a small data set, as a user would have put there."""
    folder = tmp_path / "workspace"
    shutil.copytree(tiny_bert, folder / "models" / "tiny")
    (folder / "data").mkdir()
    write_tsv(folder / "data" / "train.tsv", synthetic_rows(400, seed=1), ("review", "sentiment", "locale"))
    return folder


@dataclasses.dataclass
class Gang:
    """The user, with the operator and the box running."""

    api: k8s.Api
    box: PodBox
    workspace: Path

    async def apply(self, name: str, **sections: Any) -> None:
        """`kubectl apply` of a small CPU FineTuneJob; keyword arguments merge into its spec sections."""
        spec: dict[str, Any] = {
            "task": "text-classification",
            "model": {"path": "/workspace/models/tiny"},
            "dataset": {"train": {"path": "/workspace/data/train.tsv"}, "textColumn": "review",
                        "labelColumn": "sentiment"},
            "training": {"epochs": 6, "batchSize": 16, "learningRate": 3e-3, "maxLength": 32, "warmupRatio": 0.0,
                         "logSteps": 5},
            "resources": {"nodes": 2, "gpusPerNode": 0, "cpu": "1"},
            "storage": {"claimName": "data"},
            "promotion": {"minValue": 0.6},
            "serving": {"replicas": 1},
        }
        for key, value in sections.items():
            spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
        body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1}, "spec": spec}
        await self.api.create(body)

    async def status(self, name: str) -> dict[str, Any]:
        return ((await self.api.get(f"{FTJS}/{name}")) or {}).get("status") or {}

    async def wait_phase(self, name: str, *phases: str, timeout: float = RUN_BOUND) -> dict[str, Any]:
        """Wait until the phase is one of `phases`; a terminal phase that is not wanted fails at once."""
        terminal = {"Failed", "Rejected", "Succeeded", "Serving"}

        async def check() -> dict[str, Any] | None:
            status = await self.status(name)
            if status.get("phase") in phases:
                return status
            if status.get("phase") in terminal - set(phases):
                raise AssertionError(f"{name} ended {status.get('phase')}: {json.dumps(status, indent=1)}")
            return None

        try:
            found: dict[str, Any] = await self.box.wait_for(check, timeout, f"{name} in {phases}")
        except AssertionError as err:
            status = json.dumps(await self.status(name), indent=1)
            raise AssertionError(f"{err}\nstatus: {status}\n{self.logs()}") from None
        return found

    def logs(self, lines: int = 30) -> str:
        """The last log lines of every pod, for a failure message."""
        parts = []
        for pod in self.box.pods():
            text = self.box.log(pod["metadata"]["name"]).splitlines()[-lines:]
            parts.append(f"--- {pod['metadata']['name']} ({pod['status'].get('phase')})\n" + "\n".join(text))
        return "\n".join(parts)

    def trainer_pods(self, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
        pods = self.box.pods(naming.trainer_name(name, 1))
        if attempt is None:
            return pods
        return [p for p in pods if p["metadata"]["labels"].get(naming.JOBSET_RESTART_LABEL) == str(attempt)]

    def output(self, name: str) -> Path:
        return self.workspace / name / "run-1"

    def metrics(self, name: str) -> dict[str, Any]:
        return json.loads((self.output(name) / "metrics.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture()
async def gang(
    cluster: kmock.KubernetesEmulator, api: k8s.Api, workspace: Path, tmp_path: Path
) -> AsyncIterator[Gang]:
    async with (
        PodBox(api, root=tmp_path / "box", claims={"data": workspace}, namespace_filter=(NS,),
               grace_seconds=10.0) as box,
        running_operator(cluster, FAST_CONFIG),
    ):
        yield Gang(api, box, workspace)
        assert not box.errors, box.errors
