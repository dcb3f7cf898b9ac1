"""`finetune run` for a job with a search section: the trials on this machine, then the winner's test.

Each trial is the trainer pod's own trial command, `finetune train --trial PARAMS`, in OUT/trials/<n>
(its log in OUT/trials/<n>/train.log), at most `--parallel` at once, sharing the CPUs between them. A
trial prunes itself (`finetune.trainer.trial`); the driver reads each trial.json as it is written and
records everything in OUT/search.json after every change. A killed search resumes from search.json:
finished trials are not rerun, and trials that were running resume from their checkpoints. When all
trials are done, the winner (best validation value, within search.maxGroupGap) gets the one test of
the search: `finetune train` on its own job.yaml resumes its end state, tests and exports it; the other
trials' checkpoints are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from finetune.contracts import (
    SEARCH_FILE,
    TRIAL_FILE,
    ExportMetrics,
    SearchReport,
    TrialProgress,
    TrialRecord,
    one_line,
)
from finetune.search import best_index, describe_params, direction, propose, winner
from finetune.spec import FineTuneJob, SpecError

log = logging.getLogger(__name__)
POLL_S = 0.5
EXIT_REJECTED = 3
TRIALS_DIR = "trials"
LOG_FILE = "train.log"
SEARCH_HASH_KEY = "searchHash"


def trial_folder(output: Path, number: int) -> Path:
    return output / TRIALS_DIR / str(number)


@dataclass
class Running:
    """A trial process of this driver."""

    record: TrialRecord
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float = field(default_factory=time.monotonic)


def search_hash(job: FineTuneJob) -> str:
    """What a search's records belong to: the whole spec but the serving side (changing how the winner is
    served does not invalidate the trials)."""
    import hashlib

    doc = job.spec.model_dump(mode="json", by_alias=True, exclude={"serving", "promotion", "monitoring"})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_report(job: FineTuneJob, output: Path, force: bool) -> SearchReport:
    """search.json of this very search (resume), or a fresh one; another search's records are refused."""
    assert job.spec.search is not None
    path = output / SEARCH_FILE
    wanted = search_hash(job)
    if force:
        path.unlink(missing_ok=True)
        shutil.rmtree(output / TRIALS_DIR, ignore_errors=True)
    elif path.exists():
        report: SearchReport = SearchReport.read(path)
        if getattr(report, SEARCH_HASH_KEY, None) != wanted:
            raise SpecError(f"--output {output} holds another search's trials (search.json: the spec changed); "
                            "use a new --output, or pass --force to start the search again")
        return report
    search = job.spec.search
    return SearchReport.model_validate({
        "metric": job.spec.search_metric, "direction": direction(job.spec), "algorithm": search.algorithm,
        "pruner": search.pruner, "trials_planned": search.trials, SEARCH_HASH_KEY: wanted})


def save_report(output: Path, report: SearchReport) -> None:
    from finetune.trainer.atomic import write_json

    write_json(output / SEARCH_FILE, report.document())


class SearchDriver:
    """Runs a search's trials to the end; `run()` returns the winner's record (or None)."""

    def __init__(self, job_file: str, job: FineTuneJob, output: Path, processes: int, parallel: int,
                 report: SearchReport) -> None:
        assert job.spec.search is not None
        self.job_file, self.job, self.output, self.processes = job_file, job, output, processes
        self.search = job.spec.search
        self.parallel = parallel if parallel > 0 else self.search.parallel  # --parallel overrides
        self.report = report
        self.running: dict[int, Running] = {}

    @property
    def records(self) -> list[TrialRecord]:
        return self.report.trials

    def run(self) -> TrialRecord | None:
        for record in self.records:
            if record.state != "running":
                say(f"trial {record.number}/{self.search.trials}: already {record.state} "
                    f"({self.summary(record)}); not rerun")
        try:
            while True:
                self.start_trials()
                if not self.running:
                    break
                self.follow()
                time.sleep(POLL_S)
        except BaseException:
            self.stop_all()
            raise
        return winner(self.job.spec, self.records)

    def start_trials(self) -> None:
        waiting = [r for r in self.records if r.state == "running" and r.number not in self.running]
        while len(self.running) < self.parallel:
            if waiting:  # a trial the last driver left running: same parameters, resumes its checkpoint
                record = waiting.pop(0)
            elif len(self.records) < self.search.trials:
                params = propose(self.job.spec, self.records)
                record = TrialRecord(number=len(self.records) + 1, params=params,
                                     output=str(trial_folder(self.output, len(self.records) + 1)))
                self.records.append(record)
                save_report(self.output, self.report)
            else:
                return
            self.running[record.number] = self.launch(record)

    def launch(self, record: TrialRecord) -> Running:
        folder = Path(record.output)
        folder.mkdir(parents=True, exist_ok=True)
        command = trial_command(self.job_file, folder, record.params, self.processes)
        env = {**os.environ, "FINETUNE_CPUS": str(self.cpus_per_trial())}
        logfile = open(folder / LOG_FILE, "ab")  # noqa: SIM115 - closed when the trial ends
        say(f"trial {record.number}/{self.search.trials}: started, {describe_params(record.params)} "
            f"(log: {folder / LOG_FILE})")
        proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)
        return Running(record, proc, logfile)

    def cpus_per_trial(self) -> int:
        from finetune.hardware import available_cpus

        return max(1, available_cpus() // self.parallel)

    def follow(self) -> None:
        for number, trial in list(self.running.items()):
            self.read_curve(trial)
            code = trial.proc.poll()
            if code is None:
                continue
            trial.log.close()
            del self.running[number]
            self.finish(trial, code)
            save_report(self.output, self.report)

    def read_curve(self, trial: Running) -> None:
        progress = TrialProgress.read_if_valid(Path(trial.record.output) / TRIAL_FILE)
        if progress is None:
            return
        record = trial.record
        record.curve = progress.curve
        if progress.history:
            minimize = self.report.direction == "minimize"
            best = progress.history[best_index(progress.curve, minimize)] if progress.curve else {}
            record.validation = {k: v for k, v in best.items() if k not in ("step", "epoch")}
            record.value = record.curve[best_index(record.curve, minimize)] if record.curve else None
            gap = record.validation.get("group_gap")
            record.group_gap = float(gap) if isinstance(gap, int | float) else None

    def finish(self, trial: Running, code: int) -> None:
        record = trial.record
        record.wall_seconds = round(record.wall_seconds + time.monotonic() - trial.started, 1)
        progress = TrialProgress.read_if_valid(Path(record.output) / TRIAL_FILE)
        if code == 0 and progress is not None and progress.finished:
            record.state, record.pruned_at = progress.state, progress.pruned_at
        elif code == 2:
            self.stop_all()
            raise SpecError(f"trial {record.number}: {last_error(Path(record.output) / LOG_FILE)}")
        elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise KeyboardInterrupt  # stopped from outside: the trial stays running, and resumes
        else:
            record.state = "failed"
            record.message = last_error(Path(record.output) / LOG_FILE)
        say(f"trial {record.number}/{self.search.trials}: {record.state} ({self.summary(record)})")

    def summary(self, record: TrialRecord) -> str:
        metric = self.report.metric
        value = f"{metric} {record.value:.4f}" if record.value is not None else f"no {metric}"
        if record.state == "pruned":
            return f"{value}, pruned after validation {record.pruned_at}, {record.wall_seconds:.0f} s"
        if record.state == "failed":
            return record.message
        gap = f", group gap {record.group_gap:.3f}" if record.group_gap is not None else ""
        return f"{value}{gap}, {len(record.curve)} validations, {record.wall_seconds:.0f} s"

    def stop_all(self) -> None:
        """Stop every running trial at its next step (a checkpoint each) and wait for them."""
        for trial in self.running.values():
            if trial.proc.poll() is None:
                trial.proc.send_signal(signal.SIGTERM)
        for trial in self.running.values():
            try:
                trial.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                trial.proc.kill()
            trial.log.close()
        self.running.clear()
        save_report(self.output, self.report)


def _stop_with_parent() -> None:
    """In the trial before exec: SIGTERM when the driver dies, so a killed search leaves checkpoints behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def trial_command(job_file: str, folder: Path, params: dict[str, Any], processes: int) -> list[str]:
    """Exactly what a trial pod runs (but its cluster flags)."""
    return [sys.executable, "-m", "finetune.cli", "train", "-f", job_file, "--output", str(folder),
            "--trial", json.dumps(params), "--processes", str(processes)]


def last_error(logfile: Path) -> str:
    try:
        lines = [line for line in logfile.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("finetune train:")]
    return one_line((errors or lines or ["no output"])[-1].removeprefix("finetune train: error: "))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def remove_losers(records: list[TrialRecord], best: TrialRecord) -> None:
    """Only the winner's model is kept: the others' checkpoints hold optimizer state (several x the model)."""
    from finetune.trainer.checkpoint import checkpoint_root

    for record in records:
        if record.number != best.number:
            shutil.rmtree(checkpoint_root(Path(record.output)), ignore_errors=True)


def run_search(job_file: str, job: FineTuneJob, output: Path, processes: int, parallel: int,
               force: bool) -> tuple[int, Path | None]:
    """The whole search; returns an exit code and the winner's export folder (tested, not yet gated)."""
    from finetune.trainer.cli import TRIAL_JOB_FILE, output_folder, run_training

    output_folder(str(output))
    report = load_report(job, output, force)
    best = SearchDriver(job_file, job, output, processes, parallel, report).run()
    save_report(output, report)
    if best is None:
        limit = job.spec.search.max_group_gap if job.spec.search else None
        why = f" within search.maxGroupGap {limit}" if limit is not None else ""
        sys.stderr.write(f"finetune run: no trial finished with a validation {report.metric}{why}; "
                         f"see {output / SEARCH_FILE}\n")
        return EXIT_REJECTED, None
    say(f"best: trial {best.number} ({describe_params(best.params)}), validation {report.metric} "
        f"{best.value:.4f}; testing it (the only test of the search)")
    folder = Path(best.output)
    code = run_training(str(folder / TRIAL_JOB_FILE), str(folder), processes)
    if code != 0:
        return code, None
    metrics = ExportMetrics.in_folder(folder)
    report.best_trial, report.model_path, report.test = best.number, str(folder), metrics.test_numbers()
    remove_losers(report.trials, best)
    save_report(output, report)
    save_report(folder, report)
    say(trials_table(report))
    return 0, folder


def trials_table(report: SearchReport) -> str:
    """Trials side by side: parameters, validation value, group gap, outcome."""
    names = sorted({k for r in report.trials for k in r.params})
    head = ["trial", *names, f"val {report.metric}", "group gap", "state", "seconds"]
    rows = [head]
    for r in report.trials:
        params = [f"{r.params[n]:.3g}" if isinstance(r.params.get(n), float) else str(r.params.get(n, ""))
                  for n in names]
        mark = " *" if r.number == report.best_trial else ""
        rows.append([f"{r.number}{mark}", *params, f"{r.value:.4f}" if r.value is not None else "-",
                     f"{r.group_gap:.3f}" if r.group_gap is not None else "-", r.state, f"{r.wall_seconds:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
