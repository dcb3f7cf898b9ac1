"""Every PromQL expression of the dashboards and alerts, executed by a real Prometheus on real metrics.

Prometheus scrapes a running `finetune serve` (driven with SST-2 traffic) and a `finetune train` run,
loads the chart's PrometheusRule, and then:
- every dashboard query and alert expression must parse and evaluate;
- the serving and model-quality queries must return data, and so must the training ones;
- the latency and drift alerts, rendered with near-zero thresholds, must become active, while the
  no-traffic alert must stay quiet on a server that has traffic.
Operator queries only need to parse: no operator runs here (the operator's own tests cover its metrics).

    bash scripts/install-tools.sh && .venv/bin/pytest tests/integration/monitoring -q
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
BOARDS = ROOT / "charts" / "finetune-operator" / "dashboards"
# Grafana fills these in; "All" is `.*` (the dashboards' allValue), $__rate_interval is at least
# four scrape intervals.
GRAFANA_VARIABLES = {"$__rate_interval": "5s", "$namespace": ".*", "$service": ".*", "$job": ".*"}
MUST_HAVE_DATA = {"serving", "model-quality", "training"}


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(BOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.stem, f"{panel['title']} [{target['refId']}]", target["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def alert_rules(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


def has_data(answer: dict[str, Any]) -> bool:
    return any(series.get("values") or series.get("value") for series in answer["data"]["result"])


QUERIES = dashboard_queries()


@pytest.mark.parametrize(("board", "panel", "expr"), QUERIES, ids=[f"{b}:{p}" for b, p, _ in QUERIES])
def test_dashboard_query_runs(request: pytest.FixtureRequest, prometheus: Any, traffic: dict[str, float],
                              board: str, panel: str, expr: str) -> None:
    answer = prometheus.query_range(grafana_to_promql(expr))
    assert answer["status"] == "success", f"{board} / {panel}: {answer.get('error')}\n{expr}"
    if board == "training":
        request.getfixturevalue("trained")  # skips, naming what is missing, without a trainer endpoint
        answer = prometheus.query_range(grafana_to_promql(expr))
    if board in MUST_HAVE_DATA:
        assert has_data(answer), f"{board} / {panel} returned no data:\n{expr}"


def test_training_metrics_were_scraped_while_training(prometheus: Any, trained: Any) -> None:
    (series,) = prometheus.query_range('finetune_trainer_step{job="sst2"}')["data"]["result"]
    assert series["metric"]["job"] == "sst2"  # honor_labels kept the FineTuneJob's name
    assert series["metric"]["namespace"] == "ml"
    steps = [float(v) for _, v in series["values"]]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    (total,) = prometheus.query_range('finetune_trainer_total_steps{job="sst2"}')["data"]["result"]
    assert float(total["values"][-1][1]) >= steps[-1]


def test_alert_rules_load_and_evaluate(prometheus: Any, traffic: dict[str, float]) -> None:
    deadline = time.monotonic() + 20
    while True:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "0001").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, "the rules were never evaluated"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == set(alert_rules(prometheus.rules))
    assert [r["name"] for r in rules if r["health"] != "ok"] == [], [r.get("lastError") for r in rules]


@pytest.mark.parametrize("alert", ["FineTuneServingLatencyP99", "FineTuneModelDrift"])
def test_alert_becomes_active_when_its_threshold_is_crossed(
    prometheus: Any, traffic: dict[str, float], alert: str
) -> None:
    """Rendered with near-zero thresholds, the alert must be pending (its `for:` is minutes long)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        active = {a["labels"]["alertname"]: a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]}
        if alert in active:
            labels = active[alert]["labels"]
            assert labels["namespace"] == "ml" and labels["service"] == "sst2-server"
            assert active[alert]["state"] in ("pending", "firing")
            return
        time.sleep(0.5)
    raise AssertionError(f"{alert} never became active; active: {sorted(active)}")


def test_error_rate_alert_measures_the_real_traffic(prometheus: Any, traffic: dict[str, float]) -> None:
    expr = alert_rules(prometheus.rules)["FineTuneServingErrorRate"]["expr"]
    ratio, _, threshold = expr.rpartition(">")
    assert float(threshold) == 0.05
    answer = prometheus.query(ratio)
    assert answer["status"] == "success", answer
    (series,) = answer["data"]["result"]
    assert series["metric"] == {"namespace": "ml", "service": "sst2-server"}
    assert float(series["value"][1]) == 0.0  # 4xx are the clients' fault; no 5xx was sent
    assert traffic["errors"] > 0, "the bad requests were meant to be answered 4xx"


def test_no_traffic_alert_is_quiet_while_requests_flow(prometheus: Any, traffic: dict[str, float]) -> None:
    expr = alert_rules(prometheus.rules)["FineTuneServingNoTraffic"]["expr"]
    answer = prometheus.query(expr)
    assert answer["status"] == "success", answer
    assert answer["data"]["result"] == []
    # The same rule over a window that holds scrapes but no requests (the traffic is over) fires.
    time.sleep(max(0.0, traffic["ended"] + 3 - time.time()))
    quiet = re.sub(r"\[[0-9]+[smhd]\]", "[2s]", expr)
    assert quiet != expr
    assert prometheus.query(quiet)["data"]["result"], f"no-traffic did not fire on a silent window:\n{quiet}"


@pytest.mark.parametrize("alert", ["FineTuneTrainerFailed", "FineTuneJobStuck", "FineTuneOperatorReconcileErrors"])
def test_operator_alert_expressions_parse(prometheus: Any, alert: str) -> None:
    expr = alert_rules(prometheus.rules)[alert]["expr"]
    answer = prometheus.query(expr)
    assert answer["status"] == "success", f"{alert}: {answer.get('error')}"
