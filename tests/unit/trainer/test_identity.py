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


def test_only_node_0_records(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert decide_start(load_job(job_file(tmp_path)), out, 2, force=False, record=False).action == "fresh"
    assert not (out / "run.json").exists()


def finished_export(out: Path, training_hash: str | None) -> None:
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    doc = {"task": "text-classification", "name": "j", "headline_metric": "f1",
           "training": {"training_hash": training_hash}}
    (out / "metrics.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", ["delete", "not json", "wrong type"])
def test_another_runs_model_is_refused_even_when_its_metrics_json_is_damaged(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    first = decide_start(load_job(job_file(tmp_path)), out, 1, force=False)  # writes run.json
    finished_export(out, first.training_hash)
    metrics = out / "metrics.json"
    if damage == "delete":
        metrics.unlink()
    else:
        metrics.write_text("{" if damage == "not json" else json.dumps({"training": {"steps": "many"}}))
    with pytest.raises(SpecError, match=r"holds model files of an unfinished or damaged export of a different run "
                                        r"\(training.learningRate 0.0001 -> 0.001\)"):
        decide_start(load_job(job_file(tmp_path, learningRate=1e-3)), out, 1, force=False)


def test_an_older_versions_export_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    finished_export(out, None)
    with pytest.raises(SpecError, match=r"what changed is unknown: .* \(made by an older version of finetune"):
        decide_start(load_job(job_file(tmp_path)), out, 1, force=False)


def test_force_removes_every_file_of_the_old_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    finished_export(out, "0123456789abcdef")
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"old adapter")
    (out / "feedback.jsonl").write_text('{"label": "x"}\n')
    decide_start(load_job(job_file(tmp_path)), out, 1, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["feedback.jsonl", "run.json"]


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path: Path) -> None:
    from finetune.trainer.checkpoint import latest_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    start = decide_start(load_job(job_file(tmp_path)), out, 1, force=False)
    checkpoint(out, start.training_hash)
    newer = out / "checkpoints" / "step-0000020"
    newer.mkdir()
    (newer / "progress.json").write_text('{"global_step": "20"')
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000010"
    assert decide_start(load_job(job_file(tmp_path)), out, 1, force=False).action == "resume"


def test_writing_the_defaults_out_is_the_same_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    start = decide_start(load_job(job_file(tmp_path)), out, 1, force=False)
    checkpoint(out, start.training_hash)
    doc = yaml.safe_load(job_file(tmp_path).read_text())
    doc["spec"]["dataset"]["cleaning"] = {"normalizeWhitespace": True}  # the classification default
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert decide_start(load_job(tmp_path / "job.yaml"), out, 1, force=False).action == "resume"


def test_an_unwritable_output_is_one_line(tmp_path: Path) -> None:
    from finetune.trainer.lock import LOCK_FILE, output_lock

    (tmp_path / LOCK_FILE).mkdir()
    lock = output_lock(tmp_path)
    with pytest.raises(SpecError, match=r"cannot write .*\.finetune\.lock: Is a directory; give a writable folder"):
        lock.__enter__()
