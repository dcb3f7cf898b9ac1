"""Server settings: one typed object built from flags and `FINETUNE_SERVE_*` environment variables.

Flags win over the environment (they are passed as init arguments), so the serving Deployment can set
everything through `env:` and a laptop user through flags. Example:

    FINETUNE_SERVE_MAX_BATCH_SIZE=16 finetune serve --model out/model --port 8080
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)


class ServerSettings(BaseSettings):
    """Everything `finetune serve` can be told; each field is also `FINETUNE_SERVE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="FINETUNE_SERVE_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(description="Directory exported by `finetune train` (model, tokenizer, metrics.json).")
    name: str | None = Field(
        None, description="Served model name in URLs; default: metrics.json 'name', else the directory name."
    )
    host: str = Field("127.0.0.1", description="Address to bind; the Deployment passes 0.0.0.0.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free one (tests).")
    feedback_path: Path | None = Field(
        None, description="JSONL file that POST /v1/feedback appends to; default: <model_dir>/feedback.jsonl."
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most texts in one forward pass.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="Longest a request waits for others to share its forward pass."
    )
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model; beyond it: 503 + Retry-After.")
    max_instances: int = Field(64, ge=1, description="Most instances (or prompts) in one request; beyond it: 413.")
    max_request_tokens: int = Field(
        16_384, ge=16, description="Most tokens one request may make the model process (classification: its texts "
        "after truncation; completions: (prompt + max_tokens) x n per prompt); beyond it: 413.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body; beyond it: 413.")
    request_timeout_s: float = Field(30.0, gt=0, description="A request still unanswered after this gets 504.")
    max_length: int | None = Field(
        None, ge=2, description="Token limit per input; default: the tokenizer's model_max_length."
    )
    on_long_input: Literal["truncate", "reject"] = Field(
        "truncate", description="Input over the token limit: truncate and flag it, or answer 413."
    )
    max_new_tokens: int = Field(512, ge=1, description="Upper bound for a completion's max_tokens.")
    auth_token: SecretStr | None = Field(
        None, description="Bearer token required on inference and feedback routes (e.g. from a Secret)."
    )
    auth_token_file: Path | None = Field(None, description="File holding the bearer token (a mounted Secret).")
    drift_window: int = Field(1000, ge=10, description="Recent inputs the drift gauges compare with the baseline.")
    drift_min_samples: int = Field(30, ge=1, description="Inputs needed before the drift gauges get a value.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; default: the CPUs this process may use.",
    )
    model_workers: int | None = Field(
        None, ge=1, le=64,
        description="Forward passes that may run at once, splitting the torch threads between them; "
        "default: 2 where at least 2 threads are usable, else 1.",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto",
        description="Classification compute type: fp32 (exactly the exported weights' scores), bf16 autocast "
        "(about twice as fast on CPUs with native bf16; scores differ in the second or third decimal), or "
        "auto: bf16 when the trainer tested the model under bf16 autocast (metrics.json "
        "training.mixed_precision) and this CPU runs bf16 natively, so serving reproduces the tested "
        "numbers; fp32 otherwise.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs: auto = the GPU when torch sees one (bf16 where the GPU has "
        "it, unless precision is fp32), else the CPU; cuda fails the load when there is no GPU.",
    )
    max_header_bytes: int = Field(32_768, ge=1024, description="Largest request line + headers; beyond it: 431.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request headers are not complete after this gets 408 and is closed."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not complete this long after its headers: 408, connection closed."
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    max_connections: int = Field(
        1000, ge=2, description="Open connections; beyond it the longest-idle one is closed to make room "
        "(never above the process's file-descriptor limit less a margin).",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 when the queue is full.")

    @field_validator("model_dir", "feedback_path", "auth_token_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    def shutdown_seconds(self) -> float:
        """The longest a SIGTERM'd server takes to stop: uvicorn's wait for in-flight requests, then the
        batch-queue drain. The Deployment's terminationGracePeriodSeconds must be longer."""
        return graceful_shutdown_seconds(self.request_timeout_s) + self.request_timeout_s

    def resolved_feedback_path(self) -> Path:
        return self.feedback_path or self.model_dir / "feedback.jsonl"

    def bearer_token(self) -> str | None:
        """The token that guards inference routes, or None when auth is off. The file wins over the env var."""
        if self.auth_token_file is not None:
            token = self.auth_token_file.read_text(encoding="utf-8").strip()
            if not token:
                raise ValueError(f"auth token file {self.auth_token_file} is empty")
            return token
        if self.auth_token is not None and self.auth_token.get_secret_value().strip():
            return self.auth_token.get_secret_value().strip()
        return None


def graceful_shutdown_seconds(request_timeout_s: float) -> int:
    """How long uvicorn waits for in-flight requests after SIGTERM: the longest a request may take, plus
    time to send its answer."""
    return int(request_timeout_s) + 5


class BearerToken:
    """The current token. From a file it is re-read when the file changes (a rotated, mounted Secret
    reaches the running server without a restart); a file that turns unreadable keeps the last token."""

    def __init__(self, settings: ServerSettings, check_every_s: float = 1.0) -> None:
        self._settings = settings
        self._path = settings.auth_token_file
        self._every = check_every_s
        self._value = settings.bearer_token()  # raises on a missing or empty file: fail at start
        self._stamp = self._mtime()
        self._checked = time.monotonic()

    def _mtime(self) -> float | None:
        try:
            return self._path.stat().st_mtime if self._path is not None else None
        except OSError:
            return None

    def current(self) -> str | None:
        if self._path is not None and time.monotonic() - self._checked >= self._every:
            self._checked = time.monotonic()
            stamp = self._mtime()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._value, self._stamp = self._settings.bearer_token(), stamp
                    logger.info("bearer token reloaded from %s", self._path)
                except (OSError, ValueError) as err:
                    logger.error("cannot reload the bearer token from %s: %s", self._path, err)
        return self._value
