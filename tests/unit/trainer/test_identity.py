"""Run identity: a folder's checkpoints or export belong to one spec, one data content and one world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.spec import SpecError, load_job
from finetune.trainer.identity import decide_start


def job_file(tmp_path: Path, **training: object) -> Path:
    data = tmp_path / "train.tsv"
    if not data.exists():
        data.write_text("text\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(40)))
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
           "spec": {"task": "text-classification", "model": {"path": "/m"},
                    "dataset": {"train": {"path": str(data)}}, "training": {"learningRate": 1e-4, **training}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def checkpoint(out: Path, training_hash: str) -> None:
    step = out / "checkpoints" / "step-0000010"
    step.mkdir(parents=True)
    (step / "progress.json").write_text(json.dumps({"global_step": 10, "training_hash": training_hash}))


def test_fresh_then_resume_then_refuse_what_changed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fresh = decide_start(load_job(job_file(tmp_path)), out, 1, force=False)
    assert fresh.action == "fresh" and json.loads((out / "run.json").read_text())["trainingHash"] == fresh.training_hash
    checkpoint(out, fresh.training_hash)
    assert decide_start(load_job(job_file(tmp_path)), out, 1, force=False).action == "resume"
    # Bookkeeping fields do not change what is learned.
    assert decide_start(load_job(job_file(tmp_path, logSteps=1, checkpointSteps=7)), out, 1, False).action == "resume"

    with pytest.raises(SpecError, match=r"holds checkpoints of a different run \(worldSize 1 -> 2\)"):
        decide_start(load_job(job_file(tmp_path)), out, 2, force=False)
    (tmp_path / "train.tsv").write_text((tmp_path / "train.tsv").read_text().replace("\t1\n", "\t2\n"))
    with pytest.raises(SpecError, match=r"\(dataset\.train: the file's content changed\); use a new --output .* "
                                        r"--force to train from scratch"):
        decide_start(load_job(job_file(tmp_path)), out, 1, force=False)


def test_force_clears_the_checkpoints_but_not_the_previous_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    checkpoint(out, "0123456789abcdef")
    (out / "model.safetensors").write_bytes(b"old")
    start = decide_start(load_job(job_file(tmp_path)), out, 1, force=True)
    assert start.action == "fresh" and not (out / "checkpoints").exists() and (out / "model.safetensors").exists()


def test_only_node_0_records(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert decide_start(load_job(job_file(tmp_path)), out, 2, force=False, record=False).action == "fresh"
    assert not (out / "run.json").exists()
