"""Run identity: which spec, data and world a run's checkpoints and export belong to.

A fresh run records its identity in `run.json` in the output folder; every checkpoint and the export's
metrics.json carry its hash. Before any process starts, the launcher compares the job it is given with
what the folder holds (`decide_start`):

- a finished export of the same identity: nothing to do (the run is done; `--force` trains again);
- checkpoints of the same identity: resume from the newest;
- checkpoints or an export of another identity: refused with one line naming what differs, because
  resuming them would silently train the old spec (or crash on a changed label set);
- nothing: a fresh run.

The identity is the spec's sections that shape the model (task, model, dataset, training, evaluation,
export) without its bookkeeping (log and checkpoint frequency), the data files by content (moving a
file changes nothing, editing it does) and the world size (the batch plan and RNG states depend on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune.contracts import METRICS_FILE, ExportMetrics
from finetune.spec import FineTuneJob, SpecError
from finetune.trainer.atomic import write_json
from finetune.trainer.checkpoint import PROGRESS_FILE, checkpoint_root, latest_checkpoint
from finetune.trainer.export import export_complete

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
TRAINING_HASH_ENV = "FINETUNE_TRAINING_HASH"  # the launcher tells its trainer processes the run's hash
# Spec fields that change how often the run logs or saves, never what it learns.
BOOKKEEPING = {"training": {"logSteps", "checkpointSteps", "checkpointsKept"}, "export": {"keepCheckpoints"}}
SECTIONS = {"task", "model", "dataset", "training", "evaluation", "export"}
DIFFERENCES_SHOWN = 3


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return "unreadable"  # the data layer reports the file itself, with its own message
    return digest.hexdigest()


def run_identity(job: FineTuneJob, world_size: int) -> dict[str, Any]:
    """The identity document of a run of `job` on `world_size` processes (see the module docstring)."""
    spec = job.spec
    resolved = spec.dataset.model_copy(update={"cleaning": spec.dataset.cleaning.for_task(spec.task)})
    doc = spec.model_copy(update={"dataset": resolved}).model_dump(mode="json", by_alias=True, include=SECTIONS)
    for section, fields in BOOKKEEPING.items():
        for name in fields:
            doc.get(section, {}).pop(name, None)
    for split in ("train", "validation", "test"):
        file = doc["dataset"].get(split)
        if file is not None:
            doc["dataset"][split] = {"sha256": file_digest(file["path"])}
    doc["worldSize"] = world_size
    return doc


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {prefix: doc}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def describe_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What changed between two identities, e.g. "training.learningRate 5e-05 -> 0.0001"."""
    if old is None:
        return ("what changed is unknown: the folder's run.json does not describe that run (made by an older "
                "version of finetune, or damaged)")
    before, after = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) == after.get(key):
            continue
        if key.endswith(".sha256"):
            changes.append(f"{key.removesuffix('.sha256')}: the file's content changed")
        else:
            changes.append(f"{key} {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}")
    shown = "; ".join(changes[:DIFFERENCES_SHOWN])
    more = f" (and {len(changes) - DIFFERENCES_SHOWN} more)" if len(changes) > DIFFERENCES_SHOWN else ""
    return shown + more if changes else "nothing visible (made by an older version of finetune)"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Start:
    """What a launcher does with an output folder."""

    action: Literal["fresh", "resume", "done"]
    training_hash: str
    metrics: ExportMetrics | None = None  # the finished export's metrics.json (action done)


def run_file_hash(output: Path) -> str | None:
    value = (read_json(output / RUN_FILE) or {}).get("trainingHash")
    return str(value) if value else None


def recorded_identity(output: Path, training_hash: str | None) -> dict[str, Any] | None:
    """The identity run.json records, if it is the one of `training_hash`."""
    run = read_json(output / RUN_FILE) or {}
    identity = run.get("identity")
    return identity if training_hash and run.get("trainingHash") == training_hash and isinstance(
        identity, dict) else None


def checkpoint_hash(output: Path) -> str | None:
    latest = latest_checkpoint(output)
    if latest is None:
        return None
    return str((read_json(latest / PROGRESS_FILE) or {}).get("training_hash") or "unknown")


def decide_start(job: FineTuneJob, output: Path, world_size: int, force: bool, record: bool = True) -> Start:
    """Fresh, resume or done for `job` in `output`; a SpecError (exit 2) when the folder is another run's.

    Every trace of a run counts (checkpoints, model files, metrics.json), whole or damaged: its identity is
    the one it records, else run.json's. Only the launcher holding the folder's lock (node 0) records: it
    clears a forced run's checkpoints and old export and writes run.json; the other nodes only look.
    """
    identity = run_identity(job, world_size)
    wanted = identity_hash(identity)
    metrics = ExportMetrics.read_if_valid(output / METRICS_FILE) if export_complete(output) else None
    finished = metrics.training.training_hash if metrics else None
    found = checkpoint_hash(output)
    if force:
        if record:
            clear_run(output)
    elif finished == wanted:
        return Start("done", wanted, metrics)
    elif found == wanted:
        return Start("resume", wanted)
    elif found is not None or export_files(output):
        owner = found or finished or run_file_hash(output)
        if owner != wanted:
            what = ("checkpoints" if found is not None else "a finished model" if metrics is not None
                    else "model files of an unfinished or damaged export")
            changed = describe_difference(recorded_identity(output, owner), identity)
            raise SpecError(
                f"--output {output} holds {what} of a different run ({changed}); use a new --output (in a "
                "cluster: a new storage.outputPath, or none), or pass --force to train from scratch there"
            )
    if record:
        try:
            write_json(output / RUN_FILE, {"trainingHash": wanted, "identity": identity,
                                           "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        except OSError as err:
            raise SpecError(f"--output {output}: cannot write {RUN_FILE}: {err.strerror}; give a writable "
                            "folder") from None
    return Start("fresh", wanted)


# What an export writes beside the weights; --force removes them all, so no file of the old model (an
# adapter beside a new full model, or the reverse) is loaded with the new one.
EXPORT_PATTERNS = ("*.safetensors", "*.bin", "adapter", "adapter_config.json", "config.json",
                   "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                   "vocab.*", "merges.txt", "spiece.model", "chat_template.*", "metrics.json", "baseline.json",
                   "errors.jsonl", "samples.jsonl", ".export-tmp")


def export_files(output: Path) -> list[Path]:
    return sorted({path for pattern in EXPORT_PATTERNS for path in output.glob(pattern)})


def clear_run(output: Path) -> None:
    """A forced fresh start: the folder's checkpoints and previous export go (metrics.json first, so the
    folder never looks like a complete export of the old model again); feedback and other files stay."""
    import shutil

    (output / METRICS_FILE).unlink(missing_ok=True)
    for path in [checkpoint_root(output), *export_files(output)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.warning("--force: removed the checkpoints and the previous export in %s", output)
