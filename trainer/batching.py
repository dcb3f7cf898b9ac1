"""Length-grouped batches, sharded across processes, resumable at any batch.

Random batches of short texts pad every example to the longest one in the batch; grouping examples
of similar length first wastes far less compute on padding. Batches are still drawn in random order,
and within "mega-batches" of 8 batches, so training sees a mixed stream (wider groups save little
more padding and cost accuracy: measured with benchmarks/trainer_throughput.py).

Every process computes the same batch list from (seed, epoch) and takes every world_size-th batch;
so the position in the data is just (epoch, batch index), and a resumed run skips batches without
reading them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

MEGA_BATCH = 8


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """All examples as batches of similar length, batches in random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    span = batch_size * MEGA_BATCH
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This process's batches; every process gets the same count so collective ops stay in step."""
    per_rank = len(batches) // world_size
    if per_rank == 0:
        # Fewer batches than processes: every process trains on the first batches (a tiny data set).
        return [batches[rank % len(batches)]] if batches else []
    return batches[rank : per_rank * world_size : world_size]


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[list[int]]:
    return shard_batches(length_grouped_batches(lengths, batch_size, seed + epoch), rank, world_size)


def sampled_epoch_batches(
    rows: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[list[int]]:
    """epoch_batches over an epoch's drawn rows (group-balanced sampling, see balance.py), as row indices.

    A row drawn twice is in two batches (or twice in one). The batch count depends only on len(rows), so
    a draw of as many rows as the data has keeps the step count that the schedule was planned with.
    """
    drawn = [lengths[r] for r in rows]
    batches = length_grouped_batches(drawn, batch_size, seed + epoch)
    return shard_batches([[rows[i] for i in batch] for batch in batches], rank, world_size)


def eval_batches(lengths: Sequence[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Sorted by length (no shuffling needed), every example on exactly one process."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    mine = order[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
