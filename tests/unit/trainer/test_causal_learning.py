"""A tiny Llama learns the copy task on packed batches: perplexity falls, generation scores rise."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.spec import ModelSource, SpecError
from finetune.trainer.causal import encode_causal, generation_examples, load_causal_model
from finetune.trainer.generation import (
    generate,
    generate_and_score,
    loss_sum,
    perplexity,
    score,
    write_samples,
)
from finetune.trainer.packing import PackedCollator, make_collator
from tests.unit.trainer.causal_fixtures import copy_task, save_model, tiny_llama, train_tokenizer

MAX_LENGTH = 48


def validation_loss(model: Any, collator: Any, feats: list[Any]) -> float:
    """Token-weighted over batches of 16, checked against one forward pass over everything."""
    model.eval()
    sums = [loss_sum(model, collator(feats[i : i + 16])) for i in range(0, len(feats), 16)]
    loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
    with torch.no_grad():
        assert loss == pytest.approx(float(model(**collator(feats)).loss), rel=1e-4)
    model.train()
    return loss


def test_model_learns_copy_task(tmp_path: Path) -> None:
    tok = train_tokenizer(tmp_path / "tok")
    source = save_model(tiny_llama(tok), tok, tmp_path / "base")
    model = load_causal_model(ModelSource(path=str(source)))
    train, _ = encode_causal(copy_task(1000, seed=1), tok, MAX_LENGTH)
    val, _ = encode_causal(copy_task(64, seed=2), tok, MAX_LENGTH)
    test = generation_examples(copy_task(40, seed=3), tok, MAX_LENGTH)
    collator = make_collator(model, tok, packing=True, max_length=MAX_LENGTH)
    assert isinstance(collator, PackedCollator)

    ppl_before = perplexity(validation_loss(model, collator, val))
    before, _ = generate_and_score(model, tok, test, max_new_tokens=24, batch_size=16)

    torch.manual_seed(0)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        model(**collator(rng.sample(train, 32))).loss.backward()
        opt.step()
        opt.zero_grad()

    ppl_after = perplexity(validation_loss(model, collator, val))
    after, samples = generate_and_score(model, tok, test, max_new_tokens=24, batch_size=16)
    assert ppl_after < ppl_before / 10 and ppl_after < 2.0, (ppl_before, ppl_after)
    assert before["exact_match"] < 0.1 and after["exact_match"] >= 0.8, (before, after)
    assert after["rougeL"] >= before["rougeL"] + 0.5
    assert after["bleu"] >= before["bleu"] + 50

    # Left-padded batches generate what each prompt generates alone.
    prompts = [e.prompt_ids for e in test[:6]]
    assert generate(model, tok, prompts, 24, batch_size=6) == generate(model, tok, prompts, 24, batch_size=1)

    path = tmp_path / "out" / "samples.jsonl"
    write_samples(path, samples)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(test) and set(rows[0]) == {"prompt", "reference", "generation"}
    assert rows[0]["prompt"].startswith("copy ") and rows[0]["reference"] == test[0].reference
    assert sum(r["generation"] == r["reference"] for r in rows) == round(after["exact_match"] * len(rows))
    assert [p.name for p in path.parent.iterdir()] == ["samples.jsonl"]  # no temp file left behind


def test_scores_of_known_answers() -> None:
    perfect = score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect == pytest.approx({"rougeL": 1.0, "bleu": 100.0, "exact_match": 1.0})
    half = score(["the cat sat", "a dog ran far away"], ["the cat sat", "the bird flew"])
    assert half["exact_match"] == 0.5
    assert 0.0 < half["rougeL"] < 1.0 and 0.0 < half["bleu"] < 100.0
    assert score([], []) == {"rougeL": 0.0, "bleu": 0.0, "exact_match": 0.0}


def test_unloadable_model_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec.model.path"):
        load_causal_model(ModelSource(path=str(tmp_path)))


def test_perplexity_is_exp_of_the_loss() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e6))
