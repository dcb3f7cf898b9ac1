"""Pure readers of what the cluster reports: the trainer JobSet's state, the rank-0 pod's result, and
whether the server Deployment has rolled out. Dicts in, small typed values out. What went wrong with
trainer pods (and what Kueue says) is read in `finetune.operator.diagnosis`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from finetune.contracts import TerminationMessage, TrainerResult
from finetune.operator import naming

JSON = dict[str, Any]
TrainerPhase = Literal["queued", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class TrainerState:
    """The trainer JobSet as the JobSet controller (and Kueue) report it."""

    phase: TrainerPhase
    restarts: int = 0  # gang restarts for any cause (status.restarts)
    restarts_counted: int = 0  # the ones that count against failurePolicy.maxRestarts
    reason: str = ""
    message: str = ""


def true_condition(obj: JSON, *types: str) -> JSON | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return dict(cond)
    return None


def trainer_state(jobset: JSON) -> TrainerState:
    """Queued while suspended (Kueue has not admitted it), then running until Completed or Failed."""
    status = jobset.get("status") or {}
    restarts = int(status.get("restarts") or 0)
    counted = int(status.get("restartsCountTowardsMax") or 0)
    failure = true_condition(jobset, "Failed")
    if failure is not None:
        reason, message = str(failure.get("reason", "")), str(failure.get("message", ""))
        return TrainerState("failed", restarts, counted, reason, message)
    if true_condition(jobset, "Completed"):
        return TrainerState("succeeded", restarts, counted)
    if (jobset.get("spec") or {}).get("suspend"):
        return TrainerState("queued", restarts, counted)
    return TrainerState("running", restarts, counted)


def completion_index(pod: JSON) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("annotations") or {}).get(naming.COMPLETION_INDEX) or (meta.get("labels") or {}).get(
        naming.COMPLETION_INDEX
    )


def attempt_of(pod: JSON) -> int:
    """The gang attempt (JobSet restart attempt) a pod belongs to; 0 for a pod JobSet did not label."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(naming.JOBSET_RESTART_LABEL, "0")
    return int(value) if str(value).isdigit() else 0


def terminated(pod: JSON) -> JSON | None:
    """The trainer container's `state.terminated` (or its last one), if it ended."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if state:
            return dict(state)
    return None


def trainer_result(pods: list[JSON]) -> TrainerResult | str:
    """The result that node 0 (which holds global rank 0) left, or a message saying why there is none."""
    finished = [
        p for p in pods if completion_index(p) == "0" and (p.get("status") or {}).get("phase") == "Succeeded"
    ]
    if not finished:
        return "the trainer finished but its node-0 pod (completion index 0) is gone, so its result is lost"
    text = ((terminated(max(finished, key=attempt_of)) or {}).get("message") or "").strip()
    message = TerminationMessage.decode(text)
    if message is None or message.result is None:
        shown = " ".join(text.split())[:200] or "nothing"
        return f"the trainer's node-0 pod ended without a result in its termination message (found: {shown})"
    return message.result


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
