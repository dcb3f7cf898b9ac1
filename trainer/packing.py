"""Causal-LM batches: padding-free (packed) when the model supports it, length-grouped padding otherwise.

A packed batch concatenates the examples into one row, `position_ids` restarting at 0 for each, and no
attention_mask. transformers (5.x) turns restarting position ids into a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`) for the eager and sdpa attention of every model built on
`create_causal_mask` (Llama, Mistral, Qwen2/3, Gemma, GPT-2, GPT-Neo, ...), and flash-attention uses them
as varlen boundaries. Two conditions: attention_mask must be absent and the forward must run without
a KV cache (`use_cache=False`), else the detection is skipped and examples attend to each other.
`supports_padding_free` checks the whole contract on the real model with a two-example probe.

The first label of every packed example is -100: after the LM's label shift, it would otherwise be the
target of the previous example's last token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from finetune.trainer.causal import IGNORE_INDEX, Feature

log = logging.getLogger(__name__)


class PackedCollator:
    """Features -> padding-free rows: input_ids, labels, position_ids, each of shape rows x width.

    Without `max_tokens_per_row`, one row holds the whole batch (what flash-attention's varlen path
    wants). With it, the examples are spread over as few rows of at most that many tokens as fit, of
    even width (first-fit decreasing); the short tail of a row is padding in its own position block,
    labels -100, which no real token can attend to. eager/sdpa attention costs (row length)^2 with a
    dense mask, so rows bound it.
    """

    def __init__(self, pad_token_id: int = 0, max_tokens_per_row: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.max_tokens_per_row = max_tokens_per_row

    def rows(self, features: Sequence[Feature]) -> list[list[int]]:
        """Indices of the features in each row: as few rows as the cap allows, of even width."""
        cap = self.max_tokens_per_row
        if cap is None:
            return [list(range(len(features)))]
        lengths = [len(f["input_ids"]) for f in features]
        total = sum(lengths)
        # Aim at k rows of equal width, widening a little until they fit, for the fewest k the cap
        # allows: far less tail padding than filling rows up to the cap one after the other.
        for k in range(-(-total // cap), len(lengths) + 1):
            width = max(max(lengths), -(-total // k))
            while True:
                rows = _first_fit_decreasing(lengths, min(width, cap))
                if len(rows) <= k:
                    return rows
                if width >= cap:
                    break
                width += max(1, width // 32)
        return _first_fit_decreasing(lengths, cap)  # examples longer than the cap: one row each

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        rows = self.rows(features)
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        positions: list[list[int]] = []
        for row in rows:
            r_ids: list[int] = []
            r_labels: list[int] = []
            r_pos: list[int] = []
            for i in row:
                f = features[i]
                r_ids += f["input_ids"]
                r_labels += [IGNORE_INDEX, *f["labels"][1:]]
                r_pos += range(len(f["input_ids"]))
            ids.append(r_ids)
            labels.append(r_labels)
            positions.append(r_pos)
        width = max(len(r) for r in ids)
        for r_ids, r_labels, r_pos in zip(ids, labels, positions, strict=True):
            pad = width - len(r_ids)
            r_ids += [self.pad_token_id] * pad
            r_labels += [IGNORE_INDEX] * pad
            r_pos += range(pad)  # the padding is its own sequence, which no real token can see
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


def _first_fit_decreasing(lengths: Sequence[int], cap: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if slot is None:  # a new row (an example longer than the cap gets one to itself)
            rows.append([i])
            room.append(cap - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


class PaddedCausalCollator:
    """Features -> right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        ids, mask, labels = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def supports_padding_free(model: Any, rtol: float | None = None) -> bool:
    """Whether a packed row gives each example the logits it gets alone (a tiny probe on `model`).

    Models whose forward takes no position_ids, use ALiBi or custom remote code that ignores packing
    fail the probe and train on padded batches instead. Dropout is off during the probe.
    """
    import inspect

    # A PeftModel's forward passes position_ids on in **kwargs; what counts is the base model's.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        log.info("padding-free batches off: %s takes no position_ids", type(model).__name__)
        return False
    param = next(model.parameters())
    vocab = int(model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (5,), generator=gen).tolist()
    b = torch.randint(0, vocab, (4,), generator=gen).tolist()
    feats = [{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}]
    packed = PackedCollator()(feats)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=packed["input_ids"].to(param.device),
                        position_ids=packed["position_ids"].to(param.device), use_cache=False).logits[0]
            alone = [model(input_ids=torch.tensor([x], device=param.device), use_cache=False).logits[0]
                     for x in (a, b)]
    except Exception as err:  # any failure just means: use the padded path
        log.info("padding-free batches off: the probe forward failed (%s)", err)
        return False
    finally:
        model.train(was_training)
    # Only the second example can be wrong: causal attention never lets the first one see the second.
    expected = alone[1].float()
    got = out[len(a) :].float()
    rel = float((got - expected).norm() / expected.norm().clamp_min(1e-6))
    tol = rtol if rtol is not None else (1e-4 if param.dtype == torch.float32 else 2e-2)
    if rel > tol:
        log.info("padding-free batches off: packed logits differ from separate passes (relative %.3g)", rel)
    return rel <= tol


def make_collator(model: Any, tokenizer: Any, packing: bool, max_length: int) -> Any:
    """The collator a causal-LM run trains with: packed when asked for and the model passes the probe.

    Flash-attention takes the whole batch as one row (its varlen kernel skips masked blocks); eager and
    sdpa build a dense (row length)^2 mask, so their rows hold at most max_length tokens.
    """
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if packing and supports_padding_free(model):
        # Training forwards pass no use_cache; with the config's default (True) transformers would
        # build a cache and skip the packed-sequence mask. See the module docstring.
        model.config.use_cache = False
        flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash")
        return PackedCollator(pad_token_id=pad, max_tokens_per_row=None if flash else max_length)
    if packing:
        log.warning("%s does not support padding-free batches; using length-grouped padded batches",
                    type(model).__name__)
    return PaddedCausalCollator(pad_token_id=pad)


def real_tokens(features: Sequence[Feature]) -> int:
    """Tokens of the examples themselves (what tokens/s counts), whatever padding a collator adds."""
    return sum(len(f["input_ids"]) for f in features)
