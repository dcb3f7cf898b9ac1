"""The quality gate: thresholds, direction, and beating the model that serves now."""

from __future__ import annotations

from typing import Any

import pytest

from finetune.operator.gate import evaluate_gate, lower_is_better
from finetune.spec import Promotion


@pytest.mark.parametrize(
    ("promotion", "headline", "metrics", "serving", "ok", "words"),
    [
        ({}, "f1", {"f1": 0.1}, None, True, ["passed", "f1=0.1"]),
        ({"minValue": 0.8}, "f1", {"f1": 0.85}, None, True, ["passed"]),
        ({"minValue": 0.8}, "f1", {"f1": 0.75}, None, False, ["f1=0.75", "below", "minValue 0.8"]),
        ({"metric": "accuracy", "minValue": 0.9}, "f1", {"f1": 0.95, "accuracy": 0.5}, None, False, ["accuracy"]),
        ({"metric": "perplexity", "maxValue": 20}, "perplexity", {"perplexity": 25.0}, None, False, ["above"]),
        ({"metric": "perplexity", "maxValue": 20}, "perplexity", {"perplexity": 12.0}, None, True, []),
        ({"minImprovement": 0.01}, "f1", {"f1": 0.90}, {"f1": 0.895}, False, ["serving", "minImprovement"]),
        ({"minImprovement": 0.01}, "f1", {"f1": 0.91}, {"f1": 0.895}, True, ["beats"]),
        ({"minImprovement": 0.01}, "f1", {"f1": 0.5}, None, True, ["nothing to beat"]),
        ({"minImprovement": 0.5}, "perplexity", {"perplexity": 9.0}, {"perplexity": 10.0}, True, ["beats"]),
        ({"minImprovement": 0.5}, "perplexity", {"perplexity": 9.8}, {"perplexity": 10.0}, False, ["less than"]),
        ({"minImprovement": 0.0}, "loss", {"loss": 2.0}, {"loss": 1.5}, False, ["less than"]),
        ({"minValue": 0.5}, "f1", {"accuracy": 0.9}, None, False, ["missing", "accuracy"]),
        ({"minValue": 0.8, "minImprovement": 0.01}, "f1", {"f1": 0.7}, {"f1": 0.6}, False, ["below"]),
    ],
)
def test_gate(
    promotion: dict[str, Any],
    headline: str,
    metrics: dict[str, float],
    serving: dict[str, float] | None,
    ok: bool,
    words: list[str],
) -> None:
    decision = evaluate_gate(Promotion.model_validate(promotion), headline, metrics, serving)
    assert decision.ok is ok
    for word in words:
        assert word in decision.reason
    passed, reason = decision  # unpacks as (ok, reason)
    assert passed is ok and reason == decision.reason


@pytest.mark.parametrize(
    ("metric", "lower"), [("loss", True), ("perplexity", True), ("eval_loss", True), ("f1", False), ("bleu", False)]
)
def test_direction(metric: str, lower: bool) -> None:
    assert lower_is_better(metric) is lower
