"""The Job controller (batch/v1), after kubernetes pkg/controller/job: job_controller.go, pod_failure_policy.go and
indexed_job_utils.go, for the Jobs the box created and any Job that names its completionMode."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.podbox.kube import (
    JOBS,
    JSON,
    PODS,
    Core,
    Snapshot,
    condition,
    controller_uid,
    is_true,
    meta,
    name,
    namespace,
    now,
    owner_reference,
    parse_time,
    random_suffix,
    uid,
)
from tests.podbox.kubelet import Kubelet

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_NAME_KEY = "batch.kubernetes.io/job-name"
CONTROLLER_UID_KEY = "batch.kubernetes.io/controller-uid"
INDEX_ENV = "JOB_COMPLETION_INDEX"
MAX_GENERATED_NAME = 58  # validation.DNS1123SubdomainMaxLength - the 5 random characters
TERMINAL = ("Succeeded", "Failed")
SOURCE = "job-controller"


def job_defaults(spec: JSON) -> JSON:
    """batch/v1 SetDefaults_Job, applied to a copy (the emulator stores Jobs without API defaults)."""
    spec = dict(spec)
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = spec["parallelism"] = 1
    if spec.get("parallelism") is None:
        spec["parallelism"] = 1
    if spec.get("backoffLimit") is None:
        spec["backoffLimit"] = 2**31 - 1 if spec.get("backoffLimitPerIndex") is not None else 6
    spec.setdefault("completionMode", "NonIndexed")
    spec["suspend"] = bool(spec.get("suspend"))
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    return spec


def _exit_code_matches(code: int, requirement: JSON) -> bool:
    values = set(requirement.get("values") or [])
    if requirement.get("operator") == "In":
        return code in values
    if requirement.get("operator") == "NotIn":
        return code not in values
    return False


def _matching_container(pod: JSON, requirement: JSON) -> JSON | None:
    """The first terminated, non-zero container status that the onExitCodes requirement matches."""
    status = pod.get("status") or {}
    for statuses in (status.get("containerStatuses") or [], status.get("initContainerStatuses") or []):
        for container in statuses:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated is None:
                continue
            wanted = requirement.get("containerName")
            code = int(terminated.get("exitCode") or 0)
            if (wanted is None or wanted == container.get("name")) and code != 0 and _exit_code_matches(code,
                                                                                                       requirement):
                found: JSON = container
                return found
    return None


def _matching_condition(pod: JSON, patterns: Iterable[JSON]) -> JSON | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        for pattern in patterns:
            if cond.get("type") == pattern.get("type") and cond.get("status") == pattern.get("status", "True"):
                found: JSON = cond
                return found
    return None


def match_pod_failure_policy(policy: JSON | None, pod: JSON) -> tuple[str | None, bool, str | None]:
    """matchPodFailurePolicy: (the Job's failure message for a FailJob rule, whether the failure counts towards
    backoffLimit, the matched action)."""
    if not policy:
        return None, True, None
    ns, pod_name = namespace(pod), name(pod)
    for index, rule in enumerate(policy.get("rules") or []):
        action = rule.get("action")
        if rule.get("onExitCodes") is not None:
            container = _matching_container(pod, rule["onExitCodes"])
            if container is None:
                continue
            code = container["state"]["terminated"]["exitCode"]
            message = (f"Container {container['name']} for pod {ns}/{pod_name} failed with exit code {code} "
                       f"matching {action} rule at index {index}")  # fmt: skip
        elif rule.get("onPodConditions") is not None:
            cond = _matching_condition(pod, rule["onPodConditions"])
            if cond is None:
                continue
            message = f"Pod {ns}/{pod_name} has condition {cond['type']} matching {action} rule at index {index}"
        else:
            continue
        if action == "Ignore":
            return None, False, action
        if action == "Count":
            return None, True, action
        if action == "FailJob":
            return message, True, action
    return None, True, None


def ensure_condition(conditions: list[JSON], kind: str, status: bool, reason: str, message: str) -> list[JSON]:
    """ensureJobConditionStatus: replace a changed condition, append a new True one, keep an unchanged one."""
    value = "True" if status else "False"
    stamp = now()
    fresh = {"type": kind, "status": value, "reason": reason, "message": message, "lastProbeTime": stamp,
             "lastTransitionTime": stamp}  # fmt: skip
    found = condition(conditions, kind)
    if found is not None:
        same = (found.get("status"), found.get("reason"), found.get("message")) == (value, reason, message)
        return conditions if same else [fresh if c is found else c for c in conditions]
    return [*conditions, fresh] if status else conditions


def intervals(indexes: Iterable[int]) -> str:
    """status.completedIndexes: "0-2,5"."""
    ordered, parts = sorted(set(indexes)), []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def pod_index(pod: JSON) -> int | None:
    value = (meta(pod).get("annotations") or {}).get(INDEX_KEY)
    return int(value) if value is not None and str(value).isdigit() else None


def phase(pod: JSON) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def build_pod(job: JSON, spec: JSON, index: int | None) -> JSON:
    """A pod of the Job's template, named, labelled and annotated as the Job controller (and the API server's
    selector defaulting) would, with JOB_COMPLETION_INDEX from the downward API in each container."""
    template = copy.deepcopy(spec.get("template") or {})
    job_name, job_uid = name(job), uid(job)
    labels = {**(template.get("metadata", {}).get("labels") or {}), CONTROLLER_UID_KEY: job_uid,
              JOB_NAME_KEY: job_name, "controller-uid": job_uid, "job-name": job_name}  # fmt: skip
    annotations = dict(template.get("metadata", {}).get("annotations") or {})
    pod_spec = template.get("spec") or {}
    prefix = f"{job_name}-"
    if index is not None:
        labels[INDEX_KEY] = annotations[INDEX_KEY] = str(index)
        pod_spec["hostname"] = f"{job_name}-{index}"
        suffix = f"-{index}-"
        prefix = job_name + suffix
        if len(prefix) > MAX_GENERATED_NAME:
            prefix = prefix[: MAX_GENERATED_NAME - len(suffix)] + suffix
        for container in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
            env = container.setdefault("env", [])
            if not any(var.get("name") == INDEX_ENV for var in env):
                env.append({"name": INDEX_ENV, "valueFrom": {"fieldRef": {
                    "fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": prefix[:MAX_GENERATED_NAME] + random_suffix(), "namespace": namespace(job),
                     "labels": labels, "annotations": annotations,
                     "ownerReferences": [owner_reference(job, JOBS)]},
        "spec": pod_spec,
        "status": {"phase": "Pending"},  # as the API server sets it on create
    }  # fmt: skip


@dataclass
class JobState:
    """What the real controller keeps in pod finalizers and status.uncountedTerminatedPods."""

    failed: int = 0
    seen: set[str] = field(default_factory=set)  # failed pods already judged (counted or ignored)
    live: set[str] = field(default_factory=set)  # pods active on the previous tick
    succeeded: set[str] = field(default_factory=set)


class JobController:
    def __init__(self, core: Core, kubelet: Kubelet) -> None:
        self.core, self.kubelet = core, kubelet
        self.state: dict[str, JobState] = {}
        self.created: set[str] = set()  # Jobs the box created (the JobSet controller's)
        self.deleting: set[str] = set()  # Jobs being deleted: they get no new pods

    def managed(self, job: JSON) -> bool:
        mode = (job.get("spec") or {}).get("completionMode")
        return uid(job) in self.created or mode in ("Indexed", "NonIndexed")

    def begin_delete(self, job: JSON) -> None:
        """A foreground deletion: the pods' processes end and the pods go first, then the Job."""
        self.deleting.add(uid(job))
        self.core.spawn(f"deljob/{uid(job)}", self._delete(job))

    async def _delete(self, job: JSON) -> None:
        pods = await self.core.api.list(PODS.collection(namespace(job)))
        await asyncio.gather(*(self.kubelet.delete_pod(p) for p in pods if controller_uid(p) == uid(job)))
        await self.core.delete(JOBS, job)
        self.state.pop(uid(job), None)

    async def sync(self, snap: Snapshot) -> None:
        for job in snap.of(JOBS):
            if self.managed(job) and uid(job) not in self.deleting:
                await self._sync(job, snap)

    async def _sync(self, job: JSON, snap: Snapshot) -> None:
        status = job.get("status") or {}
        conditions = list(status.get("conditions") or [])
        if is_true(conditions, "Complete") or is_true(conditions, "Failed"):
            return
        spec = job_defaults(job.get("spec") or {})
        pods = snap.owned(PODS, uid(job))
        state = self.state.setdefault(uid(job), JobState(failed=int(status.get("failed") or 0)))
        self._count(spec, pods, state)
        terminating = [p for p in pods if uid(p) in self.kubelet.terminating]
        active = [p for p in pods if phase(p) not in TERMINAL and p not in terminating]
        start = status.get("startTime") or (None if spec["suspend"] else now())
        new = {**status, "startTime": start, "terminating": len(terminating), "uncountedTerminatedPods": {}}
        target = self._failure_target(spec, pods, state, conditions, start)
        if target is not None:
            conditions = self._fail(job, active, terminating, state, conditions, target)
            active = [p for p in active if not self.core.busy(f"jobkill/{uid(p)}")]
        else:
            conditions, new = await self._run(job, spec, pods, active, terminating, state, conditions, new)
            active = [p for p in active if uid(p) not in self.kubelet.terminating]
        ready = sum(1 for p in active if is_true((p.get("status") or {}).get("conditions") or [], "Ready"))
        new.update(active=len(active), ready=ready, failed=state.failed, conditions=conditions)
        if new != status:
            await self.core.patch_status(JOBS, job, new)
            await self._record_finished(job, conditions)

    async def _record_finished(self, job: JSON, conditions: list[JSON]) -> None:
        """recordJobFinished: an Event when the Job ends (the failure's reason and message as they are)."""
        failed = condition(conditions, "Failed")
        if failed is not None and failed.get("status") == "True":
            await self.core.event(JOBS, job, "Warning", str(failed["reason"]), str(failed["message"]), SOURCE)
        elif is_true(conditions, "Complete"):
            await self.core.event(JOBS, job, "Normal", "Completed", "Job completed", SOURCE)

    def _count(self, spec: JSON, pods: list[JSON], state: JobState) -> None:
        """Count each failure once. A pod that vanished while active (deleted by someone else) counts as failed,
        as the job-tracking finalizer makes the real controller count it; the box's own deletions do not."""
        present = {uid(p) for p in pods}
        state.failed += len(state.live - present - self.kubelet.removed - state.seen)
        for pod in pods:
            if phase(pod) == "Failed" and uid(pod) not in state.seen and uid(pod) not in self.kubelet.removed:
                state.seen.add(uid(pod))
                _, counts, _ = match_pod_failure_policy(spec.get("podFailurePolicy"), pod)
                state.failed += int(counts)
            if phase(pod) == "Succeeded":
                state.succeeded.add(uid(pod))
        state.live = {uid(p) for p in pods if phase(p) not in TERMINAL}

    def _failure_target(self, spec: JSON, pods: list[JSON], state: JobState, conditions: list[JSON],
                        start: str | None) -> tuple[str, str] | None:  # fmt: skip
        """Why the Job fails, in the real order: a FailureTarget already set, a FailJob rule, backoffLimit,
        activeDeadlineSeconds."""
        target = condition(conditions, "FailureTarget")
        if target is not None and target.get("status") == "True":
            return str(target.get("reason") or ""), str(target.get("message") or "")
        for pod in pods:
            if phase(pod) == "Failed":
                message, _, _ = match_pod_failure_policy(spec.get("podFailurePolicy"), pod)
                if message is not None:
                    return "PodFailurePolicy", message
        if state.failed > spec["backoffLimit"] or self._past_backoff_on_failure(spec, pods):
            return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        deadline = spec.get("activeDeadlineSeconds")
        running_for = time.time() - parse_time(start).timestamp() if start else 0.0
        if deadline is not None and start and not spec["suspend"] and running_for >= float(deadline):
            return "DeadlineExceeded", "Job was active longer than specified deadline"
        return None

    @staticmethod
    def _past_backoff_on_failure(spec: JSON, pods: list[JSON]) -> bool:
        """restartPolicy OnFailure: the containers' restarts count as the Job's failures."""
        if (spec.get("template") or {}).get("spec", {}).get("restartPolicy") != "OnFailure":
            return False
        restarts = sum(int(s.get("restartCount") or 0) for p in pods if phase(p) in ("Pending", "Running")
                       for s in (p.get("status") or {}).get("containerStatuses") or [])  # fmt: skip
        limit = int(spec["backoffLimit"])
        return restarts > 0 if limit == 0 else restarts >= limit

    def _fail(self, job: JSON, active: list[JSON], terminating: list[JSON], state: JobState,
              conditions: list[JSON], target: tuple[str, str]) -> list[JSON]:  # fmt: skip
        """FailureTarget now; the still-active pods terminated (and counted failed); Failed once none is left."""
        reason, message = target
        conditions = ensure_condition(conditions, "FailureTarget", True, reason, message)
        for pod in active:
            self.core.spawn(f"jobkill/{uid(pod)}", self._kill_active(pod, state))
        if not active and not terminating:
            conditions = ensure_condition(conditions, "Failed", True, reason, message)
        return conditions

    async def _kill_active(self, pod: JSON, state: JobState) -> None:
        """deleteActivePods: SIGTERM, SIGKILL after the grace period, the pod's last status written (Failed),
        counted as failed, then deleted."""
        self.kubelet.terminating.add(uid(pod))
        run = self.kubelet.runs.get(uid(pod))
        if run is not None:
            await self.kubelet.stop(run)
        if uid(pod) not in state.seen:
            state.seen.add(uid(pod))
            state.failed += 1
        await self.kubelet.delete_pod(pod)

    async def _run(self, job: JSON, spec: JSON, pods: list[JSON], active: list[JSON], terminating: list[JSON],
                   state: JobState, conditions: list[JSON], new: JSON) -> tuple[list[JSON], JSON]:  # fmt: skip
        """Not failing: suspend or resume, create missing pods, and complete when every completion succeeded."""
        indexed = spec["completionMode"] == "Indexed"
        completions = spec.get("completions")
        done = {i for p in pods if phase(p) == "Succeeded" and (i := pod_index(p)) is not None
                and (completions is None or i < completions)}  # fmt: skip
        succeeded = len(done) if indexed else len(state.succeeded)
        if spec["suspend"]:
            for pod in active:
                self.kubelet.begin_delete(pod)  # a suspended Job's pods go, without counting as failed
            conditions = ensure_condition(conditions, "Suspended", True, "JobSuspended", "Job suspended")
        else:
            if is_true(conditions, "Suspended"):
                conditions = ensure_condition(conditions, "Suspended", False, "JobResumed", "Job resumed")
                new["startTime"] = now()
            await self._create_missing(job, spec, active, terminating, done, succeeded)
        new["succeeded"] = succeeded
        if indexed:
            new["completedIndexes"] = intervals(done)
        complete = succeeded > 0 and not active if completions is None else succeeded >= completions and not active
        if complete:
            reason, message = "CompletionsReached", "Reached expected number of succeeded pods"
            conditions = ensure_condition(conditions, "SuccessCriteriaMet", True, reason, message)
            conditions = ensure_condition(conditions, "Complete", True, reason, message)
            new["completionTime"] = now()
        return conditions, new

    async def _create_missing(self, job: JSON, spec: JSON, active: list[JSON], terminating: list[JSON],
                              done: set[int], succeeded: int) -> None:  # fmt: skip
        """manageJob: up to `parallelism` active pods; a failed index gets a new pod once the old one is gone
        from the running (podReplacementPolicy Failed: a terminating pod is not replaced yet)."""
        completions, parallelism = spec.get("completions"), int(spec["parallelism"])
        if completions is None:
            want = len(active) if succeeded > 0 else parallelism
        else:
            want = min(int(completions) - succeeded, parallelism)
        count = want - len(active) - len(terminating)
        if count <= 0:
            return
        if spec["completionMode"] == "Indexed":
            busy = {pod_index(p) for p in (*active, *terminating)}
            indexes: list[int | None] = [i for i in range(int(completions or 0)) if i not in done and i not in busy]
        else:
            indexes = [None] * count
        for index in indexes[:count]:
            pod = build_pod(job, spec, index)
            created = await self.core.create(PODS, pod)
            if created is not None:
                self.kubelet.owned.add(uid(pod))
