"""`finetune train`: one launcher for a laptop and for every trainer pod.

    finetune train -f job.yaml --output out/                       # one process
    finetune train -f job.yaml --output out/ --processes 2         # 2 local ranks (gloo on CPUs)
    finetune train -f /etc/finetune/job.yaml --output /workspace/j/run-1 \\
        --nodes 2 --node-rank 0 --processes 8 --rendezvous j-0.j:29500 --termination-log /dev/termination-log

World size = nodes x processes. Several ranks run under torch's elastic launcher (static rendezvous at
`--rendezvous` across nodes), NCCL on GPUs and gloo on CPUs. Why not `accelerate launch`: it turns any
child failure into exit code 1 and, on CPUs, forms no world at all. Here every rank leaves a
`RankOutcome` file, and the launcher exits with the trainer's own exit code (2 stays 2), prints the
trainer's one-line error last and, with `--termination-log`, leaves a `TerminationMessage` there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from finetune.contracts import (
    EXIT_PEER_LOST,
    EXIT_PERMANENT,
    EXIT_TRANSIENT,
    LOG_TAIL_LINES,
    FirstFailure,
    RankOutcome,
    TerminationMessage,
    TransientError,
    one_line,
)
from finetune.spec import FineTuneJob, SpecError, load_job
from finetune.trainer.identity import TRAINING_HASH_ENV, Start, decide_start
from finetune.trainer.lock import output_lock

log = logging.getLogger(__name__)
TRIAL_JOB_FILE = "job.yaml"
STOP_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


@dataclass(frozen=True)
class World:
    """Where this launcher's ranks sit in the run's world."""

    nodes: int = 1
    node_rank: int = 0
    processes: int = 1
    rendezvous: tuple[str, int] | None = None

    @property
    def size(self) -> int:
        return self.nodes * self.processes

    def ranks(self) -> range:
        return range(self.node_rank * self.processes, (self.node_rank + 1) * self.processes)


def parse_world(nodes: int, node_rank: str, processes: int, rendezvous: str | None) -> World:
    """The world from the command line; a SpecError (exit 2) for values that can never work."""
    if nodes < 1 or processes < 1:
        raise SpecError(f"--nodes and --processes must be at least 1 (got {nodes} and {processes})")
    if not node_rank.isdigit() or int(node_rank) >= nodes:
        raise SpecError(f"--node-rank must be a number from 0 to {nodes - 1}, got {node_rank!r}")
    address = None
    if rendezvous:
        host, _, port = rendezvous.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SpecError(f"--rendezvous must be HOST:PORT, got {rendezvous!r}")
        address = (host, int(port))
    elif nodes > 1:
        raise SpecError("--nodes above 1 needs --rendezvous HOST:PORT (node 0's address)")
    return World(nodes, int(node_rank), processes, address)


def launch_command(job_file: str, output: str, world: World, search_job: str | None = None) -> list[str]:
    """The trainer processes' command; a search trial's also names the search's job (for its pruner)."""
    trial = ["--search-job", search_job] if search_job else []
    entry = ["-m", "finetune.trainer.entry", "--job", job_file, "--output", output, *trial]
    if world.size == 1:
        return [sys.executable, *entry]
    launcher = [sys.executable, "-m", "finetune.trainer.elastic", f"--nproc_per_node={world.processes}"]
    if world.nodes == 1:
        return [*launcher, "--standalone", *entry]
    assert world.rendezvous is not None
    host, port = world.rendezvous
    return [*launcher, f"--nnodes={world.nodes}", f"--node_rank={world.node_rank}", f"--master_addr={host}",
            f"--master_port={port}", "--max_restarts=0", *entry]


def thread_count(processes: int) -> str:
    """Threads per training process: the pod's CPUs (cgroup quota and cpuset, or FINETUNE_CPUS, the
    limit the operator passes down) shared between the processes, never more than the user's
    OMP_NUM_THREADS when it is set."""
    from finetune.hardware import available_cpus

    total = available_cpus()
    cpus = os.environ.get("FINETUNE_CPUS", "")
    if cpus.isdigit() and int(cpus) > 0:
        total = min(total, int(cpus))
    threads = max(1, total // processes)
    user = os.environ.get("OMP_NUM_THREADS", "")
    if user.isdigit() and int(user) > 0:
        threads = min(threads, int(user))
    return str(threads)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the launcher dies (Linux), so no training is orphaned."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class Tail:
    """Copies a child's output through to this process's stderr, keeping the last lines."""

    def __init__(self, stream: IO[bytes], lines: int = LOG_TAIL_LINES) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self.thread.start()

    def _copy(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.buffer.flush()
            line = raw.decode(errors="replace").rstrip()
            if line.strip():
                self.lines.append(line)

    def join(self) -> list[str]:
        self.thread.join(timeout=30)
        return list(self.lines)


def run_child(command: list[str], env: dict[str, str], capture: bool) -> tuple[int, list[str], int]:
    """Run the trainer process(es); SIGTERM/SIGINT go on to them. Returns the exit code, the log tail and
    the signal this launcher was stopped by (0: none)."""
    preexec: Callable[[], None] | None = _die_with_parent if sys.platform.startswith("linux") else None
    out = subprocess.PIPE if capture else None
    received: list[int] = []
    started: list[subprocess.Popen[bytes]] = []

    def pass_on(signum: int, _frame: object) -> None:
        received.append(signum)
        for proc in started:
            proc.send_signal(signum)

    # Installed before the child starts, so no signal falls between its start and the handler.
    forward = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A process group of its own: a terminal's Ctrl-C reaches it once, forwarded here, not twice.
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if capture else None,
                                preexec_fn=preexec, process_group=0)
        started.append(proc)
        if received:  # came while it was being started
            proc.send_signal(received[0])
        tail = Tail(proc.stdout) if capture and proc.stdout is not None else None
        code = proc.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)
    return code, tail.join() if tail else [], received[0] if received else 0


def describe_exit(code: int) -> str:
    if code < 0 or code > 128:
        number = -code if code < 0 else code - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    return f"exit code {code}"


def decide(outcomes: list[RankOutcome], first: FirstFailure | None, child_code: int, world: World,
           tail: list[str]) -> TerminationMessage:
    """One exit code and message for the pod from every rank's outcome, what torch's launcher saw go
    wrong first, and its exit code. A permanent error wins (no retry can help, whoever saw it); then a
    stop by a signal, no rendezvous, and the rank that failed first, whose error is the cause; a rank
    that only lost its peer comes last (exit 76)."""
    mine = {o.rank: o for o in outcomes if o.rank in world.ranks()}
    base = {"node_rank": world.node_rank, "log_tail": tail}
    permanent = sorted((o for o in mine.values() if o.permanent), key=lambda o: o.rank)
    if permanent:
        return TerminationMessage(exit_code=EXIT_PERMANENT, permanent=True, message=permanent[0].message,
                                  failed_rank=permanent[0].rank, **base)
    stopped = [o for o in mine.values() if o.exit_code in STOP_EXIT_CODES]
    first_stopped = first is not None and first.kind == "rank" and first.rank in {o.rank for o in stopped}
    if stopped and (first is None or first.kind == "signal" or first_stopped):
        # Stopped at a step boundary with a checkpoint (SIGTERM, Ctrl-C): their own words say where.
        return TerminationMessage(exit_code=stopped[0].exit_code, message=stopped[0].message, **base)
    if first is not None and first.kind == "signal":
        return TerminationMessage(exit_code=128 - first.exit_code if first.exit_code < 0 else 143, **base,
                                  message=f"{first.message} before training finished (the pod was deleted or "
                                  "evicted, or its node is shutting down); a restart resumes from the last checkpoint")
    if first is not None and first.kind == "rendezvous":
        host, port = world.rendezvous or ("?", 0)
        return TerminationMessage(exit_code=EXIT_TRANSIENT, **base,
                                  message=f"could not meet the other nodes at {host}:{port}: {first.message}")
    if first is not None and first.rank is not None and first.rank not in mine:
        how = f"killed by {first.signal}" if first.signal else describe_exit(first.exit_code)
        hint = " (out of memory, or killed)" if first.signal == "SIGKILL" else ""
        return TerminationMessage(exit_code=1, message=f"training process (rank {first.rank}) ended without a "
                                  f"result: {how}{hint}", failed_rank=first.rank, **base)
    failed = sorted((o for o in mine.values() if o.exit_code != 0),
                    key=lambda o: (o.exit_code == EXIT_PEER_LOST, first is None or o.rank != first.rank, o.rank))
    if failed:
        cause = failed[0]
        return TerminationMessage(exit_code=cause.exit_code, message=cause.message, failed_rank=cause.rank, **base)
    if child_code != 0:
        missing = [r for r in world.ranks() if r not in mine]
        who = f"training process (rank {missing[0]})" if missing else "torch's launcher"
        code = child_code if 0 < child_code < 128 and child_code != EXIT_PERMANENT else 1
        hint = " (out of memory, or killed)" if child_code in (-signal.SIGKILL, 128 + signal.SIGKILL) else ""
        return TerminationMessage(exit_code=code, failed_rank=missing[0] if missing else None,
                                  message=f"{who} ended without a result: {describe_exit(child_code)}{hint}", **base)
    result = next((o.result for o in mine.values() if o.result is not None), None)
    done = f"trained; exported to {result.model_path}" if result else f"node {world.node_rank} done"
    return TerminationMessage(exit_code=0, message=done, result=result, **base)


def read_first_failure(folder: Path) -> FirstFailure | None:
    try:
        return FirstFailure.model_validate_json((folder / FirstFailure.FILE).read_text())
    except (OSError, ValueError):
        return None


def write_termination_log(path: str, message: TerminationMessage) -> None:
    try:
        Path(path).write_text(message.encode())
    except OSError as err:
        log.warning("could not write the termination message to %s: %s", path, err)


def output_folder(output: str) -> Path:
    """The output folder, created; a SpecError when it cannot be one."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"--output {output} is a file; give a folder for checkpoints and the exported model")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"--output {output}: cannot create the folder: {err.strerror}") from None
    return folder


def run_training(job_file: str, output: str, processes: int, world: World | None = None,
                 termination_log: str | None = None, force: bool = False, trial: str | None = None) -> int:
    """Validate the job here (one readable error instead of N), check what the output folder holds, then
    start the trainer process(es). Node 0 holds the folder's lock for the whole run.

    With `trial` (a search trial's parameters as JSON) the job trained is the trial's (written to
    OUTPUT/job.yaml) and the run stops after validation: a trial's test split is never looked at."""
    world = world or World(processes=processes)
    try:
        job = load_job(job_file)
        folder = output_folder(output)
        search_job = job_file if trial is not None else None
        if trial is not None:
            job, job_file = write_trial_job(job, trial, folder)
        elif job.spec.search is not None:
            raise SpecError("this job has a search section: `finetune run -f` runs its trials (or the operator); "
                            "`finetune train` trains one trial at a time (--trial PARAMS)")
        with output_lock(folder) if world.node_rank == 0 else contextlib.nullcontext():
            start = decide_start(job, folder, world.size, force, record=world.node_rank == 0)
            if start.action == "done":
                return finish(already_trained(folder, start, world), termination_log)
            message = train_processes(job_file, output, world, start, capture=termination_log is not None,
                                      search_job=search_job)
    except SpecError as err:
        message = TerminationMessage(exit_code=EXIT_PERMANENT, permanent=True, message=one_line(str(err)),
                                     node_rank=world.node_rank)
    except TransientError as err:
        message = TerminationMessage(exit_code=EXIT_TRANSIENT, message=one_line(str(err)), node_rank=world.node_rank)
    return finish(message, termination_log)


def write_trial_job(job: FineTuneJob, trial: str, folder: Path) -> tuple[FineTuneJob, str]:
    """The trial's own job (parameters applied, no search section) as FOLDER/job.yaml: what its processes
    read, and what the search's final run trains (resumes) to test the winner."""
    import json

    import yaml

    from finetune.search import trial_job
    from finetune.trainer.atomic import write_text

    if job.spec.search is None:
        raise SpecError("--trial needs a job with a search section")
    try:
        params = json.loads(trial)
        if not isinstance(params, dict):
            raise ValueError("not a JSON object")
        job = trial_job(job, params)
    except ValueError as err:
        raise SpecError(f"--trial must be a JSON object of search parameters: {one_line(str(err))}") from None
    path = folder / TRIAL_JOB_FILE
    write_text(path, yaml.safe_dump(job.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False))
    return job, str(path)


def already_trained(folder: Path, start: Start, world: World) -> TerminationMessage:
    """A finished export of this very job: report its result instead of training again."""
    from finetune.trainer.entry import trainer_result

    line = (f"already trained: {folder} holds this job's finished model (metrics.json); nothing to do "
            "(--force trains it again from scratch)")
    sys.stderr.write(f"finetune train: {line}\n")
    result = trainer_result(folder, start.metrics) if world.node_rank == 0 and start.metrics else None
    return TerminationMessage(exit_code=0, message=line, node_rank=world.node_rank, result=result)


def train_processes(job_file: str, output: str, world: World, start: Start, capture: bool,
                    search_job: str | None = None) -> TerminationMessage:
    with tempfile.TemporaryDirectory(prefix="finetune-outcomes-") as outcomes:
        env = {**os.environ, "OMP_NUM_THREADS": thread_count(world.processes), "FINETUNE_OUTCOME_DIR": outcomes,
               "FINETUNE_LAUNCHER_PID": str(os.getpid()), TRAINING_HASH_ENV: start.training_hash}
        code, tail, signum = run_child(launch_command(job_file, output, world, search_job), env, capture=capture)
        folder = Path(outcomes)
        message = decide(RankOutcome.read_all(folder), read_first_failure(folder), code, world, tail)
    if signum and message.exit_code not in (0, *STOP_EXIT_CODES):
        # Stopped before the trainer could stop at a step (still starting, or a second signal): still a stop.
        name = signal.Signals(signum).name
        return TerminationMessage(exit_code=128 + signum, node_rank=world.node_rank, log_tail=tail,
                                  message=f"stopped by {name} before a step boundary (no checkpoint there); "
                                  "rerun the same command to resume from the last checkpoint")
    return message


def finish(message: TerminationMessage, termination_log: str | None) -> int:
    if termination_log:
        write_termination_log(termination_log, message)
    if message.exit_code in STOP_EXIT_CODES:
        sys.stderr.write(f"finetune train: {message.message}\n")
    elif message.exit_code != 0:
        sys.stderr.write(f"finetune train: error: {message.message}\n")
    return message.exit_code


def _train(args: argparse.Namespace) -> int:
    try:
        world = parse_world(args.nodes, args.node_rank, args.processes, args.rendezvous)
    except SpecError as err:
        rank = int(args.node_rank) if str(args.node_rank).isdigit() else 0
        return finish(TerminationMessage(exit_code=EXIT_PERMANENT, permanent=True, message=one_line(str(err)),
                                         node_rank=rank), args.termination_log)
    return run_training(args.file, args.output, args.processes, world, args.termination_log, args.force,
                        args.trial)


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune and evaluate a model (what every trainer pod runs)")
    p.add_argument("-f", "--file", required=True, help="FineTuneJob YAML (the file kubectl takes)")
    p.add_argument("--output", required=True, help="output directory: checkpoints, exported model, metrics.json")
    p.add_argument("--processes", type=int, default=1, help="training processes (ranks) on this node; default 1")
    p.add_argument("--nodes", type=int, default=1, help="machines in the run (trainer pods); default 1")
    p.add_argument("--node-rank", default="0", help="this machine's index, 0 to nodes-1; default 0")
    p.add_argument("--rendezvous", help="HOST:PORT of node 0, where the ranks meet (with --nodes > 1)")
    p.add_argument("--termination-log", help="write the result or the error here as JSON (a pod's termination log)")
    p.add_argument("--force", action="store_true",
                   help="train from scratch even when --output holds checkpoints or a finished model")
    p.add_argument("--trial", metavar="PARAMS",
                   help="train one search trial: the job's search parameters as JSON, e.g. "
                   "'{\"learningRate\": 1e-4}'; stops after validation (no test), writes trial.json")
    p.set_defaults(func=_train)
