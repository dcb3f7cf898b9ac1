"""Resumable checkpoints, written atomically.

A checkpoint is `checkpoints/step-NNNNNNN/`: Accelerate's full state (model, optimizer, scheduler and
every process's RNG) plus `progress.json` (epoch, batch position, best metric, history). It is written
under a hidden temporary name and renamed once complete, so a crash mid-save leaves only a `.tmp-*`
folder that is ignored and cleaned up; the newest `step-*` folder is always whole.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.spec import SpecError
from finetune.trainer.atomic import publish_dir, write_json

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"


@dataclass
class TrainState:
    """Where training is; saved with every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    pruned_at: int | None = None  # a search trial that stopped itself after this validation
    samples_seen: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0  # the checkpoint this process started from; 0 = a fresh start
    training_hash: str | None = None  # the run identity that made it (finetune.trainer.identity)


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def complete_checkpoints(output: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if read_progress(p) is not None]


INT_FIELDS = ("epoch", "batch_in_epoch", "global_step")


def read_progress(folder: Path) -> dict[str, Any] | None:
    """A checkpoint's progress.json when it is whole; None (the checkpoint is skipped, with a warning) when
    it is missing, not JSON or of the wrong shape: an older checkpoint is then the newest whole one."""
    path = folder / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    known = {f.name for f in fields(TrainState)}
    ok = isinstance(data, dict) and set(data) <= known and all(
        isinstance(data[k], int) and not isinstance(data[k], bool) for k in INT_FIELDS if k in data)
    if not ok:
        log.warning("skipping checkpoint %s: its %s is damaged", folder, PROGRESS_FILE)
        return None
    progress: dict[str, Any] = data
    return progress


def latest_checkpoint(output: Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


def remove_partial(output: Path) -> None:
    """Delete leftovers of a save that a crash interrupted (main process only)."""
    root = checkpoint_root(output)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator: Any, output: Path, state: TrainState, keep: int) -> Path:
    """Every process calls this; the main process publishes the folder and prunes old ones."""
    final = checkpoint_root(output) / f"step-{state.global_step:07d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / PROGRESS_FILE, asdict(state))
        publish_dir(tmp, final)
        for old in complete_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> TrainState:
    """Restore model, optimizer, scheduler and RNG from `path`; return where training was."""
    data = read_progress(path)
    if data is None:
        raise SpecError(f"checkpoint {path} is damaged ({PROGRESS_FILE}); delete it to resume from an older one")
    accelerator.load_state(str(path))
    return TrainState(**data)
