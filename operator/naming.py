"""Deterministic names and labels of everything the operator creates for a FineTuneJob.

Names are pure functions of the FineTuneJob's name (and the training run number), so a restarted
operator finds what an earlier one created instead of creating it twice. Every name stays a valid
DNS label: the trainer pods' hostnames are `<job>-<index>`, so the Job name leaves room for that.
"""

from __future__ import annotations

import hashlib

MANAGER = "finetune-operator"
APP = "finetune"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "finetune.dev/run"
ANNOTATION_HASH = "finetune.dev/manifest-hash"
ANNOTATION_TRAINING_HASH = "finetune.dev/training-hash"
ANNOTATION_MODEL = "finetune.dev/model-path"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"

TRAINER = "trainer"
SERVER = "server"

DNS_LABEL_MAX = 63
# JobSet names pods `<jobset>-node-0-<index>-<random 5>` (hostname without the suffix), and its webhook
# rejects a JobSet whose longest pod name would pass 63 characters; keep room for a 4-digit index.
JOB_NAME_MAX = 45


def _fit(base: str, suffix: str, limit: int) -> str:
    """`base + suffix` cut to `limit` characters; a cut base gets a short hash so names stay unique."""
    name = f"{base}{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def trainer_name(job: str, run: int) -> str:
    """The trainer JobSet (and so its headless Service) and the spec ConfigMap of one training run."""
    return _fit(job, f"-train-{run}", JOB_NAME_MAX)


def trainer_rbac_name(job: str) -> str:
    """ServiceAccount, Role and RoleBinding that let the trainer patch its FineTuneJob's status."""
    return _fit(job, "-trainer", DNS_LABEL_MAX)


def server_name(job: str) -> str:
    """Deployment, Service, HPA, PDB and ServiceMonitor of the inference server."""
    return _fit(job, "-server", DNS_LABEL_MAX)


def labels(job: str, component: str) -> dict[str, str]:
    """The recommended labels every child carries."""
    return {
        LABEL_NAME: APP,
        LABEL_INSTANCE: job,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGER,
    }


def run_labels(job: str, run: int) -> dict[str, str]:
    """Labels of one training run's objects and pods (selects the run's pods for the headless Service)."""
    return {**labels(job, TRAINER), LABEL_RUN: str(run)}
