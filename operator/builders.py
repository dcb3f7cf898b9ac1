"""Pure builders: a typed FineTuneJob in, the trainer's Kubernetes manifests (plain dicts) out.

Nothing here talks to the cluster; `tests/unit/operator` checks every object against the Kubernetes
schemas. The serving side lives in `finetune.operator.serving` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import yaml

from finetune import spec as api
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
    "build_headless_service",
    "build_hpa",
    "build_pdb",
    "build_service_monitor",
    "build_serving_deployment",
    "build_serving_service",
    "build_spec_configmap",
    "build_trainer_job",
    "build_trainer_rbac",
    "output_dir",
    "owner_reference",
    "stamp_hash",
    "training_hash",
]

RENDEZVOUS_PORT = 29500
TRAINER_METRICS_PORT = 9090
JOB_FILE_DIR = "/etc/finetune"
JOB_FILE = f"{JOB_FILE_DIR}/job.yaml"
# podFailurePolicy: the trainer exits 2 for a bad spec or bad data, which no retry can fix.
NON_RETRYABLE_EXIT_CODE = 2
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


def build_headless_service(job: api.FineTuneJob, *, uid: str, run: int) -> JSON:
    """Gives pod 0 the stable DNS name `<job>-0.<job>` that every rank dials for the rendezvous."""
    name = naming.trainer_name(job.metadata.name, run)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, name, uid, naming.run_labels(job.metadata.name, run)),
        "spec": {
            "clusterIP": "None",
            # Ranks resolve pod 0 before any of them is "ready": there is no readiness probe to pass.
            "publishNotReadyAddresses": True,
            "selector": naming.run_labels(job.metadata.name, run),
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
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


def accelerate_command(job: api.FineTuneJob, run: int) -> list[str]:
    """`accelerate launch` for one pod: rank from the Indexed Job, pod 0 as the main process."""
    res = job.spec.resources
    name = naming.trainer_name(job.metadata.name, run)
    processes = res.nodes * max(res.gpus_per_node, 1)
    cmd = [
        "accelerate", "launch",
        "--num_machines", str(res.nodes),
        "--machine_rank", "$(JOB_COMPLETION_INDEX)",
        "--main_process_ip", f"{name}-0.{name}",
        "--main_process_port", str(RENDEZVOUS_PORT),
        "--num_processes", str(processes),
    ]  # fmt: skip
    if res.gpus_per_node == 0:
        cmd.append("--cpu")
    elif processes > 1:
        cmd.append("--multi_gpu")
    cmd += ["-m", "finetune.trainer.entry", "--job", JOB_FILE, "--output", output_dir(job, run)]
    return cmd


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


def _trainer_pod(job: api.FineTuneJob, run: int, image: str) -> JSON:
    spec = job.spec
    res = spec.resources
    name = naming.trainer_name(job.metadata.name, run)
    container: JSON = {
        "name": CONTAINER,
        "image": image,
        "command": accelerate_command(job, run),
        "env": [
            {"name": "FINETUNE_JOB_NAME", "value": job.metadata.name},
            {"name": "FINETUNE_JOB_NAMESPACE", "value": job.metadata.namespace},
            {"name": "FINETUNE_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
            {"name": "HF_HOME", "value": f"{WORKSPACE}/.cache/huggingface"},
            # The root filesystem is read-only; libraries that cache under $HOME write to /tmp.
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
            {"name": "metrics", "containerPort": TRAINER_METRICS_PORT},
        ],
        "resources": _resources(res),
        "volumeMounts": [
            {"name": "job-spec", "mountPath": JOB_FILE_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKSPACE},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": "/dev/termination-log",
        # The trainer writes its result summary there; a crash without one shows its last log lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    pod: JSON = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job controller does the retries
        "subdomain": name,
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


def build_trainer_job(job: api.FineTuneJob, *, uid: str, run: int, image: str = DEFAULT_IMAGE) -> JSON:
    """The trainer: an Indexed batch/v1 Job with one pod per node.

    Disruptions (preemption, drain, eviction) are ignored by the retry count and the retried pod
    resumes from the run's checkpoints (same output directory); exit code 2 fails the Job at once.
    With a Kueue queue the Job starts suspended and Kueue unsuspends it when quota admits it.
    """
    spec = job.spec
    name = naming.trainer_name(job.metadata.name, run)
    labels = naming.run_labels(job.metadata.name, run)
    meta = metadata(job, name, uid, labels)
    meta["annotations"] = {naming.ANNOTATION_TRAINING_HASH: training_hash(spec)}
    if spec.scheduling.queue_name:
        meta["labels"][naming.KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    job_spec: JSON = {
        "completionMode": "Indexed",
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        "backoffLimit": spec.scheduling.backoff_limit,
        "suspend": bool(spec.scheduling.queue_name),
        "podFailurePolicy": {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [NON_RETRYABLE_EXIT_CODE],
                    },
                },
            ]
        },
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
    if spec.scheduling.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.scheduling.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
