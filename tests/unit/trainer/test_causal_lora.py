"""LoRA: only adapters train; the merged export loads without peft and answers like base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.spec import Lora, ModelSource, SpecError
from finetune.trainer.causal import encode_causal, load_causal_model
from finetune.trainer.lora import apply_lora, default_target_modules, export_lora
from finetune.trainer.packing import PackedCollator, make_collator
from tests.unit.trainer.causal_fixtures import copy_task, save_model, tiny_gpt2, tiny_llama

# peft calls a transformers property that 5.x deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_default_targets_are_the_block_linears(tok: Any) -> None:
    assert default_target_modules(tiny_llama(tok)) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert default_target_modules(tiny_gpt2(tok)) == ["c_attn", "c_fc", "c_proj"]


def train_steps(model: Any, tok: Any, steps: int) -> None:
    feats, _ = encode_causal(copy_task(16, seed=1), tok, max_length=32)
    batch = PackedCollator()(feats)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_trains_only_adapters_and_merged_export_matches(tok: Any, tmp_path: Path, family: str) -> None:
    base_dir = save_model((tiny_llama if family == "llama" else tiny_gpt2)(tok), tok, tmp_path / "base")
    model = apply_lora(load_causal_model(ModelSource(path=str(base_dir))), Lora(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert isinstance(make_collator(model, tok, packing=True, max_length=32), PackedCollator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tok, steps=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # base weights untouched, adapters moved
    assert any("lora_B" in n for n in changed)  # lora_B starts at zero: it must have learned something

    probe = torch.tensor([tok("copy abcd=")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    out = tmp_path / "export"
    merged = export_lora(model, tok, out, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, expected, atol=1e-4, rtol=1e-4)

    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    # A fresh interpreter where importing peft fails: the merged model must not need it.
    code = (
        "import sys, json, torch; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"with torch.no_grad(): print(json.dumps(m(input_ids=torch.tensor({probe.tolist()})).logits.tolist()))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout)), expected, atol=1e-4, rtol=1e-4)

    # base + adapter, loaded the peft way, gives the same outputs too.
    from peft import PeftModel

    base = load_causal_model(ModelSource(path=str(base_dir)))
    with torch.no_grad():
        again = PeftModel.from_pretrained(base, out / "adapter").eval()(input_ids=probe).logits
    torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)


def test_unmerged_export_loads_adapter_on_top_of_the_base(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir = save_model(tiny_llama(tok), tok, tmp_path / "base")
    model = apply_lora(load_causal_model(ModelSource(path=str(base_dir))), Lora(r=2, alpha=4))
    train_steps(model, tok, steps=1)
    export_lora(model, tok, tmp_path / "out", merge=False)
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    probe = torch.tensor([tok("copy ab=")["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, model(input_ids=probe).logits,
                                   atol=1e-4, rtol=1e-4)


def test_unknown_target_modules_is_a_spec_error(tok: Any) -> None:
    with pytest.raises(SpecError, match="targetModules"):
        apply_lora(tiny_llama(tok), Lora(target_modules=["no_such_proj"]))
