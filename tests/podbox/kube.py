"""What the box's controllers share: resource paths, one listing of the cluster per tick, API calls that
tolerate races, conditions, events and background tasks.

The controllers only talk HTTP to the emulator, through our own `k8s.Api`, like real controllers do.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import secrets
import uuid
from collections.abc import Collection, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from finetune.operator import k8s

log = logging.getLogger("podbox")
JSON = dict[str, Any]
NODE_NAME = "podbox"
# The API server's generateName alphabet (k8s.io/apimachinery/pkg/util/rand): no vowels, no look-alikes.
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(frozen=True)
class Resource:
    api_version: str
    plural: str
    kind: str

    def collection(self, namespace: str | None) -> str:
        return str(k8s.collection_path(self.api_version, self.plural, namespace))

    def path(self, obj: JSON, subresource: str | None = None) -> str:
        meta = obj["metadata"]
        path = f"{self.collection(meta.get('namespace'))}/{meta['name']}"
        return f"{path}/{subresource}" if subresource else path


PODS = Resource("v1", "pods", "Pod")
JOBS = Resource("batch/v1", "jobs", "Job")
JOBSETS = Resource("jobset.x-k8s.io/v1alpha2", "jobsets", "JobSet")
DEPLOYMENTS = Resource("apps/v1", "deployments", "Deployment")
SERVICES = Resource("v1", "services", "Service")
CONFIGMAPS = Resource("v1", "configmaps", "ConfigMap")
SECRETS = Resource("v1", "secrets", "Secret")
EVENTS = Resource("v1", "events", "Event")
# Listed on every tick, dependents before their owners: a dependent seen in this tick's list always has its
# owner (created earlier) in a later list of the same tick, unless the owner is really gone.
WATCHED = (PODS, JOBS, JOBSETS, DEPLOYMENTS)
# Only garbage-collected, so listed less often.
COLLECTED = (SERVICES, CONFIGMAPS, SECRETS)
BY_KIND = {r.kind: r for r in (*WATCHED, *COLLECTED, EVENTS)}


def now() -> str:
    """RFC 3339 in seconds, as metav1.Time serializes."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def random_suffix(n: int = 5) -> str:
    return "".join(random.choice(NAME_ALPHABET) for _ in range(n))


def meta(obj: JSON) -> JSON:
    return obj.setdefault("metadata", {})  # type: ignore[no-any-return]


def uid(obj: JSON) -> str:
    return str(meta(obj).get("uid") or "")


def name(obj: JSON) -> str:
    return str(meta(obj).get("name") or "")


def namespace(obj: JSON) -> str:
    return str(meta(obj).get("namespace") or "")


def labels(obj: JSON) -> dict[str, str]:
    found: dict[str, str] = meta(obj).get("labels") or {}
    return found


def controller_uid(obj: JSON) -> str | None:
    for ref in meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def owner_reference(owner: JSON, resource: Resource) -> JSON:
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "name": name(owner),
        "uid": uid(owner),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def stamp(obj: JSON) -> JSON:
    """What the API server adds on create: a uid and a creationTimestamp (the emulator adds neither)."""
    meta(obj).setdefault("uid", str(uuid.uuid4()))
    meta(obj).setdefault("creationTimestamp", now())
    return obj


def condition(conditions: Iterable[JSON], kind: str) -> JSON | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def is_true(conditions: Iterable[JSON], kind: str) -> bool:
    found = condition(conditions, kind)
    return found is not None and found.get("status") == "True"


@dataclass
class Snapshot:
    """The cluster as one tick of the box saw it: every watched object, by resource, plus an index by uid."""

    items: dict[str, list[JSON]] = field(default_factory=dict)
    by_uid: dict[str, JSON] = field(default_factory=dict)

    def of(self, resource: Resource) -> list[JSON]:
        return self.items.get(resource.plural, [])

    def owned(self, resource: Resource, owner_uid: str) -> list[JSON]:
        """Objects whose controller is `owner_uid`, oldest first."""
        found = [o for o in self.of(resource) if controller_uid(o) == owner_uid]
        return sorted(found, key=lambda o: (meta(o).get("creationTimestamp") or "", name(o)))


class Core:
    """The API client plus the bookkeeping every controller of one box needs."""

    def __init__(self, api: k8s.Api, namespaces: Collection[str] | None) -> None:
        self.api = api
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.errors: list[str] = []
        self.snapshot = Snapshot()

    # --- listing --------------------------------------------------------------------------------------------------

    async def list(self, resource: Resource, assign_uids: bool = True) -> list[JSON]:
        """Every object of one resource in the watched namespaces; an API the cluster lacks lists as empty."""
        scopes: Iterable[str | None] = sorted(self.namespaces) if self.namespaces is not None else [None]
        found: list[JSON] = []
        for scope in scopes:
            status, data = await self.api.request("GET", resource.collection(scope))
            if status == 404:
                continue
            if status >= 400:
                raise k8s.ApiError(status, "GET", resource.collection(scope), data)
            found.extend(i for i in (data or {}).get("items") or [] if isinstance(i, dict))
        for obj in found:
            if assign_uids and not uid(obj):
                await self.assign_uid(resource, obj)
        return found

    async def assign_uid(self, resource: Resource, obj: JSON) -> None:
        """Objects created without a uid (the emulator assigns none) get one, as the API server would have."""
        stamp(obj)
        body = {"metadata": {"uid": uid(obj), "creationTimestamp": meta(obj)["creationTimestamp"]}}
        await self.patch(resource.path(obj), body)

    async def take_snapshot(self, extra: Iterable[Resource] = ()) -> Snapshot:
        snap = Snapshot()
        for resource in (*WATCHED, *extra):
            # Only the kinds the box controls get a uid: it never rewrites others' ConfigMaps or Services.
            snap.items[resource.plural] = await self.list(resource, assign_uids=resource in WATCHED)
            snap.by_uid.update((uid(o), o) for o in snap.items[resource.plural])
        self.snapshot = snap
        return snap

    # --- writes that tolerate the object having gone away meanwhile ------------------------------------------------

    async def create(self, resource: Resource, obj: JSON) -> JSON | None:
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        status, data = await self.api.request("POST", resource.collection(namespace(obj) or None), body=stamp(obj))
        if status == 409:
            return None
        if status >= 400:
            raise k8s.ApiError(status, "POST", resource.collection(namespace(obj)), data)
        return data if isinstance(data, dict) else obj

    async def patch(self, path: str, body: JSON) -> JSON | None:
        status, data = await self.api.request("PATCH", path, body=body, content_type="application/merge-patch+json")
        if status == 404:
            return None
        if status >= 400:
            raise k8s.ApiError(status, "PATCH", path, data)
        return data  # type: ignore[no-any-return]

    async def patch_status(self, resource: Resource, obj: JSON, status: JSON) -> JSON | None:
        return await self.patch(resource.path(obj, "status"), {"status": status})

    async def delete(self, resource: Resource, obj: JSON) -> bool:
        return bool(await self.api.delete(resource.path(obj)))

    async def event(self, resource: Resource, obj: JSON, kind: str, reason: str, message: str, source: str) -> None:
        """A core/v1 Event about `obj`, as `kubectl describe` and kopf read them."""
        stamp_time = now()
        await self.create(EVENTS, {
            "metadata": {"name": f"{name(obj)}.{secrets.token_hex(8)}", "namespace": namespace(obj)},
            "involvedObject": {"apiVersion": resource.api_version, "kind": resource.kind, "name": name(obj),
                               "namespace": namespace(obj), "uid": uid(obj)},
            "type": kind, "reason": reason, "message": message, "source": {"component": source},
            "reportingComponent": source, "firstTimestamp": stamp_time, "lastTimestamp": stamp_time, "count": 1,
        })  # fmt: skip

    # --- background work -------------------------------------------------------------------------------------------

    def busy(self, key: str) -> bool:
        task = self.tasks.get(key)
        return task is not None and not task.done()

    def spawn(self, key: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` in the background once per key: a second request while it runs joins the first."""
        if self.busy(key):
            work.close()
            return self.tasks[key]
        task = asyncio.get_running_loop().create_task(self._guarded(key, work), name=f"podbox:{key}")
        self.tasks[key] = task
        return task

    async def _guarded(self, key: str, work: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.report(f"{key}: {err!r}")
            log.exception("podbox background task %s failed", key)
            return None

    def report(self, message: str) -> None:
        self.errors.append(message)
        del self.errors[:-50]

    async def close(self) -> None:
        tasks = [t for t in self.tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
