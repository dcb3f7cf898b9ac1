"""`PodBox`: the controllers and the kubelet on one loop, and the handful of helpers tests use."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from finetune.operator import k8s
from tests.podbox.deployments import DeploymentController
from tests.podbox.gc import GarbageCollector
from tests.podbox.jobs import JobController
from tests.podbox.jobsets import JobSetController
from tests.podbox.kube import COLLECTED, JSON, PODS, WATCHED, Core, log, name, namespace, now
from tests.podbox.kubelet import Kubelet, PodCheck, PodRun

COLLECT_EVERY = 10  # ticks between listings of the kinds that are only garbage-collected
# The messages Kubernetes puts on DisruptionTarget, by reason (scheduler, eviction API, taint manager, pod GC).
DISRUPTION_MESSAGES = {
    "PreemptionByScheduler": "default-scheduler: preempting to accommodate a higher priority pod",
    "EvictionByEvictionAPI": "Eviction API: evicting",
    "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
    "DeletionByPodGC": "PodGC: node no longer exists",
    "TerminationByKubelet": "The node was low on resource",
}


class PodBox:
    """The cluster's controllers and kubelet for the emulator behind `api`; see the package docstring.

    Args:
        api: our client for the emulator (`k8s.Api(k8s.Cluster(server=url))`).
        root: a folder for the pods' working folders, logs, termination-message files and volumes.
        claims: a local folder per PersistentVolumeClaim name (a pod naming another claim stays Unschedulable).
        namespace_filter: the namespaces to act in; None for all.
        grace_seconds: the grace period of a pod without terminationGracePeriodSeconds (Kubernetes: 30).
        poll_seconds: how often the emulator is listed.
        backoff_seconds: the first CrashLoopBackOff delay (Kubernetes: 10), doubled per restart.
    """

    def __init__(
        self,
        api: k8s.Api,
        root: Path,
        claims: Mapping[str, Path] | None = None,
        namespace_filter: Collection[str] | None = None,
        grace_seconds: float = 5.0,
        poll_seconds: float = 0.05,
        backoff_seconds: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.poll = poll_seconds
        self.core = Core(api, namespace_filter)
        self.kubelet = Kubelet(self.core, self.root, claims or {}, grace_seconds, backoff_seconds)
        self.jobs = JobController(self.core, self.kubelet)
        self.jobsets = JobSetController(self.core, self.jobs)
        self.deployments = DeploymentController(self.core, self.kubelet)
        self.gc = GarbageCollector(self.core, self.kubelet, self.jobs)
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    async def __aenter__(self) -> PodBox:
        self.root.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="podbox")
        return self

    async def __aexit__(self, *_: object) -> None:
        """Stop the controllers, then SIGKILL every process group the box started and reap them."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.core.close()
        await self.kubelet.kill_all()

    # --- the loop ---------------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        tick = 0
        while True:
            try:
                await self._tick(tick)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # reported, and the next tick tries again (the API may just have raced)
                message = f"tick: {err!r}"
                if message != self._last_error:
                    log.exception("podbox tick failed")
                    self.core.report(message)
                self._last_error = message
            tick += 1
            await asyncio.sleep(self.poll)

    async def _tick(self, tick: int) -> None:
        extra = COLLECTED if tick % COLLECT_EVERY == 0 else ()
        snap = await self.core.take_snapshot(extra)
        await self.gc.sync(snap, (*WATCHED, *extra))
        await self.jobsets.sync(snap)
        await self.jobs.sync(snap)
        await self.deployments.sync(snap)
        await self.kubelet.sync(snap)

    # --- helpers for tests ------------------------------------------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        """Failures the controllers hit (each also logged); a test may assert that there are none."""
        return list(self.core.errors)

    def pods(self, prefix: str = "") -> list[JSON]:
        """The pods as of the last tick whose names start with `prefix`, by name."""
        return sorted((p for p in self.core.snapshot.of(PODS) if name(p).startswith(prefix)), key=name)

    async def wait_for(self, check: Callable[[], Any | Awaitable[Any]], timeout: float = 120.0, what: str = "") -> Any:
        """Poll `check` (sync or async) until it returns something truthy, and return that; fail after `timeout`
        seconds with `what`, the last value and the box's errors."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = check()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
            if self._task is not None and self._task.done():
                raise AssertionError(f"the podbox loop stopped while waiting for {what or check}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last: {last!r}; "
                                     f"podbox errors: {self.errors}")  # fmt: skip
            await asyncio.sleep(self.poll)

    def _pod(self, pod_name: str) -> JSON:
        ns, _, short = pod_name.rpartition("/")
        for pod in [r.pod for r in self.kubelet.runs.values()] + self.core.snapshot.of(PODS):
            if name(pod) == short and ns in ("", namespace(pod)):
                return pod
        raise KeyError(f"podbox knows no pod {pod_name!r}")

    def _run(self, pod_name: str) -> PodRun:
        pod = self._pod(pod_name)
        run = self.kubelet.runs.get(str(pod["metadata"].get("uid")))
        if run is None:
            raise KeyError(f"pod {pod_name!r} has not been started")
        return run

    def log(self, pod_name: str, container: str | None = None) -> str:
        """A pod's stdout and stderr (one container's, or all of them in spec order); "" before it started."""
        try:
            run = self._run(pod_name)
        except KeyError:
            return ""
        files = [c.log_path for c in run.containers if container in (None, c.name)]
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def port(self, pod_name: str, container_port: int) -> int:
        """The loopback port that stands for `container_port` of this pod."""
        return self.kubelet.port(self._pod(pod_name), container_port)

    def processes(self) -> dict[str, int]:
        """The pid of each pod's first live container, by pod name."""
        found: dict[str, int] = {}
        for run in self.kubelet.runs.values():
            live = self.kubelet.live(run)
            if live and live[0].proc is not None:
                found[name(run.pod)] = live[0].proc.pid
        return found

    async def kill(self, pod_name: str, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Signal every container's process group (a rank dying); returns once they exited (or after `timeout`)
        with the pod's status written."""
        run = self._run(pod_name)
        # These processes, not the containers: a restartPolicy Always container may be running again already.
        procs = [c.proc for c in self.kubelet.live(run) if c.proc is not None]
        for proc in procs:
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.kubelet.write(run)

    async def disrupt(self, pod_name: str, reason: str = "PreemptionByScheduler", message: str | None = None,
                      grace_seconds: float | None = None) -> None:  # fmt: skip
        """What preemption and the eviction API do: condition DisruptionTarget, SIGTERM, SIGKILL after the grace
        period; returns once the pod is Failed (its object is kept, with the condition)."""
        cond = {"type": "DisruptionTarget", "status": "True", "reason": reason, "lastProbeTime": None,
                "message": message or DISRUPTION_MESSAGES.get(reason, f"podbox: {reason}"),
                "lastTransitionTime": now()}  # fmt: skip
        pod = self._pod(pod_name)
        run = self.kubelet.runs.get(str(pod["metadata"].get("uid")))
        if run is not None:
            await self.kubelet.stop(run, grace_seconds, [cond])
            return
        conditions = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != cond["type"]]
        await self.core.patch_status(PODS, pod, {"phase": "Failed", "conditions": [*conditions, cond]})

    def hold(self, check: PodCheck | str) -> PodCheck:
        """Keep matching pods (a predicate on the pod object, or a name prefix) Pending and unstarted, so a test
        can write their status itself; returns the handle for `release`."""
        predicate: PodCheck = (lambda pod: name(pod).startswith(check)) if isinstance(check, str) else check
        self.kubelet.holds.append(predicate)
        return predicate

    def release(self, handle: PodCheck | None = None) -> None:
        """Let held pods start (on the next tick): those of one `hold` handle, or all."""
        self.kubelet.holds[:] = [h for h in self.kubelet.holds if handle is not None and h is not handle]

