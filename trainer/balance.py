"""Bias mitigation for text classification: loss weights per row, and group-balanced epochs.

Two ways to make an under-represented group (or class) count as much as a common one:
- reweight: every row keeps its place in the data, its loss is scaled by n / (k x rows of its group);
  cheap and exact, but a rare group's few rows get large weights, so its gradients are noisy.
- sample: each epoch draws the same number of rows from every group (rare rows repeat, common rows
  are skipped); steadier gradients, but the majority's rows are not all seen every epoch.

The draw depends only on (seed, epoch), like the batch order in batching.py: every process computes the
same rows, and a run resumed after a kill trains on exactly the rows it would have.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import torch

from finetune.spec import Training

K = TypeVar("K", bound=Hashable)


def balanced_weights(keys: Sequence[K]) -> dict[K, float]:
    """sklearn's "balanced" formula: n / (number of values x rows of that value); the mean row weight is 1."""
    counts = Counter(keys)
    n, k = len(keys), len(counts)
    return {key: n / (k * count) for key, count in counts.items()}


def uses_weights(cfg: Training) -> bool:
    return cfg.class_weights == "balanced" or cfg.group_balance == "reweight"


def row_weights(labels: Sequence[int], groups: Sequence[str] | None, cfg: Training) -> list[float] | None:
    """Each training row's loss weight, with mean 1 over the rows; None when the spec asks for none.

    Mean 1 keeps the loss on the scale of an unweighted run, so the learning rate means the same thing.
    """
    if not uses_weights(cfg):
        return None
    weights = [1.0] * len(labels)
    if cfg.class_weights == "balanced":
        per_class = balanced_weights(labels)
        weights = [w * per_class[y] for w, y in zip(weights, labels, strict=True)]
    if cfg.group_balance == "reweight":
        known = _need_groups(groups, len(labels))
        per_group = balanced_weights(known)
        weights = [w * per_group[g] for w, g in zip(weights, known, strict=True)]
    mean = sum(weights) / len(weights) if weights else 1.0
    return [w / mean for w in weights]


def group_balanced_rows(groups: Sequence[str], seed: int, epoch: int) -> list[int]:
    """One epoch's training rows, as many from every group, len(groups) rows in all (so the number of
    steps, which the learning-rate schedule is planned with, does not change).

    A group short of its quota contributes all its rows, repeated, and then a draw of the rest; a
    group over it contributes a draw without replacement. Whole repeats before the draw mean every row
    of a rare group is seen each epoch, rather than leaving it to chance which ones.
    """
    # Its own stream, apart from the batch order's Random(seed + epoch); a str seed hashes the same in
    # every process (sha512), whatever PYTHONHASHSEED says.
    rng = random.Random(f"group-balance:{seed}:{epoch}")
    members: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    if not members:
        return []
    names = sorted(members)
    base, extra = divmod(len(groups), len(names))
    lucky = set(rng.sample(names, extra))  # who takes the remainder rows varies by epoch: no group is favoured
    rows: list[int] = []
    for name in names:
        quota, pool = base + (name in lucky), members[name]
        repeats, rest = divmod(quota, len(pool))
        rows.extend(pool * repeats)
        rows.extend(rng.sample(pool, rest))
    return rows


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of weight x cross-entropy over the batch.

    Not divided by the batch's weight sum (torch's weighted mean): that would make a batch with no rare
    row count as much as one with several, undoing most of the weighting across batches; the weights'
    mean of 1 over the training rows already keeps the loss on the unweighted scale.
    """
    losses = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), labels.view(-1), reduction="none"
    )
    return (losses * weights.float().view(-1)).mean()


def balance_report(
    labels: Sequence[int], groups: Sequence[str] | None, cfg: Training, label_names: Sequence[str]
) -> dict[str, Any]:
    """What mitigation ran, for metrics.json (data.balance): the settings and the weights they gave."""
    report: dict[str, Any] = {"class_weights": cfg.class_weights, "group_balance": cfg.group_balance}
    weights: dict[str, dict[str, float]] = {}
    if cfg.class_weights == "balanced":
        per_class = balanced_weights(labels)
        weights["class"] = {label_names[y]: round(per_class[y], 4) for y in sorted(per_class)}
    if groups is not None:
        report["train_rows_per_group"] = dict(sorted(Counter(groups).items()))
        if cfg.group_balance == "reweight":
            per_group = balanced_weights(groups)
            weights["group"] = {g: round(per_group[g], 4) for g in sorted(per_group)}
        elif cfg.group_balance == "sample":
            drawn = Counter(groups[row] for row in group_balanced_rows(groups, cfg.seed, 0))
            report["rows_per_group_per_epoch"] = dict(sorted(drawn.items()))
    if weights:
        report["weights"] = weights
    return report


def _need_groups(groups: Sequence[str] | None, n: int) -> Sequence[str]:
    if groups is None or len(groups) != n:
        raise ValueError("training.groupBalance needs a group for every training row (evaluation.groupColumn)")
    return groups
