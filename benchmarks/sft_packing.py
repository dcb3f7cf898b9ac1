"""SFT throughput: padded batches vs packed (padding-free) batches, same model, same data, one run.

    .venv/bin/python benchmarks/sft_packing.py --threads 1       # ~2 minutes; the docs' figures
    .venv/bin/python benchmarks/sft_packing.py                   # torch's default threads
    .venv/bin/python benchmarks/sft_packing.py --steps 4         # a quick look

On a machine that other jobs share, prefer --threads 1: torch's threads wait on each other when
the cores are busy, and the timings turn erratic.

Model: a randomly initialised 4-layer Llama (hidden 256, 8 heads, vocab 2048), sdpa attention, fp32.
Data: synthetic SFT examples whose lengths follow a log-normal spread clipped to 20..400 tokens
(median ~90: most instruction data is short with a long tail); the first 40% of each example is
prompt (labels -100). Every mode trains a fresh copy of the same model (same seed) with AdamW for
the same number of steps, after one untimed warm-up step; tokens/s counts the examples' own tokens,
never padding. Modes:
- padded (random batches): random batches right-padded to their longest example (the seeds' setup);
- padded (length-grouped): the trainer's fallback for models without padding-free support;
- packed, one row: all examples of a batch in one row (what flash-attention gets);
- packed, rows <= max_length: what the trainer uses with eager/sdpa attention (CPU, most GPUs
  without flash-attn), since those build a dense (row length)^2 mask.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.trainer.batching import length_grouped_batches
from finetune.trainer.causal import IGNORE_INDEX, Feature
from finetune.trainer.packing import PackedCollator, PaddedCausalCollator, real_tokens

VOCAB = 2048
MAX_LENGTH = 512  # training.maxLength: what the trainer bounds packed rows by on eager/sdpa attention


def make_data(n: int, seed: int) -> list[Feature]:
    rng = random.Random(seed)
    feats = []
    for _ in range(n):
        length = int(min(400, max(20, rng.lognormvariate(4.5, 0.7))))
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        cut = int(length * 0.4)
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return feats


def make_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg)


class Mode:
    """One way of batching: its own copy of the model and optimizer, and the time it has spent."""

    def __init__(self, name: str, batches: list[list[int]], collate: Callable[[Any], dict[str, Any]],
                 seed: int) -> None:
        self.name, self.batches, self.collate = name, batches, collate
        self.model = make_model(seed)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.seconds, self.tokens, self.computed = 0.0, 0, 0

    def step(self, feats: Sequence[Feature], n: int) -> None:
        chunk = [feats[i] for i in self.batches[n]]
        batch = self.collate(chunk)
        start = time.perf_counter()
        self.model(**batch, use_cache=False).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if n:  # the first step warms up allocators and kernels
            self.seconds += time.perf_counter() - start
            self.tokens += real_tokens(chunk)
            self.computed += batch["input_ids"].numel()

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per mode")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    n = args.batch_size * (args.steps + 1)
    feats = make_data(n, args.seed)
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    batches = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    grouped = length_grouped_batches([len(f["input_ids"]) for f in feats], args.batch_size, args.seed)
    lengths = sorted(len(f["input_ids"]) for f in feats)
    print(f"torch threads {torch.get_num_threads()}; {n} examples, lengths min {lengths[0]} "
          f"median {lengths[n // 2]} max {lengths[-1]}; batch size {args.batch_size}; {args.steps} timed steps")

    modes = [
        Mode("padded (random batches)", batches, PaddedCausalCollator(pad_token_id=0), args.seed),
        Mode("padded (length-grouped)", grouped, PaddedCausalCollator(pad_token_id=0), args.seed),
        Mode("packed, one row", batches, PackedCollator(pad_token_id=0), args.seed),
        Mode("packed, rows <= max_length", batches,
             PackedCollator(pad_token_id=0, max_tokens_per_row=MAX_LENGTH), args.seed),
    ]
    # Steps of the modes alternate, so a load change on a shared machine hits every mode alike.
    for n in range(args.steps + 1):
        for mode in modes:
            mode.step(feats, n)
    for mode in modes:
        print(f"{mode.name:28s} {mode.rate:9.0f} tokens/s  ({mode.tokens} real of {mode.computed} "
              f"computed tokens, {mode.seconds:.1f} s)")
    rates = {mode.name: mode.rate for mode in modes}
    ours = rates["packed, rows <= max_length"]
    print(f"packed (rows) / padded (random batches)  = {ours / rates['padded (random batches)']:.2f}x")
    print(f"packed (rows) / padded (length-grouped)  = {ours / rates['padded (length-grouped)']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
