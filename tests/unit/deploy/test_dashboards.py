"""The Grafana dashboards: well-formed, the panels the product promises, only metric names that exist.

Whether every query parses and returns data is checked against a real Prometheus in
tests/integration/monitoring; this file checks the JSON and the metric names without one.

    .venv/bin/pytest tests/unit/deploy/test_dashboards.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
BOARDS = ROOT / "charts" / "finetune-operator" / "dashboards"
METRIC = re.compile(r"\bfinetune_[a-z_]+\b")

# The metric contract (helper CONTEXT / DESIGN.md): base names as exposed on /metrics.
SERVER = {
    "finetune_server_requests_total", "finetune_server_request_duration_seconds",
    "finetune_server_queue_wait_seconds", "finetune_server_batch_size", "finetune_server_queue_depth",
    "finetune_server_model_load_seconds", "finetune_server_model_info", "finetune_server_predictions_total",
    "finetune_server_prediction_confidence", "finetune_server_input_tokens", "finetune_server_drift_psi",
    "finetune_server_feedback_total", "finetune_server_generated_tokens_total",
}
TRAINER = {
    f"finetune_trainer_{n}" for n in ("step", "total_steps", "epoch", "loss", "learning_rate",
                                      "samples_per_second", "tokens_per_second", "validation_metric")
}
OPERATOR = {
    "finetune_operator_jobs", "finetune_operator_reconcile_duration_seconds",
    "finetune_operator_reconcile_errors_total", "finetune_operator_trainer_runs_total",
}
HISTOGRAMS = {
    "finetune_server_request_duration_seconds", "finetune_server_queue_wait_seconds", "finetune_server_batch_size",
    "finetune_server_prediction_confidence", "finetune_server_input_tokens",
    "finetune_operator_reconcile_duration_seconds",
}
# What each dashboard must show (issue 6), as words in its panel titles.
REQUIRED_PANELS = {
    "training": ["loss", "learning rate", "per second", "progress"],
    "serving": ["request rate", "error rate", "latency", "batch size", "queue depth"],
    "model-quality": ["label mix", "confidence", "drift", "feedback"],
    "operator": ["jobs by phase", "reconcile errors"],
}


def boards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(BOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p["targets"]]


def series_names(name: str) -> set[str]:
    """Names a metric family exposes: histograms add _bucket, _sum and _count."""
    return {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if name in HISTOGRAMS else {name}


def test_the_four_dashboards_exist_with_unique_uids() -> None:
    found = boards()
    assert set(found) == set(REQUIRED_PANELS)
    uids = [b["uid"] for b in found.values()]
    assert len(set(uids)) == len(uids)
    for name, board in found.items():
        assert board["title"].startswith("FineTune / ") and board["description"], name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name


@pytest.mark.parametrize("name", sorted(REQUIRED_PANELS))
def test_dashboard_has_the_promised_panels(name: str) -> None:
    board = boards()[name]
    titles = " | ".join(p["title"].lower() for p in panels(board))
    for words in REQUIRED_PANELS[name]:
        assert words in titles, f"{name} dashboard has no {words!r} panel (titles: {titles})"
    for panel in panels(board):
        assert panel["description"], f"{name}: panel {panel['title']!r} has no description"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)


def test_latency_panel_has_p50_p95_p99() -> None:
    serving = boards()["serving"]
    (latency,) = [p for p in panels(serving) if p["title"] == "Request latency"]
    quantiles = [re.search(r"histogram_quantile\((0\.\d+)", t["expr"])[1] for t in latency["targets"]]  # type: ignore[index]
    assert quantiles == ["0.5", "0.95", "0.99"]


def test_only_contract_metric_names_are_queried() -> None:
    known = set().union(*(series_names(n) for n in SERVER | TRAINER | OPERATOR))
    for name, board in boards().items():
        for expr in exprs(board):
            unknown = set(METRIC.findall(expr)) - known
            assert not unknown, f"{name}: {expr} uses unknown metrics {unknown}"
        for variable in board["templating"]["list"][1:]:
            assert set(METRIC.findall(variable["definition"])) <= known


def test_every_component_has_panels() -> None:
    used = {m for board in boards().values() for e in exprs(board) for m in METRIC.findall(e)}
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    for group in (SERVER, TRAINER, OPERATOR):
        assert group <= base, f"metrics without a panel: {group - base}"


def test_server_exposes_every_server_metric_the_dashboards_use() -> None:
    """The server's real registry (not just the contract) has each name the dashboards query."""
    metrics_module = pytest.importorskip("finetune.server.metrics", reason="the server's metrics module")
    registry = metrics_module.ServerMetrics().registry
    exposed = {s.name for family in registry.collect() for s in family.samples}
    exposed |= {f.name for f in registry.collect()}
    needed = {m for b in boards().values() for e in exprs(b) for m in METRIC.findall(e) if "_server_" in m}
    # Counters and gauges with labels have no samples until first use; their family name is still there.
    suffixes = {"counter": ["_total"], "info": ["_info"], "histogram": ["_bucket", "_sum", "_count"]}
    families = {f.name + s for f in registry.collect() for s in suffixes.get(f.type, [""])}
    missing = {m for m in needed if m not in exposed and m not in families}
    assert not missing, f"the server does not expose {missing}"
