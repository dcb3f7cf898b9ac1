"""Phases, conditions and status patches, built from the typed `finetune.status` models.

A status patch is a JSON merge patch of `.status`: only the fields a step sets are sent, and a field
set to None is sent as null, which removes it (e.g. the previous run's progress when a new run starts).
The trainer patches `progress` and `training` itself; the operator never writes those except to clear them.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Literal

from pydantic import ValidationError

from finetune.operator.naming import MANAGER
from finetune.spec import API_VERSION, KIND
from finetune.status import Condition, FineTuneJobStatus, Phase

SPEC_VALID = "SpecValid"
JOBSET_AVAILABLE = "JobSetAvailable"
ADMITTED = "Admitted"
TRAINED = "Trained"
PROMOTED = "Promoted"
SERVING = "Serving"
READY = "Ready"

ACTIVE_PHASES: frozenset[str] = frozenset({"Pending", "Queued", "Training", "Evaluating", "Deploying"})
# Phases after which the run's trainer Job is no longer needed.
TRAINED_PHASES: frozenset[str] = frozenset({"Evaluating", "Rejected", "Deploying", "Serving", "Succeeded"})
EVENT_TYPE: dict[str, str] = {"Failed": "Warning", "Rejected": "Warning"}


def now() -> str:
    """RFC 3339 UTC time, second precision, as Kubernetes writes it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_status(raw: dict[str, Any] | None) -> FineTuneJobStatus:
    """The typed status of an object; unknown keys (another writer's) are ignored, never fatal."""
    raw = dict(raw or {})
    known = {f.alias or name for name, f in FineTuneJobStatus.model_fields.items()}
    data = {k: v for k, v in raw.items() if k in known}
    try:
        return FineTuneJobStatus.model_validate(data)
    except ValidationError:
        # A hand-edited status must not wedge the operator: keep the fields that still parse.
        kept = {}
        for key, value in data.items():
            try:
                FineTuneJobStatus.model_validate({key: value})
            except ValidationError:
                continue
            kept[key] = value
        return FineTuneJobStatus.model_validate(kept)


def find_condition(status: FineTuneJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def condition_is(status: FineTuneJobStatus, type_: str, value: str) -> bool:
    cond = find_condition(status, type_)
    return cond is not None and cond.status == value


def with_condition(
    conditions: list[Condition],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[Condition]:
    """The list with `type_` set; its transition time moves only when its status changes."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now()
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [new]


def status_patch(**fields: Any) -> dict[str, Any]:
    """`{"status": {...}}` with exactly the given FineTuneJobStatus fields (None = remove)."""
    typed = FineTuneJobStatus(**fields)
    # Nested values go whole (a merge patch would otherwise keep stale counters of the previous run);
    # only top-level Nones stay, as the nulls that remove a field.
    data = typed.model_dump(mode="json", by_alias=True, include=set(fields), exclude_none=True)
    for name, value in fields.items():
        if value is None:
            data[FineTuneJobStatus.model_fields[name].alias or name] = None
    return {"status": data}


def event_type(phase: Phase | str) -> str:
    return EVENT_TYPE.get(phase, "Normal")


def event_manifest(body: dict[str, Any], type_: str, reason: str, message: str, instance: str) -> dict[str, Any]:
    """A core/v1 Event about a FineTuneJob; the name is unique per call, like kubectl's."""
    meta = body["metadata"]
    stamp = now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": MANAGER},
        "reportingComponent": MANAGER,
        "reportingInstance": instance,
    }
