"""The real app under uvicorn on loopback, classifying with a tiny exported BERT."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest


def direct_scores(model_dir: Path, texts: list[str]) -> list[list[float]]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for text in texts:  # one at a time: no padding, the model's plain answer
            enc = tokenizer(text, truncation=True, return_tensors="pt")
            out.append(model(**enc).logits.softmax(-1)[0].tolist())
    return out


def test_predictions_equal_the_models_direct_outputs(classifier_dir, start_server):
    texts = ["a gorgeous , witty , seductive movie .", "unflinchingly bleak and desperate", "meh", "x " * 60]
    server = start_server(classifier_dir)
    answer = httpx.post(
        f"{server.url}/v1/models/{server.name}:predict",
        json={"instances": [texts[0], {"text": texts[1]}, texts[2], texts[3]]},
    )
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == len(texts)
    for prediction, expected in zip(predictions, direct_scores(classifier_dir, texts), strict=True):
        assert list(prediction["scores"]) == ["negative", "positive"]
        assert prediction["scores"]["negative"] == pytest.approx(expected[0], abs=1e-5)
        assert prediction["scores"]["positive"] == pytest.approx(expected[1], abs=1e-5)
        assert prediction["label"] == ["negative", "positive"][expected.index(max(expected))]
        assert prediction["score"] == pytest.approx(max(expected), abs=1e-5)
    # over the 32-token limit: truncated, and the answer says so
    assert [p["truncated"] for p in predictions] == [False, False, False, True]


def test_health_readiness_and_model_state(classifier_dir, start_server):
    server = start_server(classifier_dir)
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    state = httpx.get(f"{server.url}/v1/models/tiny-sst2").json()
    assert state["name"] == "tiny-sst2" and state["ready"] is True
    assert state["version"] == "text0123456789abcdef" and state["task"] == "text-classification"
    assert httpx.get(f"{server.url}/v1/models/other").status_code == 404


async def _fire(url: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def test_concurrent_requests_share_forward_passes(classifier_dir, start_server, scrape):
    server = start_server(classifier_dir, max_wait_ms=50, max_batch_size=64)
    texts = [f"movie number {i} was {'great' if i % 2 else 'dull'}" for i in range(48)]
    answers = asyncio.run(
        _fire(f"{server.url}/v1/models/{server.name}:predict", [{"instances": [t]} for t in texts])
    )
    assert all(a.status_code == 200 for a in answers)
    # each answer belongs to its own request: same as asking one by one
    alone = httpx.post(f"{server.url}/v1/models/{server.name}:predict", json={"instances": texts[:3]}).json()
    for got, expected in zip(answers[:3], alone["predictions"], strict=True):
        assert got.json()["predictions"][0]["scores"]["positive"] == pytest.approx(
            expected["scores"]["positive"], abs=1e-5
        )
    samples = scrape(server.url)
    passes = samples[("finetune_server_batch_size_count", ())]
    requests = samples[("finetune_server_batch_size_sum", ())]
    single = samples[("finetune_server_batch_size_bucket", (("le", "1.0"),))]
    assert requests == 49
    assert passes < requests and single < passes, "some forward passes must have served several requests"


def test_metrics_exist_with_the_right_labels(classifier_dir, start_server, scrape):
    server = start_server(classifier_dir)
    httpx.post(f"{server.url}/v1/models/{server.name}:predict", json={"instances": ["fine", "bad"]})
    httpx.post(f"{server.url}/v1/models/{server.name}:predict", json={"instances": []})
    samples = scrape(server.url)
    route = "/v1/models/{name}:predict"
    assert samples[("finetune_server_requests_total", (("code", "200"), ("route", route)))] == 1
    assert samples[("finetune_server_requests_total", (("code", "422"), ("route", route)))] == 1
    assert samples[("finetune_server_request_duration_seconds_count", (("route", route),))] == 2
    info = (("model", "tiny-sst2"), ("task", "text-classification"), ("version", "text0123456789abcdef"))
    assert samples[("finetune_server_model_info", info)] == 1
    by_label = [samples[("finetune_server_predictions_total", (("label", lab),))] for lab in ("negative", "positive")]
    predicted = sum(by_label)
    assert predicted == 2
    assert samples[("finetune_server_prediction_confidence_count", ())] == 2
    assert samples[("finetune_server_input_tokens_count", ())] == 2
    assert samples[("finetune_server_queue_wait_seconds_count", ())] == 1
    assert samples[("finetune_server_model_load_seconds", ())] > 0
    assert ("finetune_server_queue_depth", ()) in samples
    for feature in ("input_length", "predicted_label"):
        assert ("finetune_server_drift_psi", (("feature", feature),)) in samples
    for label in ("negative", "positive"):
        assert samples[("finetune_server_feedback_total", (("label", label),))] == 0


def test_drift_gauge_moves_when_inputs_shift(classifier_dir, start_server, scrape, sst2_holdout):
    server = start_server(classifier_dir, drift_window=60, drift_min_samples=30)
    url = f"{server.url}/v1/models/{server.name}:predict"
    for start in range(0, 60, 20):  # inputs like the training data
        assert httpx.post(url, json={"instances": sst2_holdout[start : start + 20]}).status_code == 200
    calm = _psi(scrape(server.url), "input_length")
    long_texts = [" ".join(sentence.split() * 6) for sentence in sst2_holdout[60:120]]
    for start in range(0, 60, 20):  # the live population shifts to long inputs
        assert httpx.post(url, json={"instances": long_texts[start : start + 20]}).status_code == 200
    shifted = _psi(scrape(server.url), "input_length")
    assert calm < 0.25, f"same population should look stable, PSI={calm}"
    assert shifted > 1.0 and shifted > calm + 0.75, (calm, shifted)
    assert math.isfinite(_psi(scrape(server.url), "predicted_label"))


def _psi(samples, feature: str) -> float:
    return samples[("finetune_server_drift_psi", (("feature", feature),))]


def test_feedback_survives_a_restart(classifier_dir, start_server, tmp_path):
    store = tmp_path / "store" / "feedback.jsonl"
    first = start_server(classifier_dir, feedback_path=store)
    for i, label in enumerate(["positive", "negative"]):
        answer = httpx.post(f"{first.url}/v1/feedback",
                            json={"id": f"r{i}", "input": f"text {i}", "label": label, "prediction": "negative"})
        assert answer.status_code == 200 and answer.json() == {"id": f"r{i}", "stored": True}
    first.stop()
    second = start_server(classifier_dir, feedback_path=store)
    assert httpx.post(f"{second.url}/v1/feedback", json={"input": "later", "label": "positive"}).status_code == 200
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert [r["input"] for r in records] == ["text 0", "text 1", "later"]
    assert records[0]["id"] == "r0" and records[0]["label"] == "positive" and records[0]["prediction"] == "negative"
    assert {"id", "time", "model", "model_version", "input", "label", "prediction"} <= set(records[2])
    assert records[2]["model"] == "tiny-sst2" and records[2]["model_version"] == "text0123456789abcdef"
    # the format a later FineTuneJob reads: jsonl, textColumn=input, labelColumn=label
    import pandas as pd

    frame = pd.read_json(store, lines=True)
    assert list(frame["label"]) == ["positive", "negative", "positive"]


def test_psi_helper_is_finite_after_enough_inputs(classifier_dir, start_server, scrape):
    server = start_server(classifier_dir, drift_min_samples=5)
    assert math.isnan(_psi(scrape(server.url), "input_length"))
    httpx.post(f"{server.url}/v1/models/{server.name}:predict", json={"instances": ["a b c"] * 5})
    assert math.isfinite(_psi(scrape(server.url), "input_length"))
