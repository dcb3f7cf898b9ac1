"""The JobSet controller (jobset.x-k8s.io/v1alpha2), after kubernetes-sigs/jobset pkg/controllers/
jobset_controller.go and failure_policy.go, pkg/constants/constants.go and the defaulting webhook."""

from __future__ import annotations

import copy
import hashlib
import re
import time
from dataclasses import dataclass, field

from tests.podbox.jobs import JobController
from tests.podbox.kube import (
    JOBS,
    JOBSETS,
    JSON,
    SERVICES,
    Core,
    Snapshot,
    condition,
    is_true,
    labels,
    log,
    meta,
    name,
    namespace,
    now,
    owner_reference,
    parse_time,
    uid,
)

PREFIX = "jobset.sigs.k8s.io/"
JOBSET_NAME, JOBSET_UID = PREFIX + "jobset-name", PREFIX + "jobset-uid"
REPLICATED_JOB, REPLICATED_JOB_REPLICAS = PREFIX + "replicatedjob-name", PREFIX + "replicatedjob-replicas"
GLOBAL_REPLICAS, JOB_INDEX, JOB_KEY = PREFIX + "global-replicas", PREFIX + "job-index", PREFIX + "job-key"
JOB_GLOBAL_INDEX, RESTART_ATTEMPT = PREFIX + "job-global-index", PREFIX + "restart-attempt"
GROUP_NAME, GROUP_REPLICAS = PREFIX + "group-name", PREFIX + "group-replicas"
JOB_GROUP_INDEX = PREFIX + "job-group-index"
COORDINATOR = PREFIX + "coordinator"
CONTROLLER_NAME = "jobset.sigs.k8s.io/jobset-controller"
SOURCE = "jobset-controller"

# pkg/constants/constants.go
FAILED_JOBS = ("FailedJobs", "jobset failed due to one or more job failures")
REACHED_MAX_RESTARTS = ("ReachedMaxRestarts", "jobset failed due to reaching max number of restarts")
FAIL_JOBSET_ACTION = ("FailJobSetFailurePolicyAction", "applying FailJobSet failure policy action")
RESTART_ACTION = ("RestartJobSetFailurePolicyAction", "applying RestartJobSet failure policy action")
RESTART_IGNORE_MAX_ACTION = ("RestartJobSetAndIgnoreMaxRestartsFailurePolicyAction",
                             "applying RestartJobSetAndIgnoreMaxRestarts failure policy action")
ALL_JOBS_COMPLETED = ("AllJobsCompleted", "jobset completed successfully")


def jobset_defaults(spec: JSON) -> JSON:
    """The defaulting webhook's changes, on a copy: the emulator runs no webhooks."""
    spec = copy.deepcopy(spec)
    spec.setdefault("successPolicy", {"operator": "All"})
    spec.setdefault("startupPolicy", {"startupPolicyOrder": "AnyOrder"})
    for rjob in spec.get("replicatedJobs") or []:
        job_spec = rjob.setdefault("template", {}).setdefault("spec", {})
        job_spec.setdefault("completionMode", "Indexed")
        pod_spec = job_spec.setdefault("template", {}).setdefault("spec", {})
        pod_spec["restartPolicy"] = pod_spec.get("restartPolicy") or "OnFailure"
        rjob.setdefault("groupName", "default")
        rjob.setdefault("replicas", 1)
    network = spec.setdefault("network", {})
    network.setdefault("enableDNSHostnames", True)
    network.setdefault("publishNotReadyAddresses", True)
    for index, rule in enumerate((spec.get("failurePolicy") or {}).get("rules") or []):
        rule["name"] = rule.get("name") or f"failurePolicyRule{index}"
    return spec


def subdomain(js: JSON, spec: JSON) -> str:
    return str((spec.get("network") or {}).get("subdomain") or name(js))


def job_failure(job: JSON) -> JSON | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == "Failed" and c.get("status") == "True"), None)  # fmt: skip


def first_failed(jobs: list[JSON]) -> JSON:
    """The Job whose Failed condition is oldest (the first in list order on a tie, as Go's strict Before)."""
    best: JSON | None = None
    for job in jobs:
        when = str((job_failure(job) or {}).get("lastTransitionTime") or "")
        if best is None or when < str((job_failure(best) or {}).get("lastTransitionTime") or ""):
            best = job
    assert best is not None
    return best


def rule_applies(rule: JSON, job: JSON) -> bool:
    """ruleIsApplicable: reasons, message patterns (Go regexp.MatchString: a search), target replicatedJobs."""
    failure = job_failure(job) or {}
    reasons, patterns = rule.get("onJobFailureReasons") or [], rule.get("onJobFailureMessagePatterns") or []
    if reasons and failure.get("reason") not in reasons:
        return False
    if patterns and not any(_search(p, str(failure.get("message") or "")) for p in patterns):
        return False
    parent = labels(job).get(REPLICATED_JOB)
    targets = rule.get("targetReplicatedJobs") or []
    return bool(parent) and (not targets or parent in targets)


def _search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        log.error("podbox: invalid regex for onJobFailureMessagePatterns: %r", pattern)
        return False


def matching_rule(rules: list[JSON], failed: list[JSON]) -> tuple[JSON | None, JSON]:
    """findFirstFailedPolicyRuleAndJob: the first rule that any failed Job matches, with the earliest such Job;
    without one, (None, the earliest failed Job)."""
    for rule in rules:
        matched = [job for job in failed if rule_applies(rule, job)]
        if matched:
            return rule, first_failed(matched)
    return None, first_failed(failed)


def label_and_annotate(target: JSON, js: JSON, spec: JSON, rjob: JSON, index: int, restarts: int) -> None:
    """labelAndAnnotateObject: the same keys as labels and as annotations, over the object's own."""
    job_name = f"{name(js)}-{rjob['name']}-{index}"
    rjobs = spec.get("replicatedJobs") or []
    group = rjob.get("groupName") or "default"
    before = rjobs[: rjobs.index(rjob)]
    values = {
        JOBSET_NAME: name(js), JOBSET_UID: uid(js), REPLICATED_JOB: rjob["name"], RESTART_ATTEMPT: str(restarts),
        REPLICATED_JOB_REPLICAS: str(rjob["replicas"]), GLOBAL_REPLICAS: str(sum(r["replicas"] for r in rjobs)),
        JOB_INDEX: str(index), JOB_KEY: hashlib.sha1(f"{namespace(js)}/{job_name}".encode()).hexdigest(),
        JOB_GLOBAL_INDEX: str(sum(r["replicas"] for r in before) + index), GROUP_NAME: group,
        GROUP_REPLICAS: str(sum(r["replicas"] for r in rjobs if (r.get("groupName") or "default") == group)),
        JOB_GROUP_INDEX: str(sum(r["replicas"] for r in before if (r.get("groupName") or "default") == group)
                             + index),
    }  # fmt: skip
    if coordinator := spec.get("coordinator"):
        values[COORDINATOR] = (f"{name(js)}-{coordinator['replicatedJob']}-{coordinator.get('jobIndex', 0)}-"
                               f"{coordinator.get('podIndex', 0)}.{subdomain(js, spec)}")  # fmt: skip
    target_meta = target.setdefault("metadata", {})
    target_meta["labels"] = {**(target_meta.get("labels") or {}), **values}
    target_meta["annotations"] = {**(target_meta.get("annotations") or {}), **values}


def construct_job(js: JSON, spec: JSON, rjob: JSON, index: int, restarts: int) -> JSON:
    template = copy.deepcopy(rjob.get("template") or {})
    job_spec = template.get("spec") or {}
    job: JSON = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{name(js)}-{rjob['name']}-{index}", "namespace": namespace(js),
                     "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                     "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                     "ownerReferences": [owner_reference(js, JOBSETS)]},
        "spec": job_spec,
    }  # fmt: skip
    label_and_annotate(job, js, spec, rjob, index, restarts)
    pod_template = job_spec.setdefault("template", {})
    label_and_annotate(pod_template, js, spec, rjob, index, restarts)
    if spec["network"].get("enableDNSHostnames"):
        pod_template.setdefault("spec", {})["subdomain"] = subdomain(js, spec)
    job_spec["suspend"] = bool(spec.get("suspend"))
    return job


def update_condition(conditions: list[JSON], new: JSON) -> bool:
    """updateCondition: a changed status replaces the condition; a changed reason or message keeps its
    lastTransitionTime; a new condition is only added when True."""
    fresh = {**new, "lastTransitionTime": now()}
    for i, current in enumerate(conditions):
        if current.get("type") != fresh["type"]:
            continue
        if current.get("status") != fresh["status"]:
            conditions[i] = fresh
            return True
        if (current.get("reason"), current.get("message")) != (fresh["reason"], fresh["message"]):
            conditions[i] = {**fresh, "lastTransitionTime": current.get("lastTransitionTime")}
            return True
        return False
    if fresh["status"] == "True":
        conditions.append(fresh)
        return True
    return False


@dataclass
class Children:
    active: list[JSON] = field(default_factory=list)
    successful: list[JSON] = field(default_factory=list)
    failed: list[JSON] = field(default_factory=list)
    previous: list[JSON] = field(default_factory=list)


def classify(jobs: list[JSON], restarts: int) -> Children:
    """getChildJobs: Jobs of an older restart attempt are "previous" (to delete), the rest by their state."""
    children = Children()
    for job in jobs:
        attempt = labels(job).get(RESTART_ATTEMPT, "")
        conditions = (job.get("status") or {}).get("conditions") or []
        if not attempt.isdigit() or int(attempt) < restarts:
            children.previous.append(job)
        elif is_true(conditions, "Failed"):
            children.failed.append(job)
        elif is_true(conditions, "Complete"):
            children.successful.append(job)
        else:
            children.active.append(job)
    return children


class Reconcile:
    """One reconcile of one JobSet: a status being built, and the events to post once it is written."""

    def __init__(self, js: JSON) -> None:
        self.js = js
        self.spec = jobset_defaults(js.get("spec") or {})
        self.status: JSON = copy.deepcopy(js.get("status") or {})
        self.status.setdefault("restarts", 0)
        self.status.setdefault("restartsCountTowardsMax", 0)
        self.conditions: list[JSON] = self.status.setdefault("conditions", [])
        self.events: list[tuple[str, str, str]] = []

    def set_condition(self, kind: str, status: bool, reason: str, message: str, event_type: str) -> None:
        new = {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}
        if update_condition(self.conditions, new):
            self.events.append((event_type, reason, message))

    def fail(self, reason: str, message: str) -> None:
        self.set_condition("Failed", True, reason, message, "Warning")
        self.set_condition("RestartingJobSet", False, "JobSetFailed", "jobset failed", "Normal")
        self.status["terminalState"] = "Failed"

    def complete(self) -> None:
        self.set_condition("Completed", True, *ALL_JOBS_COMPLETED, "Normal")
        self.set_condition("RestartingJobSet", False, "JobSetCompleted", ALL_JOBS_COMPLETED[1], "Normal")
        self.status["terminalState"] = "Completed"

    def restart(self, rule: JSON | None, job: JSON, counts: bool) -> None:
        """failurePolicyRecreateAll: the next attempt; the old attempt's Jobs are deleted on the next reconcile."""
        reason, base = RESTART_ACTION if counts else RESTART_IGNORE_MAX_ACTION
        message = f"{base} (first failed job: {name(job)})"
        self.status["restarts"] += 1
        if counts:
            self.status["restartsCountTowardsMax"] += 1
        cond_reason = f"FailurePolicy_{rule['name']}" if rule is not None else "DefaultFailurePolicy"
        self.set_condition("RestartingJobSet", True, cond_reason, message, "Warning")
        self.events.append(("Warning", reason, message))

    def finished(self) -> bool:
        return is_true(self.conditions, "Completed") or is_true(self.conditions, "Failed")


class JobSetController:
    def __init__(self, core: Core, jobs: JobController) -> None:
        self.core, self.jobs = core, jobs
        self.services: set[str] = set()  # JobSets whose headless Service exists

    async def sync(self, snap: Snapshot) -> None:
        for js in snap.of(JOBSETS):
            managed_by = (js.get("spec") or {}).get("managedBy")
            if managed_by in (None, CONTROLLER_NAME) and not meta(js).get("deletionTimestamp"):
                await self._sync(js, snap)

    async def _sync(self, js: JSON, snap: Snapshot) -> None:
        r = Reconcile(js)
        children = classify(snap.owned(JOBS, uid(js)), int(r.status["restarts"]))
        r.status["replicatedJobsStatus"] = self._replicated_statuses(r.spec, children)
        if r.finished():
            self._delete(children.active)
            await self._write(r)
            await self._ttl(js, r)
            return
        self._delete(children.previous)
        suspended = bool(r.spec.get("suspend"))
        if not suspended and self._all_ready(r):
            r.set_condition("RestartingJobSet", False, "JobsReady", "all jobs are ready", "Normal")
        if children.failed:
            self._failure_policy(r, children.failed)
        elif not (children.successful and self._success(r, children.successful)):
            await self._run(js, r, children)
        await self._write(r)

    async def _run(self, js: JSON, r: Reconcile, children: Children) -> None:
        await self._headless_service(js, r.spec)
        await self._create_jobs(js, r, children)
        if r.spec.get("suspend"):
            for job in children.active:
                if not (job.get("spec") or {}).get("suspend"):
                    await self.core.patch(JOBS.path(job), {"spec": {"suspend": True}})
            r.set_condition("Suspended", True, "SuspendedJobs", "jobset is suspended", "Normal")
            r.set_condition("RestartingJobSet", False, "JobSetSuspended", "jobset is suspended", "Normal")
        else:
            for job in children.active:
                if (job.get("spec") or {}).get("suspend"):
                    await self._resume(job, r.spec)
            r.set_condition("Suspended", False, "ResumeJobs", "jobset is resumed", "Normal")

    @staticmethod
    def _replicated_statuses(spec: JSON, children: Children) -> list[JSON]:
        """calculateReplicatedJobStatuses, in spec order."""
        counts = {r["name"]: {"name": r["name"], "ready": 0, "succeeded": 0, "failed": 0, "active": 0,
                              "suspended": 0} for r in spec.get("replicatedJobs") or []}  # fmt: skip
        for job in children.active:
            found = counts.get(labels(job).get(REPLICATED_JOB, ""))
            if found is None:
                continue
            job_spec, status = job.get("spec") or {}, job.get("status") or {}
            pods = int(job_spec.get("parallelism") or 1)
            if job_spec.get("completions") is not None:
                pods = min(pods, int(job_spec["completions"]))
            found["ready"] += int(int(status.get("succeeded") or 0) + int(status.get("ready") or 0) >= pods)
            found["active"] += int(int(status.get("active") or 0) > 0)
            found["suspended"] += int(bool(job_spec.get("suspend")))
        for key, jobs in (("succeeded", children.successful), ("failed", children.failed)):
            for job in jobs:
                if (found := counts.get(labels(job).get(REPLICATED_JOB, ""))) is not None:
                    found[key] += 1
        return list(counts.values())

    @staticmethod
    def _all_ready(r: Reconcile) -> bool:
        total = sum(int(rjob["replicas"]) for rjob in r.spec.get("replicatedJobs") or [])
        ready = sum(int(s["ready"]) + int(s["succeeded"]) for s in r.status["replicatedJobsStatus"])
        return total == ready

    @staticmethod
    def _failure_policy(r: Reconcile, failed: list[JSON]) -> None:
        """executeFailurePolicy: no policy fails the JobSet; else the first matching rule's action, or
        RestartJobSet when none matches."""
        policy = r.spec.get("failurePolicy")
        if policy is None:
            r.fail(FAILED_JOBS[0], f"{FAILED_JOBS[1]} (first failed job: {name(first_failed(failed))})")
            return
        rule, job = matching_rule(policy.get("rules") or [], failed)
        action = rule.get("action") if rule is not None else "RestartJobSet"
        if action == "FailJobSet":
            r.fail(FAIL_JOBSET_ACTION[0], f"{FAIL_JOBSET_ACTION[1]} (first failed job: {name(job)})")
        elif action == "RestartJobSet":
            if int(r.status["restartsCountTowardsMax"]) >= int(policy.get("maxRestarts") or 0):
                r.fail(REACHED_MAX_RESTARTS[0], f"{REACHED_MAX_RESTARTS[1]} (first failed job: {name(job)})")
            else:
                r.restart(rule, job, counts=True)
        elif action == "RestartJobSetAndIgnoreMaxRestarts":
            r.restart(rule, job, counts=False)
        else:  # RestartJob and RestartJobAndIgnoreMaxRestarts sit behind the RestartJob feature gate, off here
            log.error("podbox: JobSet %s: failure policy action %s is not supported", name(r.js), action)

    @staticmethod
    def _success(r: Reconcile, successful: list[JSON]) -> bool:
        """executeSuccessPolicy: All → every Job of the target replicatedJobs; Any → one of them."""
        policy = r.spec.get("successPolicy") or {}
        targets = set(policy.get("targetReplicatedJobs") or [])
        rjobs = [j for j in r.spec.get("replicatedJobs") or [] if not targets or j["name"] in targets]
        names = {j["name"] for j in rjobs}
        matching = sum(1 for job in successful if labels(job).get(REPLICATED_JOB) in names)
        expected = 1 if policy.get("operator") == "Any" else sum(int(j["replicas"]) for j in rjobs)
        if matching >= expected:
            r.complete()
            return True
        return False

    async def _create_jobs(self, js: JSON, r: Reconcile, children: Children) -> None:
        """constructJobsFromTemplate: every `<jobset>-<replicatedJob>-<index>` that no owned Job holds yet (an
        old attempt's Job keeps its name until it is deleted, so the new attempt starts after it is gone)."""
        blocking = (r.spec.get("failurePolicy") or {}).get("restartStrategy") == "BlockingRecreate"
        if children.previous and blocking:
            return
        taken = {name(j) for j in (*children.active, *children.successful, *children.failed, *children.previous)}
        for rjob in r.spec.get("replicatedJobs") or []:
            for index in range(int(rjob["replicas"])):
                if f"{name(js)}-{rjob['name']}-{index}" in taken:
                    continue
                job = construct_job(js, r.spec, rjob, index, int(r.status["restarts"]))
                created = await self.core.create(JOBS, job)
                if created is not None:
                    self.jobs.created.add(uid(job))

    async def _resume(self, job: JSON, spec: JSON) -> None:
        """resumeJob: the template's scheduling fields (Kueue may have changed them) merged in, suspend off."""
        rjob = next((r for r in spec["replicatedJobs"] if r["name"] == labels(job).get(REPLICATED_JOB)), None)
        patch: JSON = {"spec": {"suspend": False}}
        if rjob is not None:
            source = rjob["template"]["spec"].get("template") or {}
            current = (job.get("spec") or {}).get("template") or {}
            merged_meta = {key: {**((current.get("metadata") or {}).get(key) or {}),
                                 **((source.get("metadata") or {}).get(key) or {})}
                           for key in ("labels", "annotations")}  # fmt: skip
            pod = current.get("spec") or {}
            src = source.get("spec") or {}
            merged_spec: JSON = {"nodeSelector": {**(pod.get("nodeSelector") or {}), **(src.get("nodeSelector") or {})}}
            for key in ("tolerations", "schedulingGates"):
                have = list(pod.get(key) or [])
                merged_spec[key] = have + [x for x in src.get(key) or [] if x not in have]
            patch["spec"]["template"] = {"metadata": merged_meta, "spec": merged_spec}
        if (job.get("status") or {}).get("startTime"):
            await self.core.patch_status(JOBS, job, {"startTime": None})
        await self.core.patch(JOBS.path(job), patch)

    async def _headless_service(self, js: JSON, spec: JSON) -> None:
        """createHeadlessSvcIfNecessary: the Service behind `<pod hostname>.<subdomain>`."""
        if not spec["network"].get("enableDNSHostnames") or uid(js) in self.services:
            return
        svc_name = subdomain(js, spec)
        if await self.core.api.get(f"{SERVICES.collection(namespace(js))}/{svc_name}") is None:
            await self.core.create(SERVICES, {
                "metadata": {"name": svc_name, "namespace": namespace(js),
                             "ownerReferences": [owner_reference(js, JOBSETS)]},
                "spec": {"clusterIP": "None", "selector": {JOBSET_NAME: name(js)},
                         "publishNotReadyAddresses": bool(spec["network"].get("publishNotReadyAddresses", True))},
            })  # fmt: skip
        self.services.add(uid(js))

    def _delete(self, jobs: list[JSON]) -> None:
        for job in jobs:
            self.jobs.begin_delete(job)

    async def _write(self, r: Reconcile) -> None:
        if r.status != (r.js.get("status") or {}):
            await self.core.patch_status(JOBSETS, r.js, r.status)
            r.js["status"] = r.status
        for event_type, reason, message in r.events:
            await self.core.event(JOBSETS, r.js, event_type, reason, message, SOURCE)

    async def _ttl(self, js: JSON, r: Reconcile) -> None:
        """ttlSecondsAfterFinished: the JobSet is deleted that long after it finished (its Jobs go with it)."""
        ttl = r.spec.get("ttlSecondsAfterFinished")
        finished = condition(r.conditions, "Completed") if is_true(r.conditions, "Completed") else condition(
            r.conditions, "Failed")
        if ttl is None or finished is None or not finished.get("lastTransitionTime"):
            return
        if time.time() - parse_time(str(finished["lastTransitionTime"])).timestamp() >= float(ttl):
            await self.core.delete(JOBSETS, js)
