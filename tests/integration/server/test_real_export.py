"""The server on what the trainer really exports: the `good` run of tests/real_runs.py (a 2-node run of the
trainer pod's command), read through the typed export contract, nothing written by hand."""

from __future__ import annotations

from pathlib import Path

import httpx

from finetune.contracts import Baseline, ExportMetrics


def test_the_server_serves_a_real_export_with_its_name_version_and_drift_baseline(trained, start_server, scrape):
    folder = Path(trained.result("good").model_path)
    metrics, baseline = ExportMetrics.in_folder(folder), Baseline.in_folder(folder)
    assert baseline is not None and set(baseline.label_distribution) == {"negative", "positive"}
    server = start_server(folder, drift_min_samples=1)
    state = httpx.get(f"{server.url}/v1/models/{metrics.name}", timeout=30).json()
    assert state["ready"] is True and state["task"] == metrics.task == "text-classification"
    assert state["version"] == metrics.model_version and len(metrics.model_version) == 16
    response = httpx.post(f"{server.url}/v1/models/{metrics.name}:predict", timeout=60,
                          json={"instances": ["the film is great", "the film is awful"]})
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == ["positive", "negative"]
    drift = {labels: value for (name, labels), value in scrape(server.url).items()
             if name == "finetune_server_drift_psi"}
    assert {dict(labels)["feature"] for labels in drift} == {"input_length", "predicted_label"}, drift
