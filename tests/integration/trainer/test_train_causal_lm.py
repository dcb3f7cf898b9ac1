"""`finetune train` on a causal LM: LoRA SFT with completion-only loss on a copy task, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.unit.trainer.causal_fixtures import copy_task, save_model, tiny_llama, train_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_job(tmp_path: Path, model_dir: Path, data: Path, dataset: dict[str, object] | None = None,
              **training: object) -> Path:
    """A causal-LM job on `data`: prompt/completion columns, unless `dataset` names others."""
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "copy-lora"},
        "spec": {
            "task": "causal-lm",
            "model": {"path": str(model_dir)},
            "dataset": {"train": {"path": str(data)}, "promptColumn": "prompt", "completionColumn": "completion",
                        "split": {"validationFraction": 0.1, "testFraction": 0.1}},
            "training": {"method": "lora", "epochs": 6, "batchSize": 16, "learningRate": 3e-3, "maxLength": 48,
                         "warmupRatio": 0.0, "logSteps": 10, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                         **training},
            "evaluation": {"maxNewTokens": 20, "maxTestSamples": 30},
        },
    }
    if dataset is not None:
        job["spec"]["dataset"] = {"train": {"path": str(data)}, **dataset}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def train(job: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune.cli", "train", "-f", str(job), "--output", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600, check=False)


def test_lora_sft_trains_exports_merged_model_and_samples(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(tmp_path / "tok")
    base = save_model(tiny_llama(tokenizer, hidden=64), tokenizer, tmp_path / "base")
    data = tmp_path / "copy.jsonl"
    copy_task(400, seed=3, words=2).to_json(data, orient="records", lines=True)
    out = tmp_path / "out"
    result = train(write_job(tmp_path, base, data), out)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["headline_metric"] == "perplexity"
    test = metrics["test"]
    assert set(test) >= {"loss", "perplexity", "rougeL", "bleu", "exact_match"}
    history = metrics["training"]["history"]
    assert history[-1]["perplexity"] < history[0]["perplexity"], "validation perplexity falls with training"
    assert test["perplexity"] < 0.5 * tokenizer.vocab_size, "far better than guessing among the vocabulary"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == test["generation_support"] == 30 and test["support"] == 40  # all test rows: loss
    assert all(set(s) == {"prompt", "reference", "generation"} for s in samples)
    assert (out / "adapter" / "adapter_config.json").exists()

    # The merged export loads without peft and is the fine-tuned model, not the base.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(base).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([tokenizer("copy abc fed=")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, original(ids).logits, atol=1e-4)


def tiny_base(tmp_path: Path) -> Path:
    tokenizer = train_tokenizer(tmp_path / "tok")
    return save_model(tiny_llama(tokenizer, hidden=32), tokenizer, tmp_path / "base")


def short_job(tmp_path: Path, data: Path, dataset: dict[str, object]) -> Path:
    return write_job(tmp_path, tiny_base(tmp_path), data, dataset, method="full", epochs=1, maxSteps=3)


def test_plain_text_reports_perplexity_and_no_generation_scores(tmp_path: Path) -> None:
    """No completions, nothing to compare generations with: no ROUGE/BLEU of 0.0 over support 0."""
    data = tmp_path / "corpus.jsonl"
    rows = copy_task(60, seed=4, words=2)
    (rows["prompt"] + rows["completion"]).to_frame("body").to_json(data, orient="records", lines=True)
    out = tmp_path / "out"
    result = train(short_job(tmp_path, data, {"textColumn": "body"}), out)
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert {"loss", "perplexity"} <= set(test) and not {"rougeL", "bleu", "exact_match"} & set(test), test
    assert test["support"] == 6 and test["generation_support"] == 0
    assert not (out / "samples.jsonl").exists()


def test_chats_without_assistant_turns_are_refused_for_what_they_are(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"chat": [{"role": "user", "content": f"hello {i}"}]}) + "\n"
                            for i in range(40)))
    result = train(short_job(tmp_path, data, {"messagesColumn": "chat"}), tmp_path / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "no training example has anything to learn (32 of 32 are chats without an assistant turn" in last, last
    assert "maxLength" not in last
