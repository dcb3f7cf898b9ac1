"""Optimizer, learning-rate schedule and the step plan they share with the loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from finetune.spec import Training
from finetune.trainer.batching import epoch_batches
from finetune.trainer.loop import steps_per_epoch, total_steps

NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")


def plan_steps(cfg: Training, lengths: Sequence[int], accelerator: Any) -> int:
    """Optimizer steps the whole run will take (the schedule needs it before training starts)."""
    batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, accelerator.process_index,
                            accelerator.num_processes)
    return total_steps(cfg, steps_per_epoch(len(batches), cfg.gradient_accumulation_steps))


def build_optimizer(model: Any, cfg: Training) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights get no weight decay, as in the BERT recipe."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused/foreach kernels help on GPUs; on CPUs foreach is the fast path.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Training, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=int(total * cfg.warmup_ratio), num_training_steps=total
    )
