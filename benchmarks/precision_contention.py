"""Training precision on CPUs, idle and next to a CPU hog: the figures behind `precision: auto` = fp32.

    .venv/bin/python benchmarks/precision_contention.py [--train-rows 1000]

Runs `finetune train` on the bundled MiniLM and SST-2 rows with `training.precision` fp32 and bf16, each
on an idle machine and with one busy-looping process per core beside it (a neighbour on a shared node),
and prints training samples/s and the bf16/fp32 ratio of each. Whether this CPU has native bf16
(AVX512-BF16, AMX) is printed too: without it bf16 autocast is emulated and slower anyway.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "data" / "sst2"


def spin() -> None:
    while True:
        pass


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "label"], delimiter="\t", quoting=csv.QUOTE_NONE)
        writer.writeheader()
        writer.writerows({"sentence": r["sentence"], "label": r["label"]} for r in rows)
    return path


def train(folder: Path, train_file: Path, val_file: Path, precision: str) -> float:
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"p-{precision}"},
           "spec": {"task": "text-classification", "model": {"name": "sentence-transformers/all-MiniLM-L6-v2"},
                    "dataset": {"train": {"path": str(train_file)}, "validation": {"path": str(val_file)},
                                "test": {"path": str(val_file)}, "textColumn": "sentence"},
                    "training": {"epochs": 1, "batchSize": 32, "maxLength": 128, "precision": precision,
                                 "checkpointSteps": 100000, "logSteps": 1000}}}
    folder.mkdir(parents=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "finetune.cli", "train", "-f", str(folder / "job.yaml"), "--output",
                    str(folder / "out")], check=True, stderr=subprocess.DEVNULL)
    metrics = json.loads((folder / "out" / "metrics.json").read_text())
    return float(metrics["training"]["samples_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-rows", type=int, default=1000)
    args = parser.parse_args()
    from finetune.hardware import cpu_has_bf16

    # A SIGTERM (a timeout) must end the hog processes too: it unwinds through `finally` like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with open(SST2 / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    results: dict[tuple[str, bool], float] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_file = write_rows(tmp / "train.tsv", rows[: args.train_rows])
        val_file = write_rows(tmp / "val.tsv", rows[args.train_rows : args.train_rows + 100])
        for hog in (False, True):
            cores = os.cpu_count() or 1
            hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(cores if hog else 0)]
            for h in hogs:
                h.start()
            try:
                for precision in ("fp32", "bf16"):
                    results[precision, hog] = train(tmp / f"{precision}-{hog}", train_file, val_file, precision)
                    print(f"{precision:5} {'with a CPU hog' if hog else 'idle':15} "
                          f"{results[precision, hog]:7.1f} samples/s", flush=True)
            finally:
                for h in hogs:
                    h.kill()
    print(f"\nnative bf16 on this CPU: {cpu_has_bf16()}; {os.cpu_count()} cores; {args.train_rows} rows, 1 epoch")
    for hog in (False, True):
        ratio = results["bf16", hog] / results["fp32", hog]
        print(f"bf16 / fp32 {'with a CPU hog' if hog else 'idle':15} {ratio:.2f}x")


if __name__ == "__main__":
    main()
