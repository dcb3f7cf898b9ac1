"""`finetune run -f JOB`: the whole flow on this machine — train, evaluate, quality gate, serve.

    finetune run -f job.yaml                   # trains into runs/<name>/, then serves on :8080
    finetune run -f job.yaml --no-serve        # stop after the gate

The quality gate is the operator's own (`finetune.operator.gate`), so a model rejected in the cluster
is rejected here too. Exit codes: 0 served or passed; 2 bad spec or data; 3 rejected by the gate.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from finetune.contracts import ExportMetrics
from finetune.spec import FineTuneJob, load_job

log = logging.getLogger(__name__)
EXIT_REJECTED = 3


def train_and_gate(job_file: str, output: Path, processes: int, force: bool = False,
                   parallel: int = 0) -> tuple[FineTuneJob, int, ExportMetrics | None, Path]:
    """Train (a search: its trials, then the winner's test), then apply spec.promotion; returns the job, an
    exit code, the export's metrics and the export's folder."""
    from finetune.operator.gate import evaluate_gate
    from finetune.trainer.cli import run_training

    job = load_job(job_file)
    if job.spec.search is not None:
        from finetune.search_run import run_search

        code, winner = run_search(job_file, job, output, processes, parallel, force)
        if code != 0 or winner is None:
            return job, code, None, output
        output = winner
    else:
        code = run_training(job_file, str(output), processes, force=force)
        if code != 0:
            return job, code, None, output
    metrics = ExportMetrics.in_folder(output)
    decision = evaluate_gate(job.spec.promotion, metrics.headline_metric, metrics.test_numbers())
    log.info("quality gate: %s", decision.reason)
    if not decision.ok:
        sys.stderr.write(f"finetune run: rejected by the quality gate: {decision.reason}\n")
        return job, EXIT_REJECTED, metrics, output
    return job, 0, metrics, output


def server_settings(job: FineTuneJob, model_dir: Path, host: str, port: int) -> Any:
    """The server as the operator's Deployment runs it (same `serving` mapping), on this machine."""
    from finetune.server.settings import ServerSettings

    return ServerSettings(model_dir=model_dir, host=host, port=port, name=job.metadata.name,
                          **job.spec.serving.server_settings())


def _run(args: argparse.Namespace) -> int:
    job = load_job(args.file)
    output = Path(args.output or Path("runs") / job.metadata.name)
    job, code, metrics, output = train_and_gate(args.file, output, args.processes, args.force, args.parallel)
    if code != 0 or metrics is None:
        return code
    test = metrics.test_numbers()
    sys.stdout.write(f"test metrics: {json.dumps({k: round(v, 4) for k, v in test.items()})}\n")
    if args.no_serve or not job.spec.serving.enabled:
        sys.stdout.write(f"model exported to {output}\n")
        return 0
    from finetune.server.serving import serve

    url = f"http://{args.host}:{args.port}/v1/models/{job.metadata.name}"
    sys.stdout.write(f"serving {output} at {url} (Ctrl-C to stop)\n")
    sys.stdout.flush()
    serve(server_settings(job, output, args.host, args.port))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="train, evaluate, gate and serve a FineTuneJob on this machine")
    p.add_argument("-f", "--file", required=True, help="FineTuneJob YAML")
    p.add_argument("--output", help="output directory (default runs/<job name>)")
    p.add_argument("--processes", type=int, default=1, help="local training processes")
    p.add_argument("--parallel", type=int, default=0,
                   help="a search: trials at once on this machine (default: the spec's search.parallel)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8080, help="port to serve on")
    p.add_argument("--no-serve", action="store_true", help="stop after training and the quality gate")
    p.add_argument("--force", action="store_true",
                   help="train from scratch even when --output holds checkpoints or a finished model")
    p.set_defaults(func=_run)
