"""The trainer entry point: one process (rank) of a training run. `finetune train` starts it, alone or
under torch's elastic launcher (`finetune.trainer.cli`); a trainer pod runs that same command.

    python -m finetune.trainer.entry --job job.yaml --output out/

Every rank leaves a `RankOutcome` in $FINETUNE_OUTCOME_DIR (set by the launcher) when it ends, so the
launcher can exit with the trainer's own exit code and one-line error. Exit codes: 0 done; 2 bad spec
or data (permanent); 75 the model hub or the network failed (transient); anything else is retryable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from finetune.contracts import (
    EXIT_PEER_LOST,
    EXIT_PERMANENT,
    EXIT_TRANSIENT,
    ExportMetrics,
    RankOutcome,
    TrainerResult,
    TransientError,
    one_line,
)
from finetune.hardware import available_cpus
from finetune.spec import FineTuneJob, SpecError, Training, load_job

log = logging.getLogger("finetune.trainer")
EXIT_BAD_INPUT = EXIT_PERMANENT
OUTCOME_DIR_ENV = "FINETUNE_OUTCOME_DIR"


def mixed_precision(cfg: Training) -> str:
    import torch

    if cfg.precision == "fp32":
        return "no"
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # On CPUs, fp32. bf16 autocast is only ~1.2x faster on an idle CPU with native bf16 (AMX), and 5-8x
    # slower than fp32 on the same job while another process competes for the cores, which is the
    # normal state of a shared node (README, "Precision on CPUs"). `precision: bf16` still asks for it.
    return "no"



def make_accelerator(cfg: Training) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Adam's moment estimates for rarely-seen embedding rows decay into denormal floats, which
    # are many times slower on CPUs; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        # N processes on one machine share its cores instead of each oversubscribing all of them; the
        # launcher's OMP_NUM_THREADS already says how many (the pod's CPU limit, or the user's choice).
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or available_cpus() // local_world
        torch.set_num_threads(max(1, threads))
    # cpu=True is what makes Accelerate form a gloo world from WORLD_SIZE/RANK when there is no GPU;
    # without it every CPU process silently trains alone (world size 1).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision(cfg),
        step_scheduler_with_optimizer=False,  # the step plan is already per process
    )
    set_seed(cfg.seed, device_specific=False)
    return accelerator


def train(job: FineTuneJob, output: Path, search_job: FineTuneJob | None = None) -> ExportMetrics | None:
    """Run the whole training job in this process (one rank of however many). A search trial (`search_job`:
    the search it belongs to) prunes itself when it falls behind, and stops after training: its checkpoints
    and trial.json stay, and nothing is tested or exported."""
    accelerator = make_accelerator(job.spec.training)
    trial = None
    if search_job is not None:
        from finetune.trainer.trial import TrialPruner

        trial = TrialPruner(search_job, output, accelerator)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        log.info("training %s: task %s, world size %d, device %s, precision %s", job.metadata.name,
                 job.spec.task, accelerator.num_processes, accelerator.device, accelerator.mixed_precision)
    accelerator.wait_for_everyone()
    if job.spec.task == "text-classification":
        from finetune.trainer.pipeline import train_classifier

        metrics = train_classifier(job, output, accelerator, trial)
    else:
        from finetune.trainer.causal_pipeline import train_causal_lm

        metrics = train_causal_lm(job, output, accelerator, trial)
    if accelerator.is_main_process and not job.spec.export.keep_checkpoints and trial is None:
        remove_checkpoints(output)
    return metrics


def remove_checkpoints(output: Path) -> None:
    """After the export (every rank is past its last use of them): they only cost space now."""
    import shutil

    from finetune.trainer.checkpoint import checkpoint_root

    root = checkpoint_root(output)
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
        log.info("removed the checkpoints in %s (export.keepCheckpoints keeps them)", root)


def quiet_libraries() -> None:
    """Our own log says what happened; the libraries' per-checkpoint and load-report chatter hides it."""
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # untyped functions
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


LAUNCHER_PID_ENV = "FINETUNE_LAUNCHER_PID"


def die_with_parent() -> None:
    """On Linux, this process gets SIGKILL when its launcher dies, so no training outlives a killed one.

    The launcher may have died already, while this process was still starting (before the request
    below): then its parent is no longer the pid the launcher left in FINETUNE_LAUNCHER_PID, and it stops.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    expected = os.environ.get(LAUNCHER_PID_ENV, "")
    if expected.isdigit() and os.getppid() != int(expected):
        os._exit(1)


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def leave_outcome(outcome: RankOutcome) -> None:
    """Write this rank's outcome where the launcher looks; never raises (the exit code still tells)."""
    folder = os.environ.get(OUTCOME_DIR_ENV)
    if not folder:
        return
    try:
        outcome.write(Path(folder))
    except OSError as err:
        log.warning("could not leave the outcome for the launcher: %s", err)


PEER_LOST_WAIT_ENV = "FINETUNE_PEER_LOST_WAIT_SECONDS"
PEER_LOST_WAIT_SECONDS = 600.0
# What a collective says when the process at the other end is gone (gloo, NCCL, the c10d store).
PEER_LOST_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "read error",
                   "remote process exited", "communicator was aborted", "socket closed", "recvbytes failed",
                   "connection refused", "timed out")


def lost_peer(err: BaseException) -> bool:
    """Whether a distributed error only says that another rank went away (the cause is that rank)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return False
    names = {cls.__name__ for cls in type(err).__mro__}
    text = str(err).lower()
    distributed = bool(names & {"DistNetworkError", "DistBackendError", "DistStoreError"}) or "gloo" in text
    return distributed and any(sign in text for sign in PEER_LOST_SIGNS)


def wait_for_the_cause(rank: int, message: str) -> None:
    """A rank that lost its peer is a victim, not the cause: it waits before failing, so the pod that went
    first (preempted, evicted, crashed) fails its Job first and decides the gang's restart (a disruption
    uses no budget). The JobSet's restart ends this wait at once (SIGTERM); only a cause that never shows
    (a lost node) lets it run out, and then this rank's failure restarts the gang."""
    import time

    from finetune.trainer.stopping import requested

    wait = float(os.environ.get(PEER_LOST_WAIT_ENV) or PEER_LOST_WAIT_SECONDS)
    log.error("rank %d lost a peer (%s); waiting up to %.0f s for the gang to be restarted", rank, message, wait)
    deadline = time.monotonic() + max(wait, 0.0)
    while time.monotonic() < deadline and not requested.signum:  # a signal (the restart) ends the wait
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def say(line: str) -> None:
    """The one-line error on stderr, unless a launcher collects outcomes: it prints the line itself, last."""
    if not os.environ.get(OUTCOME_DIR_ENV):
        sys.stderr.write(line + "\n")


def trainer_result(output: Path, metrics: ExportMetrics) -> TrainerResult:
    return TrainerResult(
        model_path=str(output),
        metrics=metrics.test_numbers(),
        headline_metric=metrics.headline_metric,
        world_size=metrics.training.world_size,
        steps=metrics.training.steps,
        resumed_from_step=metrics.training.resumed_from_step,
    )


def run(job_file: str, output: Path, search_job: str | None = None) -> int:
    """Train; report how it ended, as an exit code and as this rank's outcome."""
    from finetune.trainer.stopping import Stopped, requested

    rank = global_rank()
    try:
        metrics = train(load_job(job_file), output, load_job(search_job) if search_job else None)
    except Stopped as stop:
        if not requested.signum:
            # Only a rank on another node was signalled (its pod is being deleted or preempted): like a
            # lost peer, wait, so that pod's disruption decides the gang's restart, not this pod's exit.
            leave_outcome(RankOutcome(rank=rank, exit_code=EXIT_PEER_LOST, message=f"a peer rank was {stop}"))
            wait_for_the_cause(rank, f"a peer rank was {stop}")
            return 128 + requested.signum if requested.signum else EXIT_PEER_LOST
        say(f"finetune train: {stop}")
        leave_outcome(RankOutcome(rank=rank, exit_code=stop.exit_code, message=str(stop)))
        return stop.exit_code
    except SpecError as err:
        say(f"finetune train: error: {err}")
        leave_outcome(RankOutcome(rank=rank, exit_code=EXIT_PERMANENT, permanent=True, message=one_line(str(err))))
        return EXIT_PERMANENT
    except TransientError as err:
        say(f"finetune train: error (retryable): {err}")
        leave_outcome(RankOutcome(rank=rank, exit_code=EXIT_TRANSIENT, message=one_line(str(err))))
        return EXIT_TRANSIENT
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        message = one_line(f"{type(err).__name__}: {err}")
        if lost_peer(err):
            leave_outcome(RankOutcome(rank=rank, exit_code=EXIT_PEER_LOST, message=f"lost a peer rank: {message}"))
            wait_for_the_cause(rank, message)
            return EXIT_PEER_LOST
        leave_outcome(RankOutcome(rank=rank, exit_code=1, message=message))
        raise  # the traceback stays in the log
    result = trainer_result(output, metrics) if metrics else None
    done = f"trained; exported to {output}" if result else "trial trained; see trial.json" if search_job else "done"
    leave_outcome(RankOutcome(rank=rank, exit_code=0, message=done, result=result))
    if metrics:
        log.info("test metrics: %s", json.dumps(metrics.test_numbers()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="finetune trainer (one process of a training run)")
    parser.add_argument("--job", required=True, help="FineTuneJob YAML")
    parser.add_argument("--output", required=True, help="output directory (checkpoints and export)")
    parser.add_argument("--search-job", help="a search trial: the search's job (train and validate only)")
    args = parser.parse_args(argv)
    from finetune.trainer.stopping import requested

    requested.install()  # first: a SIGTERM while the libraries load is a stop too, not a crash
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    return run(args.job, Path(args.output), args.search_job)


if __name__ == "__main__":
    sys.exit(main())
