"""A real hyperparameter search with `finetune run`: trials through the trial command, one pruned, only the
winner tested and exported, and a killed search that resumes without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Random draws from two learning rates; seed 2 draws good, hopeless, good: trial 2 falls behind trial 1,
# so the median pruner stops it.
GOOD, HOPELESS = 3e-3, 1e-7
SEARCH = {"trials": 3, "algorithm": "random", "seed": 2, "startupTrials": 1, "pruner": "median",
          "parameters": {"learningRate": {"values": [GOOD, HOPELESS]}}}


def search_job(write_job: Callable[..., Path], tiny_bert: Path, data: Path, **search: Any) -> Path:
    return write_job(tiny_bert, data, name="search", search={**SEARCH, **search}, serving={"enabled": False},
                     training={"epochs": 4, "batchSize": 16, "learningRate": 3e-3, "maxLength": 32,
                               "warmupRatio": 0.0, "logSteps": 5})


def run_search(job: Path, out: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune.cli", "run", "-f", str(job), "--output", str(out),
                           "--no-serve"], capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


def read_search(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "search.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_search_prunes_tests_only_the_winner_and_records_every_trial(
        tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_search(search_job(write_job, tiny_bert, synthetic_data), out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    print(result.stdout)

    report = read_search(out)
    trials = {t["number"]: t for t in report["trials"]}
    assert [trials[n]["params"]["learningRate"] for n in (1, 2, 3)] == [GOOD, HOPELESS, GOOD]
    # The median pruner stops trial 2 at the first validation where it is behind trial 1 (the only finished
    # trial), and the trial stops right there: the verdict is its own, not a poll's from outside.
    behind = next(i for i, (a, b) in enumerate(zip(trials[1]["curve"], trials[2]["curve"], strict=False)) if b < a)
    assert trials[2]["state"] == "pruned" and trials[2]["pruned_at"] == behind + 1 < 4, trials
    assert len(trials[2]["curve"]) == behind + 1, "a pruned trial stops after the validation that pruned it"
    assert trials[1]["state"] == trials[3]["state"] == "complete"
    assert report["best_trial"] in (1, 3) and trials[report["best_trial"]]["value"] > 0.9

    winner = Path(report["model_path"])
    assert winner == out / "trials" / str(report["best_trial"])
    tested = sorted(p.parent.name for p in (out / "trials").glob("*/metrics.json"))
    assert tested == [winner.name], "only the winner is tested and exported"
    assert not list((out / "trials").glob("*/errors.jsonl"))[1:], "no other trial's test predictions exist"
    assert json.loads((winner / "search.json").read_text())["best_trial"] == report["best_trial"]
    metrics = json.loads((winner / "metrics.json").read_text())
    assert report["test"]["f1"] == metrics["test"]["f1"] > 0.8
    trial_job = yaml.safe_load((winner / "job.yaml").read_text())
    assert "search" not in trial_job["spec"], "the winner's job is a plain run of its parameters"
    assert trial_job["spec"]["training"]["learningRate"] == GOOD
    assert not any((out / "trials" / str(n) / "checkpoints").exists() for n in trials), "checkpoints removed"
    assert "trial 2/3: pruned" in result.stdout and "best: trial" in result.stdout


def test_a_killed_search_resumes_without_rerunning_finished_trials(
        tiny_bert: Path, synthetic_data: Path, write_job: Callable[..., Path], tmp_path: Path) -> None:
    job, out = search_job(write_job, tiny_bert, synthetic_data, pruner="none"), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", "-f", str(job), "--output", str(out),
                             "--no-serve"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(t["state"] == "complete" for t in read_search(out).get("trials", []))
                 and len(read_search(out)["trials"]) >= 2, "trial 1 to finish and trial 2 to start")
        first_log = (out / "trials" / "1" / "train.log").read_text()
        proc.send_signal(signal.SIGKILL)  # the driver dies; its trial gets SIGTERM and checkpoints
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    result = run_search(job, out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "trial 1/3: already complete" in result.stdout and "not rerun" in result.stdout
    assert (out / "trials" / "1" / "train.log").read_text() == first_log, "trial 1 ran again"
    report = read_search(out)
    assert [t["number"] for t in report["trials"]] == [1, 2, 3]
    assert all(t["state"] == "complete" for t in report["trials"])
    assert report["best_trial"] is not None and report["test"]


def test_a_trial_with_bad_data_stops_the_search_with_its_error(
        tiny_bert: Path, tmp_path: Path, write_job: Callable[..., Path]) -> None:
    data = tmp_path / "bad.tsv"
    data.write_text("review\tsentiment\nonly one row\tpositive\n")
    result = run_search(search_job(write_job, tiny_bert, data), tmp_path / "out")
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune run: error: trial 1:"), last
