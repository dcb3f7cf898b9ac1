"""Causal-LM evaluation: perplexity from the validation loss, greedy generation scored on the test split.

Generation is greedy (deterministic, comparable between runs) with a bound on new tokens; prompts
are left-padded so every row's next token comes right after its own prompt. Scores:
- rougeL: mean ROUGE-L F1 (Google's `rouge-score`, no stemming) of generation vs reference, 0..1;
- bleu: corpus BLEU of `sacrebleu` (its default 13a tokenization), on sacrebleu's 0..100 scale;
- exact_match: share of generations equal to the reference after trimming white space, 0..1.
Neither library downloads anything at run time.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finetune.trainer.causal import IGNORE_INDEX, GenerationExample


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); capped so a diverged run reports a number, not an overflow."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed token cross-entropy, predicted tokens) of one batch, for a token-weighted validation
    loss over batches and processes: loss = sum of sums / sum of counts (all-reduce both)."""
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the LM loss shifts labels by one
    if n == 0:
        return 0.0, 0
    return float(model(**batch).loss) * n, n


def score(generations: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """rougeL, bleu and exact_match of generations against references (see the module docstring)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not generations:
        return {"rougeL": 0.0, "bleu": 0.0, "exact_match": 0.0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, gen)["rougeL"].fmeasure for gen, ref in zip(generations, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(list(generations), [list(references)]).score
    exact = [gen.strip() == ref.strip() for gen, ref in zip(generations, references, strict=True)]
    return {
        "rougeL": float(sum(rouge) / len(rouge)),
        "bleu": float(bleu),
        "exact_match": float(sum(exact) / len(exact)),
    }


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus the model's own (chat models often end a turn with another token)."""
    stops = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(int(t) for t in stops if t is not None)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_tokens(model, tokenizer)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        # Longest first so each batch pads little; results go back to the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        texts: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                device=device)
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=stops,
            )
            for row, i in enumerate(idx):
                texts[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
        out = [texts[i] for i in range(len(prompts))]
    finally:
        model.train(was_training)
    return out


def generate_and_score(
    model: Any, tokenizer: Any, examples: Sequence[GenerationExample], max_new_tokens: int, batch_size: int = 16
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Metrics {rougeL, bleu, exact_match} and one sample {prompt, reference, generation} per example."""
    generations = generate(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens, batch_size)
    references = [e.reference for e in examples]
    samples = [{"prompt": e.prompt, "reference": e.reference, "generation": g}
               for e, g in zip(examples, generations, strict=True)]
    return score(generations, references), samples


def write_samples(path: str | Path, samples: Sequence[dict[str, str]]) -> None:
    """JSONL, one sample a line, written atomically (temp file in the same folder + os.replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for sample in samples:
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
