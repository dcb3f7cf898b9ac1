"""Packed (padding-free) batches: each example sees only itself, exactly as in a separate forward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from finetune.trainer.causal import IGNORE_INDEX, Feature
from finetune.trainer.packing import (
    PackedCollator,
    PaddedCausalCollator,
    make_collator,
    real_tokens,
    supports_padding_free,
)
from tests.unit.trainer.causal_fixtures import tiny_gpt2, tiny_llama, tiny_other

BUILDERS: dict[str, Callable[..., Any]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def features(lengths: list[int], seed: int = 0) -> list[Feature]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(7, 262, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return out


def separate_logits(model: Any, feats: list[Feature]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in feats]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_each_example_its_own_logits(tok: Any, family: str, attn: str) -> None:
    model = BUILDERS[family](tok, attn=attn).eval()
    feats = features([7, 3, 11, 5])
    collator = make_collator(model, tok, packing=True, max_length=64)
    assert isinstance(collator, PackedCollator) and model.config.use_cache is False
    batch = PackedCollator()(feats)  # one row, as flash-attention gets it
    assert batch["input_ids"].shape == (1, 26)
    assert batch["position_ids"][0].tolist() == [*range(7), *range(3), *range(11), *range(5)]
    with torch.no_grad():
        packed = model(**batch).logits[0]
    start = 0
    for f, alone in zip(feats, separate_logits(model, feats), strict=True):
        n = len(f["input_ids"])
        torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-4)
        start += n


@pytest.mark.parametrize(("family", "attn"), [("qwen2", "sdpa"), ("mistral", "sdpa"), ("gpt_neo", "eager")])
def test_other_families_pack_too(tok: Any, family: str, attn: str) -> None:
    model = tiny_other(family, tok, attn=attn).eval()
    assert supports_padding_free(model)
    feats = features([6, 9, 4])
    with torch.no_grad():
        packed = model(**PackedCollator()(feats), use_cache=False).logits[0]
    torch.testing.assert_close(packed, torch.cat(separate_logits(model, feats)), atol=1e-5, rtol=1e-4)


def test_without_restarting_positions_examples_would_leak(tok: Any) -> None:
    """The control that shows the test above can fail: plain concatenation mixes the examples."""
    model = tiny_llama(tok).eval()
    feats = features([7, 5])
    batch = PackedCollator()(feats)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits[0, 7:]
        cached = model(**batch, use_cache=True).logits[0, 7:]  # a KV cache turns packing detection off
    alone = separate_logits(model, feats)[1]
    assert (leaky - alone).abs().max() > 1e-3
    assert (cached - alone).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_bounded_by_max_length_match_separate_passes(tok: Any, family: str) -> None:
    model = BUILDERS[family](tok).eval()
    feats = features([9, 4, 6, 12, 3, 8])
    collator = PackedCollator(pad_token_id=tok.pad_token_id, max_tokens_per_row=15)
    batch = collator(feats)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] == 15
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits
    alone = separate_logits(model, feats)
    for r, row in enumerate(collator.rows(feats)):
        start = 0
        for i in row:
            n = len(feats[i]["input_ids"])
            torch.testing.assert_close(packed[r, start : start + n], alone[i], atol=1e-5, rtol=1e-4)
            start += n
        assert (batch["labels"][r, start:] == IGNORE_INDEX).all()  # the row's tail padding


def test_packed_labels_mask_each_examples_first_token(tok: Any) -> None:
    feats = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackedCollator()(feats)
    # After the LM's shift, label 8 would be the target of token 7 (the previous example's end).
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert real_tokens(feats) == 5


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tok: Any) -> None:
    feats = features([12, 5, 9, 3], seed=1)
    losses, grads = [], []
    for collator in (PackedCollator(), PaddedCausalCollator(pad_token_id=tok.pad_token_id)):
        model = tiny_llama(tok, seed=3).train()
        model.config.use_cache = False
        loss = model(**collator(feats)).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_models_that_cannot_pack_fall_back_to_padded_batches(tok: Any) -> None:
    # BLOOM has ALiBi attention and no position_ids: packing would leak across examples.
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=2))
    assert supports_padding_free(bloom) is False
    assert isinstance(make_collator(bloom, tok, packing=True, max_length=64), PaddedCausalCollator)
    assert supports_padding_free(tiny_llama(tok)) is True
    assert isinstance(make_collator(tiny_llama(tok), tok, packing=False, max_length=64), PaddedCausalCollator)


def test_rows_waste_little_on_padding() -> None:
    rng = torch.Generator().manual_seed(0)
    lengths = (torch.randn(64, generator=rng) * 0.7 + 4.5).exp().clamp(20, 400).long().tolist()
    feats = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    for start in range(0, 64, 16):
        chunk = feats[start : start + 16]
        batch = PackedCollator(max_tokens_per_row=512)(chunk)
        assert batch["input_ids"].shape[1] <= 512
        assert batch["input_ids"].numel() <= 1.1 * real_tokens(chunk)
