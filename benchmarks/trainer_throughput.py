"""Training throughput and accuracy at equal budget: a tutorial recipe vs HF Trainer vs our trainer.

    .venv/bin/python benchmarks/trainer_throughput.py [--train-rows 4000] [--batch 32] [--lr 5e-5]
        [--warmup-ratio 0.06] [--weight-decay 0.01] [--seeds 3] [--only b c]

Same model (the bundled MiniLM), same SST-2 rows, same machine, one invocation:
  (a) HF Trainer, tokenizer padding to max_length=128, default arguments (batch 8, lr 5e-5, no warm-up)
  (b) HF Trainer with dynamic padding and exactly (c)'s hyperparameters: batch, learning rate, warm-up,
      weight decay, schedule, max length, epochs
  (c) `finetune train` (length-grouped batches, padding to a multiple of 8)
Both (b) and (c) test the model they end with on the SST-2 dev set (one evaluation per epoch, so with
one epoch (c)'s "best" model is its final one). Prints training samples/s of each, the ratios c/a and
c/b, and the dev accuracy each reached ((b) and (c) averaged over --seeds runs: one epoch on a few
thousand rows varies by about a point per seed, so only means say anything).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from finetune.spec import Training

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "data" / "sst2"
TRAIN_COMMAND = [sys.executable, "-m", "finetune.cli", "train"]


@dataclass(frozen=True)
class Budget:
    """The hyperparameters (b) and (c) share."""

    batch: int
    lr: float
    warmup_ratio: float
    weight_decay: float
    scheduler: str
    max_length: int
    epochs: float


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def warmup_steps(rows: int, budget: Budget) -> int:
    """(c)'s warm-up in steps (HF rounds a ratio up, we round down: give HF the same count)."""
    total = max(1, int(math.ceil(rows / budget.batch) * budget.epochs))
    return int(total * budget.warmup_ratio)


def hf_trainer(texts: list[str], labels: list[int], dev: tuple[list[str], list[int]], budget: Budget,
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
        return tok(batch["text"], truncation=True, max_length=budget.max_length)  # type: ignore[no-any-return]

    train = Dataset.from_dict({"text": texts, "label": labels}).map(encode, batched=True, remove_columns=["text"])
    test = Dataset.from_dict({"text": dev[0], "label": dev[1]}).map(encode, batched=True, remove_columns=["text"])
    extra: dict[str, object] = {} if pad_to_max else {
        "per_device_train_batch_size": budget.batch, "learning_rate": budget.lr,
        "warmup_steps": warmup_steps(len(texts), budget), "weight_decay": budget.weight_decay,
        "lr_scheduler_type": budget.scheduler,
    }
    args = TrainingArguments(output_dir=str(out), num_train_epochs=budget.epochs, report_to="none", save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=seed, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=None if pad_to_max else DataCollatorWithPadding(tok), processing_class=tok)
    result = trainer.train()
    pred = trainer.predict(test)
    accuracy = float((np.argmax(pred.predictions, -1) == np.asarray(dev[1])).mean())
    return float(result.metrics["train_samples_per_second"]), accuracy


def ours(train_file: Path, val_file: Path, budget: Budget, out: Path, precision: str = "auto",
         seed: int = 42) -> tuple[float, float]:
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
        "spec": {
            "task": "text-classification",
            "model": {"name": "sentence-transformers/all-MiniLM-L6-v2"},
            "dataset": {"train": {"path": str(train_file)}, "validation": {"path": str(val_file)},
                        "test": {"path": str(SST2 / "dev.tsv")}, "textColumn": "sentence"},
            "training": {"epochs": budget.epochs, "batchSize": budget.batch, "learningRate": budget.lr,
                         "warmupRatio": budget.warmup_ratio, "weightDecay": budget.weight_decay,
                         "scheduler": budget.scheduler, "maxLength": budget.max_length,
                         "checkpointSteps": 100000, "logSteps": 1000, "precision": precision, "seed": seed},
        },
    }
    job_file = out / "job.yaml"
    out.mkdir(parents=True, exist_ok=True)
    job_file.write_text(yaml.safe_dump(job))
    subprocess.run([*TRAIN_COMMAND, "-f", str(job_file), "--output", str(out / "model")], check=True,
                   stderr=subprocess.DEVNULL)
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
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32, help="(b) and (c): examples per step")
    parser.add_argument("--lr", type=float, default=5e-5, help="(b) and (c): peak learning rate")
    parser.add_argument("--warmup-ratio", type=float, default=Training().warmup_ratio, help="(b) and (c)")
    parser.add_argument("--weight-decay", type=float, default=Training().weight_decay, help="(b) and (c)")
    parser.add_argument("--scheduler", default=Training().scheduler, help="(b) and (c): linear, cosine, ...")
    parser.add_argument("--max-length", type=int, default=128, help="(b) and (c): tokens per example")
    parser.add_argument("--only", choices=["a", "b", "c"], nargs="*", default=["a", "b", "c"])
    parser.add_argument("--precision", default="auto", help="(c)'s training.precision: auto, fp32, bf16")
    parser.add_argument("--seeds", type=int, default=3, help="runs of (b) and (c), seeds 42, 43, ...; "
                        "accuracy on a few thousand rows varies by about a point between seeds, so compare means")
    args = parser.parse_args()
    budget = Budget(args.batch, args.lr, args.warmup_ratio, args.weight_decay, args.scheduler, args.max_length,
                    args.epochs)
    texts, labels = read_tsv(SST2 / "train.tsv")
    n = args.train_rows
    train = (texts[:n], labels[:n])
    dev = read_tsv(SST2 / "dev.tsv")
    results: dict[str, tuple[float, float]] = {}
    seeds = [42 + i for i in range(args.seeds)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_file = write_rows(tmp / "train.tsv", *train)
        # (c) needs a validation set; rows that neither recipe trains on, so (b) and (c) see the same data.
        val_file = write_rows(tmp / "val.tsv", texts[n : n + 200], labels[n : n + 200])
        runs = {
            "a": ("(a) HF Trainer, pad to 128, defaults",
                  [lambda: hf_trainer(*train, dev, budget, True, tmp / "a")]),
            "b": ("(b) HF Trainer, dynamic padding", [
                lambda s=s: hf_trainer(*train, dev, budget, False, tmp / f"b{s}", s) for s in seeds]),
            "c": ("(c) finetune train", [
                lambda s=s: ours(train_file, val_file, budget, tmp / f"c{s}", args.precision, s) for s in seeds]),
        }
        for key in args.only:
            name, calls = runs[key]
            figures = []
            for call in calls:
                started = time.perf_counter()
                figures.append(call())
                print(f"{name}: {figures[-1][0]:.1f} samples/s, dev accuracy {figures[-1][1]:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            results[key] = (statistics.mean(f[0] for f in figures), statistics.mean(f[1] for f in figures))
    report(results, {k: v[0] for k, v in runs.items()}, budget, n, seeds)


def report(results: dict[str, tuple[float, float]], names: dict[str, str], budget: Budget, rows: int,
           seeds: list[int]) -> None:
    """The table, then (c) against (a) and (b): speed-up and accuracy side by side, with the targets."""
    print(f"\ntrain rows {rows}, epochs {budget.epochs}, batch {budget.batch}, lr {budget.lr:g}, warm-up "
          f"{budget.warmup_ratio:g}, weight decay {budget.weight_decay:g}, {budget.scheduler}, max length "
          f"{budget.max_length}; (b) and (c): means over seeds {seeds}")
    print(f"{'recipe':40} {'samples/s':>10} {'dev acc':>8}")
    for key, (rate, acc) in results.items():
        print(f"{names[key]:40} {rate:10.1f} {acc:8.4f}")
    if "c" not in results:
        return
    c, acc_c = results["c"]
    if "a" in results:
        a, acc_a = results["a"]
        print(f"c vs a: {c / a:.2f}x samples/s (target >= 5), dev accuracy {acc_c - acc_a:+.4f}")
    if "b" in results:
        b, acc_b = results["b"]
        ok = c / b >= 2 and acc_c >= acc_b
        print(f"c vs b: {c / b:.2f}x samples/s, dev accuracy {acc_c:.4f} vs {acc_b:.4f} ({acc_c - acc_b:+.4f}); "
              f"target: >= 2x at >= (b)'s accuracy: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
