"""The operator's settings: one frozen value built by `finetune operator` (or a test) and handed to
kopf as its memo, so handlers never read globals or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from finetune.operator.objects import DEFAULT_IMAGE


@dataclass(frozen=True)
class OperatorConfig:
    """What `finetune operator` was started with."""

    image: str = DEFAULT_IMAGE
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 8080  # None: no /metrics server
    # kopf tuning; the defaults suit a real cluster, tests shorten them.
    watch_server_timeout: float = 300.0
    worker_idle_timeout: float = 5.0  # how long kopf keeps an idle per-object worker
    consistency_timeout: float = 5.0
    post_events: bool = True
    instance: str = os.environ.get("HOSTNAME", "finetune-operator")  # reportingInstance of our Events
    retry_delay: float = 30.0  # how long to wait before looking again at something not ready yet

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorConfig:
        image = os.environ.get("FINETUNE_IMAGE") or DEFAULT_IMAGE
        return cls(**{"image": image, **overrides})  # type: ignore[arg-type]
