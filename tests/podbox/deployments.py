"""The Deployment controller (apps/v1), after kubernetes pkg/controller/deployment, with the ReplicaSet layer
folded in: pods belong to the Deployment directly, named and labelled as their ReplicaSet would name them."""

from __future__ import annotations

import json
import math
import time

from tests.podbox.kube import (
    DEPLOYMENTS,
    JSON,
    PODS,
    Core,
    Snapshot,
    is_true,
    labels,
    meta,
    name,
    namespace,
    now,
    owner_reference,
    random_suffix,
    uid,
)
from tests.podbox.kubelet import Kubelet

HASH_LABEL = "pod-template-hash"
ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
DEFAULT_PROGRESS_DEADLINE = 600


def template_hash(template: JSON) -> str:
    """FNV-32a of the template, encoded as rand.SafeEncodeString does (a ReplicaSet's name suffix)."""
    value = 0x811C9DC5
    for byte in json.dumps(template, sort_keys=True).encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(ALPHANUMS[ord(c) % len(ALPHANUMS)] for c in str(value))


def _scaled(value: int | str | None, replicas: int, default: str, round_up: bool) -> int:
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        exact = int(value[:-1]) * replicas / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def rolling_parameters(spec: JSON, replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable): percentages of replicas, surge rounded up, unavailable down; never both 0."""
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    surge = _scaled(rolling.get("maxSurge"), replicas, "25%", round_up=True)
    unavailable = _scaled(rolling.get("maxUnavailable"), replicas, "25%", round_up=False)
    return surge, 1 if surge == 0 and unavailable == 0 else unavailable


def pod_ready(pod: JSON) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and is_true(status.get("conditions") or [], "Ready")


def set_condition(conditions: list[JSON], kind: str, status: bool, reason: str, message: str) -> list[JSON]:
    """A Deployment condition: lastTransitionTime changes with the status, lastUpdateTime with the reason."""
    value, stamp = ("True" if status else "False"), now()
    current = next((c for c in conditions if c.get("type") == kind), None)
    if current is not None and (current["status"], current.get("reason"), current.get("message")) == (
        value, reason, message):
        return conditions
    transition = current["lastTransitionTime"] if current is not None and current["status"] == value else stamp
    fresh = {"type": kind, "status": value, "reason": reason, "message": message, "lastUpdateTime": stamp,
             "lastTransitionTime": transition}  # fmt: skip
    return [c for c in conditions if c.get("type") != kind] + [fresh]


class DeploymentController:
    def __init__(self, core: Core, kubelet: Kubelet) -> None:
        self.core, self.kubelet = core, kubelet
        self.seen: dict[str, tuple[str, int]] = {}  # uid → (spec, generation) last seen
        self.progress: dict[str, tuple[tuple[int, ...], float]] = {}  # uid → (counts, when they last changed)

    async def sync(self, snap: Snapshot) -> None:
        for deployment in snap.of(DEPLOYMENTS):
            await self._sync(deployment, snap)

    async def _generation(self, deployment: JSON) -> int:
        """The emulator never bumps metadata.generation, so the box plays the API server: a spec that changed
        (and whose writer did not bump it) gets generation + 1; a new Deployment gets 1."""
        spec = json.dumps(deployment.get("spec") or {}, sort_keys=True)
        generation = int(meta(deployment).get("generation") or 0)
        previous = self.seen.get(uid(deployment))
        bump = generation == 0 or (previous is not None and previous[0] != spec and previous[1] == generation)
        if bump:
            generation += 1
            await self.core.patch(DEPLOYMENTS.path(deployment), {"metadata": {"generation": generation}})
        self.seen[uid(deployment)] = (spec, generation)
        return generation

    async def _sync(self, deployment: JSON, snap: Snapshot) -> None:
        generation = await self._generation(deployment)
        spec = deployment.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        template_key = template_hash(spec.get("template") or {})
        pods = [p for p in snap.owned(PODS, uid(deployment)) if uid(p) not in self.kubelet.terminating]
        for pod in pods:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                self.kubelet.begin_delete(pod)  # a terminated pod is replaced, as a ReplicaSet does
        alive = [p for p in pods if uid(p) not in self.kubelet.terminating]
        new = [p for p in alive if labels(p).get(HASH_LABEL) == template_key]
        old = [p for p in alive if p not in new]
        if not spec.get("paused"):
            if (spec.get("strategy") or {}).get("type") == "Recreate":
                await self._recreate(deployment, template_key, replicas, new, old)
            else:
                await self._roll(deployment, template_key, replicas, new, old)
        await self._status(deployment, generation, replicas, template_key, new, alive)

    async def _recreate(self, deployment: JSON, key: str, replicas: int, new: list[JSON], old: list[JSON]) -> None:
        for pod in old:
            self.kubelet.begin_delete(pod)
        if not old:
            await self._scale_new(deployment, key, replicas, new)

    async def _roll(self, deployment: JSON, key: str, replicas: int, new: list[JSON], old: list[JSON]) -> None:
        """RollingUpdate: at most replicas + maxSurge pods, at least replicas - maxUnavailable ready ones."""
        surge, unavailable = rolling_parameters(deployment.get("spec") or {}, replicas)
        room = replicas + surge - len(new) - len(old)
        if len(new) < replicas and room > 0:
            await self._scale_new(deployment, key, min(replicas, len(new) + room), new)
        elif len(new) > replicas:
            await self._scale_new(deployment, key, replicas, new)
        for pod in [p for p in old if not pod_ready(p)]:
            self.kubelet.begin_delete(pod)  # an unready old pod serves nobody
        ready_old = [p for p in old if pod_ready(p)]
        removable = sum(map(pod_ready, new)) + len(ready_old) - (replicas - unavailable)
        for pod in ready_old[: max(removable, 0)]:
            self.kubelet.begin_delete(pod)

    async def _scale_new(self, deployment: JSON, key: str, want: int, new: list[JSON]) -> None:
        for pod in sorted(new, key=pod_ready)[: max(len(new) - want, 0)]:  # unready ones go first
            self.kubelet.begin_delete(pod)
        template = deployment["spec"].get("template") or {}
        for _ in range(want - len(new)):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{name(deployment)}-{key}-{random_suffix()}", "namespace": namespace(deployment),
                             "labels": {**(template.get("metadata", {}).get("labels") or {}), HASH_LABEL: key},
                             "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                             "ownerReferences": [owner_reference(deployment, DEPLOYMENTS)]},
                "spec": json.loads(json.dumps(template.get("spec") or {})),
                "status": {"phase": "Pending"},
            }  # fmt: skip
            if await self.core.create(PODS, pod) is not None:
                self.kubelet.owned.add(uid(pod))

    async def _status(self, deployment: JSON, generation: int, replicas: int, key: str, new: list[JSON],
                      alive: list[JSON]) -> None:  # fmt: skip
        status = deployment.get("status") or {}
        ready = sum(map(pod_ready, alive))
        _, unavailable = rolling_parameters(deployment.get("spec") or {}, replicas)
        counts = (len(alive), len(new), ready, generation)
        previous = self.progress.get(uid(deployment))
        if previous is None or previous[0] != counts:
            self.progress[uid(deployment)] = (counts, time.monotonic())
        since = time.monotonic() - self.progress[uid(deployment)][1]
        conditions = list(status.get("conditions") or [])
        available = ready >= replicas - unavailable
        conditions = set_condition(conditions, "Available", available,
                                   "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                                   "Deployment has minimum availability." if available
                                   else "Deployment does not have minimum availability.")  # fmt: skip
        rs = f"{name(deployment)}-{key}"
        deadline = float((deployment.get("spec") or {}).get("progressDeadlineSeconds") or DEFAULT_PROGRESS_DEADLINE)
        if len(new) == replicas == len(alive) and ready == replicas:
            conditions = set_condition(conditions, "Progressing", True, "NewReplicaSetAvailable",
                                       f'ReplicaSet "{rs}" has successfully progressed.')
        elif since > deadline:
            conditions = set_condition(conditions, "Progressing", False, "ProgressDeadlineExceeded",
                                       f'ReplicaSet "{rs}" has timed out progressing.')
        else:
            conditions = set_condition(conditions, "Progressing", True, "ReplicaSetUpdated",
                                       f'ReplicaSet "{rs}" is progressing.')
        fresh = {**status, "observedGeneration": generation, "replicas": len(alive), "updatedReplicas": len(new),
                 "readyReplicas": ready, "availableReplicas": ready,
                 "unavailableReplicas": max(replicas - ready, 0), "conditions": conditions}  # fmt: skip
        if fresh != status:
            await self.core.patch_status(DEPLOYMENTS, deployment, fresh)
