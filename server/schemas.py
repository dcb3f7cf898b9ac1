"""Request bodies. Strict types: a number where a text belongs is a 422, not silently a string."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator


class TextInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr


class PredictRequest(BaseModel):
    """KServe v1: `{"instances": ["text", {"text": "..."}]}`."""

    model_config = ConfigDict(extra="forbid")

    instances: list[StrictStr | TextInstance] = Field(min_length=1)

    def texts(self) -> list[str]:
        return [i if isinstance(i, str) else i.text for i in self.instances]


class CompletionRequest(BaseModel):
    """The OpenAI /v1/completions fields this server honours; other OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if not self.prompts():
            raise ValueError("prompt must not be an empty list")
        if len(self.stops()) > 4:
            raise ValueError("stop takes at most 4 sequences")
        return self


class FeedbackRequest(BaseModel):
    """What a user says the right answer was: a `label` (classification) or a `completion` (causal LM)."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(None, min_length=1, max_length=200)
    input: StrictStr
    label: StrictStr | None = None
    completion: StrictStr | None = None
    prediction: Any = None

    @model_validator(mode="after")
    def _one_answer(self) -> FeedbackRequest:
        if (self.label is None) == (self.completion is None):
            raise ValueError("give exactly one of 'label' (classification) or 'completion' (causal LM)")
        return self
