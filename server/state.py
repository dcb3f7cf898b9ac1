"""What an app holds at run time (`app.state.server`) and the typed dependencies routes use."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

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


# Dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency on its thread pool,
# a thread hop per dependency per request that cost more than the rest of the routing.
async def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_ready(state: StateDep) -> Ready:
    if not state.ready or state.runner is None or state.batcher is None:
        reason = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        raise ApiError(503, "not_ready", reason, headers={"Retry-After": "5"})
    return Ready(
        state.settings, state.metrics, state.runner, state.batcher, state.drift, state.feedback, state.feedback_error
    )


ReadyDep = Annotated[Ready, Depends(get_ready)]


async def require_token(request: Request, state: StateDep) -> None:
    """Bearer auth for inference and feedback; a no-op when no token is configured."""
    token = state.token.current()
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(
            401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


AuthDep = Depends(require_token)
