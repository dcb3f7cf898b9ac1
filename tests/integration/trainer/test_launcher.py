"""The trainer pod's command, run by hand: the exact command of the built JobSet, as real processes.

Exit codes survive the launcher (2 stays 2, 75 is retryable), the trainer's one-line error is the last
line on stderr and in the termination message, two node commands form one world, a killed rank is
reported as retryable and its rerun resumes, and killing the launcher leaves no training behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from finetune.contracts import EXIT_PERMANENT, EXIT_TRANSIENT, TerminationMessage
from tests.integration.pod_command import free_port, pod_command
from tests.integration.processes import alive, children, cmdline, ranks

pytestmark = pytest.mark.timeout(600)
BOUND = 300.0  # seconds; the machine is shared, a bound is never a timing assertion


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def finished(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=BOUND)


def message(path: Path) -> TerminationMessage:
    found = TerminationMessage.decode(path.read_text())
    assert found is not None, path.read_text()
    return found


def wait_until(check: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_bad_data_exits_2_with_the_trainers_line(tiny_bert, synthetic_data, write_job, tmp_path) -> None:
    job = write_job(tiny_bert, synthetic_data, dataset={"labelColumn": "stars"}, resources={"gpusPerNode": 0})
    log = tmp_path / "termination-log"
    done = subprocess.run(pod_command(job, tmp_path / "out", log), capture_output=True, text=True, timeout=BOUND)
    assert done.returncode == EXIT_PERMANENT, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune train: error: ") and "column 'stars' not found" in last
    ended = message(log)
    assert ended.permanent and ended.exit_code == 2 and "column 'stars' not found" in ended.message
    assert ended.failed_rank == 0 and ended.result is None


def test_two_node_commands_form_one_world(tiny_bert, synthetic_data, write_job, tmp_path) -> None:
    job = write_job(tiny_bert, synthetic_data, resources={"nodes": 2, "gpusPerNode": 0},
                    training={"epochs": 1})
    port, output = free_port(), tmp_path / "out"
    logs = [tmp_path / f"termination-{rank}" for rank in (0, 1)]
    procs = [start(pod_command(job, output, logs[rank], node_rank=rank, port=port), tmp_path / f"pod-{rank}.log",
                   OMP_NUM_THREADS="1") for rank in (0, 1)]
    codes = [finished(p) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"pod-{r}.log").read_text()[-2000:] for r in (0, 1)]
    node0, node1 = message(logs[0]), message(logs[1])
    assert node0.result is not None and node0.result.world_size == 2
    assert node0.result.model_path == str(output) and "f1" in node0.result.metrics
    assert node1.exit_code == 0 and node1.result is None and node1.node_rank == 1
    assert json.loads((output / "metrics.json").read_text())["training"]["world_size"] == 2


def test_a_killed_rank_is_retryable_and_the_rerun_resumes(tiny_bert, synthetic_data, write_job, tmp_path) -> None:
    job = write_job(tiny_bert, synthetic_data, resources={"gpusPerNode": 0},
                    training={"epochs": 8, "checkpointSteps": 4, "evalSteps": 1000})
    output, log = tmp_path / "out", tmp_path / "termination-log"
    command = [*pod_command(job, output, log)]
    command[command.index("--processes") + 1] = "2"  # a node with two ranks: torch's launcher in between
    launcher = start(command, tmp_path / "pod.log", OMP_NUM_THREADS="1")
    wait_until(lambda: any((output / "checkpoints").glob("step-*")) or launcher.poll() is not None, "a checkpoint")
    assert launcher.poll() is None, (tmp_path / "pod.log").read_text()[-2000:]
    workers = ranks(launcher.pid)
    assert len(workers) == 2, [(cmdline(p)) for p in children(launcher.pid)]
    os.kill(max(workers), signal.SIGKILL)  # one rank dies (the OOM killer's signal)
    code = finished(launcher)
    ended = message(log)
    assert code not in (0, EXIT_PERMANENT) and not ended.permanent, ended
    assert ended.exit_code == code and ended.log_tail
    assert "ended without a result: killed by SIGKILL (out of memory, or killed)" in ended.message, ended.message
    # The pod is recreated: the same command resumes from the checkpoint and finishes.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=BOUND, env={**os.environ,
                                                                                       "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = message(log).result
    assert result is not None and result.resumed_from_step > 0 and result.world_size == 2


def test_killing_the_launcher_leaves_no_training_behind(tiny_bert, synthetic_data, write_job, tmp_path) -> None:
    job = write_job(tiny_bert, synthetic_data, resources={"gpusPerNode": 0}, training={"epochs": 50})
    command = pod_command(job, tmp_path / "out", tmp_path / "termination-log")
    command[command.index("--processes") + 1] = "2"
    launcher = start(command, tmp_path / "pod.log", OMP_NUM_THREADS="1")
    wait_until(lambda: len(ranks(launcher.pid)) == 2, "two training processes")
    descendants = children(launcher.pid)
    launcher.kill()
    launcher.wait(timeout=BOUND)
    try:
        wait_until(lambda: not any(alive(p) for p in descendants), "every training process gone")
    finally:  # a failing run must not leave training processes eating the machine's cores
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_an_unreachable_hub_is_transient(synthetic_data, write_job, tmp_path) -> None:
    job = write_job(tmp_path, synthetic_data, resources={"gpusPerNode": 0})
    doc = yaml.safe_load(job.read_text())
    doc["spec"]["model"] = {"name": "someone/not-cached-anywhere"}
    job.write_text(yaml.safe_dump(doc))
    log = tmp_path / "termination-log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(pod_command(job, tmp_path / "out", log), capture_output=True, text=True, timeout=BOUND,
                          env=env)
    assert done.returncode == EXIT_TRANSIENT, done.stderr[-2000:]
    ended = message(log)
    assert not ended.permanent and "cannot reach the model hub" in ended.message


def test_sigterm_stops_both_ranks_at_one_step_with_a_checkpoint_and_the_pod_resumes(
        tiny_bert, synthetic_data, write_job, tmp_path) -> None:
    """A pod being deleted gets SIGTERM: both ranks stop after the same step, save it, and say so (not "a rank
    crashed"); the recreated pod resumes from that step."""
    job = write_job(tiny_bert, synthetic_data, resources={"gpusPerNode": 0},
                    training={"epochs": 12, "logSteps": 1, "checkpointSteps": 1000, "evalSteps": 1000})
    output, log = tmp_path / "out", tmp_path / "termination-log"
    command = pod_command(job, output, log)
    command[command.index("--processes") + 1] = "2"
    launcher = start(command, tmp_path / "pod.log", OMP_NUM_THREADS="1")
    wait_until(lambda: '"eta_seconds"' in (tmp_path / "pod.log").read_text() or launcher.poll() is not None,
               "training steps")
    descendants = children(launcher.pid)
    try:
        launcher.send_signal(signal.SIGTERM)  # what the kubelet sends the container's process
        code = finished(launcher)
    finally:
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    ended = message(log)
    assert code == 128 + signal.SIGTERM and ended.exit_code == code and not ended.permanent, ended
    assert ended.message.startswith("stopped by SIGTERM at step "), ended.message
    step = int(ended.message.split("at step ")[1].split()[0])
    assert (output / "checkpoints" / f"step-{step:07d}").is_dir(), "every rank saved the step it stopped at"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=BOUND,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = message(log).result
    assert result is not None and result.resumed_from_step == step and result.world_size == 2
