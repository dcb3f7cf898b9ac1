"""HTTP routes: health, KServe v1 prediction, model status, feedback and /metrics.

Causal-LM completions live in `completions.py`. Inference and feedback routes sit behind the optional
bearer token; health, readiness, model status and metrics stay open for probes and Prometheus.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from finetune.server.batcher import Overloaded, RequestTooLarge
from finetune.server.errors import ApiError
from finetune.server.model_runner import Encoded
from finetune.server.schemas import FeedbackRequest, PredictRequest
from finetune.server.state import Ready, ready_parts, server_state

T = TypeVar("T")

ops = APIRouter(tags=["operations"])
inference = APIRouter(tags=["inference"])  # behind the bearer token: AuthMiddleware in app.py


# --- shared by the inference routes ---------------------------------------------------------------------


def check_count(ready: Ready, count: int, what: str) -> None:
    limit = ready.settings.max_instances
    if count > limit:
        raise ApiError(413, "too_many_instances", f"{what} has {count} items; this server takes at most {limit}")


def queued(request: Request) -> None:
    """This request is about to join the queue: the batcher need not wait for it any more."""
    arrival = getattr(request.state, "arrival", None)
    if arrival is not None:
        arrival.done()


def refuse_long(index: int, n_tokens: int, limit: int) -> ApiError:
    return ApiError(
        413, "input_too_long", f"input {index} has {n_tokens} tokens; the limit is {limit} (on_long_input=reject)"
    )


async def encode(ready: Ready, texts: list[str], *, limit: int, keep: str = "start") -> list[Encoded]:
    """Tokenize off the event loop; over-long inputs are truncated, or refused with 413 when configured."""
    encoded: list[Encoded] = await asyncio.to_thread(ready.runner.encode, texts, limit=limit, keep=keep)
    if ready.settings.on_long_input == "reject":
        for index, item in enumerate(encoded):
            if item.truncated:
                raise refuse_long(index, item.n_tokens, limit)
    for item in encoded:
        ready.metrics.input_tokens.observe(item.n_tokens)
    return encoded


async def run_model(ready: Ready, call: Awaitable[T]) -> T:
    """Await a batcher call, turning overload into 503 + Retry-After and slowness into 504."""
    try:
        return await call
    except Overloaded as err:
        retry = str(ready.settings.retry_after_s)
        raise ApiError(503, "overloaded", f"{err}; retry later", headers={"Retry-After": retry}) from None
    except RequestTooLarge as err:
        raise ApiError(413, "too_many_tokens", str(err)) from None
    except TimeoutError:
        timeout = ready.settings.request_timeout_s
        raise ApiError(504, "timeout", f"no answer within {timeout:g}s; the server is busy") from None


# --- operations (open) ----------------------------------------------------------------------------------


@ops.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness: the process answers. A model that failed to load makes it fail so the pod restarts."""
    state = server_state(request)
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@ops.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the model is loaded and one warm-up batch went through."""
    state = server_state(request)
    if state.ready:
        return JSONResponse({"status": "ready"})
    status = "error" if state.load_error else "loading"
    return JSONResponse({"status": status, "error": state.load_error}, status_code=503)


@ops.get("/v1/models/{name}")
async def model_status(name: str, request: Request) -> JSONResponse:
    """KServe v1 model ready state, with the version and task."""
    state = server_state(request)
    runner = state.runner
    if runner is None:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    if name != runner.name:
        raise ApiError(404, "model_not_found", f"no model named {name!r}; this server serves {runner.name!r}")
    body = {"name": runner.name, "ready": state.ready, "version": runner.version, "task": runner.task}
    if runner.labels:
        body["labels"] = runner.labels
    if state.ready:
        body["precision"] = runner.compute_precision
    return JSONResponse(body, status_code=200 if state.ready else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    # Gauges that summarise a window are computed at scrape time, not on every request.
    state = server_state(request)
    if state.drift is not None:
        for feature, value in state.drift.values().items():
            state.metrics.drift.labels(feature=feature).set(value)
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- inference (auth) -----------------------------------------------------------------------------------


@inference.post("/v1/models/{name}:predict")
async def predict(name: str, body: PredictRequest, request: Request) -> JSONResponse:
    """KServe v1 classification: `{"instances": [...]}` -> `{"predictions": [...]}`, order kept."""
    ready = ready_parts(request)
    ready.check_name(name)
    if ready.runner.task != "text-classification":
        raise ApiError(400, "wrong_task", "this model is a causal LM; use POST /v1/completions")
    texts = body.texts()
    check_count(ready, len(texts), "instances")
    queued(request)
    # Tokenization happens with the batch, on the model thread: one tokenizer call for the whole batch.
    answers = await run_model(ready, ready.batcher.classify(texts, ready.settings.request_timeout_s))
    if any(result is None for _, result in answers):  # refused whole: name the first long text
        index, enc = next((i, enc) for i, (enc, _) in enumerate(answers) if enc.truncated)
        raise refuse_long(index, enc.n_tokens, ready.runner.max_length)
    metrics, predictions = ready.metrics, list[dict[str, Any]]()
    for enc, result in answers:
        assert result is not None
        metrics.input_tokens.observe(enc.n_tokens)
        metrics.predictions.labels(label=result.label).inc()
        metrics.confidence.observe(result.score)
        predictions.append(
            {"label": result.label, "score": result.score, "scores": result.scores, "truncated": enc.truncated}
        )
    if ready.drift is not None:
        ready.drift.observe([enc.n_tokens for enc, _ in answers], [p["label"] for p in predictions])
    return JSONResponse({"predictions": predictions})


@inference.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
    """Store what the right answer was, durably, for the next fine-tuning round."""
    ready = ready_parts(request)
    runner = ready.runner
    if runner.task == "text-classification":
        if body.label is None:
            raise ApiError(422, "invalid_request", "label: required for a text-classification model")
        if body.label not in runner.labels:
            raise ApiError(422, "unknown_label", f"label: {body.label!r} is not one of {runner.labels}")
        answer: dict[str, Any] = {"label": body.label}
    else:
        if body.completion is None:
            raise ApiError(422, "invalid_request", "completion: required for a causal-lm model")
        answer = {"completion": body.completion}
    record = {
        "id": body.id or uuid.uuid4().hex, "model": runner.name, "model_version": runner.version,
        "input": body.input, **answer, "prediction": body.prediction,
    }
    if ready.feedback is None:
        raise ApiError(503, "feedback_unavailable", f"the feedback store cannot be opened: {ready.feedback_error}")
    try:
        stored = await asyncio.to_thread(ready.feedback.append, record)
    except (OSError, ValueError, RuntimeError) as err:
        raise ApiError(503, "feedback_unavailable", f"could not store feedback: {err}") from None
    ready.metrics.feedback.labels(label=body.label if body.label is not None else "completion").inc()
    return {"id": stored["id"], "stored": True}
