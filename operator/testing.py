"""Run the operator against kmock's Kubernetes emulator: for the integration tests and the benchmark.

Like `kopf.testing`, this ships with the package but is only imported by tests and benchmarks; it needs
the test extra (`kmock`). Two things make kmock usable for hundreds of FineTuneJobs:

- kmock matches every request against its whole request history, and finds objects by scanning every
  stored object; both grow with the test, so a few hundred jobs take minutes. `FastEmulator` matches
  a request against itself only and looks named objects up by key.
- kmock stores a create with `dryRun=All`; `FastEmulator` answers it without storing, as a real API
  server does.
- kopf cancels every task created in its event loop after it started (it cannot tell whose they are),
  including the test's own; `running_operator` therefore gives kopf a loop of its own in a thread,
  while the emulator keeps serving from the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf

import finetune.operator.main  # noqa: F401  (registers the handlers)
from finetune.operator import k8s
from finetune.operator.config import OperatorConfig
from finetune.spec import GROUP, KIND, PLURAL, SHORT_NAME, SINGULAR, VERSION

_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("kmock_current_request")


class _CurrentRequestOnly(list):  # type: ignore[type-arg]
    """While a request is handled, its task sees only itself in the history; the history is capped."""

    def __iter__(self) -> Any:
        current = _CURRENT.get(None)
        return iter((current,)) if current is not None else super().__iter__()

    def append(self, item: Any) -> None:
        super().append(item)
        if len(self) > 2000:
            del self[:1000]


class FastEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with constant-time request matching and object lookups by name.

    `arrivals[(plural, name)]` records when the first POST of each object arrived (perf_counter).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._requests = _CurrentRequestOnly()
        self.arrivals: dict[tuple[str, str], float] = {}

    async def _handle(self, request: Any) -> Any:
        _CURRENT.set(request)  # each request runs in its own task, so this is per request
        if request.method == "POST" and request.resource is not None and isinstance(request.data, dict):
            if request.params.get("dryRun") == "All":
                return self._dry_run_create(request)
            name = (request.data.get("metadata") or {}).get("name", "")
            self.arrivals.setdefault((request.resource.plural, name), time.perf_counter())
        return await super()._handle(request)

    def _dry_run_create(self, request: Any) -> Any:
        """A dry-run create as the API server answers it: the object as it would be stored (this emulator
        prunes nothing), or 409 when it exists; nothing is stored (kmock itself would store it)."""
        from aiohttp import web

        meta = request.data.get("metadata") or {}
        key: Any = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
        existing = self._objects._objects.get(key)
        if existing is not None and not existing.deleted:
            return web.json_response({"kind": "Status", "status": "Failure", "reason": "AlreadyExists",
                                      "code": 409, "message": f"{meta.get('name')} already exists"}, status=409)
        return web.json_response(request.data, status=201)

    # Replaces KubernetesEmulator.__get_objs (name-mangled): a dict lookup for named requests.
    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        store: dict[Any, Any] = self._objects._objects
        if request.name is not None and (strict or request.namespace is not None):
            obj = store.get((request.resource, request.namespace, request.name))
            return [obj] if obj is not None else []
        return [
            obj
            for (resource, namespace, name), obj in store.items()
            if resource == request.resource
            and (namespace == request.namespace if strict else request.namespace in (None, namespace))
            and (request.name is None or name == request.name)
        ]


VERBS = frozenset({"list", "watch", "get", "patch", "create", "delete", "update"})


# The operator as the tests run it: no /metrics server, short watches and retries, so a test that waits
# for a condition sees it soon; the defaults suit a real cluster.
FAST_CONFIG = OperatorConfig(
    metrics_port=None, watch_server_timeout=10, worker_idle_timeout=0.5, consistency_timeout=0.2, retry_delay=0.5
)


def declare(
    emulator: kmock.KubernetesEmulator, namespaces: tuple[str, ...] = (), *, jobset: bool = True, kueue: bool = False
) -> None:
    """Every resource the operator and kopf touch: the bundled built-ins, the FineTuneJob CRD and, as a
    cluster with those installed has them, JobSet's CRD (a prerequisite) and Kueue's Workloads."""
    emulator.resources.load_bundled()
    emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = emulator.ResourceInfo(
        kind=KIND,
        singular=SINGULAR,
        namespaced=True,
        shortnames={SHORT_NAME},
        verbs=set(VERBS),
        subresources={"status"},
    )
    if jobset:
        emulator.resources["jobset.x-k8s.io/v1alpha2/jobsets"] = emulator.ResourceInfo(
            kind="JobSet", singular="jobset", namespaced=True, verbs=set(VERBS), subresources={"status"}
        )
    if kueue:
        emulator.resources["kueue.x-k8s.io/v1beta1/workloads"] = emulator.ResourceInfo(
            kind="Workload", singular="workload", namespaced=True, verbs=set(VERBS), subresources={"status"}
        )
    for namespace in namespaces:
        emulator.objects["v1/namespaces", None, namespace] = {"metadata": {"name": namespace}}


def server_url(emulator: kmock.KubernetesEmulator) -> str:
    return str(emulator.url).rstrip("/")


@contextlib.asynccontextmanager
async def running_operator(
    emulator: kmock.KubernetesEmulator, config: OperatorConfig, start_timeout: float = 15.0
) -> AsyncIterator[kopf.Memo]:
    """The operator, cluster-wide and standalone, in its own thread until the block ends."""
    stop, ready = threading.Event(), threading.Event()
    memo = kopf.Memo(config=config, cluster=k8s.Cluster(server=server_url(emulator)))
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(
                kopf.operator(clusterwide=True, standalone=True, memo=memo, stop_flag=stop, ready_flag=ready)
            )
        except BaseException as err:  # handed to the caller below
            errors.append(err)

    thread = threading.Thread(target=main, name="finetune-operator", daemon=True)
    thread.start()
    if not await asyncio.to_thread(ready.wait, start_timeout):
        raise RuntimeError(f"the operator did not start within {start_timeout} s: {errors}")
    try:
        yield memo
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        if thread.is_alive():
            raise RuntimeError("the operator did not stop within 30 s")
        if errors:
            raise errors[0]
