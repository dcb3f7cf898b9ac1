"""kopf for real, in-process, against kmock's Kubernetes emulator.

The emulator runs no controllers, so these tests play the JobSet and Job controllers, the kubelet and
the Deployment controller by patching child status, then assert what the operator did. What the trainer
reports (its termination message) always comes from a real `finetune train` run of the exact command
the operator puts in the trainer pods (`trained`, once per test session); `tests/integration/podbox`
runs the whole gang for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kmock
import kopf
import pytest

from finetune.operator import builders, k8s, naming
from finetune.operator.testing import FAST_CONFIG, running_operator
from tests.real_runs import Trained

NS = "ml"
FTJS = f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs"
JOBSETS = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"


def spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec; keyword arguments replace whole top-level sections."""
    base: dict[str, Any] = {
        "task": "text-classification",
        "model": {"name": "distilbert-base-uncased"},
        "dataset": {"train": {"path": "/workspace/data/train.tsv"}, "test": {"path": "/workspace/data/test.tsv"}},
        "storage": {"claimName": "data"},
        "training": {"epochs": 1},
        "promotion": {"minValue": 0.8},
        "serving": {"replicas": 2},
    }
    base.update(overrides)
    return base


def ftj(name: str, uid: str | None = None, **overrides: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS, "uid": uid or f"uid-{name}", "generation": 1,
                     "resourceVersion": "1"},
        "spec": spec(**overrides),
    }


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 60.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last: {last!r}")


def pod(owner: str, run: int, index: int, phase: str, terminated: dict[str, Any] | None,
        conditions: list[dict[str, Any]] | None = None, attempt: int = 0,
        waiting: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trainer pod as the JobSet and Job controllers and the kubelet would leave it."""
    jobset = naming.trainer_name(owner, run)
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    state = {"terminated": terminated} if terminated is not None else {"waiting": waiting} if waiting else {}
    status["containerStatuses"] = [{"name": "trainer", "image": "img:1", "state": state}]
    labels = {**naming.run_labels(owner, run), naming.COMPLETION_INDEX: str(index),
              naming.JOBSET_NAME_LABEL: jobset, naming.JOBSET_RESTART_LABEL: str(attempt)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{jobset}-{builders.REPLICATED_JOB}-0-{index}-a{attempt}{phase.lower()[:3]}",
            "namespace": NS,
            "labels": labels,
            "annotations": {naming.COMPLETION_INDEX: str(index)},
        },
        "status": status,
    }


class Kube:
    """The user and the missing controllers, acting through real HTTP on the emulator."""

    def __init__(self, emulator: kmock.KubernetesEmulator, api: k8s.Api, trained: Trained) -> None:
        self.emulator = emulator
        self.api = api
        self.trained = trained

    spec = staticmethod(spec)
    ftj = staticmethod(ftj)
    eventually = staticmethod(eventually)

    def operator(self, **overrides: Any) -> contextlib.AbstractAsyncContextManager[kopf.Memo]:
        """Run an operator (FAST_CONFIG, with `overrides`) for the duration of an `async with`."""
        return running_operator(self.emulator, dataclasses.replace(FAST_CONFIG, **overrides))

    async def create(self, name: str, **overrides: Any) -> dict[str, Any]:
        return await self.api.create(ftj(name, **overrides))

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.api.get(path)

    async def status(self, name: str) -> dict[str, Any]:
        body = await self.api.get(f"{FTJS}/{name}")
        return (body or {}).get("status") or {}

    async def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status = await self.status(name)
            return status if status.get("phase") == phase else None

        return await eventually(check, timeout, f"{name} phase {phase}")  # type: ignore[no-any-return]

    async def wait_jobset(self, name: str, run: int = 1) -> dict[str, Any]:
        path = f"{JOBSETS}/{naming.trainer_name(name, run)}"
        found: dict[str, Any] = await eventually(lambda: self.api.get(path), what=f"trainer JobSet of {name} run {run}")
        return found

    async def edit(self, name: str, **spec_changes: Any) -> None:
        """The user edits the spec (kmock does not count generations, so the edit bumps it)."""
        body = await self.api.get(f"{FTJS}/{name}")
        assert body is not None
        generation = int(body["metadata"].get("generation") or 1) + 1
        await self.api.merge_patch(f"{FTJS}/{name}", {"metadata": {"generation": generation}, "spec": spec_changes})

    async def delete(self, name: str) -> None:
        await self.api.delete(f"{FTJS}/{name}")

    def events(self, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events on one FineTuneJob, oldest first."""
        found = []
        for (res, _ns, key), obj in self.emulator.objects.items():
            mine = obj.get("involvedObject", {}).get("name") == name if not obj.deleted else False
            if getattr(res, "plural", None) == "events" and mine and obj.get("reason"):
                found.append((key, obj["type"], obj["reason"], obj["message"]))
        return [item[1:] for item in sorted(found)]

    async def wait_events(self, name: str, check: Callable[[list[tuple[str, str, str]]], bool],
                          what: str) -> list[tuple[str, str, str]]:
        """The Events of `name` once `check` holds for them: an Event is posted after the status write."""
        async def events() -> list[tuple[str, str, str]] | None:
            found = self.events(name)
            return found if check(found) else None

        return await eventually(events, what=what)  # type: ignore[no-any-return]

    def live(self, plural: str, prefix: str = "") -> list[str]:
        """Names of live objects of one resource (by plural) in the emulator's store."""
        return sorted(
            key for (res, ns, key), obj in self.emulator.objects.items()
            if getattr(res, "plural", None) == plural and not obj.deleted and key.startswith(prefix)
        )

    def stored(self, plural: str, name: str) -> dict[str, Any]:
        for (res, _ns, key), obj in self.emulator.objects.items():
            if getattr(res, "plural", None) == plural and key == name and not obj.deleted:
                return dict(obj.raw)
        raise AssertionError(f"no live {plural}/{name}")

    async def set_jobset_status(self, name: str, status: dict[str, Any]) -> None:
        await self.api.merge_patch(f"{JOBSETS}/{name}/status", {"status": status})

    async def add_pod(self, owner: str, run: int, index: int, phase: str, *, code: int | None = None,
                      message: str = "", conditions: list[dict[str, Any]] | None = None, attempt: int = 0,
                      waiting: dict[str, Any] | None = None, finished: str | None = None) -> dict[str, Any]:
        terminated = None
        if code is not None:
            terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                          **({"finishedAt": finished} if finished else {})}
        return await self.api.create(pod(owner, run, index, phase, terminated, conditions, attempt, waiting))

    async def finish_training(self, owner: str, run: int = 1, which: str = "good") -> str:
        """Kubelet + JobSet controller: node 0 leaves a real trainer's result, then the JobSet completes."""
        await self.add_pod(owner, run, 0, "Succeeded", code=0, message=getattr(self.trained, which))
        await self.set_jobset_status(naming.trainer_name(owner, run), {"conditions": [
            {"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}]})
        return str(self.trained.result(which).model_path)

    async def roll_out(self, owner: str, replicas: int = 2) -> None:
        """Deployment controller: every replica updated and available."""
        name = naming.server_name(owner)
        await eventually(lambda: self.api.get(f"{DEPLOYMENTS}/{name}"), what=f"Deployment {name}")
        await self.api.merge_patch(f"{DEPLOYMENTS}/{name}/status", {"status": {
            "replicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas,
            "readyReplicas": replicas}})


@pytest.fixture()
async def kube(cluster: kmock.KubernetesEmulator, api: k8s.Api, trained: Trained) -> Kube:
    return Kube(cluster, api, trained)


@pytest.fixture()
async def running(kube: Kube) -> AsyncIterator[kopf.Memo]:
    async with kube.operator() as memo:
        yield memo
