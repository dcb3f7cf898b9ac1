"""Bias mitigation, measured: real `finetune train` runs on data with a group the training rows under-represent.

Group "a" (95% of the training rows) writes film reviews whose one sentiment word gives the label. Group
"b" (5%) writes food reviews with its own sentiment words ("tasty", "stale"), and uses a's words the other
way round (ironically: "a great soggy dish" is negative). A model fitted to the rows as they come learns
a's words and gets most of b wrong; trained on group-balanced epochs it learns that b's own word wins.
The validation and test files are half a, half b: enough rows of the rare group to measure it.

`pytest -s` prints the figures (docs/bias.md quotes them).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.synthetic import FILLER, NEGATIVE, POSITIVE, write_tsv

FOOD_POSITIVE = ["tasty", "fresh", "crisp", "juicy", "sweet", "warm", "rich", "ripe"]
FOOD_NEGATIVE = ["stale", "soggy", "bland", "burnt", "sour", "cold", "greasy", "rotten"]
FOOD_FILLER = ["the", "meal", "was", "a", "dish", "with", "sauce", "and", "bread", "it", "tasted", "quite"]
HEADER = ("review", "sentiment", "community")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def review(rng: random.Random, group: str) -> tuple[str, str, str]:
    positive = rng.random() < 0.5
    if group == "a":
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
    else:
        words = rng.choices(FOOD_FILLER, k=rng.randint(3, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(NEGATIVE if positive else POSITIVE))
        words.insert(rng.randrange(len(words) + 1), rng.choice(FOOD_POSITIVE if positive else FOOD_NEGATIVE))
    return " ".join(words), "positive" if positive else "negative", group


def reviews(n: int, share_b: float, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    n_b = round(n * share_b)
    rows = [review(rng, "b") for _ in range(n_b)] + [review(rng, "a") for _ in range(n - n_b)]
    rng.shuffle(rows)
    return rows


def train(mode: str, tiny_bert: Path, files: dict[str, Path], write_job: Callable[..., Path],
          tmp_path: Path) -> dict[str, Any]:
    job = write_job(
        tiny_bert, files["train"], name=f"bias-{mode}",
        dataset={"validation": {"path": str(files["validation"])}, "test": {"path": str(files["test"])}},
        training={"epochs": 4, "learningRate": 2e-3, "groupBalance": mode, "logSteps": 50},
        evaluation={"groupColumn": "community"},
    )
    out = tmp_path / f"out-{mode}"
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "train", "-f", str(job), "--output", str(out)],
                            capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def summary(mode: str, metrics: dict[str, Any]) -> str:
    test = metrics["test"]
    groups = ", ".join(f"{g} {v['f1']:.3f}" for g, v in test["groups"].items())
    return (f"groupBalance {mode:8s}: test f1 {test['f1']:.3f}, per-group f1 {groups}, largest gap "
            f"f1 {test['max_group_gap']['f1']:.3f} accuracy {test['max_group_gap']['accuracy']:.3f}, "
            f"validation group_gap {metrics['validation']['group_gap']:.3f}")


def test_group_balanced_training_closes_the_gap(tiny_bert: Path, write_job: Callable[..., Path],
                                                tmp_path: Path) -> None:
    files = {"train": write_tsv(tmp_path / "train.tsv", reviews(1200, 0.05, seed=1), HEADER),
             "validation": write_tsv(tmp_path / "validation.tsv", reviews(200, 0.5, seed=2), HEADER),
             "test": write_tsv(tmp_path / "test.tsv", reviews(400, 0.5, seed=3), HEADER)}
    runs = {mode: train(mode, tiny_bert, files, write_job, tmp_path) for mode in ("none", "sample", "reweight")}
    print()
    for mode, metrics in runs.items():
        print(summary(mode, metrics))

    plain, sampled, reweighted = runs["none"], runs["sample"], runs["reweight"]
    gap_before, gap_after = plain["test"]["max_group_gap"]["f1"], sampled["test"]["max_group_gap"]["f1"]
    assert plain["test"]["groups"]["b"]["f1"] < plain["test"]["groups"]["a"]["f1"] - 0.1, \
        "the data should make the unmitigated model clearly worse on the rare group"
    assert gap_after <= gap_before / 2, f"group-balanced sampling should at least halve the gap: {gap_before} -> "\
        f"{gap_after}"
    assert sampled["test"]["f1"] > plain["test"]["f1"], "closing the gap should not cost the headline f1 here"
    assert sampled["test"]["groups"]["a"]["f1"] > 0.9, "the majority should not pay for it"
    assert sampled["validation"]["group_gap"] < plain["validation"]["group_gap"]

    # What ran is on record in metrics.json; the reweighted run trains on other losses than the plain one.
    assert plain["data"]["balance"] == {"class_weights": "none", "group_balance": "none",
                                        "train_rows_per_group": {"a": 1140, "b": 60}}
    assert sampled["data"]["balance"]["rows_per_group_per_epoch"] == {"a": 600, "b": 600}
    assert reweighted["data"]["balance"]["weights"]["group"] == {"a": round(1200 / (2 * 1140), 4), "b": 10.0}
    assert reweighted["training"]["history"] != plain["training"]["history"]
    # Balanced epochs are as long as plain ones: the same planned steps.
    assert plain["training"]["steps"] == sampled["training"]["steps"] == reweighted["training"]["steps"]
