"""Causal-LM SFT from spec to export: completion-only loss, packed batches, optional LoRA, generation eval."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from finetune.contracts import ExportMetrics
from finetune.spec import FineTuneJob, lower_is_better
from finetune.trainer import checkpoint as ckpt
from finetune.trainer.batching import eval_batches
from finetune.trainer.causal import (
    Feature,
    encode_causal,
    feature_lengths,
    generation_examples,
    load_causal_model,
    prepare_tokenizer,
)
from finetune.trainer.data import DataError, prepare_data
from finetune.trainer.export import baseline_stats, finish_export, save_pretrained_atomic
from finetune.trainer.generation import generate_and_score, loss_sum, perplexity, write_samples
from finetune.trainer.loop import LoopTask, TrainLoop
from finetune.trainer.lora import apply_lora, export_lora
from finetune.trainer.models import load_tokenizer
from finetune.trainer.optim import build_optimizer, build_scheduler, plan_steps
from finetune.trainer.packing import make_collator
from finetune.trainer.pipeline import (
    finish_trial,
    load_weights,
    metrics_document,
    resume_or_start,
    save_weights,
    trial_file,
)
from finetune.trainer.report import Reporter

log = logging.getLogger(__name__)
EVAL_BATCH = 16


def token_loss(accelerator: Any, model: Any, features: list[Feature], collate: Any) -> dict[str, float]:
    """Token-weighted loss and perplexity over all processes' shares of `features`."""
    import torch
    from accelerate.utils import gather_object

    net = accelerator.unwrap_model(model)  # plain module: ranks may run different batch counts
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    lengths = feature_lengths(features)
    with torch.inference_mode():
        for idx in eval_batches(lengths, EVAL_BATCH, accelerator.process_index, accelerator.num_processes):
            batch = {k: v.to(accelerator.device) for k, v in collate([features[i] for i in idx]).items()}
            with accelerator.autocast():
                s, n = loss_sum(net, batch)
            total, count = total + s, count + n
    net.train(was_training)
    parts = gather_object([(total, count)]) if accelerator.num_processes > 1 else [(total, count)]
    loss = sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)
    return {"loss": loss, "perplexity": perplexity(loss)}


def train_causal_lm(job: FineTuneJob, output: Path, accelerator: Any, trial: Any = None) -> ExportMetrics | None:
    """Fine-tune, evaluate and export a causal LM; returns metrics.json on the main process, else None."""
    spec, cfg = job.spec, job.spec.training
    started = time.time()
    data = prepare_data(spec)
    tokenizer = prepare_tokenizer(load_tokenizer(spec.model))
    train_f, report = encode_causal(data.train, tokenizer, cfg.max_length)
    val_f, val_report = encode_causal(data.validation, tokenizer, cfg.max_length)
    test_f, _ = encode_causal(data.test, tokenizer, cfg.max_length)
    for split, features, split_report in (("training", train_f, report), ("validation", val_f, val_report)):
        if not features:
            raise DataError(split_report.why_none_left(split, cfg.max_length))
    lora = cfg.method == "lora"
    model = load_causal_model(spec.model)
    if lora:
        model = apply_lora(model, cfg.lora)
    collate = make_collator(model, tokenizer, cfg.packing, cfg.max_length)
    lengths = feature_lengths(train_f)
    total = plan_steps(cfg, lengths, accelerator)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    best_dir = ckpt.checkpoint_root(output) / "best"
    metric = spec.headline_metric
    task = LoopTask(
        lengths=lengths,
        make_batch=lambda idx: collate([train_f[i] for i in idx]),
        validate=lambda m: token_loss(accelerator, m, val_f, collate),
        metric=metric,
        higher_is_better=not lower_is_better(metric),
        save_best=lambda m: save_weights(m, best_dir, trainable_only=lora),
    )
    reporter = Reporter(job.metadata.name, accelerator.is_main_process, cfg.log_steps, trial_file(output, trial))
    loop = TrainLoop(accelerator, model, optimizer, scheduler, task, cfg, output, reporter, trial)
    state = loop.run(resume_or_start(accelerator, output))
    reporter.close()
    if trial is not None:
        finish_trial(accelerator, output, state, loop.total, metric)
        return None

    net = accelerator.unwrap_model(model)
    if (best_dir / "model.safetensors").exists():
        load_weights(net, best_dir, trainable_only=lora)
    test = token_loss(accelerator, net, test_f, collate) if test_f else {}
    metrics = None
    if accelerator.is_main_process:
        examples = generation_examples(data.test, tokenizer, cfg.max_length, spec.evaluation.max_test_samples)
        if examples:  # plain text has no completions to compare generations with
            scores, samples = generate_and_score(net, tokenizer, examples, spec.evaluation.max_new_tokens)
            write_samples(output / "samples.jsonl", samples)
            test.update(scores)
        test["support"] = len(test_f)
        test["generation_support"] = len(examples)
        version = save_pretrained_atomic(
            net, tokenizer, output,
            write=(lambda tmp: export_lora(net, tokenizer, tmp, spec.export.merge_adapters)) if lora else None,
        )
        data_report = {**data.report, "tokenization": report.as_dict()}
        metrics = metrics_document(job, version, test, data_report, state, accelerator, tokenizer)
        metrics.training.wall_time_seconds = round(time.time() - started, 2)
        prompt_lengths = [len(e.prompt_ids) for e in generation_examples(data.train, tokenizer, cfg.max_length)]
        finish_export(output, metrics, baseline_stats(spec.task, prompt_lengths or lengths, None))
        reporter.finished()
    accelerator.wait_for_everyone()
    return metrics
