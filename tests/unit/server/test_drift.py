"""PSI over a sliding window against the training baseline."""

from __future__ import annotations

import json
import math

import pytest

from finetune.server.drift import Baseline, DriftMonitor, psi

BASELINE = Baseline({"negative": 0.5, "positive": 0.5}, [0, 10, 20, 1e9], [0.25, 0.5, 0.25])


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift():
    assert psi([0.25, 0.5, 0.25], [2500, 5000, 2500]) == pytest.approx(0.0, abs=1e-3)
    small = psi([0.25, 0.5, 0.25], [3000, 4500, 2500])
    large = psi([0.25, 0.5, 0.25], [0, 1000, 9000])
    assert 0 < small < 0.1 < 1.0 < large


def test_an_empty_bin_does_not_make_psi_infinite():
    assert math.isfinite(psi([0.0, 1.0], [10, 0]))
    assert math.isfinite(psi([0.5, 0.5], [0, 10]))


def test_monitor_is_nan_until_enough_samples_then_tracks_the_window():
    monitor = DriftMonitor(BASELINE, ["negative", "positive"], window=40, min_samples=20)
    assert monitor.features == ["input_length", "predicted_label"]
    monitor.observe([5] * 10, ["negative"] * 10)
    assert all(math.isnan(v) for v in monitor.values().values())
    for _ in range(10):  # like the baseline: 1/4 short, 1/2 medium, 1/4 long, labels balanced
        monitor.observe([5, 15, 15, 25], ["negative", "positive", "negative", "positive"])
    calm = monitor.values()
    assert calm["input_length"] < 0.1 and calm["predicted_label"] < 0.1
    monitor.observe([500] * 40, ["positive"] * 40)  # the window is now all long, all positive
    shifted = monitor.values()
    assert shifted["input_length"] > 1.0 and shifted["predicted_label"] > 1.0
    for _ in range(10):  # and it slides back
        monitor.observe([5, 15, 15, 25], ["negative", "positive", "negative", "positive"])
    assert monitor.values()["input_length"] < 0.1


def test_baseline_reads_the_trainer_file(tmp_path):
    (tmp_path / "baseline.json").write_text(json.dumps({
        "task": "causal-lm", "label_distribution": {},
        "input_length": {"edges": [0, 8, 1e9], "fractions": [0.4, 0.6]},
    }))
    baseline = Baseline.from_dir(tmp_path)
    assert baseline is not None and baseline.length_fractions == [0.4, 0.6]
    assert DriftMonitor(baseline, [], window=10, min_samples=1).features == ["input_length"]
    assert Baseline.from_dir(tmp_path / "missing") is None
