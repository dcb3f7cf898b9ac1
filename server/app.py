"""The app factory: `create_app(settings) -> FastAPI`. Nothing happens at import time.

The server starts answering at once: /healthz is 200 while the model loads in the background, /readyz
turns 200 only after the model loaded and one warm-up batch went through. On shutdown (uvicorn
handles SIGTERM: stop accepting, finish in-flight requests) the lifespan drains the batch queue and
closes the feedback store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from finetune.server import completions, routes
from finetune.server.batcher import Batcher
from finetune.server.drift import Baseline, DriftMonitor
from finetune.server.errors import error_response, install_error_handlers
from finetune.server.feedback import FeedbackStore
from finetune.server.metrics import Message, RequestMetricsMiddleware, Scope, ServerMetrics
from finetune.server.model_runner import ModelRunner, default_torch_threads
from finetune.server.settings import BearerToken, ServerSettings
from finetune.server.state import ServerState, token_accepted

logger = logging.getLogger(__name__)


def create_app(settings: ServerSettings, *, freeze_gc: bool = False) -> FastAPI:
    """Build the app; the model loads when the app starts (its lifespan), not here.

    `freeze_gc`: for a process that only serves (`finetune serve`), see `_load`.
    """
    metrics = ServerMetrics()
    state = ServerState(settings=settings, metrics=metrics, token=BearerToken(settings), freeze_gc=freeze_gc)
    app = FastAPI(title="finetune server", version="v1", lifespan=_lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(routes.ops)
    app.include_router(routes.inference)
    app.include_router(completions.router)
    # Last added runs first: metrics see every answer, including the body-limit 413.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, state=state)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(ArrivalMiddleware, state=state)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    loader = asyncio.create_task(_load(state), name="finetune-model-load")
    try:
        yield
    finally:
        if not loader.done():
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
        left = 0
        if state.batcher is not None:
            left = await state.batcher.drain(timeout=state.settings.request_timeout_s)
        stored = 0
        if state.feedback is not None:
            stored = state.feedback.count
            state.feedback.close()
        logger.info("server stopped: drained %d queued request(s); feedback store closed (%d new records)",
                    left, stored)


async def _load(state: ServerState) -> None:
    settings, metrics = state.settings, state.metrics
    try:
        runner = ModelRunner(settings.model_dir, name=settings.name, max_length=settings.max_length,
                             precision=settings.precision, device=settings.device)
        state.runner = runner
        threads = settings.torch_threads or default_torch_threads()
        batcher = Batcher(
            runner, metrics, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue, on_long_input=settings.on_long_input,
            workers=settings.model_workers or min(2, threads), threads=threads,
            max_request_tokens=settings.max_request_tokens,
        )
        await batcher.on_model_thread(runner.load, threads)
        await batcher.on_model_thread(runner.warm_up)
        state.feedback = _open_feedback(state)
        baseline = Baseline.from_dir(settings.model_dir)
        if baseline is not None:
            state.drift = DriftMonitor(
                baseline, runner.labels, window=settings.drift_window, min_samples=settings.drift_min_samples
            )
        batcher.start()
        state.batcher = batcher
    except Exception as err:  # a bad export must show on /healthz and in the log, not kill the loop
        logger.exception("model failed to load from %s", settings.model_dir)
        state.load_error = f"{type(err).__name__}: {err}"
        return
    _describe(state, runner)
    if state.freeze_gc:
        # torch, transformers and the model leave a million long-lived objects that every full garbage
        # collection walked again (tens of ms, several times a second under load). Frozen, they are
        # skipped: +12% requests/s at concurrency 32 and a shorter p99.
        gc.collect()
        gc.freeze()
    state.ready = True
    logger.info("ready: %r (%s) serving on the v1 routes", runner.name, runner.task)


def _open_feedback(state: ServerState) -> FeedbackStore | None:
    """A broken feedback volume must not take inference down: feedback answers 503, the rest works."""
    path = state.settings.resolved_feedback_path()
    try:
        return FeedbackStore(path)
    except OSError as err:
        logger.error("feedback store %s unavailable: %s", path, err)
        state.feedback_error = f"{path}: {err.strerror or err}"
        return None


def _describe(state: ServerState, runner: ModelRunner) -> None:
    """Metrics known once the model is loaded; label series start at 0 so dashboards see them at once."""
    metrics = state.metrics
    metrics.model_load.set(runner.load_seconds)
    metrics.model_info.info({"model": runner.name, "version": runner.version, "task": runner.task})
    for label in runner.labels:
        metrics.predictions.labels(label=label)
        metrics.feedback.labels(label=label)
    if runner.task == "causal-lm":
        metrics.feedback.labels(label="completion")
    for feature in state.drift.features if state.drift is not None else []:
        metrics.drift.labels(feature=feature).set(math.nan)


Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ArrivalMiddleware:
    """Tell the batcher a model request has arrived, from its first byte until it is queued.

    While such requests are being read and validated, the batcher may wait (up to max_wait_ms) for them
    to join the forward pass it is about to run.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batcher = self.state.batcher
        model_call = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] != "/v1/feedback"
        if batcher is None or not model_call:
            await self.app(scope, receive, send)
            return
        arrival = batcher.arrival()
        scope.setdefault("state", {})["arrival"] = arrival
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.done()


class AuthMiddleware:
    """The bearer token guards every POST (inference and feedback); GET routes (health, readiness, model
    state, metrics) stay open for probes and Prometheus. Checked before anything reads the body, so a
    client without the token cannot make the server parse a megabyte of JSON."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not token_accepted(authorization.decode("latin-1"), self.state.token.current()):
                response = error_response(
                    401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                    headers={"WWW-Authenticate": "Bearer", "Connection": "close"},  # the body is left unread
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JsonBodyMiddleware:
    """Every POST body is read as JSON, whatever its Content-Type says: `curl -d '{...}'` sends
    `application/x-www-form-urlencoded`, and FastAPI would hand the route raw form data ("Input should be
    a valid dictionary"). A body that is not JSON still gets 400 invalid_json."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            # In place: the metrics middleware outside reads the route the router stores in this scope.
            scope["headers"] = [*headers, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answer 413 for bodies over `max_bytes` before anything parses them (chunked bodies included)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.strip().isdigit():  # the parser accepts "10 " too
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read up to the limit, then replay what was read.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close: the unread body must not be parsed as the connection's next request.
        response = error_response(413, "too_large", f"the request body is over {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)
