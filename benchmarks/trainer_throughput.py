"""Training throughput: a typical tutorial recipe vs HF Trainer with dynamic padding vs our trainer.

    .venv/bin/python benchmarks/trainer_throughput.py [--train-rows 2000] [--epochs 1]

Same model (the bundled MiniLM), same SST-2 rows, same machine, one invocation:
  (a) HF Trainer, tokenizer padding to max_length=128, default arguments (batch 8, lr 5e-5)
  (b) HF Trainer with dynamic padding, our batch size and learning rate
  (c) `finetune train` (length-grouped batches, padding to a multiple of 8)
Prints training samples/s of each, the ratios c/a and c/b, and the SST-2 dev accuracy each reached
((b) and (c) averaged over --seeds runs: one epoch on 2,000 rows varies by about a point per seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "data" / "sst2"
BATCH, LR = 16, 1e-4


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def hf_trainer(texts: list[str], labels: list[int], dev: tuple[list[str], list[int]], epochs: float,
               pad_to_max: bool, out: Path, seed: int = 42) -> tuple[float, float]:
    """Samples/s and dev accuracy of transformers' Trainer."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from finetune.trainer.models import bundled_model_dir

    model_dir = bundled_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        if pad_to_max:
            return tok(batch["text"], truncation=True, padding="max_length", max_length=128)  # type: ignore[no-any-return]
        return tok(batch["text"], truncation=True, max_length=128)  # type: ignore[no-any-return]

    train = Dataset.from_dict({"text": texts, "label": labels}).map(encode, batched=True, remove_columns=["text"])
    test = Dataset.from_dict({"text": dev[0], "label": dev[1]}).map(encode, batched=True, remove_columns=["text"])
    extra = {} if pad_to_max else {"per_device_train_batch_size": BATCH, "learning_rate": LR}
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, report_to="none", save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=seed, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=None if pad_to_max else DataCollatorWithPadding(tok), processing_class=tok)
    result = trainer.train()
    pred = trainer.predict(test)
    accuracy = float((np.argmax(pred.predictions, -1) == np.asarray(dev[1])).mean())
    return float(result.metrics["train_samples_per_second"]), accuracy


def ours(train_file: Path, val_file: Path, epochs: float, out: Path, precision: str = "auto",
         seed: int = 42) -> tuple[float, float]:
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
        "spec": {
            "task": "text-classification",
            "model": {"name": "sentence-transformers/all-MiniLM-L6-v2"},
            "dataset": {"train": {"path": str(train_file)}, "validation": {"path": str(val_file)},
                        "test": {"path": str(SST2 / "dev.tsv")}, "textColumn": "sentence"},
            "training": {"epochs": epochs, "batchSize": BATCH, "learningRate": LR, "maxLength": 128,
                         "checkpointSteps": 100000, "logSteps": 1000, "precision": precision, "seed": seed},
        },
    }
    job_file = out / "job.yaml"
    out.mkdir(parents=True, exist_ok=True)
    job_file.write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "finetune.cli", "train", "-f", str(job_file), "--output",
                    str(out / "model")], check=True, stderr=subprocess.DEVNULL)
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    return metrics["training"]["samples_per_second"], metrics["test"]["accuracy"]


def write_rows(path: Path, texts: list[str], labels: list[int]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(["sentence", "label"])
        w.writerows(zip(texts, labels, strict=True))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--only", choices=["a", "b", "c"], nargs="*", default=["a", "b", "c"])
    parser.add_argument("--precision", default="auto", help="(c)'s training.precision: auto, fp32, bf16")
    parser.add_argument("--seeds", type=int, default=3, help="runs of (b) and (c), seeds 42, 43, ...; "
                        "accuracy on 2,000 rows varies by about a point between seeds, so compare means")
    args = parser.parse_args()
    texts, labels = read_tsv(SST2 / "train.tsv")
    n = args.train_rows
    train = (texts[:n], labels[:n])
    dev = read_tsv(SST2 / "dev.tsv")
    results: dict[str, tuple[float, float]] = {}
    seeds = [42 + i for i in range(args.seeds)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_file = write_rows(tmp / "train.tsv", *train)
        val_file = write_rows(tmp / "val.tsv", texts[n : n + 200], labels[n : n + 200])
        runs = {
            "a": ("(a) HF Trainer, pad to 128, defaults",
                  [lambda: hf_trainer(*train, dev, args.epochs, True, tmp / "a")]),
            "b": ("(b) HF Trainer, dynamic padding", [
                lambda s=s: hf_trainer(*train, dev, args.epochs, False, tmp / f"b{s}", s) for s in seeds]),
            "c": ("(c) finetune train", [
                lambda s=s: ours(train_file, val_file, args.epochs, tmp / f"c{s}", args.precision, s) for s in seeds]),
        }
        for key in args.only:
            name, calls = runs[key]
            figures = []
            for call in calls:
                started = time.perf_counter()
                figures.append(call())
                print(f"{name}: {figures[-1][0]:.1f} samples/s, dev accuracy {figures[-1][1]:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            results[name] = (statistics.mean(f[0] for f in figures), statistics.mean(f[1] for f in figures))
    if len(results) < 3:
        return
    (a, acc_a), (b, acc_b), (c, acc_c) = results.values()
    print(f"\ntrain rows {n}, epochs {args.epochs}; (b) and (c): means over seeds {seeds}")
    print(f"{'recipe':40} {'samples/s':>10} {'dev acc':>8}")
    for name, (rate, acc) in results.items():
        print(f"{name:40} {rate:10.1f} {acc:8.4f}")
    print(f"ratio c/a: {c / a:.2f}x (target >= 5)   ratio c/b: {c / b:.2f}x (target >= 1.5)")
    print(f"accuracy c - a: {acc_c - acc_a:+.4f}   c - b: {acc_c - acc_b:+.4f}")


if __name__ == "__main__":
    main()
