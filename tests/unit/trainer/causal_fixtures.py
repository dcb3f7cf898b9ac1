"""Tiny causal LMs, a tokenizer trained on the fly and a learnable synthetic task, for the causal tests.

Test modules import this file by path (pytest runs in importlib mode, so sibling modules are not on
sys.path): see `load_fixtures()` at the top of each test_causal_*.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

ALPHABET = "abcdef"
SPECIALS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# Renders each turn as <|role|>content<|end|>; <|end|> is also the EOS, so assistant turns end with it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def copy_task(n: int, seed: int, words: int = 4) -> pd.DataFrame:
    """Rows prompt="copy bad fed ace cab=" / completion="bad fed ace cab" (random 3-letter words).

    A 2-layer model learns it in ~100 steps; several words give BLEU n-grams to count.
    """
    rng = random.Random(seed)
    texts = [" ".join("".join(rng.choice(ALPHABET) for _ in range(3)) for _ in range(words)) for _ in range(n)]
    return pd.DataFrame({"prompt": [f"copy {t}=" for t in texts], "completion": texts})


def train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per character here) with BOS, EOS, pad and a chat template,
    saved with save_pretrained and loaded back the way the trainer loads a real one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(SPECIALS), special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [f"copy {w}={w}" for w in copy_task(200, seed=0)["completion"]]
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir)


def tiny_llama(tokenizer: Any, hidden: int = 64, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(tokenizer: Any, hidden: int = 64, attn: str = "sdpa", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=hidden, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation=attn,
    )
    return GPT2LMHeadModel(cfg)


def tiny_other(family: str, tokenizer: Any, attn: str = "sdpa", seed: int = 0) -> Any:
    """Tiny Qwen2, Mistral or GPT-Neo (the other families the issue names) from their configs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    if family == "gpt_neo":
        cfg = AutoConfig.for_model("gpt_neo", hidden_size=32, num_layers=2, num_heads=2,
                                   attention_types=[[["global", "local"], 1]], window_size=8, **ids)
    else:
        cfg = AutoConfig.for_model(family, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **ids)
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread than on two fighting over a busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
