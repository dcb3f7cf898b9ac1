"""Causal-LM generation: concurrent requests share one `generate` call (dynamic batching).

Requests whose sampling settings agree (`GenerationParams.batch_key`) are left-padded into one batch;
each row stops on its own (its stop strings, its `max_tokens`, eos, or its client leaving) while the
others go on. A request with a `seed` runs alone, so its samples depend on nothing but the seed.
`n` choices are `n` rows of the same prompt. `logprobs` come from one extra forward pass over prompt and
completion: the model's own distribution, before temperature and top-p.

Synchronous; runs on a batcher worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None

    def batch_key(self) -> tuple[float, ...] | None:
        """Requests with equal keys may share a `generate` call; None: this one runs alone."""
        if self.seed is not None:
            return None
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0,)


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: dict[str, list[Any] | None] | None = None  # OpenAI's legacy completions logprobs object


@dataclass
class GenerationControl:
    """Lets the caller stream text as it is generated and cancel a generation (client went away)."""

    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class GenerationRequest:
    ids: list[int]
    params: GenerationParams
    control: GenerationControl


class Progress:
    """One row's generated text: stop strings, incremental streaming with hold-back, eos, max_tokens."""

    def __init__(
        self, tokenizer: Any, lock: threading.Lock, params: GenerationParams, control: GenerationControl
    ) -> None:
        self._tokenizer = tokenizer
        self._lock = lock
        self._stop = [s for s in params.stop if s]
        self._max_tokens = params.max_tokens
        self._control = control
        self._eos = tokenizer.eos_token_id
        self.ids: list[int] = []
        self.tokens_in_text: int | None = None  # set when a stop string cut the text: tokens it kept
        self._emitted = 0
        self.text = ""
        self.stopped_by_string = False
        self.done = False

    def put(self, token: int) -> None:
        if self.done:  # generate() keeps padding rows that finished while others go on
            return
        self.ids.append(token)
        with self._lock:
            self.text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped_by_string, self.done = self.text[:cut], True, True
            self.tokens_in_text = len(self.ids)
        if token == self._eos or len(self.ids) >= self._max_tokens or self._control.cancelled.is_set():
            self.done = True
        # Hold back what could still become a stop string, and half-decoded characters.
        hold = 0 if self.done else max((len(s) - 1 for s in self._stop), default=0)
        safe = len(self.text) - hold
        while safe > self._emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        self._emit(safe)

    def check_cancelled(self) -> None:
        if self._control.cancelled.is_set():
            self.done = True

    def _emit(self, upto: int) -> None:
        if upto > self._emitted and self._control.on_text is not None:
            self._control.on_text(self.text[self._emitted : upto])
        self._emitted = max(self._emitted, upto)

    def finish(self, prompt_tokens: int) -> Completion:
        self._emit(len(self.text))
        ended = self.stopped_by_string or (self._eos is not None and self._eos in self.ids)
        ended = ended or len(self.ids) < self._max_tokens
        return Completion(self.text, "stop" if ended else "length", prompt_tokens, len(self.ids))


@dataclass
class _Row:
    request: int
    ids: list[int]
    progress: Progress


def generate_batch(
    model: Any, tokenizer: Any, tokenizer_lock: threading.Lock, requests: Sequence[GenerationRequest], *,
    pad_id: int, device: Any,
) -> list[list[Completion]]:
    """Run `requests` (equal `batch_key`) in one `generate` call; `n` completions per request."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    rows = [
        _Row(index, list(request.ids), Progress(tokenizer, tokenizer_lock, request.params, request.control))
        for index, request in enumerate(requests)
        for _ in range(request.params.n)
    ]
    params = requests[0].params
    width = max(len(row.ids) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long, device=device)
    attention = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], dtype=torch.long,
                             device=device)
    seen_prompt = False

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            for row in rows:
                row.progress.check_cancelled()
            return torch.tensor([row.progress.done for row in rows], dtype=torch.bool, device=input_ids.device)

    class _Stream(BaseStreamer):
        def put(self, value: Any) -> None:
            nonlocal seen_prompt
            if not seen_prompt:  # generate() first hands the streamer the prompt
                seen_prompt = True
                return
            for row, token in zip(rows, value.reshape(-1).tolist(), strict=True):
                row.progress.put(int(token))

        def end(self) -> None:
            pass

    sampling: dict[str, Any] = {"do_sample": False}
    if params.temperature > 0:
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.seed is not None:
            torch.manual_seed(params.seed)
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids, attention_mask=attention,
            max_new_tokens=max(request.params.max_tokens for request in requests), pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([_Stop()]), streamer=_Stream(), **sampling,
        )
    completions = [row.progress.finish(len(row.ids)) for row in rows]
    wanted = [i for i, row in enumerate(rows) if requests[row.request].params.logprobs is not None]
    if wanted:
        _add_logprobs(model, tokenizer, tokenizer_lock, [rows[i] for i in wanted], [completions[i] for i in wanted],
                      [requests[rows[i].request].params.logprobs or 0 for i in wanted], pad_id=pad_id, device=device)
    out: list[list[Completion]] = [[] for _ in requests]
    for row, completion in zip(rows, completions, strict=True):
        out[row.request].append(completion)
    return out


def _add_logprobs(
    model: Any, tokenizer: Any, lock: threading.Lock, rows: list[_Row], completions: list[Completion],
    top: list[int], *, pad_id: int, device: Any,
) -> None:
    """One forward pass over prompt + completion: the log-probability of each generated token and the
    `top` most likely alternatives at its position, as OpenAI's completions API reports them."""
    import torch

    sequences = [row.ids + row.progress.ids for row in rows]
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
    with torch.inference_mode():
        logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    for index, (row, completion, k) in enumerate(zip(rows, completions, top, strict=True)):
        start, generated = len(row.ids), row.progress.ids
        kept = generated[: row.progress.tokens_in_text] if row.progress.tokens_in_text is not None else generated
        with lock:
            prompt_text = tokenizer.decode(row.ids, skip_special_tokens=True)
            # Offsets from prefix decodes: a character split over byte tokens decodes to U+FFFD piece by
            # piece, so the pieces' lengths do not add up to the text's.
            prefixes = [tokenizer.decode(kept[:i], skip_special_tokens=True) for i in range(len(kept))]
            pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in kept]
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for step, (token, piece) in enumerate(zip(kept, pieces, strict=True)):
            position = logprobs[index, start + step - 1]
            tokens.append(piece)
            token_logprobs.append(float(position[token]))
            offsets.append(len(prompt_text) + min(len(prefixes[step]), len(completion.text)))
            if k:
                values, alternatives = position.topk(k)
                with lock:
                    names = [tokenizer.decode([int(a)], skip_special_tokens=True) for a in alternatives.tolist()]
                best: dict[str, float] = {}
                for name, value in zip(names, values.tolist(), strict=True):
                    best.setdefault(name, float(value))  # tokens that decode alike: the likeliest one's value
                top_logprobs.append(best)
        completion.logprobs = {"tokens": tokens, "token_logprobs": token_logprobs,
                               "top_logprobs": top_logprobs if k else None, "text_offset": offsets}
