"""What is wrong with a training run, in words a user can act on. Pure: pod and Workload dicts in.

- `pod_failure`: one failed trainer pod as a `PodFailure` (exit code, the trainer's own one-line error
  from its termination message, the last log lines, whether it was a disruption).
- `merge_failures`: the cause among the failed pods of each gang attempt: a permanent error first, then
  the first real failure by the time it ended, and only then the ranks that merely lost their peer
  (exit 76) or were stopped by a deletion (a gang restart, a Kueue suspension): those are victims.
- `pod_problem`: why a gang that should be running is not (unschedulable, image pull, bad config).
- `kueue_message`: what Kueue says about a Workload it has not admitted.
- `failed_message` / `restart_note`: the FineTuneJob's message for a failed run and after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.contracts import EXIT_PEER_LOST, EXIT_PERMANENT, TerminationMessage, one_line
from finetune.operator import builders, observe
from finetune.status import PodFailure

JSON = dict[str, Any]
KEPT_FAILURES = 10
# Enough to see why, little enough that the status stays small: the full log is `kubectl logs <pod>`.
LOG_LINES = 10
LOG_LINE_CHARS = 200
# Reasons of pods that failed because of another pod (the cause is elsewhere).
VICTIM_REASONS = frozenset({"PeerLost", "StoppedByDeletion"})
SIGTERM_EXIT = 143
# Container waiting reasons that never resolve by waiting longer.
WAITING_PROBLEMS = {
    "ErrImagePull": "ImagePullBackOff",
    "ImagePullBackOff": "ImagePullBackOff",
    "InvalidImageName": "ImagePullBackOff",
    "ErrImageNeverPull": "ImagePullBackOff",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CreateContainerError": "CreateContainerError",
    "RunContainerError": "RunContainerError",
    "CrashLoopBackOff": "CrashLoopBackOff",
}
DISRUPTION = "DisruptionTarget"


@dataclass(frozen=True)
class Problem:
    """Why the gang cannot run right now: a CamelCase reason and a message."""

    reason: str
    message: str


def _condition(pod: JSON, type_: str) -> JSON | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _rank(pod: JSON) -> int | None:
    index = observe.completion_index(pod)
    return int(index) if index is not None and index.isdigit() else None


def failed(pod: JSON) -> bool:
    state = observe.terminated(pod) or {}
    return (pod.get("status") or {}).get("phase") == "Failed" or int(state.get("exitCode") or 0) != 0


def pod_failure(pod: JSON) -> PodFailure | None:
    """The failure of one trainer pod, or None when it has not failed."""
    if not failed(pod):
        return None
    state = observe.terminated(pod) or {}
    code = state.get("exitCode")
    text = str(state.get("message") or "")
    typed = TerminationMessage.decode(text)
    disruption = _condition(pod, DISRUPTION)
    disrupted = disruption is not None and disruption.get("status") == "True"
    if typed is not None:
        message, tail = typed.message, typed.log_tail[-LOG_LINES:]
    else:  # no message of the trainer's: the kubelet's fallback is the pod's last log lines
        message, tail = "", [line for line in text.splitlines() if line.strip()][-LOG_LINES:]
    status = pod.get("status") or {}
    deleted = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    if disrupted:
        assert disruption is not None
        reason = str(disruption.get("reason") or DISRUPTION)
        message = one_line(f"{reason}: {disruption.get('message') or 'the pod was disrupted'}")
    elif code == EXIT_PERMANENT or (typed is not None and typed.permanent):
        reason = "PermanentError"
    elif code == EXIT_PEER_LOST:
        reason = "PeerLost"
    elif deleted and code in (SIGTERM_EXIT, None):
        reason = "StoppedByDeletion"
    elif not state and status.get("reason"):  # never started: the kubelet rejected it (admission, eviction)
        reason = str(status["reason"])
        message = message or one_line(str(status.get("message") or reason))
    else:
        reason = str(state.get("reason") or status.get("reason") or "Error")
    if not message:
        message = f"exited with code {code}" + (f" ({reason})" if reason not in ("Error", "") else "")
    finished = state.get("finishedAt") or (disruption or {}).get("lastTransitionTime")
    return PodFailure(
        pod=str((pod.get("metadata") or {}).get("name", "?")),
        node_rank=_rank(pod),
        attempt=observe.attempt_of(pod),
        exit_code=int(code) if code is not None else None,
        reason=reason,
        message=one_line(message),
        log_tail=[one_line(line, LOG_LINE_CHARS) for line in tail],
        finished_at=str(finished) if finished else None,
        counts_against_budget=not disrupted,
    )


def cause_order(failure: PodFailure) -> tuple[int, str]:
    """Sorts the likeliest cause first: a permanent error, a real failure, then the victims; by end time
    within each (RFC 3339 UTC strings of one format sort as times; a missing time sorts last)."""
    rank = 0 if failure.reason == "PermanentError" else 2 if failure.reason in VICTIM_REASONS else 1
    return rank, failure.finished_at or "~"


def merge_failures(known: list[PodFailure], pods: list[JSON]) -> list[PodFailure]:
    """The cause of each attempt's failure, from what was recorded before and what the pods show now."""
    first = {f.attempt: f for f in known}
    for pod in pods:
        failure = pod_failure(pod)
        if failure is None:
            continue
        have = first.get(failure.attempt)
        if have is None or cause_order(failure) < cause_order(have) or (have.pod == failure.pod and have != failure):
            first[failure.attempt] = failure
    return [first[a] for a in sorted(first)][-KEPT_FAILURES:]


def describe(failure: PodFailure) -> str:
    """`pod X (rank r) exited with code c: <the trainer's error>`."""
    rank = f" (rank {failure.node_rank})" if failure.node_rank is not None else ""
    if not failure.counts_against_budget:
        return f"pod {failure.pod}{rank} was disrupted: {failure.message}"
    code = f" exited with code {failure.exit_code}" if failure.exit_code is not None else " failed"
    detail = failure.message if not failure.message.startswith("exited with code") else ""
    return f"pod {failure.pod}{rank}{code}" + (f": {detail}" if detail else "")


def pod_problem(pods: list[JSON], attempt: int) -> Problem | None:
    """Why pods of the current attempt are not running, when waiting longer will not fix it by itself."""
    current = [p for p in pods if observe.attempt_of(p) == attempt and not failed(p)]
    for pod in sorted(current, key=lambda p: str((p.get("metadata") or {}).get("name"))):
        name = (pod.get("metadata") or {}).get("name", "?")
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = WAITING_PROBLEMS.get(str(waiting.get("reason")))
            if reason:
                detail = one_line(str(waiting.get("message") or waiting.get("reason")))
                image = f" (image {cs.get('image')})" if reason == "ImagePullBackOff" and cs.get("image") else ""
                return Problem(reason, f"trainer pod {name}{image}: {waiting.get('reason')}: {detail}")
        scheduled = _condition(pod, "PodScheduled")
        if scheduled is not None and scheduled.get("status") == "False":
            reason = str(scheduled.get("reason") or "Unschedulable")
            detail = one_line(str(scheduled.get("message") or "no node fits"))
            return Problem(reason, f"trainer pod {name} cannot be scheduled: {detail}")
    return None


def kueue_message(workloads: list[JSON], jobset_name: str) -> str | None:
    """Kueue's own words on why the JobSet's Workload waits, if Kueue has said anything."""
    for workload in workloads:
        owners = (workload.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("kind") == "JobSet" and o.get("name") == jobset_name for o in owners):
            continue
        conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
        for type_ in ("Evicted", "Preempted"):
            cond = conditions.get(type_)
            if cond and cond.get("status") == "True" and cond.get("message"):
                return one_line(f"{type_}: {cond['message']}")
        for type_ in ("QuotaReserved", "Admitted"):
            cond = conditions.get(type_)
            if cond and cond.get("status") != "True" and cond.get("message"):
                return one_line(str(cond["message"]))
    return None


def restart_note(restarts: int, counted: int, budget: int, failures: list[PodFailure]) -> str:
    """`restart 2 (1 of 3 allowed failures used) after pod X (rank 1) exited with code 137: ...`."""
    note = f"restart {restarts} ({counted} of {budget} allowed failure restarts used)"
    last = failures[-1] if failures else None
    return note + (f" after {describe(last)}" if last is not None else "")


def job_failure_reason(jobs: list[JSON]) -> str:
    """The reason (PodFailurePolicy, BackoffLimitExceeded, DeadlineExceeded) of the first failed child Job."""
    conditions = [c for job in jobs if (c := observe.true_condition(job, "Failed")) is not None]
    conditions.sort(key=lambda c: str(c.get("lastTransitionTime") or ""))
    return str(conditions[0].get("reason") or "") if conditions else ""


def failed_message(
    state: observe.TrainerState, failures: list[PodFailure], budget: int, jobset: str, job_reason: str = ""
) -> tuple[str, str]:
    """(reason, message) for a run whose JobSet failed."""
    last = failures[-1] if failures else None
    where = f"; see `kubectl logs {last.pod}`" if last is not None else f"; see `kubectl describe jobset {jobset}`"
    if last is not None and last.reason == "PermanentError":
        return "PermanentError", (
            f"the trainer stopped on an error a retry cannot fix: {describe(last)}; fix the spec or the data "
            f"and apply again{where}"
        )
    if state.reason == "ReachedMaxRestarts":
        cause = f"; the last: {describe(last)}" if last is not None else ""
        return "BackoffLimitExceeded", (
            f"the trainer failed {state.restarts_counted + 1} times; scheduling.backoffLimit allows "
            f"{budget} restart(s){cause}{where}"
        )
    if job_reason == "DeadlineExceeded":
        return "DeadlineExceeded", f"training ran past scheduling.activeDeadlineSeconds{where}"
    cause = f": {describe(last)}" if last is not None else ""
    detail = f" ({state.reason}: {state.message})" if state.reason else ""
    return "TrainerFailed", f"the trainer JobSet {jobset} failed{detail}{cause}{where}"


def jobset_too_old_message() -> str:
    return (
        f"the installed JobSet is older than {builders.JOBSET_MIN_VERSION}: its API dropped the failure "
        "rules' onJobFailureMessagePatterns, without which every preemption would fail the run. "
        f"Upgrade it: {builders.JOBSET_INSTALL}"
    )


def jobset_missing_message() -> str:
    return (
        f"the JobSet API (jobset.x-k8s.io/v1alpha2, JobSet {builders.JOBSET_MIN_VERSION} or newer) is not "
        f"installed in this cluster; the trainer runs as a JobSet. Install it: {builders.JOBSET_INSTALL}"
    )
