"""What `finetune train` does with an output folder that is not empty, and how it stops.

Real runs of the command on a tiny BERT: a finished export is not trained again, a folder of another
spec is refused with what differs, Ctrl-C stops at a step boundary with a checkpoint that the rerun
resumes, checkpoints are cleaned up after the export, and a second trainer cannot write the same folder.
"""

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
import yaml

from finetune.contracts import EXIT_PERMANENT, EXIT_TRANSIENT, TerminationMessage
from finetune.trainer.lock import output_lock
from tests.integration.processes import children, cmdline

pytestmark = pytest.mark.timeout(900)
BOUND = 300.0  # seconds; a bound, never a timing assertion
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FINETUNE = [sys.executable, "-m", "finetune.cli", "train"]


def train(job: Path, out: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FINETUNE, "-f", str(job), "--output", str(out), *flags], capture_output=True,
                          text=True, env={**ENV, **env}, timeout=BOUND, check=False)


def edit(job: Path, **training: object) -> Path:
    doc = yaml.safe_load(job.read_text())
    doc["spec"]["training"].update(training)
    job.write_text(yaml.safe_dump(doc))
    return job


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_a_finished_export_is_done_and_a_changed_spec_is_refused(
        tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path], tmp_path: Path) -> None:
    job, out = write_job(tiny_bert, synthetic_data, training={"epochs": 1, "checkpointSteps": 5}), tmp_path / "out"
    first = train(job, out)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = (out / "metrics.json").read_text()
    assert not (out / "checkpoints").exists(), "step checkpoints and best/ go once the model is exported"
    assert json.loads(metrics)["training"]["training_hash"] == json.loads((out / "run.json").read_text())[
        "trainingHash"]

    log = tmp_path / "termination-log"
    again = train(job, out, "--termination-log", str(log))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already trained" in last_line(again) and "--force" in last_line(again)
    assert "loss" not in again.stderr, "nothing was trained"
    assert (out / "metrics.json").read_text() == metrics
    ended = TerminationMessage.decode(log.read_text())
    assert ended is not None and ended.result is not None and "f1" in ended.result.metrics, "the pod still reports"

    changed = train(edit(job, learningRate=0.001), out)
    assert changed.returncode == EXIT_PERMANENT, changed.stderr[-2000:]
    line = last_line(changed)
    assert line.startswith("finetune train: error: --output ") and "holds a finished model of a different run" in line
    assert "training.learningRate 0.003 -> 0.001" in line and "--force" in line, line

    forced = train(job, out, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["training"]["training_hash"] != json.loads(metrics)[
        "training"]["training_hash"]


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_the_rerun_resumes_there(
        tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path], tmp_path: Path) -> None:
    job = write_job(tiny_bert, synthetic_data,
                    training={"epochs": 10, "checkpointSteps": 1000, "evalSteps": 1000, "logSteps": 1},
                    export={"keepCheckpoints": True})
    out, log = tmp_path / "out", tmp_path / "train.log"
    with open(log, "w") as sink:
        # A session of its own, as a terminal runs a command: Ctrl-C signals the whole process group.
        proc = subprocess.Popen([*FINETUNE, "-f", str(job), "--output", str(out)], stdout=sink,
                                stderr=subprocess.STDOUT, env=ENV, start_new_session=True, text=True)
    try:
        deadline = time.monotonic() + BOUND
        while '"eta_seconds"' not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=BOUND)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("finetune train: stopped by SIGINT at step "), last
    assert last.endswith("(checkpoint saved); rerun the same command to resume"), last
    step = int(last.split("at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step-{step:07d}").is_dir()

    refused = train(edit(job, maxLength=24), out)
    assert refused.returncode == EXIT_PERMANENT
    assert "holds checkpoints of a different run (training.maxLength 32 -> 24)" in last_line(refused)

    resumed = train(edit(job, maxLength=32, epochs=2), out)  # epochs changed too: refused as well
    assert resumed.returncode == EXIT_PERMANENT and "training.epochs 10.0 -> 2" in last_line(resumed)
    edit(job, epochs=10)
    resumed = train(job, out, FINETUNE_LOCK_WAIT_SECONDS="5")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint step-{step:07d}" in resumed.stderr
    assert (out / "checkpoints").exists(), "export.keepCheckpoints keeps them"


def test_a_second_trainer_cannot_write_a_folder_in_use(
        tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path], tmp_path: Path) -> None:
    job, out = write_job(tiny_bert, synthetic_data, training={"epochs": 1}), tmp_path / "out"
    out.mkdir()
    with output_lock(out):  # another trainer (this process) holds the folder
        busy = train(job, out, FINETUNE_LOCK_WAIT_SECONDS="1")
    assert busy.returncode == EXIT_TRANSIENT, busy.stderr[-2000:]
    assert f"--output {out} is in use by pid {os.getpid()} on " in last_line(busy), last_line(busy)
    assert not (out / "run.json").exists(), "nothing was touched"
    done = train(job, out)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("command", ["train", "run"])
def test_an_output_that_is_a_file_is_one_line_and_exit_2(tiny_bert: Path, synthetic_data: Path,
                                                          write_job: Callable[..., Path], tmp_path: Path,
                                                          command: str) -> None:
    job, file = write_job(tiny_bert, synthetic_data), tmp_path / "out.txt"
    file.write_text("not a folder")
    flags = ["--no-serve"] if command == "run" else []
    done = subprocess.run([sys.executable, "-m", "finetune.cli", command, "-f", str(job), "--output", str(file),
                           *flags], capture_output=True, text=True, env=ENV, timeout=BOUND, check=False)
    assert done.returncode == EXIT_PERMANENT and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"finetune train: error: --output {file} is a file; give a folder for checkpoints and the exported model")


def test_sigterm_while_the_trainer_is_still_starting_is_a_stop_not_a_crash(
        tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path], tmp_path: Path) -> None:
    """However early the signal comes (the trainer may not have its handler yet), the pod says "stopped"."""
    job, log = write_job(tiny_bert, synthetic_data, training={"epochs": 1}), tmp_path / "termination-log"
    proc = subprocess.Popen([*FINETUNE, "-f", str(job), "--output", str(tmp_path / "out"), "--termination-log",
                             str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    deadline = time.monotonic() + BOUND
    while not any("finetune.trainer.entry" in cmdline(child) for child in children(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=BOUND)
    assert proc.returncode == 143, stderr[-2000:]
    ended = TerminationMessage.decode(log.read_text())
    assert ended is not None and ended.exit_code == 143 and ended.message.startswith("stopped by SIGTERM"), ended
    assert stderr.strip().splitlines()[-1].startswith("finetune train: stopped by SIGTERM")
