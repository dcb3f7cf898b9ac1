"""Export: the from_pretrained-loadable model, metrics.json, the drift baseline, error analysis.

Files are written to a hidden temporary folder, fsync'd, then renamed into the output folder one by
one, and `metrics.json` goes last: a folder with `metrics.json` holds a complete export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune.contracts import BASELINE_FILE, METRICS_FILE, Baseline, ExportMetrics, LengthHistogram
from finetune.spec import Task
from finetune.trainer.atomic import fsync_dir, fsync_tree, write_json, write_text

# Token-length bins of the drift baseline; the last edge catches everything longer.
LENGTH_EDGES = [0, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 1_000_000_000]
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")


def content_hash(folder: Path) -> str:
    """A short hash of the weights, the model version the server reports."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def length_histogram(lengths: Sequence[int]) -> dict[str, list[float]]:
    counts = [0] * (len(LENGTH_EDGES) - 1)
    for n in lengths:
        for i in range(len(counts)):
            if LENGTH_EDGES[i] <= n < LENGTH_EDGES[i + 1]:
                counts[i] += 1
                break
    total = max(sum(counts), 1)
    return {"edges": [float(e) for e in LENGTH_EDGES], "fractions": [c / total for c in counts]}


def baseline_stats(task: Task, lengths: Sequence[int], labels: Sequence[str] | None) -> Baseline:
    """Training-data statistics the server compares live traffic with (drift)."""
    dist: dict[str, float] = {}
    if labels:
        counts = Counter(labels)
        dist = {k: v / len(labels) for k, v in sorted(counts.items())}
    return Baseline(task=task, label_distribution=dist, input_length=LengthHistogram(**length_histogram(lengths)))


def save_pretrained_atomic(
    model: Any, tokenizer: Any, output: Path, write: Callable[[Path], None] | None = None
) -> str:
    """Write model and tokenizer (or whatever `write(folder)` writes) into `output`; returns the weights' hash."""
    tmp = output / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if write is not None:
        write(tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    version = content_hash(tmp)
    for path in tmp.iterdir():
        target = output / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    tmp.rmdir()
    fsync_dir(output)
    return version


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def finish_export(output: Path, metrics: ExportMetrics, baseline: Baseline) -> None:
    """The last two files; metrics.json marks the export complete."""
    write_json(output / BASELINE_FILE, baseline.document())
    write_json(output / METRICS_FILE, metrics.document())


def export_complete(output: Path) -> bool:
    return (output / METRICS_FILE).exists() and any((output / f).exists() for f in WEIGHT_FILES)
