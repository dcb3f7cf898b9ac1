"""Pure readers of what the cluster reports: the trainer Job's state, the rank-0 pod's result, and
whether the server Deployment has rolled out. Dicts in, small typed values out."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune.operator import naming

JSON = dict[str, Any]
TrainerPhase = Literal["queued", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class TrainerState:
    """The trainer Job as the Job controller (and Kueue) report it."""

    phase: TrainerPhase
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class TrainerResult:
    """The summary the trainer's rank 0 writes to its termination message on success."""

    model_path: str
    metrics: dict[str, float] = field(default_factory=dict)
    headline_metric: str | None = None


def _true_condition(obj: JSON, *types: str) -> JSON | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return dict(cond)
    return None


def trainer_state(job: JSON) -> TrainerState:
    """Queued while suspended (Kueue has not admitted it), then running until Complete or Failed."""
    status = job.get("status") or {}
    active, succeeded, failed = (int(status.get(k) or 0) for k in ("active", "succeeded", "failed"))
    counts = {"active": active, "succeeded": succeeded, "failed": failed}
    failure = _true_condition(job, "Failed", "FailureTarget")
    if failure is not None:
        reason, message = str(failure.get("reason", "")), str(failure.get("message", ""))
        return TrainerState("failed", active, succeeded, failed, reason, message)
    completions = int((job.get("spec") or {}).get("completions") or 1)
    if _true_condition(job, "Complete", "SuccessCriteriaMet") or counts["succeeded"] >= completions:
        return TrainerState("succeeded", active, succeeded, failed)
    if (job.get("spec") or {}).get("suspend"):
        return TrainerState("queued", active, succeeded, failed)
    return TrainerState("running", active, succeeded, failed)


def completion_index(pod: JSON) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("annotations") or {}).get(naming.COMPLETION_INDEX) or (meta.get("labels") or {}).get(
        naming.COMPLETION_INDEX
    )


def terminated(pod: JSON) -> JSON | None:
    """The trainer container's `state.terminated` (or its last one), if it ended."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if state:
            return dict(state)
    return None


def rank0_pods(pods: list[JSON]) -> list[JSON]:
    return [p for p in pods if completion_index(p) == "0"]


def trainer_result(pods: list[JSON]) -> TrainerResult | str:
    """The rank-0 pod's result, or a message saying why there is none."""
    candidates = [p for p in rank0_pods(pods) if (p.get("status") or {}).get("phase") == "Succeeded"]
    if not candidates:
        return "the trainer finished but its rank-0 pod (completion index 0) is gone, so its result is lost"
    state = terminated(candidates[-1]) or {}
    text = (state.get("message") or "").strip()
    try:
        data = json.loads(text)
        model_path = str(data["modelPath"])
        raw_metrics = data.get("metrics") or {}
    except (ValueError, KeyError, TypeError):
        shown = text[:200] or "nothing"
        return f"the trainer's rank-0 pod ended without a JSON result in its termination message (found: {shown})"
    metrics = {
        str(k): float(v)
        for k, v in raw_metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    headline = data.get("headlineMetric")
    return TrainerResult(model_path, metrics, str(headline) if headline else None)


def failure_message(state: TrainerState, pods: list[JSON], backoff_limit: int, job_name: str) -> str:
    """What went wrong, in words a user can act on."""
    why = {
        "PodFailurePolicy": "a trainer pod exited with code 2: the spec or the data is wrong, a retry cannot "
        "help; fix the dataset or training fields and apply again",
        "BackoffLimitExceeded": f"trainer pods failed more than scheduling.backoffLimit ({backoff_limit}) times",
        "DeadlineExceeded": "training ran past scheduling.activeDeadlineSeconds",
    }.get(state.reason, f"the trainer Job failed ({state.reason or 'no reason given'})")
    parts = [why]
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    for pod in failed[-1:]:
        ended = terminated(pod) or {}
        text = " ".join((ended.get("message") or "").split())[-300:]
        code = ended.get("exitCode")
        name = (pod.get("metadata") or {}).get("name", "?")
        parts.append(f"pod {name} exited with code {code}" + (f": {text}" if text else ""))
    parts.append(f"see `kubectl logs job/{job_name}`")
    return "; ".join(parts)


def deployment_ready(dep: JSON, replicas: int) -> bool:
    """Rolled out: the controller saw the latest spec and `replicas` updated pods are available."""
    meta, status = dep.get("metadata") or {}, dep.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return False
    want = replicas
    updated = int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    return updated >= want and available >= want


def rollout_problem(dep: JSON) -> str | None:
    """Why a rollout is stuck (progress deadline passed, pods cannot be created), if it is."""
    for cond in (dep.get("status") or {}).get("conditions") or []:
        stuck = cond.get("type") == "Progressing" and cond.get("status") == "False"
        failing = cond.get("type") == "ReplicaFailure" and cond.get("status") == "True"
        if stuck or failing:
            return f"{cond.get('reason', cond['type'])}: {cond.get('message', '')}".strip()
    return None
