"""The quality gate between evaluation and serving, as one pure function.

Both the operator and the local `finetune run` decide with `evaluate_gate`, so a model that would be
rejected in the cluster is rejected on a laptop too:

    from finetune.operator.gate import evaluate_gate
    ok, reason = evaluate_gate(spec.promotion, "f1", {"f1": 0.91}, serving_metrics={"f1": 0.89})

Direction: metrics whose name says loss, perplexity or error are better when lower; every other
metric (accuracy, f1, rougeL, bleu ...) is better when higher. `minImprovement` is measured in that
direction, in the metric's own units (0.01 f1 = one point; 0.5 perplexity = half a point lower).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from finetune.spec import Promotion, lower_is_better


class GateDecision(NamedTuple):
    """`ok` and a one-line `reason` that names the metric, its value and the rule it met or failed."""

    ok: bool
    reason: str


def gate_metric(promotion: Promotion, headline_metric: str) -> str:
    """The metric the gate looks at: `promotion.metric`, else the run's headline metric."""
    return promotion.metric or headline_metric


def evaluate_gate(
    promotion: Promotion,
    headline_metric: str,
    metrics: Mapping[str, float],
    serving_metrics: Mapping[str, float] | None = None,
) -> GateDecision:
    """Decide whether the newly trained model may replace (or become) the served one.

    `metrics` are the new model's test metrics; `serving_metrics` those of the model serving now (None
    or empty when nothing serves yet, which passes any improvement rule). Every rule that is set must
    hold; with no rule set the gate passes.
    """
    metric = gate_metric(promotion, headline_metric)
    if metric not in metrics:
        have = ", ".join(sorted(metrics)) or "none"
        return GateDecision(False, f"test metric {metric!r} is missing from the results (have: {have})")
    value = float(metrics[metric])
    shown = f"{metric}={value:.4g}"
    if promotion.min_value is not None and value < promotion.min_value:
        return GateDecision(False, f"{shown} is below promotion.minValue {promotion.min_value:g}")
    if promotion.max_value is not None and value > promotion.max_value:
        return GateDecision(False, f"{shown} is above promotion.maxValue {promotion.max_value:g}")
    notes = [shown]
    if promotion.min_improvement is not None:
        old = (serving_metrics or {}).get(metric)
        if old is None:
            notes.append("no model is serving yet, so there is nothing to beat")
        else:
            gain = (float(old) - value) if lower_is_better(metric) else (value - float(old))
            if gain < promotion.min_improvement:
                return GateDecision(
                    False,
                    f"{shown} improves on the serving model's {float(old):.4g} by {gain:.4g}, "
                    f"less than promotion.minImprovement {promotion.min_improvement:g}",
                )
            notes.append(f"beats the serving model's {float(old):.4g} by {gain:.4g}")
    return GateDecision(True, "passed: " + "; ".join(notes))
