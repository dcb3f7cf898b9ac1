"""The trainer entry point: what a trainer pod runs, and what `finetune train` runs locally.

    # one process
    python -m finetune.trainer.entry --job job.yaml --output out/
    # in a pod (the operator writes this command): machine rank from the Indexed Job
    accelerate launch --num_machines 2 --machine_rank $JOB_COMPLETION_INDEX \
        --main_process_ip job-0.job --main_process_port 29500 --num_processes 16 --multi_gpu \
        -m finetune.trainer.entry --job /etc/finetune/job.yaml --output /workspace/job/run-1

Exit codes: 0 done; 2 bad spec or data (retrying cannot help); anything else is retryable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from finetune.hardware import cpu_has_bf16
from finetune.spec import FineTuneJob, SpecError, Training, load_job

log = logging.getLogger("finetune.trainer")
EXIT_BAD_INPUT = 2


def mixed_precision(cfg: Training) -> str:
    import torch

    if cfg.precision == "fp32":
        return "no"
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPUs with native bf16 instructions (AVX512-BF16, AMX) run bf16 autocast several times faster
    # than fp32; the weights and optimizer state stay fp32.
    return "bf16" if cpu_has_bf16() else "no"



def make_accelerator(cfg: Training) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Adam's moment estimates for rarely-seen embedding rows decay into denormal floats, which
    # are many times slower on CPUs; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        # N processes on one machine share its cores instead of each oversubscribing all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    # cpu=True is what makes Accelerate form a gloo world from WORLD_SIZE/RANK when there is no GPU;
    # without it every CPU process silently trains alone (world size 1).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision(cfg),
        step_scheduler_with_optimizer=False,  # the step plan is already per process
    )
    set_seed(cfg.seed, device_specific=False)
    return accelerator


def train(job: FineTuneJob, output: Path) -> dict[str, Any]:
    """Run the whole training job in this process (one rank of however many)."""
    accelerator = make_accelerator(job.spec.training)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        log.info("training %s: task %s, world size %d, device %s, precision %s", job.metadata.name,
                 job.spec.task, accelerator.num_processes, accelerator.device, accelerator.mixed_precision)
    accelerator.wait_for_everyone()
    if job.spec.task == "text-classification":
        from finetune.trainer.pipeline import train_classifier

        return train_classifier(job, output, accelerator)
    from finetune.trainer.causal_pipeline import train_causal_lm

    return train_causal_lm(job, output, accelerator)


def quiet_libraries() -> None:
    """Our own log says what happened; the libraries' per-checkpoint and load-report chatter hides it."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="finetune trainer (one process of a training run)")
    parser.add_argument("--job", required=True, help="FineTuneJob YAML")
    parser.add_argument("--output", required=True, help="output directory (checkpoints and export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        metrics = train(load_job(args.job), Path(args.output))
    except SpecError as err:
        sys.stderr.write(f"finetune train: error: {err}\n")
        return EXIT_BAD_INPUT
    if metrics:
        summary = {k: v for k, v in metrics.get("test", {}).items() if isinstance(v, int | float)}
        log.info("test metrics: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
