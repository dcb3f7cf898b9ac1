"""One level-triggered reconcile of a FineTuneJob: look at the object and its children, take the next
step, write the status. Every kopf handler (create, update, resume, and the trainer-Job and Deployment
events) ends here, so a restarted operator simply reconciles again and finds what exists.

The steps, in order: validate the spec; start a training run when none matches the spec's training
fields; follow the trainer Job; read the rank-0 result; apply the quality gate; roll out the server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

from finetune.operator import builders, diagnosis, k8s, naming, observe, phases
from finetune.operator.config import OperatorConfig
from finetune.operator.gate import evaluate_gate
from finetune.operator.metrics import TRAINER_RUNS, PhaseCounts
from finetune.operator.serving import endpoint_url, min_replicas
from finetune.operator.validation import validate_job
from finetune.spec import API_VERSION, PLURAL, FineTuneJob, SpecError
from finetune.status import Condition, FineTuneJobStatus, Trainer

log = logging.getLogger(__name__)
JSON = dict[str, Any]
# Kueue's Workload API, newest first: the first one served is read for Kueue's admission message.
KUEUE_VERSIONS = ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1")


@dataclass(frozen=True)
class Wait:
    """Nothing is wrong, but something is not there yet: look again after `delay` seconds."""

    delay: float
    reason: str


def ftj_path(namespace: str, name: str) -> str:
    return f"{k8s.collection_path(API_VERSION, PLURAL, namespace)}/{name}"


class Reconciler:
    """Reconciles FineTuneJobs; one per operator, shared by all handlers (one lock per object)."""

    def __init__(self, api: k8s.Api, config: OperatorConfig, counts: PhaseCounts) -> None:
        self.api = api
        self.config = config
        self.counts = counts
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def event(self, body: JSON, type_: str, reason: str, message: str) -> None:
        """Post a Kubernetes Event on the FineTuneJob (`kubectl describe ftj` shows it); never fatal."""
        meta = body["metadata"]
        event = phases.event_manifest(body, type_, reason, message, self.config.instance)
        try:
            await self.api.create(event)
        except k8s.ApiError as err:
            log.warning("cannot post the %s event of %s/%s: %s", reason, meta["namespace"], meta["name"], err)

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self.counts.set(namespace, name, None)

    async def reconcile(self, namespace: str, name: str, seen_pods: tuple[JSON, ...] = ()) -> Wait | None:
        """Reconcile the current state of one FineTuneJob (fetched fresh, under its lock).

        `seen_pods`: trainer pods a watch event just delivered; a failed pod may already be deleted
        (a gang restart removes its pods), and its failure must still be recorded.
        """
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            body = await self.api.get(ftj_path(namespace, name))
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return None
            return await _Step(self, body, list(seen_pods)).run()


class _Step:
    """The state of one reconcile pass: the object, its typed status, and how to write it."""

    def __init__(self, owner: Reconciler, body: JSON, seen_pods: list[JSON]) -> None:
        self.r = owner
        self.api = owner.api
        self.body = body
        self.seen_pods = seen_pods
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.generation: int | None = meta.get("generation")
        self.status: FineTuneJobStatus = phases.read_status(body.get("status"))
        self.r.counts.set(self.namespace, self.name, self.status.phase)

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, **fields: Any) -> None:
        """Patch the status with `fields` (skipped when nothing changes); one Event per phase change."""
        phase = str(fields.get("phase", self.status.phase))
        if "phase" in fields:
            fields.setdefault("reason", None)  # a reason belongs to the phase it was written with
            ready = phase in ("Serving", "Succeeded")
            conds = fields.get("conditions", self.status.conditions)
            conds = phases.with_condition(
                conds, phases.READY, "True" if ready else "False", phase, fields.get("message") or "", self.generation
            )
            fields["conditions"] = phases.with_condition(
                conds, phases.SERVING, "True" if phase == "Serving" else "False", phase, "", self.generation
            )
        fields.setdefault("observed_generation", self.generation)
        new = self.status.model_copy(update=fields)
        if new.model_dump() == self.status.model_dump():
            return
        await self.api.merge_patch(ftj_path(self.namespace, self.name) + "/status", phases.status_patch(**fields))
        old_phase, self.status = self.status.phase, new
        self.r.counts.set(self.namespace, self.name, new.phase)
        if new.phase != old_phase and new.phase is not None:
            await self.r.event(self.body, phases.event_type(new.phase), new.phase, new.message or new.phase)

    def conditions(
        self, type_: str, status: Literal["True", "False", "Unknown"], reason: str, message: str = ""
    ) -> list[Condition]:
        return phases.with_condition(self.status.conditions, type_, status, reason, message, self.generation)

    # -- the pass --------------------------------------------------------------------------------

    async def run(self) -> Wait | None:
        try:
            job = validate_job(self.body)
        except SpecError as err:
            await self.write(
                phase="Failed",
                reason="InvalidSpec",
                message=f"invalid spec: {err}",
                conditions=self.conditions(phases.SPEC_VALID, "False", "InvalidSpec", str(err)),
                completion_time=self.status.completion_time or phases.now(),
            )
            raise
        if not phases.condition_is(self.status, phases.SPEC_VALID, "True"):
            stale = (self.status.message or "").startswith("invalid spec")
            await self.write(
                conditions=self.conditions(phases.SPEC_VALID, "True", "Valid"),
                message=None if stale else self.status.message,
            )
        run = self.status.trainer.run if self.status.trainer else 0
        config_map = await self.api.get(self.trainer_path("v1", "configmaps", run)) if run else None
        wanted = builders.training_hash(job.spec)
        recorded = ((config_map or {}).get("metadata", {}).get("annotations") or {}).get(
            naming.ANNOTATION_TRAINING_HASH
        )
        if run == 0 or (config_map is not None and recorded != wanted):
            return await self.start_run(job, run + 1, previous=run)
        trained = phases.find_condition(self.status, phases.TRAINED)
        if trained is None or trained.status == "Unknown":
            if config_map is None:  # the run's objects are gone before it finished: create them again
                return await self.start_run(job, run, previous=run)
            followed = await self.follow_trainer(job, run)
            if followed is not True:
                return followed or None
        trained = phases.find_condition(self.status, phases.TRAINED)
        if trained is not None and trained.status == "False":
            await self.write(phase="Failed", reason=trained.reason, message=trained.message)
            return None
        promoted = phases.find_condition(self.status, phases.PROMOTED)
        if promoted is None or promoted.status == "Unknown":
            await self.gate(job)
        return await self.serve(job)

    def trainer_path(self, api_version: str, plural: str, run: int) -> str:
        name = naming.trainer_name(self.name, run)
        return f"{k8s.collection_path(api_version, plural, self.namespace)}/{name}"

    # -- training --------------------------------------------------------------------------------

    async def start_run(self, job: FineTuneJob, run: int, previous: int) -> Wait | None:
        """Create run `run`'s objects (idempotent), record it, then drop the previous run's trainer."""
        missing = await self.missing_prerequisite(job)
        if missing is not None:
            return missing
        jobset = builders.build_trainer_jobset(job, uid=self.uid, run=run, image=self.r.config.image)
        try:
            probe = await self.api.create(jobset, dry_run=True)
        except k8s.ApiError as err:
            if err.status not in (400, 422):
                raise
            # Refused for what the spec says (JobSet's webhook, a policy engine): a retry would meet the
            # same answer, so say it once; the next edit of the spec tries again.
            message = f"the API server refused the trainer JobSet: {err.body_message()}; change the spec"
            await self.write(
                phase="Failed",
                reason="TrainerRefused",
                message=message,
                conditions=self.conditions(phases.TRAINED, "False", "TrainerRefused", message),
                completion_time=phases.now(),
            )
            return None
        if not builders.failure_rules_kept(probe):
            return await self.pending(phases.JOBSET_AVAILABLE, "JobSetTooOld", diagnosis.jobset_too_old_message())
        conditions = self.conditions("VolumeFound", "True", "ClaimFound")
        conditions = phases.with_condition(
            conditions, phases.JOBSET_AVAILABLE, "True", "JobSetServed", "", self.generation
        )
        for obj in builders.build_trainer_rbac(job, uid=self.uid):
            await self.api.create(obj)
        await self.api.create(builders.build_spec_configmap(job, uid=self.uid, run=run))
        trainer = await self.api.create(jobset)
        for type_ in (phases.TRAINED, phases.PROMOTED):
            conditions = phases.with_condition(conditions, type_, "Unknown", "NewRun", f"run {run}", self.generation)
        # One status write records the new run and forgets the previous run's results; it happens only
        # after the run's objects exist, so a crash before it just repeats the (idempotent) creation.
        fields: dict[str, Any] = {
            "model_path": None,
            "metrics": {},
            "headline_metric": None,
            "training": None,
            "progress": None,
            "start_time": None,
            "completion_time": None,
        }
        state = observe.trainer_state(trainer)
        fields.update(self.trainer_fields(job, state, self.trainer_record(job, state, run, []), [], conditions))
        if fields["phase"] == "Training":
            fields["start_time"] = phases.now()  # not the previous run's
        await self.write(**fields)
        if previous and previous != run:
            for plural, version in (("jobsets", builders.JOBSET_API_VERSION), ("configmaps", "v1")):
                await self.api.delete(self.trainer_path(version, plural, previous))
        return None

    async def missing_prerequisite(self, job: FineTuneJob) -> Wait | None:
        """Pending, with what to do, while the claim or the JobSet API is missing: nothing is created."""
        claim = job.spec.storage.claim_name
        pvc = await self.api.get(f"{k8s.collection_path('v1', 'persistentvolumeclaims', self.namespace)}/{claim}")
        if pvc is None:
            message = (
                f"PersistentVolumeClaim {claim!r} not found in namespace {self.namespace!r}: create it "
                "(it holds the data and receives the model) or fix spec.storage.claimName"
            )
            return await self.pending("VolumeFound", "ClaimNotFound", message)
        if not await self.api.served(builders.JOBSET_API_VERSION):
            return await self.pending(phases.JOBSET_AVAILABLE, "JobSetMissing", diagnosis.jobset_missing_message())
        return None

    async def pending(self, condition: str, reason: str, message: str) -> Wait:
        """Pending for a missing prerequisite: the condition False with what to do; look again later."""
        await self.write(
            phase="Pending",
            reason=reason,
            message=message,
            conditions=self.conditions(condition, "False", reason, message),
        )
        return Wait(self.r.config.retry_delay, message)

    def trainer_fields(
        self,
        job: FineTuneJob,
        state: observe.TrainerState,
        trainer: Trainer,
        pods: list[JSON],
        conditions: list[Condition],
        kueue: str | None = None,
    ) -> dict[str, Any]:
        """Status fields of a queued, pending or running trainer (`trainer`: its record, `trainer_record`)."""
        run = trainer.run
        queue = job.spec.scheduling.queue_name
        fields: dict[str, Any] = {"trainer": trainer, "conditions": conditions}
        if state.phase == "queued":
            # Without a queue name, Kueue (manageJobsWithoutQueueName) or someone else suspended it.
            message = "waiting for Kueue to admit the trainer" + (f" (LocalQueue {queue!r})" if queue else "")
            message += f": {kueue}" if kueue else ""
            fields.update(phase="Queued", reason="Queued", message=message)
            fields["conditions"] = phases.with_condition(
                conditions, phases.ADMITTED, "False", "Queued", message, self.generation
            )
            return fields
        if queue:
            fields["conditions"] = phases.with_condition(
                conditions, phases.ADMITTED, "True", "Admitted", f"LocalQueue {queue!r}", self.generation
            )
        problem = diagnosis.pod_problem(pods, state.restarts)
        if problem is not None:
            message = f"run {run} cannot start: {problem.message}"
            fields.update(phase="Pending", reason=problem.reason, message=message)
            return fields
        message = f"training run {run} on {job.spec.resources.nodes} node(s)"
        if state.restarts:
            message += "; " + diagnosis.restart_note(
                state.restarts, state.restarts_counted, trainer.restart_budget, trainer.failures
            )
        fields.update(phase="Training", reason="Restarted" if state.restarts else "Running", message=message)
        fields["start_time"] = self.status.start_time or phases.now()
        return fields

    def trainer_record(self, job: FineTuneJob, state: observe.TrainerState, run: int, pods: list[JSON]) -> Trainer:
        """status.trainer: pod counts of the current attempt, restarts, and the first failure of each."""
        known = self.status.trainer.failures if self.status.trainer and self.status.trainer.run == run else []
        current = [p for p in pods if observe.attempt_of(p) == state.restarts]
        phase_of = [(p.get("status") or {}).get("phase") for p in current]
        return Trainer(
            job_set_name=naming.trainer_name(self.name, run),
            run=run,
            active=sum(ph in ("Pending", "Running") for ph in phase_of),
            succeeded=phase_of.count("Succeeded"),
            failed=sum(diagnosis.failed(p) for p in current),
            restarts=state.restarts,
            restarts_counted=state.restarts_counted,
            restart_budget=job.spec.scheduling.backoff_limit,
            failures=diagnosis.merge_failures(known, pods),
        )

    async def trainer_pods(self, run: int, seen: list[JSON]) -> list[JSON]:
        """The run's pods now, plus any a pod event just showed (it may be deleted already)."""
        pods = await self.api.list(k8s.collection_path("v1", "pods", self.namespace), naming.run_labels(self.name, run))
        names = {(p.get("metadata") or {}).get("name") for p in pods}
        mine = [p for p in seen if k8s.has_labels(p, naming.run_labels(self.name, run))]
        return pods + [p for p in mine if (p.get("metadata") or {}).get("name") not in names]

    async def kueue_message(self, jobset: str) -> str | None:
        for version in KUEUE_VERSIONS:
            if await self.api.served(version):
                workloads = await self.api.list(k8s.collection_path(version, "workloads", self.namespace))
                return diagnosis.kueue_message(workloads, jobset)
        return None

    async def follow_trainer(self, job: FineTuneJob, run: int) -> bool | Wait:
        """Mirror the trainer JobSet; True once it succeeded and its result is recorded."""
        jobset = await self.api.get(self.trainer_path(builders.JOBSET_API_VERSION, "jobsets", run))
        if jobset is None:
            message = (
                f"trainer JobSet {naming.trainer_name(self.name, run)} disappeared before it finished "
                "(deleted by hand?); change a training field or re-create the FineTuneJob to train again"
            )
            await self.write(
                phase="Failed",
                reason="TrainerGone",
                message=message,
                conditions=self.conditions(phases.TRAINED, "False", "TrainerGone", message),
                completion_time=phases.now(),
            )
            TRAINER_RUNS.labels(outcome="failed").inc()
            return False
        state = observe.trainer_state(jobset)
        pods = await self.trainer_pods(run, self.seen_pods)
        record = self.trainer_record(job, state, run, pods)
        disruptions = state.restarts - state.restarts_counted
        if state.phase == "running" and disruptions > job.spec.scheduling.max_disruptions:
            # JobSet never stops restarting after disruptions; past the limit the run stops here.
            await self.api.delete(self.trainer_path(builders.JOBSET_API_VERSION, "jobsets", run))
            message = (
                f"the trainer was disrupted {disruptions} times (preemption, eviction, drain), more than "
                f"scheduling.maxDisruptions ({job.spec.scheduling.max_disruptions}) allows; the run is stopped so "
                "that it does not hold its nodes forever. Find out why its pods are evicted (memory limits, node "
                "pressure, priorities) and apply again"
            )
            await self.fail_training(record, "DisruptionLimitExceeded", message)
            return False
        if state.phase in ("queued", "running"):
            kueue = await self.kueue_message(jobset["metadata"]["name"]) if state.phase == "queued" else None
            await self.note_restart(record, run)
            await self.write(**self.trainer_fields(job, state, record, pods, self.status.conditions, kueue))
            return Wait(self.r.config.retry_delay, "queued") if state.phase == "queued" else False
        if state.phase == "failed":
            jobs = await self.api.list(
                k8s.collection_path("batch/v1", "jobs", self.namespace),
                {naming.JOBSET_NAME_LABEL: jobset["metadata"]["name"]},
            )
            reason, message = diagnosis.failed_message(
                state, record.failures, record.restart_budget, jobset["metadata"]["name"],
                diagnosis.job_failure_reason(jobs),
            )
            await self.fail_training(record, reason, message)
            return False
        result = observe.trainer_result(pods)
        if isinstance(result, str):
            await self.fail_training(record, "NoResult", result)
            return False
        headline = result.headline_metric or job.spec.headline_metric
        value = result.metrics.get(headline)
        await self.write(
            phase="Evaluating",
            reason="TrainerSucceeded",
            message=f"run {run} finished on {result.world_size} process(es); checking the quality gate",
            trainer=record,
            model_path=result.model_path,
            metrics=result.metrics,
            headline_metric=f"{headline}={value:.4g}" if value is not None else None,
            conditions=self.conditions(phases.TRAINED, "True", "TrainerSucceeded", result.model_path),
        )
        return True

    async def note_restart(self, record: Trainer, run: int) -> None:
        """A Warning Event per gang restart, naming the pod that failed first and why."""
        before = self.status.trainer.restarts if self.status.trainer and self.status.trainer.run == run else 0
        if record.restarts <= before:
            return
        note = diagnosis.restart_note(record.restarts, record.restarts_counted, record.restart_budget, record.failures)
        await self.r.event(self.body, "Warning", "TrainerRestarted", f"run {run}: {note}")

    async def fail_training(self, counts: Trainer, reason: str, message: str) -> None:
        await self.write(
            phase="Failed",
            reason=reason,
            message=message,
            trainer=counts,
            conditions=self.conditions(phases.TRAINED, "False", reason, message),
            completion_time=phases.now(),
        )
        TRAINER_RUNS.labels(outcome="failed").inc()

    # -- gate and serving ------------------------------------------------------------------------

    async def gate(self, job: FineTuneJob) -> None:
        headline = (self.status.headline_metric or "").split("=")[0] or job.spec.headline_metric
        serving = self.status.serving_metrics if self.status.serving_model_path else None
        if self.status.serving_model_path == self.status.model_path:
            serving = None  # re-gating the model that already serves: nothing to beat but itself
        decision = evaluate_gate(job.spec.promotion, headline, self.status.metrics, serving)
        if decision.ok:
            conditions = self.conditions(phases.PROMOTED, "True", "GatePassed", decision.reason)
            await self.write(conditions=conditions)
            TRAINER_RUNS.labels(outcome="succeeded").inc()
            return
        message = f"quality gate failed: {decision.reason}"
        if self.status.serving_model_path:
            message += f"; still serving {self.status.serving_model_path}"
        await self.write(
            phase="Rejected",
            reason="GateFailed",
            message=message,
            conditions=self.conditions(phases.PROMOTED, "False", "GateFailed", decision.reason),
            completion_time=phases.now(),
        )
        TRAINER_RUNS.labels(outcome="rejected").inc()

    async def serve(self, job: FineTuneJob) -> Wait | None:
        promoted = phases.condition_is(self.status, phases.PROMOTED, "True")
        target = self.status.model_path if promoted else self.status.serving_model_path
        if not job.spec.serving.enabled or target is None:
            if promoted or self.status.endpoint:
                await self.remove_serving()
            if promoted:
                await self.write(
                    phase="Succeeded",
                    message=f"model exported to {target}; serving is disabled",
                    serving_model_path=None,
                    serving_metrics={},
                    endpoint=None,
                    completion_time=self.status.completion_time or phases.now(),
                )
            return None
        image = self.r.config.image
        deployment = await self.ensure(
            builders.build_serving_deployment(job, uid=self.uid, model_path=target, image=image)
        )
        await self.ensure(builders.build_serving_service(job, uid=self.uid))
        await self.ensure(builders.build_pdb(job, uid=self.uid))
        await self.ensure_optional("autoscaling/v2", "horizontalpodautoscalers", builders.build_hpa(job, uid=self.uid))
        message = await self.ensure_monitor(job)
        if not promoted:
            return None  # Rejected: the previous model keeps serving, now with the current serving spec
        rolled = observe.deployment_ready(deployment, min_replicas(job.spec.serving))
        serving_now = (deployment.get("metadata", {}).get("annotations") or {}).get(naming.ANNOTATION_MODEL)
        if rolled and serving_now == target:
            await self.write(
                phase="Serving",
                message=f"serving {target}" + (f"; {message}" if message else ""),
                serving_model_path=target,
                serving_metrics=self.status.metrics,
                endpoint=endpoint_url(job),
                completion_time=self.status.completion_time
                if self.status.phase == "Serving"
                else phases.now(),
            )
            return None
        problem = observe.rollout_problem(deployment)
        message = f"rolling out {target}"
        if problem:
            name = deployment["metadata"]["name"]
            message += f"; the rollout is stuck ({problem}); see `kubectl describe deployment {name}`"
        await self.write(phase="Deploying", reason="RolloutStuck" if problem else "RollingOut", message=message)
        return None

    async def ensure(self, obj: JSON) -> JSON:
        """Create `obj`, or update it when its content hash changed (server-side apply)."""
        builders.stamp_hash(obj)
        existing = await self.api.get(k8s.object_path(obj))
        if existing is None:
            return await self.api.create(obj)
        have = (existing.get("metadata", {}).get("annotations") or {}).get(naming.ANNOTATION_HASH)
        if have == obj["metadata"]["annotations"][naming.ANNOTATION_HASH]:
            return existing
        return await self.api.apply(obj)

    async def ensure_optional(self, api_version: str, plural: str, obj: JSON | None) -> None:
        if obj is not None:
            await self.ensure(obj)
        else:
            path = k8s.collection_path(api_version, plural, self.namespace)
            await self.api.delete(f"{path}/{naming.server_name(self.name)}")

    async def ensure_monitor(self, job: FineTuneJob) -> str:
        monitor = builders.build_service_monitor(job, uid=self.uid)
        if monitor is None:
            return ""
        if not await self.api.served("monitoring.coreos.com/v1"):
            return "monitoring.serviceMonitor is true but the ServiceMonitor CRD (Prometheus Operator) is missing"
        await self.ensure(monitor)
        return ""

    async def remove_serving(self) -> None:
        server = naming.server_name(self.name)
        for version, plural in (
            ("apps/v1", "deployments"),
            ("v1", "services"),
            ("policy/v1", "poddisruptionbudgets"),
            ("autoscaling/v2", "horizontalpodautoscalers"),
            ("monitoring.coreos.com/v1", "servicemonitors"),
        ):
            await self.api.delete(f"{k8s.collection_path(version, plural, self.namespace)}/{server}")
