"""Real training runs of `finetune train` on a tiny BERT: export, world size, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def finetune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, check=False)


def test_train_evaluates_and_exports(tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path],
                                     tmp_path: Path) -> None:
    job = write_job(tiny_bert, synthetic_data, evaluation={"groupColumn": "locale"})
    out = tmp_path / "out"
    result = finetune("train", "-f", str(job), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert test["accuracy"] > 0.8, "the tiny model should learn the one-word sentiment task"
    assert set(test) >= {"accuracy", "f1", "precision", "recall", "per_class", "confusion_matrix", "groups"}
    assert set(test["groups"]) == {"en-us", "en-gb"}
    assert 0 <= test["max_group_gap"]["accuracy"] <= 1
    assert sum(map(sum, test["confusion_matrix"]["matrix"])) == test["support"] == 40
    training = metrics["training"]
    assert training["world_size"] == 1 and training["steps"] > 0 and training["best_step"] is not None
    assert training["samples_per_second"] > 0 and training["tokens_per_second"] > 0
    assert metrics["validation"]["f1"] > 0.5

    baseline = json.loads((out / "baseline.json").read_text())
    assert set(baseline["label_distribution"]) == {"negative", "positive"}
    assert abs(sum(baseline["input_length"]["fractions"]) - 1) < 1e-6
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert all(e["label"] != e["prediction"] for e in errors)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        inputs = tokenizer(["the film is great", "the film is awful"], return_tensors="pt", padding=True)
        logits = model(**inputs).logits
    assert logits.argmax(-1).tolist() == [1, 0]
    lines = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert any("loss" in x and "eta_seconds" in x for x in lines), "one JSON progress line per logging step"


def test_two_processes_form_a_world_of_two(tiny_bert: Path, synthetic_data: Path,
                                           write_job: Callable[..., Path], tmp_path: Path) -> None:
    job = write_job(tiny_bert, synthetic_data, training={"epochs": 1})
    out = tmp_path / "out"
    result = finetune("train", "-f", str(job), "--output", str(out), "--processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2
    assert "world size 2" in result.stderr
    # Each rank takes half of the batches: 320 train rows / 16 per batch / 2 ranks = 10 steps.
    assert metrics["training"]["steps"] == 10


def test_sigkilled_run_resumes_from_its_checkpoint(tiny_bert: Path, synthetic_data: Path,
                                                   write_job: Callable[..., Path], tmp_path: Path) -> None:
    job = write_job(tiny_bert, synthetic_data,
                    training={"epochs": 8, "checkpointSteps": 10, "evalSteps": 1000, "learningRate": 1e-3})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finetune.cli", "train", "-f", str(job), "--output", str(out)]
    # Its own process group: the kill takes the CLI and the trainer process it starts, like a pod kill.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(checkpoints.glob("step-*")):
        time.sleep(0.2)
    # Kill it mid-training: it has a complete checkpoint but has not finished.
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "metrics.json").exists()
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert done, "no checkpoint was written before the kill"

    result = finetune("train", "-f", str(job), "--output", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from checkpoint step-{done[-1]:07d}" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 8 * 20  # 320 rows / 16 = 20 steps per epoch, all 8 epochs
    assert not list(checkpoints.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"textColumn": "text"}, "dataset.textColumn: column 'text' not found in"),
        ({"labelColumn": "stars"}, "dataset.labelColumn: column 'stars' not found in"),
        ({"train": {"path": "/nonexistent/train.tsv"}}, "/nonexistent/train.tsv does not exist"),
    ],
)
def test_bad_data_exits_2_with_one_readable_line(tiny_bert: Path, synthetic_data: Path,
                                                 write_job: Callable[..., Path], tmp_path: Path,
                                                 dataset: dict[str, object], expected: str) -> None:
    job = write_job(tiny_bert, synthetic_data, dataset=dataset)
    result = finetune("train", "-f", str(job), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def test_run_applies_the_quality_gate(tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path],
                                      tmp_path: Path) -> None:
    """`finetune run` trains, then refuses to serve a model below spec.promotion (exit 3, one line)."""
    job = write_job(tiny_bert, synthetic_data, training={"epochs": 1}, promotion={"metric": "accuracy",
                                                                                  "minValue": 1.01})
    result = finetune("run", "-f", str(job), "--output", str(tmp_path / "out"), "--no-serve")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "rejected by the quality gate: accuracy=" in result.stderr
    assert "below promotion.minValue 1.01" in result.stderr
    assert (tmp_path / "out" / "metrics.json").exists(), "a rejected model is still exported for review"

    passing = write_job(tiny_bert, synthetic_data, name="passing", training={"epochs": 1})
    result = finetune("run", "-f", str(passing), "--output", str(tmp_path / "ok"), "--no-serve")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test metrics:" in result.stdout and "model exported to" in result.stdout
