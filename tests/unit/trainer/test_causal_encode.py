"""Causal-LM tokenization: the loss lands exactly on completion tokens, never on prompts or padding."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from finetune.spec import SpecError
from finetune.trainer.causal import IGNORE_INDEX, encode_causal, generation_examples
from finetune.trainer.packing import PaddedCausalCollator


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_prompt_is_masked_and_completion_plus_eos_is_learned(tok: Any) -> None:
    df = pd.DataFrame({"prompt": ["copy abc=", "copy fedcba="], "completion": ["abc", "fedcba"]})
    feats, report = encode_causal(df, tok, max_length=64)
    assert report.as_dict() == {"total": 2, "prompt_truncated": 0, "dropped": 0, "too_long": 0, "nothing_to_learn": 0,
                                "split": 0}
    for f, (p, c) in zip(feats, zip(df["prompt"], df["completion"], strict=True), strict=True):
        prompt = [tok.bos_token_id, *ids(tok, p)]
        completion = [*ids(tok, c), tok.eos_token_id]
        assert f["input_ids"] == prompt + completion
        assert f["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert tok.decode([t for t in feats[1]["labels"] if t != IGNORE_INDEX]) == "fedcba<|end|>"


def test_too_long_example_loses_the_left_of_its_prompt_and_keeps_bos(tok: Any) -> None:
    df = pd.DataFrame({"prompt": ["copy abcdefabcdef=", "x="], "completion": ["abcdef", "abcdefabcdefabcdef"]})
    feats, report = encode_causal(df, tok, max_length=12)
    assert report.total == 2 and report.prompt_truncated == 1 and report.dropped == 1
    (f,) = feats
    assert len(f["input_ids"]) == 12
    learned = [*ids(tok, "abcdef"), tok.eos_token_id]
    assert f["labels"][-7:] == learned and f["labels"][:5] == [IGNORE_INDEX] * 5
    # BOS, then the END of the prompt: what the completion depends on most survives.
    assert f["input_ids"][0] == tok.bos_token_id
    assert tok.decode(f["input_ids"][1:5]) == "def="


def test_padding_gets_no_loss_and_no_attention(tok: Any) -> None:
    df = pd.DataFrame({"prompt": ["copy a=", "copy abcdef="], "completion": ["a", "abcdef"]})
    feats, _ = encode_causal(df, tok, max_length=64)
    batch = PaddedCausalCollator(pad_token_id=tok.pad_token_id)(feats)
    assert batch["input_ids"].shape[1] % 8 == 0
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["labels"][row, :n].tolist() == f["labels"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["input_ids"][0] == tok.pad_token_id).sum() > 0  # the short row really was padded


def test_chat_messages_learn_only_assistant_turns(tok: Any) -> None:
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "copy ab"},
        {"role": "assistant", "content": "ab"},
        {"role": "user", "content": "copy cde"},
        {"role": "assistant", "content": "cde"},
    ]
    feats, report = encode_causal(pd.DataFrame({"messages": [conv]}), tok, max_length=128)
    (f,) = feats
    assert tok.decode(f["input_ids"]) == tok.apply_chat_template(conv, tokenize=False)
    learned = [t for t in f["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned) == "ab<|end|>cde<|end|>"
    # Every label that is not masked equals its input token (no shift at this stage).
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(f["labels"], f["input_ids"], strict=True))
    assert report.dropped == 0
    # The same turns as JSON text (a csv cell) encode the same way.
    again, _ = encode_causal(pd.DataFrame({"messages": [json.dumps(conv)]}), tok, max_length=128)
    assert again == feats


def test_chat_template_without_eos_gets_one_appended(tok: Any) -> None:
    plain = copy.deepcopy(tok)
    plain.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    conv = [{"role": "user", "content": "copy ab"}, {"role": "assistant", "content": "ab"}]
    (f,), _ = encode_causal(pd.DataFrame({"messages": [conv]}), plain, max_length=64)
    assert f["input_ids"][-1] == f["labels"][-1] == tok.eos_token_id
    assert tok.decode([t for t in f["labels"] if t != IGNORE_INDEX]) == "ab\n<|end|>"


def test_text_column_learns_every_token_and_splits_long_texts(tok: Any) -> None:
    feats, report = encode_causal(pd.DataFrame({"text": ["abc", "abcdef" * 5]}), tok, max_length=16)
    assert feats[0]["labels"] == feats[0]["input_ids"] == [tok.bos_token_id, *ids(tok, "abc"), tok.eos_token_id]
    assert report.split == 1 and len(feats) == 1 + 2  # 1 + 30 + 1 tokens -> pieces of 16 and 16
    assert all(len(f["input_ids"]) <= 16 for f in feats)


def test_bad_columns_give_a_clear_error(tok: Any) -> None:
    with pytest.raises(SpecError, match=r"prompt\+completion.*messages.*text.*found \['answer', 'question'\]"):
        encode_causal(pd.DataFrame({"question": ["q"], "answer": ["a"]}), tok, max_length=32)
    with pytest.raises(SpecError, match="role.*content"):
        encode_causal(pd.DataFrame({"messages": [[{"speaker": "user", "text": "hi"}]]}), tok, max_length=32)


def test_generation_prompts_match_training_prompts(tok: Any) -> None:
    df = pd.DataFrame({"prompt": ["copy abc="], "completion": ["abc"]})
    feats, _ = encode_causal(df, tok, max_length=64)
    (ex,) = generation_examples(df, tok, max_prompt_tokens=64)
    n_prompt = sum(1 for t in feats[0]["labels"] if t == IGNORE_INDEX)
    assert ex.prompt_ids == feats[0]["input_ids"][:n_prompt]
    assert ex.reference == "abc"
    conv = [{"role": "user", "content": "copy ab"}, {"role": "assistant", "content": "ab"}]
    (chat,) = generation_examples(pd.DataFrame({"messages": [conv]}), tok, max_prompt_tokens=64)
    assert chat.prompt.endswith("<|assistant|>") and chat.reference == "ab"


def test_tokenizer_round_trips_through_save_pretrained(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("copy abc=")["input_ids"] == tok("copy abc=")["input_ids"]
    assert again.chat_template == tok.chat_template
