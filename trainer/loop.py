"""The training loop: one code path for 1 process, N CPU processes and N nodes x M GPUs.

Accelerate wraps the model for DDP and handles mixed precision; batching, gradient accumulation,
validation, early stopping and checkpoints are explicit here so the loop reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.spec import Training
from finetune.trainer.balance import weighted_cross_entropy
from finetune.trainer.batching import epoch_batches, sampled_epoch_batches
from finetune.trainer.checkpoint import TrainState, save_checkpoint
from finetune.trainer.stopping import Stopped, requested

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# A batch key the model never sees: each row's loss weight (bias mitigation, see balance.py).
LOSS_WEIGHTS = "loss_weights"


@dataclass
class LoopTask:
    """What the loop needs from a task (classification, causal LM)."""

    lengths: list[int]  # tokens per training example, for length grouping
    make_batch: Callable[[list[int]], Batch]  # example indices -> model inputs with labels
    validate: Callable[[Any], dict[str, float]]  # model -> validation metrics
    metric: str  # the validation metric that picks the best model and drives early stopping
    higher_is_better: bool
    save_best: Callable[[Any], None]  # unwrapped model -> persisted as the best so far
    # epoch -> the rows it trains on, when they are drawn (group-balanced sampling) rather than all of them
    epoch_rows: Callable[[int], list[int]] | None = None


def steps_per_epoch(n_batches: int, accumulation: int) -> int:
    return max(1, math.ceil(n_batches / accumulation))


def total_steps(cfg: Training, per_epoch: int) -> int:
    planned = max(1, int(per_epoch * cfg.epochs))
    return min(planned, cfg.max_steps) if cfg.max_steps else planned


def improved(value: float, best: float | None, higher: bool, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if higher else value < best - min_delta


class TrainLoop:
    def __init__(
        self,
        accelerator: Any,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        task: LoopTask,
        cfg: Training,
        output: Path,
        reporter: Any,
        prune: Callable[[list[dict[str, Any]]], bool] | None = None,
    ) -> None:
        self.acc, self.model, self.opt, self.sched = accelerator, model, optimizer, scheduler
        self.prune = prune  # a search trial's pruner (finetune.trainer.trial): True stops the run
        self.task, self.cfg, self.output, self.reporter = task, cfg, output, reporter
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        n_batches = len(self._batches(0))
        self.per_epoch = steps_per_epoch(n_batches, cfg.gradient_accumulation_steps)
        self.total = total_steps(cfg, self.per_epoch)
        self.eval_every = cfg.eval_steps or self.per_epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        if self.task.epoch_rows is not None:
            return sampled_epoch_batches(self.task.epoch_rows(epoch), self.task.lengths, self.cfg.batch_size,
                                         self.cfg.seed, epoch, self.rank, self.world)
        return epoch_batches(self.task.lengths, self.cfg.batch_size, self.cfg.seed, epoch, self.rank, self.world)

    def run(self, state: TrainState) -> TrainState:
        """Train from `state` (fresh or resumed) until the planned steps or early stopping."""
        self.model.train()
        self._stop_if_asked(state, saved=True)
        while state.global_step < self.total and not state.stopped_early:
            batches = self._batches(state.epoch)
            self._run_epoch(state, batches)
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0
        return state

    def _run_epoch(self, state: TrainState, batches: list[list[int]]) -> None:
        accum = self.cfg.gradient_accumulation_steps
        while state.batch_in_epoch < len(batches) and state.global_step < self.total:
            group = batches[state.batch_in_epoch : state.batch_in_epoch + accum]
            started = time.perf_counter()
            loss, samples, tokens = self._optimizer_step(group)
            state.train_seconds += time.perf_counter() - started
            state.batch_in_epoch += len(group)
            state.global_step += 1
            state.samples_seen += samples * self.world
            state.tokens_seen += tokens * self.world
            self.reporter.on_step(state, self.total, loss, self.sched.get_last_lr()[0], self.per_epoch)
            if state.global_step % self.eval_every == 0 or state.global_step == self.total:
                self._validate(state)
            saved = state.global_step % self.cfg.checkpoint_steps == 0 and state.global_step < self.total
            if saved:
                save_checkpoint(self.acc, self.output, state, self.cfg.checkpoints_kept)
            if state.stopped_early:
                return
            if state.global_step < self.total:
                self._stop_if_asked(state, saved)

    def _stop_if_asked(self, state: TrainState, saved: bool) -> None:
        """At a step boundary: when any rank got SIGTERM or SIGINT, all save a checkpoint and stop."""
        signum = requested.agreed(self.acc)
        if not signum:
            return
        if not saved and state.global_step:
            save_checkpoint(self.acc, self.output, state, self.cfg.checkpoints_kept)
        raise Stopped(state.global_step, self.total, signum)

    def _optimizer_step(self, group: list[list[int]]) -> tuple[float, int, int]:
        """Forward and backward over the micro-batches of one step, then one optimizer step."""
        total_loss, samples, tokens = 0.0, 0, 0
        for i, indices in enumerate(group):
            batch = {k: v.to(self.acc.device) for k, v in self.task.make_batch(indices).items()}
            last = i == len(group) - 1
            # Skip the gradient all-reduce on all but the last micro-batch of the step.
            ctx = self.acc.no_sync(self.model) if not last and self.world > 1 else nullcontext()
            weights = batch.pop(LOSS_WEIGHTS, None)
            with ctx, self.acc.autocast():
                if weights is None:
                    loss = self.model(**batch).loss / len(group)
                else:
                    labels = batch.pop("labels")  # so the model does not compute an unweighted loss too
                    loss = weighted_cross_entropy(self.model(**batch).logits, labels, weights) / len(group)
            self.acc.backward(loss)
            total_loss += float(loss.detach())
            samples += len(indices)
            tokens += sum(self.task.lengths[i] for i in indices)  # real tokens, not padding
        if self.cfg.max_grad_norm:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total_loss, samples, tokens

    def _validate(self, state: TrainState) -> None:
        self.model.eval()
        metrics = self.task.validate(self.model)
        self.model.train()
        value = metrics[self.task.metric]
        state.history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
        es = self.cfg.early_stopping
        if improved(value, state.best_metric, self.task.higher_is_better, es.min_delta if es else 0.0):
            state.best_metric, state.best_step = value, state.global_step
            state.evals_without_improvement = 0
            if self.acc.is_main_process:
                self.task.save_best(self.acc.unwrap_model(self.model))
            self.acc.wait_for_everyone()
        else:
            state.evals_without_improvement += 1
            if es and state.evals_without_improvement >= es.patience:
                log.info("early stopping at step %d: %s did not improve for %d evaluations",
                         state.global_step, self.task.metric, es.patience)
                state.stopped_early = True
        if self.prune is not None and not state.stopped_early and state.global_step < self.total \
                and self.prune(state.history):
            state.stopped_early, state.pruned_at = True, len(state.history)
        self.reporter.on_eval(state, metrics, self.task.metric)
