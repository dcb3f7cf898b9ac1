"""OpenAI-compatible `POST /v1/completions` for causal LMs, with `stream: true` as server-sent events.

Prompts over the context (prompt + max_tokens > the model's token limit) keep their last tokens and say
so with `"truncated": true` on the choice, or get 413 with `on_long_input=reject`. Prompts are text or
token ids; `n` choices per prompt; `logprobs` (0-5 alternatives per token) as OpenAI's legacy object.
OpenAI fields this server does not implement are refused with 400 unless they carry their neutral value.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from finetune.server.batcher import Overloaded
from finetune.server.errors import ApiError
from finetune.server.generation import Completion, GenerationControl, GenerationParams
from finetune.server.model_runner import Encoded
from finetune.server.routes import check_count, encode, queued, run_model
from finetune.server.schemas import CompletionRequest
from finetune.server.state import Ready, ready_parts

router = APIRouter(tags=["inference"])  # behind the bearer token: AuthMiddleware in app.py


def _check(body: CompletionRequest, ready: Ready) -> int:
    """Validate against this model; return the prompt token budget."""
    runner = ready.runner
    if runner.task != "causal-lm":
        raise ApiError(400, "wrong_task", f"this model classifies text; use POST /v1/models/{runner.name}:predict")
    unsupported = body.unsupported()
    if unsupported:
        raise ApiError(400, "unsupported_field", "; ".join(unsupported))
    if body.model is not None and body.model != runner.name:
        raise ApiError(404, "model_not_found", f"no model named {body.model!r}; this server serves {runner.name!r}")
    check_count(ready, len(body.prompts()) * body.n, "prompt x n (choices)")
    if body.stream and (len(body.prompts()) > 1 or body.n > 1):
        raise ApiError(422, "invalid_request", "stream: supported for a single prompt with n=1 only")
    vocabulary = runner.vocabulary_size
    for index, prompt in enumerate(body.prompts()):
        if isinstance(prompt, list) and max(prompt) >= vocabulary:
            raise ApiError(422, "invalid_request",
                           f"prompt.{index}: token id {max(prompt)} is not below the vocabulary size {vocabulary}")
    if body.max_tokens > ready.settings.max_new_tokens:
        raise ApiError(
            422, "invalid_request", f"max_tokens: at most {ready.settings.max_new_tokens} on this server"
        )
    budget: int = runner.max_length - body.max_tokens
    if budget < 1:
        raise ApiError(
            422, "invalid_request", f"max_tokens: must be below the model's context of {runner.max_length} tokens"
        )
    return budget


def _params(body: CompletionRequest) -> GenerationParams:
    return GenerationParams(
        max_tokens=body.max_tokens, temperature=body.sampling_temperature(), top_p=float(body.top_p),
        stop=body.stops(), seed=body.seed, n=body.n, logprobs=body.logprobs,
    )


async def _encode_prompts(ready: Ready, body: CompletionRequest, budget: int) -> list[Encoded]:
    """Text prompts through the tokenizer, token-id prompts as they are; both keep their last tokens."""
    texts = [p for p in body.prompts() if isinstance(p, str)]
    encoded = iter(await encode(ready, texts, limit=budget, keep="end") if texts else [])
    out = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            out.append(next(encoded))
            continue
        if len(prompt) > budget and ready.settings.on_long_input == "reject":
            raise ApiError(413, "input_too_long",
                           f"a prompt has {len(prompt)} tokens; the limit is {budget} (on_long_input=reject)")
        out.append(Encoded(prompt[-budget:], len(prompt), len(prompt) > budget))
    return out


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    ready = ready_parts(request)
    budget = _check(body, ready)
    encoded = await _encode_prompts(ready, body, budget)
    tokens = sum((len(e.ids) + body.max_tokens) * body.n for e in encoded)
    if tokens > ready.settings.max_request_tokens:
        raise ApiError(413, "too_many_tokens",
                       f"the request asks for {tokens} tokens ((prompt + max_tokens) x n); this server takes at "
                       f"most {ready.settings.max_request_tokens} per request (max_request_tokens)")
    queued(request)
    params = _params(body)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": ready.runner.name}
    timeout = ready.settings.request_timeout_s
    if body.stream:
        return _stream(ready, meta, encoded[0].ids, encoded[0].truncated, params)
    controls = [GenerationControl() for _ in encoded]
    per_prompt: list[list[Completion]] = await run_model(
        ready, _unless_client_leaves(request, controls,
                                     ready.batcher.generate_many([e.ids for e in encoded], params, controls, timeout)),
    )
    choices: list[dict[str, Any]] = []
    for enc, done in ((enc, done) for enc, results in zip(encoded, per_prompt, strict=True) for done in results):
        ready.metrics.generated_tokens.inc(done.completion_tokens)
        choices.append({"text": done.text, "index": len(choices), "logprobs": done.logprobs,
                        "finish_reason": done.finish_reason, "truncated": enc.truncated})
    # OpenAI counts each prompt once, and every choice's tokens.
    prompt_tokens = sum(results[0].prompt_tokens for results in per_prompt)
    completion_tokens = sum(r.completion_tokens for results in per_prompt for r in results)
    _observe_drift(ready, [e.n_tokens for e in encoded])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {**meta, "choices": choices, "usage": usage}


async def _unless_client_leaves(
    request: Request, controls: list[GenerationControl], call: Awaitable[list[list[Completion]]]
) -> list[list[Completion]]:
    """Await the generations, stopping them when the client disconnects: nobody would read the answer,
    and the rows would hold the model for everyone else."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        for control in controls:
            control.cancelled.set()
        work.cancel()
        raise ApiError(499, "client_closed", "the client closed the connection")
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _observe_drift(ready: Ready, lengths: list[int]) -> None:
    if ready.drift is not None:
        ready.drift.observe(lengths)


def _event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _stream(
    ready: Ready, meta: dict[str, Any], ids: list[int], truncated: bool, params: GenerationParams
) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    def on_text(text: str) -> None:  # called on the model thread: hand the piece to the event loop
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    control = GenerationControl(on_text=on_text)
    timeout = ready.settings.request_timeout_s
    # Queued before the response starts, so a full queue is still a plain 503 rather than a broken stream.
    try:
        future = ready.batcher.enqueue_generation(ids, params, control)
    except Overloaded as err:
        raise ApiError(503, "overloaded", f"{err}; retry later",
                       headers={"Retry-After": str(ready.settings.retry_after_s)}) from None
    _observe_drift(ready, [len(ids)])

    def chunk(text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish, "truncated": truncated}
        return _event({**meta, "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        deadline = loop.time() + timeout
        try:
            while True:
                getter = asyncio.ensure_future(pieces.get())
                waiting: set[asyncio.Future[Any]] = {getter, future}
                done, _ = await asyncio.wait(waiting, timeout=max(deadline - loop.time(), 0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield chunk(getter.result(), None)
                    continue
                getter.cancel()
                if not done:
                    yield _event({"error": {"type": "timeout", "message": f"no answer within {timeout:g}s"}})
                    return
                while not pieces.empty():
                    yield chunk(pieces.get_nowait(), None)
                if future.exception() is not None:
                    yield _event({"error": {"type": "internal_error", "message": "generation failed"}})
                    return
                result: Completion = future.result()[0]
                ready.metrics.generated_tokens.inc(result.completion_tokens)
                yield chunk("", result.finish_reason, result.logprobs)
                yield _event("[DONE]")
                return
        finally:
            control.cancelled.set()  # the client left or we are done: stop generating
            if not future.done():
                future.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
