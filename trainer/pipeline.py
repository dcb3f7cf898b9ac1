"""Classification fine-tuning from spec to export: data -> tokens -> training -> test -> export."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.contracts import TRIAL_FILE, ExportMetrics, TrainingSummary, tokenizer_fingerprint
from finetune.spec import FineTuneJob, lower_is_better
from finetune.trainer import checkpoint as ckpt
from finetune.trainer.balance import balance_report, group_balanced_rows, row_weights
from finetune.trainer.batching import eval_batches
from finetune.trainer.classification import (
    classification_metrics,
    collate,
    encode_texts,
    group_metrics,
    scores_from_logits,
)
from finetune.trainer.data import prepare_data
from finetune.trainer.export import baseline_stats, finish_export, save_pretrained_atomic, write_jsonl
from finetune.trainer.identity import TRAINING_HASH_ENV
from finetune.trainer.loop import LOSS_WEIGHTS, LoopTask, TrainLoop
from finetune.trainer.models import load_classifier, load_tokenizer
from finetune.trainer.optim import build_optimizer, build_scheduler, plan_steps
from finetune.trainer.report import Reporter, write_trial_progress

log = logging.getLogger(__name__)
EVAL_BATCH = 64


def predict_scores(accelerator: Any, model: Any, ids: list[list[int]], pad_id: int) -> np.ndarray:
    """Class probabilities for every example, computed in shards across processes, in input order."""
    from accelerate.utils import gather_object

    net = accelerator.unwrap_model(model)  # plain module: ranks may run different batch counts
    was_training = net.training
    net.eval()
    rows: list[tuple[int, list[float]]] = []
    lengths = [len(x) for x in ids]
    with torch.inference_mode():
        for batch_idx in eval_batches(lengths, EVAL_BATCH, accelerator.process_index, accelerator.num_processes):
            batch = collate([ids[i] for i in batch_idx], pad_id)
            with accelerator.autocast():
                logits = net(**{k: v.to(accelerator.device) for k, v in batch.items()}).logits
            rows.extend(zip(batch_idx, scores_from_logits(logits).tolist(), strict=True))
    net.train(was_training)
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    ordered = sorted(rows, key=lambda r: r[0])
    return np.asarray([r[1] for r in ordered], dtype=np.float32).reshape(len(ids), -1)


def train_classifier(job: FineTuneJob, output: Path, accelerator: Any, trial: Any = None) -> ExportMetrics | None:
    """Fine-tune, evaluate and export; returns metrics.json on the main process, None on the others.
    A search trial (`trial`: its TrialPruner) ends after training (`finish_trial`)."""
    spec, cfg = job.spec, job.spec.training
    started = time.time()
    data = prepare_data(spec)
    assert data.label_names is not None
    names = [spec.dataset.label_names.get(n, n) for n in data.label_names]
    data.label_names = names
    tokenizer = load_tokenizer(spec.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_ids = encode_texts(data.train["text"].tolist(), tokenizer, cfg.max_length)
    val_ids = encode_texts(data.validation["text"].tolist(), tokenizer, cfg.max_length)
    test_ids = encode_texts(data.test["text"].tolist(), tokenizer, cfg.max_length)
    train_labels = data.train["label"].tolist()
    val_labels = data.validation["label"].tolist()
    grouped = bool(spec.evaluation.group_column)
    train_groups: list[str] | None = data.train["group"].tolist() if grouped else None
    val_groups: list[str] | None = data.validation["group"].tolist() if grouped else None
    weights = row_weights(train_labels, train_groups, cfg)
    data.report["balance"] = balance_report(train_labels, train_groups, cfg, names)

    model = load_classifier(spec.model, names)
    lengths = [len(x) for x in train_ids]
    total = plan_steps(cfg, lengths, accelerator)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    best_dir = ckpt.checkpoint_root(output) / "best"

    def validate(m: Any) -> dict[str, float]:
        scores = predict_scores(accelerator, m, val_ids, pad_id)
        predicted = scores.argmax(-1).tolist()
        full = classification_metrics(val_labels, predicted, names)
        metrics = {k: full[k] for k in ("accuracy", "f1", "precision", "recall")}
        if val_groups is not None:  # what a search constrains (search.maxGroupGap), on the validation split
            metrics["group_gap"] = group_metrics(val_labels, predicted, val_groups, names)[1]["f1"]
        return metrics

    def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([train_ids[i] for i in idx], pad_id, [train_labels[i] for i in idx])
        if weights is not None:
            batch[LOSS_WEIGHTS] = torch.tensor([weights[i] for i in idx], dtype=torch.float32)
        return batch

    def epoch_rows(epoch: int) -> list[int]:
        assert train_groups is not None
        return group_balanced_rows(train_groups, cfg.seed, epoch)

    task = LoopTask(
        lengths=lengths,
        make_batch=make_batch,
        validate=validate,
        metric=spec.headline_metric,
        higher_is_better=not lower_is_better(spec.headline_metric),
        save_best=lambda m: save_weights(m, best_dir),
        epoch_rows=epoch_rows if cfg.group_balance == "sample" else None,
    )
    reporter = Reporter(job.metadata.name, accelerator.is_main_process, cfg.log_steps, trial_file(output, trial))
    loop = TrainLoop(accelerator, model, optimizer, scheduler, task, cfg, output, reporter, trial)
    state = resume_or_start(accelerator, output)
    state = loop.run(state)
    reporter.close()
    if trial is not None:
        finish_trial(accelerator, output, state, loop.total, spec.headline_metric)
        return None

    net = accelerator.unwrap_model(model)
    if (best_dir / "model.safetensors").exists():
        load_weights(net, best_dir)
    scores = predict_scores(accelerator, net, test_ids, pad_id)
    metrics = None
    if accelerator.is_main_process:
        metrics = export_classifier(job, output, net, tokenizer, data, scores, train_ids, state, accelerator)
        metrics.training.wall_time_seconds = round(time.time() - started, 2)
        finish_export(output, metrics, baseline_stats(spec.task, lengths, [names[i] for i in train_labels]))
        reporter.finished()
    accelerator.wait_for_everyone()
    return metrics


def trial_file(output: Path, trial: object) -> Path | None:
    """trial.json for a search trial (`trial`: its pruner), else nothing."""
    return output / TRIAL_FILE if trial is not None else None


def finish_trial(accelerator: Any, output: Path, state: ckpt.TrainState, total: int, metric: str) -> None:
    """A search trial's end: its end state as a checkpoint (if the last one is older), so the search's final
    run of the winner resumes there and only tests and exports; then trial.json, finished."""
    latest = ckpt.latest_checkpoint(output)
    progress = ckpt.read_progress(latest) if latest is not None else None
    if progress is None or progress.get("global_step") != state.global_step:
        ckpt.save_checkpoint(accelerator, output, state, keep=1)
    if accelerator.is_main_process:
        write_trial_progress(output / TRIAL_FILE, metric, state, total, finished=True)
    accelerator.wait_for_everyone()


def resume_or_start(accelerator: Any, output: Path) -> ckpt.TrainState:
    if accelerator.is_main_process:
        ckpt.remove_partial(output)
    accelerator.wait_for_everyone()
    latest = ckpt.latest_checkpoint(output)
    if latest is None:
        return ckpt.TrainState(training_hash=os.environ.get(TRAINING_HASH_ENV))
    state = ckpt.load_checkpoint(accelerator, latest)
    state.resumed_from_step = state.global_step
    log.info("resumed from checkpoint %s (step %d, epoch %d)", latest.name, state.global_step, state.epoch)
    return state


def save_weights(model: Any, folder: Path, trainable_only: bool = False) -> None:
    """The best model so far, atomically; with LoRA only the adapter weights (the rest never change)."""
    from safetensors.torch import save_file, save_model

    from finetune.trainer.atomic import publish_dir

    tmp = folder.with_name(f".tmp-{folder.name}")
    tmp.mkdir(parents=True, exist_ok=True)
    if trainable_only:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    publish_dir(tmp, folder)


def load_weights(model: Any, folder: Path, trainable_only: bool = False) -> None:
    from safetensors.torch import load_file, load_model

    if trainable_only:
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    else:
        load_model(model, str(folder / "model.safetensors"))


def export_classifier(
    job: FineTuneJob, output: Path, model: Any, tokenizer: Any, data: Any, scores: np.ndarray,
    train_ids: list[list[int]], state: ckpt.TrainState, accelerator: Any,
) -> ExportMetrics:
    spec, names = job.spec, data.label_names
    y_true = data.test["label"].tolist()
    y_pred = scores.argmax(-1).tolist()
    test = classification_metrics(y_true, y_pred, names)
    if test["classes_absent"]:
        log.warning("the test split holds no rows of %s: the macro figures average over the other classes",
                    ", ".join(test["classes_absent"]))
    if spec.evaluation.group_column:
        test["groups"], test["max_group_gap"] = group_metrics(y_true, y_pred, data.test["group"].tolist(), names)
    errors = [
        {"text": t, "label": names[y], "prediction": names[p], "score": float(s[p]),
         "scores": {n: round(float(v), 5) for n, v in zip(names, s, strict=True)}}
        for t, y, p, s in zip(data.test["text"], y_true, y_pred, scores, strict=True) if y != p
    ]
    errors.sort(key=lambda e: -e["score"])  # confident mistakes first: the most informative to review
    write_jsonl(output / "errors.jsonl", errors)
    version = save_pretrained_atomic(model, tokenizer, output)
    return metrics_document(job, version, test, data.report, state, accelerator, tokenizer)


def metrics_document(job: FineTuneJob, version: str, test: dict[str, Any], data_report: dict[str, Any],
                     state: ckpt.TrainState, accelerator: Any, tokenizer: Any) -> ExportMetrics:
    """metrics.json as both tasks write it (the export contract the server and operator read)."""
    best = next((h for h in state.history if h["step"] == state.best_step), {})
    return ExportMetrics(
        task=job.spec.task,
        name=job.metadata.name,
        model_version=version,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        headline_metric=job.spec.headline_metric,
        validation={k: v for k, v in best.items() if k not in ("step", "epoch")},
        test=test,
        data=data_report,
        training=TrainingSummary(
            method=job.spec.training.method,
            world_size=accelerator.num_processes,
            samples_per_second=round(state.samples_seen / max(state.train_seconds, 1e-9), 2),
            tokens_per_second=round(state.tokens_seen / max(state.train_seconds, 1e-9), 1),
            train_seconds=round(state.train_seconds, 2),
            steps=state.global_step,
            best_step=state.best_step,
            resumed_from_step=state.resumed_from_step,
            training_hash=state.training_hash,
            epochs=state.epoch + (1 if state.batch_in_epoch else 0),
            stopped_early=state.stopped_early,
            mixed_precision=accelerator.mixed_precision,
            history=state.history,
        ),
    )
