"""What an app holds at run time (`app.state.server`), how routes get at it, and the bearer-token check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from finetune.server.batcher import Batcher
from finetune.server.drift import DriftMonitor
from finetune.server.errors import ApiError
from finetune.server.feedback import FeedbackStore
from finetune.server.metrics import ServerMetrics
from finetune.server.model_runner import ModelRunner
from finetune.server.settings import BearerToken, ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    token: BearerToken
    runner: ModelRunner | None = None
    batcher: Batcher | None = None
    drift: DriftMonitor | None = None
    feedback: FeedbackStore | None = None
    feedback_error: str | None = None
    ready: bool = False
    load_error: str | None = None
    freeze_gc: bool = False  # after loading; only where the server owns the process


@dataclass(frozen=True)
class Ready:
    """The parts of a loaded server; routes that need the model depend on this."""

    settings: ServerSettings
    metrics: ServerMetrics
    runner: ModelRunner
    batcher: Batcher
    drift: DriftMonitor | None
    feedback: FeedbackStore | None
    feedback_error: str | None

    def check_name(self, name: str) -> None:
        if name != self.runner.name:
            raise ApiError(404, "model_not_found", f"no model named {name!r}; this server serves {self.runner.name!r}")


# Plain functions, not FastAPI dependencies: resolving dependencies was the largest single cost of a
# request on the event loop (a third of it under load), which serves every request of the server.
def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def ready_parts(request: Request) -> Ready:
    """The loaded server's parts, or 503 while the model loads (or after it failed to)."""
    state = server_state(request)
    if not state.ready or state.runner is None or state.batcher is None:
        reason = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        raise ApiError(503, "not_ready", reason, headers={"Retry-After": "5"})
    return Ready(
        state.settings, state.metrics, state.runner, state.batcher, state.drift, state.feedback, state.feedback_error
    )


def token_accepted(authorization: str, token: str | None) -> bool:
    """Bearer auth: no configured token accepts everything."""
    if token is None:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
