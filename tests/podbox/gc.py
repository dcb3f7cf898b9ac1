"""The garbage collector: an object all of whose owners (by ownerReferences uid) are gone is deleted; a pod's
processes end before the pod goes, and a Job's pods go before the Job."""

from __future__ import annotations

import time
from collections.abc import Iterable

from tests.podbox.jobs import JobController
from tests.podbox.kube import BY_KIND, JOBS, JSON, PODS, Core, Resource, Snapshot, meta, namespace, uid
from tests.podbox.kubelet import Kubelet

ALIVE_CACHE_S = 0.5  # an owner outside the snapshot seen alive is not looked up again for this long


class GarbageCollector:
    def __init__(self, core: Core, kubelet: Kubelet, jobs: JobController) -> None:
        self.core, self.kubelet, self.jobs = core, kubelet, jobs
        self.kinds: dict[tuple[str, str], tuple[str, bool] | None] = {}  # (apiVersion, kind) → (plural, namespaced)
        self.alive_until: dict[str, float] = {}

    async def sync(self, snap: Snapshot, resources: Iterable[Resource]) -> None:
        for resource in resources:
            for obj in snap.of(resource):
                refs = [r for r in meta(obj).get("ownerReferences") or [] if r.get("uid")]
                if refs and not self._going(obj) and await self._orphaned(obj, refs, snap):
                    self._collect(resource, obj)

    def _going(self, obj: JSON) -> bool:
        key = uid(obj)
        return self.core.busy(f"gc/{key}") or key in self.kubelet.terminating or key in self.jobs.deleting

    async def _orphaned(self, obj: JSON, refs: list[JSON], snap: Snapshot) -> bool:
        """Every owner is gone: not in this tick's lists, and a live read finds no object with its uid (the
        real collector also confirms with the API server before it deletes)."""
        for ref in refs:
            if ref["uid"] in snap.by_uid or self.alive_until.get(ref["uid"], 0.0) > time.monotonic():
                return False
            if await self._owner_exists(namespace(obj), ref):
                self.alive_until[ref["uid"]] = time.monotonic() + ALIVE_CACHE_S
                return False
        return True

    async def _owner_exists(self, ns: str, ref: JSON) -> bool:
        found = await self._resource(str(ref.get("apiVersion") or ""), str(ref.get("kind") or ""))
        if found is None:
            return True  # an owner of a kind the cluster does not serve: never collect on a guess
        plural, namespaced = found
        root = "/api/" if "/" not in ref["apiVersion"] else "/apis/"
        scope = f"namespaces/{ns}/" if namespaced else ""
        owner = await self.core.api.get(f"{root}{ref['apiVersion']}/{scope}{plural}/{ref.get('name')}")
        return owner is not None and uid(owner) in ("", ref["uid"])

    async def _resource(self, api_version: str, kind: str) -> tuple[str, bool] | None:
        """The plural of an owner's kind, from the API discovery documents (cached)."""
        key = (api_version, kind)
        if key not in self.kinds:
            known = BY_KIND.get(kind)
            if known is not None and known.api_version == api_version:
                self.kinds[key] = (known.plural, True)
            else:
                root = "/api/" if "/" not in api_version else "/apis/"
                doc = await self.core.api.get(f"{root}{api_version}") or {}
                match = next((r for r in doc.get("resources") or [] if r.get("kind") == kind
                              and "/" not in r.get("name", "")), None)  # fmt: skip
                self.kinds[key] = (match["name"], bool(match.get("namespaced", True))) if match else None
        return self.kinds[key]

    def _collect(self, resource: Resource, obj: JSON) -> None:
        if resource == PODS:
            self.kubelet.begin_delete(obj)
        elif resource == JOBS:
            self.jobs.begin_delete(obj)
        else:
            self.core.spawn(f"gc/{uid(obj)}", self.core.delete(resource, obj))
