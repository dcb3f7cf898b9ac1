"""`finetune train -f JOB --output DIR [--processes N]`.

With --processes N > 1 the same entry point runs as N local processes under torch's elastic launcher
(gloo on CPUs, NCCL on GPUs), each a real rank of a world of size N.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune.spec import load_job


def launch_command(job_file: str, output: str, processes: int) -> list[str]:
    entry = ["-m", "finetune.trainer.entry", "--job", job_file, "--output", output]
    if processes <= 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *entry]


def run_training(job_file: str, output: str, processes: int) -> int:
    """Validate the job here (one readable error instead of N), then start the trainer process(es)."""
    load_job(job_file)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(processes, 1)))}
    proc = subprocess.Popen(launch_command(job_file, output, processes), env=env)
    # SIGTERM/SIGINT to this command reach the trainer too, so stopping it never leaves an orphan training.
    forward = {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)


def _train(args: argparse.Namespace) -> int:
    Path(args.output).mkdir(parents=True, exist_ok=True)
    return run_training(args.file, args.output, args.processes)


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune and evaluate a model locally (what a trainer pod runs)")
    p.add_argument("-f", "--file", required=True, help="FineTuneJob YAML (the file kubectl takes)")
    p.add_argument("--output", required=True, help="output directory: checkpoints, exported model, metrics.json")
    p.add_argument("--processes", type=int, default=1, help="local training processes (ranks); default 1")
    p.set_defaults(func=_train)
