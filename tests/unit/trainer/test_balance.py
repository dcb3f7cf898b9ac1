"""Bias mitigation: loss weights, group-balanced epochs and their sharding, the weighted loss."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from finetune.spec import Training
from finetune.trainer.balance import (
    balance_report,
    balanced_weights,
    group_balanced_rows,
    row_weights,
    weighted_cross_entropy,
)
from finetune.trainer.batching import epoch_batches, sampled_epoch_batches, shard_batches

# 95 rows of group a, 5 of group b; labels 0/1 at 70/30 within each group
GROUPS = ["a"] * 95 + ["b"] * 5
LABELS = [0] * 66 + [1] * 29 + [0] * 4 + [1] * 1


def test_balanced_weights_follow_sklearns_formula() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    ours = balanced_weights(LABELS)
    theirs = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(LABELS))
    assert ours[0] == pytest.approx(theirs[0]) and ours[1] == pytest.approx(theirs[1])
    assert balanced_weights(GROUPS) == pytest.approx({"a": 100 / (2 * 95), "b": 100 / (2 * 5)})


def test_no_mitigation_gives_no_weights() -> None:
    assert row_weights(LABELS, GROUPS, Training()) is None
    assert row_weights(LABELS, GROUPS, Training(group_balance="sample")) is None


def test_group_reweighting_makes_every_group_weigh_the_same() -> None:
    weights = row_weights(LABELS, GROUPS, Training(group_balance="reweight"))
    assert weights is not None
    total = Counter[str]()
    for w, g in zip(weights, GROUPS, strict=True):
        total[g] += w
    assert total["a"] == pytest.approx(total["b"]) == pytest.approx(50)
    assert sum(weights) / len(weights) == pytest.approx(1)


def test_class_and_group_weights_multiply_then_mean_one() -> None:
    weights = row_weights(LABELS, GROUPS, Training(class_weights="balanced", group_balance="reweight"))
    assert weights is not None
    cls, grp = balanced_weights(LABELS), balanced_weights(GROUPS)
    raw = [cls[y] * grp[g] for y, g in zip(LABELS, GROUPS, strict=True)]
    scale = sum(raw) / len(raw)
    assert weights == pytest.approx([r / scale for r in raw])
    assert sum(weights) / len(weights) == pytest.approx(1)
    assert weights[-1] / weights[0] == pytest.approx(cls[1] * grp["b"] / (cls[0] * grp["a"]))


def test_reweighting_without_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="groupBalance"):
        row_weights(LABELS, None, Training(group_balance="reweight"))


def test_sampled_epochs_are_group_balanced_and_keep_the_row_count() -> None:
    for epoch in range(4):
        rows = group_balanced_rows(GROUPS, seed=7, epoch=epoch)
        assert len(rows) == len(GROUPS)
        assert Counter(GROUPS[r] for r in rows) == {"a": 50, "b": 50}
        # the rare group: every row, ten times; the common one: 50 distinct rows of its 95
        assert Counter(r for r in rows if GROUPS[r] == "b") == {r: 10 for r in range(95, 100)}
        assert len({r for r in rows if GROUPS[r] == "a"}) == 50


def test_an_odd_remainder_goes_to_a_different_group_by_epoch() -> None:
    groups = ["a"] * 6 + ["b"] * 2 + ["c"] * 3  # 11 rows, 3 groups: 3 + 4 + 4 in some order
    shares = [Counter(groups[r] for r in group_balanced_rows(groups, 0, epoch)) for epoch in range(12)]
    assert all(sorted(s.values()) == [3, 4, 4] for s in shares)
    assert len({min(s, key=lambda g: s[g]) for s in shares}) > 1


def test_sampling_depends_only_on_seed_and_epoch() -> None:
    first = group_balanced_rows(GROUPS, seed=3, epoch=2)
    assert group_balanced_rows(list(GROUPS), seed=3, epoch=2) == first  # another process, a resumed run
    assert group_balanced_rows(GROUPS, seed=3, epoch=3) != first
    assert group_balanced_rows(GROUPS, seed=4, epoch=2) != first


def test_two_ranks_get_disjoint_equal_shares_of_a_sampled_epoch() -> None:
    lengths = [5 + i % 17 for i in range(len(GROUPS))]
    rows = group_balanced_rows(GROUPS, seed=1, epoch=0)
    whole = sampled_epoch_batches(rows, lengths, 10, seed=1, epoch=0, rank=0, world_size=1)
    shards = [sampled_epoch_batches(rows, lengths, 10, seed=1, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [10] * 5
    # together they are the epoch's draw, no drawn row used twice and none left out
    assert Counter(r for shard in shards for b in shard for r in b) == Counter(rows)
    assert shards == [shard_batches(whole, r, 2) for r in (0, 1)]
    # the same number of batches as an unsampled epoch: the planned step count holds
    assert len(whole) == len(epoch_batches(lengths, 10, 1, 0, 0, 1))


def test_weighted_loss_with_unit_weights_is_the_plain_loss() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert weighted_cross_entropy(logits, labels, torch.ones(6)) == pytest.approx(float(plain))
    weights = torch.tensor([3.0, 0, 0, 0, 0, 0])
    first = torch.nn.functional.cross_entropy(logits[:1], labels[:1])
    assert weighted_cross_entropy(logits, labels, weights) == pytest.approx(float(first) * 3 / 6)


def test_report_names_the_mitigation_and_its_weights() -> None:
    cfg = Training(class_weights="balanced", group_balance="reweight")
    report = balance_report(LABELS, GROUPS, cfg, ["negative", "positive"])
    assert report["class_weights"] == "balanced" and report["group_balance"] == "reweight"
    assert report["train_rows_per_group"] == {"a": 95, "b": 5}
    assert report["weights"]["group"] == {"a": round(100 / 190, 4), "b": 10.0}
    assert set(report["weights"]["class"]) == {"negative", "positive"}
    sampled = balance_report(LABELS, GROUPS, Training(group_balance="sample"), ["negative", "positive"])
    assert sampled["rows_per_group_per_epoch"] == {"a": 50, "b": 50} and "weights" not in sampled
    assert balance_report(LABELS, None, Training(), ["negative", "positive"]) == {
        "class_weights": "none", "group_balance": "none"}
