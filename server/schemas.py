"""Request bodies. Strict types: a number where a text belongs is a 422, not silently a string.

Every text must be valid Unicode: JSON may carry a lone UTF-16 surrogate (`"\\ud800"`), which no
tokenizer and no UTF-8 file can take, so it is refused where it arrives, naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    model_validator,
)

# torch.manual_seed takes 64 bits; OpenAI documents an integer. Negative seeds would alias positive ones.
MAX_SEED = 2**63 - 1
# Temperatures this close to 0 divide logits into infinities; they mean greedy decoding (as in vLLM).
GREEDY_BELOW = 1e-5


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"holds a lone UTF-16 surrogate at character {err.start}; send valid Unicode text"
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
TokenId = Annotated[StrictInt, Field(ge=0)]


def _strict_json(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as err:  # NaN/Infinity, or (UnicodeEncodeError is a ValueError) a lone surrogate
        reason = "a lone UTF-16 surrogate" if isinstance(err, UnicodeEncodeError) else "NaN or Infinity"
        raise ValueError(f"must be plain JSON; it holds {reason}") from None
    return value


class TextInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text


def _instance_kind(value: Any) -> str:
    return "<object>" if isinstance(value, dict | TextInstance) else "<string>"


# Tagged unions validate one member only, so an error names one problem, not one per member. Tags in
# <angle brackets> are dropped from error locations (errors.py).
Instance = Annotated[
    Annotated[Text, Tag("<string>")] | Annotated[TextInstance, Tag("<object>")], Discriminator(_instance_kind)
]


class PredictRequest(BaseModel):
    """KServe v1: `{"instances": ["text", {"text": "..."}]}`."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Instance] = Field(min_length=1)

    def texts(self) -> list[str]:
        return [i if isinstance(i, str) else i.text for i in self.instances]


# OpenAI /v1/completions fields this server does not implement, with the value that means "off": a
# request that sends the neutral value (as SDKs and LangChain do) is served, any other value is a 400.
NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (False, None),
    "best_of": (None, 1),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "stream_options": (None,),
}
# Accepted and recorded nowhere: OpenAI's end-user id for abuse monitoring (documented in docs/server.md).
ACCEPTED_UNUSED = frozenset({"user"})


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "<text>"
    if not isinstance(value, list):
        return None
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "<token ids>"
    if value and all(isinstance(v, list) for v in value):
        return "<token-id lists>"
    return "<texts>"


Prompt = Annotated[
    Annotated[Text, Tag("<text>")] | Annotated[list[Text], Tag("<texts>")]
    | Annotated[list[TokenId], Tag("<token ids>")] | Annotated[list[list[TokenId]], Tag("<token-id lists>")],
    Discriminator(
        _prompt_kind, custom_error_type="prompt_type",
        custom_error_message="a string, a list of strings, a list of token ids or a list of token-id lists",
    ),
]


class CompletionRequest(BaseModel):
    """OpenAI /v1/completions. Unknown fields are kept (`model_extra`) so the route can answer 400 naming
    them: a field that is silently ignored changes what the client thinks it asked for."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    prompt: Prompt
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=16)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_temperature(self) -> float:
        """0 for greedy decoding, including temperatures too small to divide by."""
        value = float(self.temperature)
        return 0.0 if value < GREEDY_BELOW else value

    def unsupported(self) -> list[str]:
        """Fields sent with a value this server would have to ignore, each as 'field: why'."""
        problems = []
        for key, value in (self.model_extra or {}).items():
            if key in ACCEPTED_UNUSED:
                continue
            if key in NEUTRAL_FIELDS:
                if not any(value == neutral and type(value) is type(neutral) for neutral in NEUTRAL_FIELDS[key]):
                    neutral = " or ".join(json.dumps(v) for v in NEUTRAL_FIELDS[key])
                    problems.append(f"{key}: not supported by this server (send {neutral}, or leave it out)")
            else:
                problems.append(f"{key}: not a field of /v1/completions on this server")
        return problems

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if any(isinstance(p, list) and not p for p in prompts):
            raise ValueError("prompt: a token-id prompt must not be empty")
        if len(self.stops()) > 4:
            raise ValueError("stop takes at most 4 sequences")
        if not math.isfinite(float(self.temperature)) or not math.isfinite(float(self.top_p)):
            raise ValueError("temperature and top_p must be finite numbers")
        return self


class FeedbackRequest(BaseModel):
    """What a user says the right answer was: a `label` (classification) or a `completion` (causal LM)."""

    model_config = ConfigDict(extra="forbid")

    id: Text | None = Field(None, min_length=1, max_length=200)
    input: Text
    label: Text | None = None
    completion: Text | None = None
    prediction: Annotated[Any, AfterValidator(_strict_json)] = None

    @model_validator(mode="after")
    def _one_answer(self) -> FeedbackRequest:
        if (self.label is None) == (self.completion is None):
            raise ValueError("give exactly one of 'label' (classification) or 'completion' (causal LM)")
        return self
