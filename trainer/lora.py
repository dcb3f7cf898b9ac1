"""LoRA (training.method: lora) through peft: adapters on every linear layer of the blocks, export.

Default targets are all the linear projections inside the transformer blocks (attention and MLP),
found by walking the model, so any architecture gets a sensible set without a lookup table: the
QLoRA paper found adapting every linear layer matters more than the rank. The LM head and the
embeddings stay frozen. GPT-2-style `Conv1D` layers store their weight transposed; peft needs
`fan_in_fan_out=True` for them.

Export: the adapter goes to `DIR/adapter/`; with export.mergeAdapters (the default) a merged model,
loadable by `AutoModelForCausalLM.from_pretrained(DIR)` without peft, goes to DIR's top level.
Without merging, DIR's top level holds the adapter itself, which transformers loads on top of the base
model (named in adapter_config.json) when peft is installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from finetune.spec import Lora, SpecError

log = logging.getLogger(__name__)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


def default_target_modules(model: nn.Module) -> list[str]:
    """Names (last path component) of the linear layers inside the blocks, e.g. q_proj ... down_proj."""
    conv1d = _conv1d_type()
    kinds: tuple[type, ...] = (nn.Linear, conv1d) if conv1d else (nn.Linear,)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, kinds) and mod is not head and "." in name}
    if not names:
        raise SpecError(f"{type(model).__name__} has no linear layers LoRA can adapt; "
                        "set training.lora.targetModules")
    return sorted(names)


def uses_conv1d(model: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and any(isinstance(m, conv1d) for m in model.modules())


def apply_lora(model: Any, lora: Lora) -> Any:
    """A PeftModel whose only trainable parameters are the LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules or default_target_modules(model)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, fan_in_fan_out=uses_conv1d(model), bias="none",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft's message for target names that match nothing
        raise SpecError(f"spec.training.lora.targetModules {targets}: {err}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA on %s: %d trainable of %d parameters (%.2f%%)", targets, trainable, total,
             100 * trainable / max(total, 1))
    return peft_model


def export_lora(model: Any, tokenizer: Any, out_dir: str | Path, merge: bool) -> Any:
    """Write the adapter (and the merged model when `merge`); returns the model to evaluate from now on.

    Merging folds the adapters into the base weights in place (no second copy of the model in memory),
    so after a merge the returned plain model replaces `model`; its outputs are the same.
    """
    out = Path(out_dir)
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if not merge:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return model
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training switched the cache off; generation wants it back
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return merged
