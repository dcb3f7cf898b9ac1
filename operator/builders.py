"""Pure builders: a typed FineTuneJob in, the trainer's Kubernetes manifests (plain dicts) out.

Nothing here talks to the cluster; `tests/unit/operator` checks every object against the Kubernetes
schemas (and the JobSet against JobSet's own typed models). The serving side lives in
`finetune.operator.serving` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import yaml

from finetune import spec as api
from finetune.contracts import EXIT_PERMANENT
from finetune.operator import naming
from finetune.operator.objects import (
    DEFAULT_IMAGE,
    JSON,
    container_security_context,
    metadata,
    owner_reference,
    pod_security_context,
    stamp_hash,
)
from finetune.operator.serving import (
    build_hpa,
    build_pdb,
    build_service_monitor,
    build_serving_deployment,
    build_serving_service,
)
from finetune.operator.validation import WORKSPACE

__all__ = [
    "build_hpa",
    "build_pdb",
    "build_service_monitor",
    "build_serving_deployment",
    "build_serving_service",
    "build_spec_configmap",
    "build_trainer_jobset",
    "build_trainer_rbac",
    "output_dir",
    "owner_reference",
    "stamp_hash",
    "training_hash",
]

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
# The oldest JobSet release whose failure policy has `onJobFailureMessagePatterns`, which is what tells a
# Job failed by the disruption rule of its podFailurePolicy from one failed by the exit-code-2 rule.
JOBSET_MIN_VERSION = "v0.10.0"
JOBSET_INSTALL = (
    "kubectl apply --server-side -f "
    "https://github.com/kubernetes-sigs/jobset/releases/download/v0.10.1/manifests.yaml"
)
REPLICATED_JOB = "node"
RULE_PERMANENT = "TrainerPermanentError"
RULE_DISRUPTION = "PodDisruption"
RULE_DEADLINE = "ActiveDeadline"
RENDEZVOUS_PORT = 29500
TRAINER_METRICS_PORT = 9090
JOB_FILE_DIR = "/etc/finetune"
JOB_FILE = f"{JOB_FILE_DIR}/job.yaml"
TERMINATION_LOG = "/dev/termination-log"
CONTAINER = "trainer"


def training_hash(spec: api.FineTuneJobSpec) -> str:
    """Hash of the fields that shape the model; when it changes, a new training run starts.

    Serving, promotion and monitoring edits never retrain. Resources and scheduling edits apply to the
    next run: restarting a long training run because a toleration changed would waste it.
    """
    fields = {"task", "model", "dataset", "training", "evaluation", "export", "storage", "image"}
    data = spec.model_dump(mode="json", by_alias=True, include=fields)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def output_dir(job: api.FineTuneJob, run: int) -> str:
    """Where run `run` writes checkpoints and the exported model (stable across pod retries)."""
    if job.spec.storage.output_path:
        return posixpath.normpath(job.spec.storage.output_path)
    return f"{WORKSPACE}/{job.metadata.name}/run-{run}"


def build_spec_configmap(job: api.FineTuneJob, *, uid: str, run: int) -> JSON:
    """The whole FineTuneJob as `job.yaml`, mounted into every trainer pod at /etc/finetune."""
    doc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    name = naming.trainer_name(job.metadata.name, run)
    meta = metadata(job, name, uid, naming.run_labels(job.metadata.name, run))
    meta["annotations"] = {naming.ANNOTATION_TRAINING_HASH: training_hash(job.spec)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"job.yaml": yaml.safe_dump(doc, sort_keys=False)},
    }


def build_trainer_rbac(job: api.FineTuneJob, *, uid: str) -> list[JSON]:
    """ServiceAccount, Role and RoleBinding: the trainer may get and patch its own FineTuneJob's status.

    `resourceNames` pins the Role to this one object; the trainer can read nothing else and cannot
    touch the spec. A spec that names its own ServiceAccount gets the binding but no new account.
    """
    name = naming.trainer_rbac_name(job.metadata.name)
    labels = naming.labels(job.metadata.name, naming.TRAINER)
    account = job.spec.resources.service_account_name or name
    objs: list[JSON] = []
    if not job.spec.resources.service_account_name:
        objs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(job, name, uid, labels)})
    objs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(job, name, uid, labels),
            "rules": [
                {
                    "apiGroups": [api.GROUP],
                    "resources": [f"{api.PLURAL}/status"],
                    "resourceNames": [job.metadata.name],
                    "verbs": ["get", "patch"],
                }
            ],
        }
    )
    objs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(job, name, uid, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": job.metadata.namespace}],
        }
    )
    return objs


def rendezvous_host(job: api.FineTuneJob, run: int) -> str:
    """Pod 0 of the gang through the JobSet's headless Service: `<pod hostname>.<subdomain>`."""
    name = naming.trainer_name(job.metadata.name, run)
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def trainer_command(job: api.FineTuneJob, run: int) -> list[str]:
    """`finetune train` for one pod: node rank from the Indexed Job, pod 0 as the rendezvous host.

    The same command as on a laptop; with `--nodes` it starts torch's launcher, which forms one world of
    nodes x processes (gloo on CPUs, NCCL on GPUs), and exits with the trainer's own exit code.
    """
    res = job.spec.resources
    return [
        "finetune", "train",
        "-f", JOB_FILE,
        "--output", output_dir(job, run),
        "--nodes", str(res.nodes),
        "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--processes", str(max(res.gpus_per_node, 1)),
        "--rendezvous", "$(FINETUNE_RENDEZVOUS_HOST):$(FINETUNE_RENDEZVOUS_PORT)",
        "--termination-log", TERMINATION_LOG,
    ]  # fmt: skip


def _resources(res: api.Resources) -> JSON:
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(res.gpus_per_node)
    # Requests equal limits: a trainer pod that bursts past its request is the first one evicted.
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _trainer_env(job: api.FineTuneJob, run: int) -> list[JSON]:
    return [
        {"name": "FINETUNE_JOB_NAME", "value": job.metadata.name},
        {"name": "FINETUNE_JOB_NAMESPACE", "value": job.metadata.namespace},
        {"name": "FINETUNE_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
        {"name": "FINETUNE_RENDEZVOUS_HOST", "value": rendezvous_host(job, run)},
        {"name": "FINETUNE_RENDEZVOUS_PORT", "value": str(RENDEZVOUS_PORT)},
        # The pod's CPU limit (whole cores, rounded up; the node's cores without a limit): the trainer
        # sizes its threads by it, not by the node's core count.
        {
            "name": "FINETUNE_CPUS",
            "valueFrom": {"resourceFieldRef": {"containerName": CONTAINER, "resource": "limits.cpu", "divisor": "1"}},
        },
        {"name": "HF_HOME", "value": f"{WORKSPACE}/.cache/huggingface"},
        # The root filesystem is read-only; libraries that cache under $HOME write to /tmp.
        {"name": "HOME", "value": "/tmp"},
    ]


def _trainer_pod(job: api.FineTuneJob, run: int, image: str) -> JSON:
    spec = job.spec
    res = spec.resources
    name = naming.trainer_name(job.metadata.name, run)
    container: JSON = {
        "name": CONTAINER,
        "image": image,
        "command": trainer_command(job, run),
        "env": _trainer_env(job, run),
        "ports": [
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(res),
        "volumeMounts": [
            {"name": "job-spec", "mountPath": JOB_FILE_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKSPACE},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        # The launcher writes the trainer's result or its one-line error there; a pod killed before it
        # could (out of memory, SIGKILL) still leaves its last log lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    pod: JSON = {
        # Never: a failed pod fails its Job at once (backoffLimit 0) and the JobSet restarts the gang.
        "restartPolicy": "Never",
        "serviceAccountName": spec.resources.service_account_name or naming.trainer_rbac_name(job.metadata.name),
        "automountServiceAccountToken": True,  # the token patches the FineTuneJob's status
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "job-spec", "configMap": {"name": name}},
            {"name": "workspace", "persistentVolumeClaim": {"claimName": spec.storage.claim_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [dict(t) for t in res.tolerations]
    if res.affinity:
        pod["affinity"] = dict(res.affinity)
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    return pod


def _pod_failure_policy() -> JSON:
    """Each rule makes the Job fail at once with a message the JobSet's rules below tell apart."""
    return {
        "rules": [
            # Index 0: "Pod <ns>/<pod> has condition DisruptionTarget matching FailJob rule at index 0".
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # Index 1: "Container trainer for pod <ns>/<pod> failed with exit code 2 matching FailJob rule at
            # index 1". Any other failure fails the Job through backoffLimit 0 (BackoffLimitExceeded).
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]},
            },
        ]
    }


def _jobset_failure_policy(scheduling: api.Scheduling) -> JSON:
    """Gang restarts: the first matching rule wins; an unmatched failure restarts and counts."""
    return {
        "maxRestarts": scheduling.backoff_limit,
        "rules": [
            {
                "name": RULE_PERMANENT,
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [f"failed with exit code {EXIT_PERMANENT} matching FailJob rule"],
            },
            {
                "name": RULE_DISRUPTION,
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": ["has condition DisruptionTarget matching FailJob rule"],
            },
            {"name": RULE_DEADLINE, "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
        ],
    }


def failure_rules_kept(stored: JSON) -> bool:
    """Whether the API server kept the failure rules' message patterns. JobSet before v0.10 has no
    `onJobFailureMessagePatterns` in its schema and prunes it, and then the permanent-error rule matches
    every pod-failure-policy failure: each preemption would fail the run."""
    rules = ((stored.get("spec") or {}).get("failurePolicy") or {}).get("rules") or []
    by_name = {r.get("name"): r for r in rules}
    wanted = (RULE_PERMANENT, RULE_DISRUPTION)
    return all((by_name.get(name) or {}).get("onJobFailureMessagePatterns") for name in wanted)


def build_trainer_jobset(job: api.FineTuneJob, *, uid: str, run: int, image: str = DEFAULT_IMAGE) -> JSON:
    """The trainer: a JobSet whose one replicated Job is Indexed, one pod per node, run as a gang.

    Any pod's failure fails its Job at once, and the JobSet's failure policy decides for the whole gang:
    exit code 2 (bad spec or data) fails the JobSet; a disruption (preemption, drain, eviction) restarts
    it without using the budget; anything else restarts it, at most `scheduling.backoffLimit` times.
    Every restart resumes from the run's checkpoints (same output directory). With a Kueue queue the
    JobSet starts suspended and Kueue unsuspends it when quota admits the whole gang.
    """
    spec = job.spec
    name = naming.trainer_name(job.metadata.name, run)
    labels = naming.run_labels(job.metadata.name, run)
    meta = metadata(job, name, uid, labels)
    meta["annotations"] = {naming.ANNOTATION_TRAINING_HASH: training_hash(spec)}
    if spec.scheduling.queue_name:
        meta["labels"][naming.KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    nodes = spec.resources.nodes
    job_spec: JSON = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": _pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": dict(labels),
                "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER},
            },
            "spec": _trainer_pod(job, run, spec.image or image),
        },
    }
    if spec.scheduling.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.scheduling.active_deadline_seconds
    jobset_spec: JSON = {
        "suspend": bool(spec.scheduling.queue_name),
        # Pods resolve `<pod hostname>.<name>` through the JobSet's own headless Service, before they
        # are ready: rank 1 dials rank 0 while both are still starting.
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
        "failurePolicy": _jobset_failure_policy(spec.scheduling),
        "replicatedJobs": [
            {
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"metadata": {"labels": dict(labels)}, "spec": job_spec},
            }
        ],
    }
    if spec.scheduling.ttl_seconds_after_finished is not None:
        jobset_spec["ttlSecondsAfterFinished"] = spec.scheduling.ttl_seconds_after_finished
    return {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet", "metadata": meta, "spec": jobset_spec}
