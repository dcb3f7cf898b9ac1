"""The exported model, loaded once: tokenizer + model, forward passes and generation.

Everything here is synchronous and runs on the batcher's single worker thread (forward passes) or a
helper thread (tokenization); nothing in this module touches the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune.contracts import ArtifactError, ExportMetrics, tokenizer_fingerprint
from finetune.hardware import available_cpus, cpu_has_bf16
from finetune.server.generation import (
    Completion,
    GenerationControl,
    GenerationParams,
    GenerationRequest,
    generate_batch,
)

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
        self, model_dir: Path, *, name: str | None = None, max_length: int | None = None, precision: str = "fp32",
        device: str = "auto",
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
        self.device_choice = device
        self.device = "cpu"
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
        check_tokenizer_fits(self._tokenizer, self._model, self.metrics)
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
        self._place(torch)
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s model %r version %s from %s in %.2fs (token limit %d, %s, %d torch threads, %s)",
            self.task, self.name, self.version, self.model_dir, self.load_seconds, self.max_length, self.device,
            torch.get_num_threads(), self.compute_precision,
        )

    @property
    def vocabulary_size(self) -> int:
        """Token ids a prompt may use: below the model's embedding rows."""
        return int(self._model.get_input_embeddings().num_embeddings)

    def _place(self, torch: Any) -> None:
        """The pod's GPU when there is one (bf16 where the GPU has it), else the CPU in fp32 or bf16."""
        if self.device_choice != "cpu" and torch.cuda.is_available():
            self.device = "cuda"
            if self.precision != "fp32" and torch.cuda.is_bf16_supported():
                self._model.to(torch.bfloat16)
                self._bf16 = True
            self._model.to(self.device)
            return
        if self.device_choice == "cuda":
            raise ModelLoadError("--device cuda: torch sees no GPU in this container")
        # bf16 autocast: CPUs with native bf16 run it about twice as fast.
        auto_bf16 = self.precision == "auto" and self._tested_in_bf16() and cpu_has_bf16()
        self._bf16 = self.precision == "bf16" or auto_bf16
        if self._bf16 and self.task == "text-classification":
            _cast_linear_weights(self._model, torch.bfloat16)

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
        """What the model's passes actually run in: "bf16" or "fp32" (on CPUs causal LMs stay fp32)."""
        return "bf16" if self._bf16 and (self.task == "text-classification" or self.device == "cuda") else "fp32"

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
        input_ids = torch.tensor([[*ids, *[self._pad_id] * (width - len(ids))] for ids in batch], dtype=torch.long,
                                 device=self.device)
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], dtype=torch.long,
                                 device=self.device)
        # On a GPU the weights themselves are bf16; autocast is the CPU's way to run bf16 Linear layers.
        autocast = self._bf16 and self.device == "cpu"
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            probs = self._model(input_ids=input_ids, attention_mask=attention).logits.float().softmax(-1)
        results = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            scores = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            results.append(Classification(self.labels[best], float(row[best]), scores))
        return results

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Requests with one `batch_key` in one `generate` call; `n` completions each."""
        # Sampling draws from torch's global RNG: a seeded request must not share it with another pass.
        lock = self._generate_lock if requests[0].params.temperature > 0 else contextlib.nullcontext()
        with lock:
            return generate_batch(self._model, self._tokenizer, self._tokenizer_lock, requests,
                                  pad_id=self._pad_id, device=self.device)

    def warm_up(self) -> None:
        """One real forward pass so the first client does not pay for lazy initialisation."""
        ids = self.encode(["warm-up"])[0].ids
        if self.task == "text-classification":
            self.classify([ids, ids])
        else:
            greedy = GenerationParams(max_tokens=2, temperature=0.0)
            self.generate([GenerationRequest(ids, greedy, GenerationControl())])


def check_tokenizer_fits(tokenizer: Any, model: Any, metrics: ExportMetrics | None) -> None:
    """Refuse a tokenizer that is not the model's: another one than the trainer exported (its fingerprint
    in metrics.json), ids past the embeddings (every pass would crash), or one far smaller than the
    vocabulary (an export without its tokenizer files falls back to a handful of special tokens, turns
    every input into [UNK] and gets confident wrong answers)."""
    expected = metrics.tokenizer_fingerprint if metrics is not None else ""
    if expected and tokenizer_fingerprint(tokenizer) != expected:
        raise ModelLoadError(
            f"the tokenizer files are not the ones exported with this model (vocabulary fingerprint "
            f"{tokenizer_fingerprint(tokenizer)}, metrics.json says {expected}): restore them from the export"
        )
    size, rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    if size > rows:
        raise ModelLoadError(
            f"the tokenizer has {size} tokens but the model only {rows} embeddings: they are not from one export"
        )
    if size < rows // 2:
        raise ModelLoadError(
            f"the tokenizer has only {size} tokens for a model with {rows} embeddings: the export's tokenizer "
            "files (tokenizer.json, or vocab.txt / vocab.json + merges.txt) are missing or from another model"
        )


def _cast_linear_weights(model: Any, dtype: Any) -> None:
    """Store Linear weights in `dtype` once. Autocast casts them to bf16 on every forward pass anyway
    (same numbers), and that cast cost a third of a one-sentence pass on MiniLM."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)
