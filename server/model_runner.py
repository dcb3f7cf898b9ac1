"""The exported model, loaded once: tokenizer + model, forward passes and generation.

Everything here is synchronous and runs on the batcher's single worker thread (forward passes) or a
helper thread (tokenization); nothing in this module touches the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.contracts import ArtifactError, ExportMetrics
from finetune.hardware import available_cpus, cpu_has_bf16

logger = logging.getLogger(__name__)

Task = Literal["text-classification", "causal-lm"]
# Tokenizers without a real limit report a huge sentinel (int(1e30)); anything above this is "unset".
_NO_LIMIT = 1_000_000
_per_thread = threading.local()


class ModelLoadError(RuntimeError):
    """The directory is not a loadable export (missing files, unknown task)."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: the ids the model sees, and whether they were cut to fit."""

    ids: list[int]
    n_tokens: int  # before truncation: what the input-length metrics and drift use
    truncated: bool


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationControl:
    """Lets the caller stream text as it is generated and cancel a generation (client went away)."""

    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def read_export_metrics(model_dir: Path) -> ExportMetrics | None:
    """The export's metrics.json; None for a model folder without one (any from_pretrained folder serves)."""
    if not (model_dir / "metrics.json").exists():
        return None
    try:
        return ExportMetrics.in_folder(model_dir)
    except ArtifactError as err:
        raise ModelLoadError(str(err)) from None


def content_hash(model_dir: Path) -> str:
    """Hash of the weight files, for exports whose metrics.json lacks model_version."""
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def default_torch_threads() -> int:
    """torch's own default counts the host's cores; in a pod with a CPU limit of 2 on a 64-core node that
    means 64 spinning OpenMP threads fighting over 2 CPUs. Use the CPUs this process may actually use."""
    return available_cpus()


def detect_task(metrics: ExportMetrics | None, config: dict[str, Any]) -> Task:
    if metrics is not None:
        return metrics.task
    architectures = " ".join(config.get("architectures") or [])
    if "SequenceClassification" in architectures:
        return "text-classification"
    if "CausalLM" in architectures or "LMHead" in architectures:
        return "causal-lm"
    raise ModelLoadError("cannot tell the task: metrics.json has no 'task' and config.json no known architecture")


class ModelRunner:
    """Loads `model_dir` (the trainer's export contract) and runs it. Call `load()` once, off the event loop."""

    def __init__(
        self, model_dir: Path, *, name: str | None = None, max_length: int | None = None, precision: str = "fp32"
    ) -> None:
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"{model_dir} has no config.json: not an exported model directory")
        self.model_dir = model_dir
        self.metrics = read_export_metrics(model_dir)
        self.config = read_json(model_dir / "config.json")
        self.task: Task = detect_task(self.metrics, self.config)
        self.name: str = name or (self.metrics.name if self.metrics else model_dir.resolve().name)
        # Hashing the weights can take seconds on a large model: done in load(), not here.
        self.version: str = self.metrics.model_version if self.metrics else ""
        self._max_length_override = max_length
        self.precision = precision
        self._bf16 = False
        self.max_length = max_length or 512
        self.labels: list[str] = []
        self.load_seconds = 0.0
        self._tokenizer: Any = None
        self._model: Any = None
        # A fast tokenizer refuses concurrent calls that change its settings ("Already borrowed"), and
        # seeded sampling uses torch's global RNG: both are serialized across the batcher's workers.
        self._tokenizer_lock = threading.Lock()
        self._generate_lock = threading.Lock()

    def load(self, torch_threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        started = time.perf_counter()
        torch.set_num_threads(torch_threads or default_torch_threads())
        # trust_remote_code stays off: a served directory must never run code shipped inside it.
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
        auto = AutoModelForSequenceClassification if self.task == "text-classification" else AutoModelForCausalLM
        self._model = auto.from_pretrained(
            self.model_dir, trust_remote_code=False, **self._attention_choice()
        ).eval()
        config = self._model.config
        if self.task == "text-classification":
            self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        elif self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.max_length = self._resolve_max_length()
        self.version = self.version or content_hash(self.model_dir)
        self._pad_id = int(self._tokenizer.pad_token_id or 0)
        tok = self._tokenizer
        candidates = (tok.bos_token_id, tok.cls_token_id, tok.eos_token_id, tok.unk_token_id, self._pad_id)
        self._empty_id = int(next(c for c in candidates if c is not None))
        if getattr(config, "pad_token_id", None) is None:
            # e.g. GPT-2-style classifiers find the last real token through pad_token_id
            config.pad_token_id = self._pad_id
        # bf16 autocast: CPUs with native bf16 run it about twice as fast.
        auto_bf16 = self.precision == "auto" and self._tested_in_bf16() and cpu_has_bf16()
        self._bf16 = self.precision == "bf16" or auto_bf16
        if self._bf16 and self.task == "text-classification":
            _cast_linear_weights(self._model, torch.bfloat16)
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s model %r version %s from %s in %.2fs (token limit %d, %d torch threads, %s)",
            self.task, self.name, self.version, self.model_dir, self.load_seconds, self.max_length,
            torch.get_num_threads(), self.compute_precision,
        )

    def _attention_choice(self) -> dict[str, str]:
        """Plain matmul attention for short-input classifiers: on one CPU thread it ran MiniLM on SST-2
        9% faster than torch's flash kernel, which pays off only for long sequences. Its memory grows
        with length squared, so models that take more than 512 tokens keep the library's choice."""
        limits = self._declared_limits()
        if self.task == "text-classification" and limits and min(limits) <= 512:
            return {"attn_implementation": "eager"}
        return {}

    @property
    def compute_precision(self) -> str:
        """What classification passes actually run in: "bf16" or "fp32"."""
        return "bf16" if self._bf16 and self.task == "text-classification" else "fp32"

    def _tested_in_bf16(self) -> bool:
        """The trainer evaluated this export under bf16 autocast: serving in bf16 reproduces the test metrics."""
        return self.metrics is not None and self.metrics.training.mixed_precision == "bf16"

    def _declared_limits(self) -> list[int]:
        """Token limits known before loading: --max-length and the model's positions (config.json)."""
        positions = (self.config.get(key) for key in ("max_position_embeddings", "n_positions"))
        candidates = [self._max_length_override, *positions]
        return [int(c) for c in candidates if isinstance(c, int) and 0 < c < _NO_LIMIT]

    def _resolve_max_length(self) -> int:
        limits = self._declared_limits()
        if isinstance(self._tokenizer.model_max_length, int) and 0 < self._tokenizer.model_max_length < _NO_LIMIT:
            limits.append(self._tokenizer.model_max_length)
        return min(limits) if limits else 512

    # --- tokenization (any thread) -------------------------------------------------------------------

    def encode(self, texts: Sequence[str], *, limit: int | None = None, keep: str = "start") -> list[Encoded]:
        """Tokenize; inputs over `limit` tokens are cut (classification keeps the start, prompts the end)."""
        limit = limit or self.max_length
        with self._tokenizer_lock:
            full = self._tokenizer(
                list(texts), truncation=False, verbose=False, return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
        out = []
        for text, ids in zip(texts, full, strict=True):
            if not ids:  # "" with a tokenizer that adds no special tokens: give the model one token
                ids = [self._empty_id]
            if len(ids) <= limit:
                out.append(Encoded(list(ids), len(ids), False))
            elif keep == "end":
                out.append(Encoded(list(ids[-limit:]), len(ids), True))
            else:
                # Re-encode with the tokenizer's own truncation so special tokens ([SEP]) stay in place.
                with self._tokenizer_lock:
                    cut = self._tokenizer(text, truncation=True, max_length=limit)["input_ids"]
                out.append(Encoded(list(cut), len(ids), True))
        return out

    # --- model calls (the batcher's worker threads) --------------------------------------------------

    def use_threads(self, threads: int) -> None:
        """torch intra-op threads for the calling thread's next passes (OpenMP settings are per thread)."""
        if getattr(_per_thread, "threads", None) != threads:
            import torch

            torch.set_num_threads(threads)
            _per_thread.threads = threads

    def classify(self, batch: Sequence[Sequence[int]]) -> list[Classification]:
        import torch

        width = max(len(ids) for ids in batch)
        # Padded rows as Python lists, then one tensor each: a copy per row cost more than the small passes.
        input_ids = torch.tensor([[*ids, *[self._pad_id] * (width - len(ids))] for ids in batch], dtype=torch.long)
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], dtype=torch.long)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16):
            probs = self._model(input_ids=input_ids, attention_mask=attention).logits.float().softmax(-1)
        results = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            scores = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            results.append(Classification(self.labels[best], float(row[best]), scores))
        return results

    def generate(
        self, ids: Sequence[int], params: GenerationParams, control: GenerationControl | None = None
    ) -> Completion:
        with self._generate_lock:
            return self._generate(ids, params, control or GenerationControl())

    def _generate(self, ids: Sequence[int], params: GenerationParams, control: GenerationControl) -> Completion:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        progress = _Progress(self._tokenizer, self._tokenizer_lock, params.stop, control)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), progress.done, dtype=torch.bool)

        class _Stream(BaseStreamer):
            def put(self, value: Any) -> None:
                progress.put(value)

            def end(self) -> None:
                pass

        if params.seed is not None:
            # Generations are serialized (the lock in generate()), so seeding the global RNG is per request.
            torch.manual_seed(params.seed)
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_tokens,
                pad_token_id=self._pad_id,
                stopping_criteria=StoppingCriteriaList([_Stop()]),
                streamer=_Stream(),
                **sampling,
            )
        return progress.finish(len(ids), params.max_tokens)

    def warm_up(self) -> None:
        """One real forward pass so the first client does not pay for lazy initialisation."""
        ids = self.encode(["warm-up"])[0].ids
        if self.task == "text-classification":
            self.classify([ids, ids])
        else:
            self.generate(ids, GenerationParams(max_tokens=2, temperature=0.0))


def _cast_linear_weights(model: Any, dtype: Any) -> None:
    """Store Linear weights in `dtype` once. Autocast casts them to bf16 on every forward pass anyway
    (same numbers), and that cast cost a third of a one-sentence pass on MiniLM."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)


class _Progress:
    """Tracks generated text: stop strings, incremental streaming with hold-back, eos."""

    def __init__(self, tokenizer: Any, lock: threading.Lock, stop: Sequence[str], control: GenerationControl) -> None:
        self._tokenizer = tokenizer
        self._lock = lock
        self._stop = [s for s in stop if s]
        self._control = control
        self._ids: list[int] = []
        self._seen_prompt = False
        self._emitted = 0
        self.text = ""
        self.stopped_by_string = False
        self.done = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:  # generate() first hands the streamer the prompt
            self._seen_prompt = True
            return
        self._ids.extend(int(t) for t in value.reshape(-1).tolist())
        with self._lock:
            self.text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped_by_string, self.done = self.text[:cut], True, True
        if self._control.cancelled.is_set():
            self.done = True
        # Hold back what could still become a stop string, and half-decoded characters.
        hold = 0 if self.done else max((len(s) - 1 for s in self._stop), default=0)
        safe = len(self.text) - hold
        while safe > self._emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        self._emit(safe)

    def _emit(self, upto: int) -> None:
        if upto > self._emitted and self._control.on_text is not None:
            self._control.on_text(self.text[self._emitted : upto])
        self._emitted = max(self._emitted, upto)

    def finish(self, prompt_tokens: int, max_tokens: int) -> Completion:
        self._emit(len(self.text))
        eos = self._tokenizer.eos_token_id
        ended = self.stopped_by_string or (eos is not None and eos in self._ids) or len(self._ids) < max_tokens
        return Completion(self.text, "stop" if ended else "length", prompt_tokens, len(self._ids))
