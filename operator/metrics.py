"""The operator's own Prometheus metrics and the tiny HTTP server that exposes them at /metrics.

One registry for the operator, so several operators in one process (tests) share the series instead
of registering them twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from finetune.status import PHASES

REGISTRY = CollectorRegistry()
JOBS = Gauge("finetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Time spent reconciling one FineTuneJob.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "finetune_operator_reconcile_errors_total", "Reconciles that raised.", ["handler"], registry=REGISTRY
)
TRAINER_RUNS = Counter(
    "finetune_operator_trainer_runs_total",
    "Finished training runs by outcome (succeeded, failed, rejected).",
    ["outcome"],
    registry=REGISTRY,
)


HANDLERS = ("finetunejob", "trainer-jobset", "trainer-pod", "server-deployment")
OUTCOMES = ("succeeded", "failed", "rejected")


def init_series() -> None:
    """Create every label set at zero, so dashboards and rate() see the series from the start."""
    for handler in HANDLERS:
        RECONCILE_ERRORS.labels(handler=handler).inc(0)
    for outcome in OUTCOMES:
        TRAINER_RUNS.labels(outcome=outcome).inc(0)


class PhaseCounts:
    """Last known phase of every FineTuneJob, mirrored into the `finetune_operator_jobs` gauge."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            JOBS.labels(phase=phase).set(0)

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        if phase is None:
            self._phases.pop((namespace, name), None)
        else:
            self._phases[(namespace, name)] = phase
        counts = dict.fromkeys(PHASES, 0)
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for key, count in counts.items():
            JOBS.labels(phase=key).set(count)


@contextmanager
def timed(handler: str, expected: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Observe the duration of a reconcile; count it as an error when it raises (but not `expected`)."""
    start = time.perf_counter()
    try:
        yield
    except expected:
        raise
    except Exception:
        RECONCILE_ERRORS.labels(handler=handler).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(handler=handler).observe(time.perf_counter() - start)


async def _metrics(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_server(host: str, port: int) -> web.AppRunner:
    """Serve GET /metrics; the caller stops it with `await runner.cleanup()`."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
