"""Causal-LM data: tokenization with loss only on what the model should learn to write.

Three shapes of data, by the normalized column names that `finetune.trainer.data` produces:
- `prompt` + `completion`: the prompt is context (labels -100), the completion and an appended EOS are
  learned. A too-long example loses the LEFT end of its prompt, so the completion (the part the loss
  is on) survives; an example whose completion alone does not fit is dropped.
- `messages` ([{role, content}, ...]): rendered with the tokenizer's chat template; only the assistant
  turns are learned. Each assistant turn's tokens are found by rendering the conversation up to that
  turn (with the generation prompt) and up to its end: the difference is the turn, whatever the template.
- `text`: continued pre-training, every token learned; texts longer than max_length are split into
  max_length pieces rather than cut, so no data is lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from finetune.spec import ModelSource, SpecError
from finetune.trainer.models import load_failure, load_kwargs, resolve_source

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers' LM loss) skips
Feature = dict[str, list[int]]


@dataclass
class EncodeReport:
    """What tokenization did to the examples; the trainer logs it and puts it in metrics.json."""

    total: int = 0
    prompt_truncated: int = 0  # prompts (or chat history) cut from the left to fit max_length
    too_long: int = 0  # examples whose completion (last assistant turn) alone does not fit
    nothing_to_learn: int = 0  # chats without an assistant turn, one-token texts
    split: int = 0  # `text` examples cut into several max_length pieces

    @property
    def dropped(self) -> int:
        return self.too_long + self.nothing_to_learn

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "prompt_truncated": self.prompt_truncated, "dropped": self.dropped,
                "too_long": self.too_long, "nothing_to_learn": self.nothing_to_learn, "split": self.split}

    def why_none_left(self, split: str, max_length: int) -> str:
        """Why no example of `split` is left, as an actionable message."""
        if self.too_long >= self.nothing_to_learn:
            return (f"training.maxLength {max_length}: no {split} example fits ({self.too_long} of {self.total} "
                    "have a completion longer than that alone); raise training.maxLength or shorten the data")
        return (f"dataset: no {split} example has anything to learn ({self.nothing_to_learn} of {self.total} "
                "are chats without an assistant turn, or texts of a single token); the loss is only on "
                "assistant turns, so each conversation needs at least one")


@dataclass
class GenerationExample:
    """One test prompt for generation: text for the sample file, ids exactly as in training."""

    prompt: str
    prompt_ids: list[int]
    reference: str


def data_shape(df: pd.DataFrame) -> str:
    """Which of the three data shapes `df` has; a clear SpecError when none."""
    cols = set(df.columns)
    if {"prompt", "completion"} <= cols:
        return "prompt-completion"
    if "messages" in cols:
        return "messages"
    if "text" in cols:
        return "text"
    raise SpecError(
        "causal-lm data needs columns prompt+completion (dataset.promptColumn/completionColumn), "
        "messages (dataset.messagesColumn) or text (dataset.textColumn); "
        f"found {sorted(map(str, cols))}"
    )


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise SpecError("the model's tokenizer has no EOS token; causal-lm fine-tuning needs one")
    return int(tokenizer.eos_token_id)


def _fit(prefix: list[int], target: list[int], max_length: int, keep_first: bool) -> list[int] | None:
    """The prefix cut from the left so prefix + target fits; None if the target leaves no room."""
    room = max_length - len(target)
    if room < 1:
        return None
    if len(prefix) <= room:
        return prefix
    # Keep a leading BOS: models were trained to see it first, and it costs one token.
    if keep_first and room >= 2:
        return prefix[:1] + prefix[len(prefix) - room + 1 :]
    return prefix[len(prefix) - room :]


def _encode_prompt_completion(
    df: pd.DataFrame, tokenizer: Any, max_length: int, report: EncodeReport
) -> list[Feature]:
    out: list[Feature] = []
    bos = tokenizer.bos_token_id
    eos = eos_id(tokenizer)
    for prompt, completion in zip(df["prompt"], df["completion"], strict=True):
        p = _ids(tokenizer, str(prompt), special=True)
        c = [*_ids(tokenizer, str(completion)), eos]
        # Some tokenizers also append EOS to the prompt when adding special tokens; that would teach
        # the model to stop right after every prompt.
        if p and p[-1] == eos and len(p) > 1:
            p = p[:-1]
        fitted = _fit(p, c, max_length, keep_first=bool(p) and p[0] == bos)
        if fitted is None:
            report.too_long += 1
            continue
        report.prompt_truncated += len(fitted) < len(p)
        out.append({"input_ids": fitted + c, "labels": [IGNORE_INDEX] * len(fitted) + c})
    return out


def check_messages(messages: Any, row: int) -> list[dict[str, str]]:
    """The chat turns of one row, or a SpecError that says what is wrong with them."""
    if hasattr(messages, "tolist"):  # parquet / pyarrow give numpy arrays of dicts
        messages = messages.tolist()
    if isinstance(messages, str):  # csv / tsv cells hold the turns as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise SpecError(f"dataset row {row}: messages is text but not JSON: {messages[:80]!r}") from None
    if not isinstance(messages, list) or not messages:
        raise SpecError(f"dataset row {row}: messages must be a non-empty list of {{role, content}}")
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise SpecError(f"dataset row {row}: every message needs 'role' and 'content', got {turn!r}")
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in messages]


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
    """The rendered conversation as token segments, each flagged True when it is an assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise SpecError("dataset.messagesColumn needs a tokenizer with a chat template; this one has none")

    def render(turns: list[dict[str, str]], gen_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen_prompt))

    segments: list[tuple[list[int], bool]] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(messages[:i], gen_prompt=True)
        after = render(messages[: i + 1], gen_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise SpecError("the chat template does not render conversations incrementally; "
                            "use promptColumn/completionColumn instead")
        if before != done:
            segments.append((_ids(tokenizer, before[len(done) :]), False))
        segments.append((_ids(tokenizer, after[len(before) :]), True))
        done = after
    return segments


def _encode_messages(df: pd.DataFrame, tokenizer: Any, max_length: int, report: EncodeReport) -> list[Feature]:
    out: list[Feature] = []
    eos = eos_id(tokenizer)
    for row, raw in enumerate(df["messages"]):
        segments = chat_segments(tokenizer, check_messages(raw, row))
        if not segments:  # no assistant turn: nothing to learn
            report.nothing_to_learn += 1
            continue
        ids: list[int] = []
        labels: list[int] = []
        for seg, learned in segments:
            ids += seg
            labels += seg if learned else [IGNORE_INDEX] * len(seg)
        keep = len(segments[-1][0])  # the last assistant turn must survive truncation whole
        # A template whose turns do not contain EOS would never teach the model to stop (templates
        # that follow EOS with a newline, like ChatML's, already teach it).
        if eos not in segments[-1][0]:
            ids.append(eos)
            labels.append(eos)
            keep += 1
        head = _fit(ids[:-keep], ids[-keep:], max_length, keep_first=False)
        if head is None:
            report.too_long += 1
            continue
        cut = len(ids) - keep - len(head)
        report.prompt_truncated += cut > 0
        ids, labels = ids[cut:], labels[cut:]
        if all(label == IGNORE_INDEX for label in labels):
            report.too_long += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    return out


def _encode_text(df: pd.DataFrame, tokenizer: Any, max_length: int, report: EncodeReport) -> list[Feature]:
    out: list[Feature] = []
    eos = eos_id(tokenizer)
    for text in df["text"]:
        ids = [*_ids(tokenizer, str(text), special=True), eos]
        if len(ids) < 2:  # a lone token has no next token to predict
            report.nothing_to_learn += 1
            continue
        pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        pieces = [p for p in pieces if len(p) >= 2]
        report.split += len(pieces) > 1
        out.extend({"input_ids": p, "labels": list(p)} for p in pieces)
    return out


def encode_causal(df: pd.DataFrame, tokenizer: Any, max_length: int) -> tuple[list[Feature], EncodeReport]:
    """Token ids and labels (-100 where no loss) for every row; see the module docstring for the rules."""
    shape = data_shape(df)
    report = EncodeReport(total=len(df))
    encoders = {"prompt-completion": _encode_prompt_completion, "messages": _encode_messages,
                "text": _encode_text}
    features = encoders[shape](df, tokenizer, max_length, report)
    if report.prompt_truncated or report.dropped or report.split:
        log.warning("tokenization (max_length=%d): %d of %d examples had their prompt cut, %d dropped, "
                    "%d texts split", max_length, report.prompt_truncated, report.total, report.dropped,
                    report.split)
    return features, report


def generation_examples(
    df: pd.DataFrame, tokenizer: Any, max_prompt_tokens: int, limit: int | None = None
) -> list[GenerationExample]:
    """Test prompts tokenized exactly as in training (left-cut to fit), with their reference answers.

    `text` data has no prompt/answer split, so it gives none (it is scored by perplexity only).
    For `messages` the prompt is the conversation before the last assistant turn.
    """
    shape = data_shape(df)
    rows = df if limit is None else df.head(limit)
    out: list[GenerationExample] = []
    if shape == "prompt-completion":
        for prompt, completion in zip(rows["prompt"], rows["completion"], strict=True):
            ids = _ids(tokenizer, str(prompt), special=True)
            if ids and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
                ids = ids[:-1]
            keep = _fit(ids, [], max_prompt_tokens, keep_first=bool(ids) and ids[0] == tokenizer.bos_token_id)
            out.append(GenerationExample(str(prompt), keep or ids[-max_prompt_tokens:], str(completion)))
    elif shape == "messages":
        for row, raw in enumerate(rows["messages"]):
            turns = check_messages(raw, row)
            last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
            if last is None:
                continue
            text = str(tokenizer.apply_chat_template(turns[:last], tokenize=False, add_generation_prompt=True))
            ids = _ids(tokenizer, text)[-max_prompt_tokens:]
            out.append(GenerationExample(text, ids, turns[last]["content"]))
    return out


def feature_lengths(features: Sequence[Feature]) -> list[int]:
    return [len(f["input_ids"]) for f in features]


def load_causal_model(model: ModelSource, *, dtype: Any = None, attn_implementation: str | None = None) -> Any:
    """AutoModelForCausalLM for training; trust_remote_code only when the spec sets it.

    The KV cache is switched off in the config: with a cache, transformers skips the detection of
    packed sequences (restarting position_ids) and every example would attend to the ones before it
    in the packed row. `generate` turns the cache back on per call; export sets it back to True.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(model)
    kwargs = load_kwargs(model)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise load_failure("a causal LM from", source, err) from None
    lm.config.use_cache = False
    return lm


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Pad with EOS when the tokenizer has no pad token (GPT-2, Llama); padding is masked anyway."""
    eos_id(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
