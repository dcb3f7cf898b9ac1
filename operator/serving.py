"""Pure builders of the inference side: Deployment, Service, HPA, PodDisruptionBudget, ServiceMonitor.

A new model version changes only the Deployment's pod template (`--model` and an annotation), and the
rolling update keeps every old pod serving until a new one is ready (maxUnavailable 0): no gap.
"""

from __future__ import annotations

from finetune import spec as api
from finetune.operator import naming
from finetune.operator.objects import (
    DEFAULT_IMAGE,
    JSON,
    container_security_context,
    metadata,
    pod_security_context,
)
from finetune.server.settings import ServerSettings, graceful_shutdown_seconds

HTTP_PORT = 8080
SERVICE_PORT = 80
WORKSPACE = "/workspace"
# HPA CPU targets are relative to the request, so every server pod requests some CPU.
DEFAULT_CPU_REQUEST = "1"
DEFAULT_MEMORY_REQUEST = "2Gi"
AUTH_DIR = "/etc/finetune-auth"


def autoscaled(serving: api.Serving) -> bool:
    """An HPA owns the replica count when `maxReplicas` is set."""
    return serving.max_replicas is not None


def min_replicas(serving: api.Serving) -> int:
    if autoscaled(serving):
        return max(1, min(serving.replicas, serving.max_replicas or 1))
    return serving.replicas


def feedback_path(job: api.FineTuneJob) -> str:
    return f"{WORKSPACE}/{job.metadata.name}/feedback/feedback.jsonl"


def endpoint_url(job: api.FineTuneJob) -> str:
    """The in-cluster base URL of the inference Service (status.endpoint)."""
    return f"http://{naming.server_name(job.metadata.name)}.{job.metadata.namespace}.svc.cluster.local"


def termination_grace_seconds() -> int:
    """Longer than the drain the server promises after SIGTERM (ServerSettings.shutdown_seconds, the
    defaults the Deployment runs with), plus a margin for the endpoints to drop the pod; Kubernetes'
    default of 30 s would SIGKILL a server still finishing requests."""
    timeout = float(ServerSettings.model_fields["request_timeout_s"].default)
    return int(graceful_shutdown_seconds(timeout) + timeout) + 15


def _probe(path: str, period: int, failures: int) -> JSON:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def _server_container(job: api.FineTuneJob, model_path: str, image: str) -> JSON:
    serving = job.spec.serving
    requests = {"cpu": serving.cpu or DEFAULT_CPU_REQUEST, "memory": serving.memory or DEFAULT_MEMORY_REQUEST}
    limits: dict[str, str] = {}
    if serving.memory:
        limits["memory"] = serving.memory
    if serving.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(serving.gpus)
    env: list[JSON] = [
        {"name": "HF_HOME", "value": f"{WORKSPACE}/.cache/huggingface"},
        {"name": "HOME", "value": "/tmp"},
        # `finetune serve` reads every setting from FINETUNE_SERVE_<NAME> as well as from its flags.
        *({"name": f"FINETUNE_SERVE_{key.upper()}", "value": f"{value:g}" if isinstance(value, float) else str(value)}
          for key, value in serving.server_settings().items()),
    ]
    mounts: list[JSON] = [{"name": "workspace", "mountPath": WORKSPACE}, {"name": "tmp", "mountPath": "/tmp"}]
    if serving.auth_secret_name:
        # A mounted file, not an env var: a rotated Secret reaches running pods without a restart.
        env.append({"name": "FINETUNE_SERVE_AUTH_TOKEN_FILE", "value": f"{AUTH_DIR}/token"})
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    command = [
        "finetune", "serve",
        "--model", model_path,
        "--host", "0.0.0.0",
        "--port", str(HTTP_PORT),
        "--name", job.metadata.name,
        "--feedback-path", feedback_path(job),
    ]  # fmt: skip
    return {
        "name": "server",
        "image": image,
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT}],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        # Loading a large model can take minutes; the startup probe holds the liveness probe off until then.
        "startupProbe": _probe("/healthz", 5, 120),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/healthz", 10, 3),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }


def build_serving_deployment(
    job: api.FineTuneJob, *, uid: str, model_path: str, image: str = DEFAULT_IMAGE
) -> JSON:
    """`finetune serve` on the exported model, rolled out without a gap in serving."""
    name = naming.server_name(job.metadata.name)
    labels = naming.labels(job.metadata.name, naming.SERVER)
    volumes: list[JSON] = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": job.spec.storage.claim_name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if job.spec.serving.auth_secret_name:
        secret = {"secretName": job.spec.serving.auth_secret_name, "items": [{"key": "token", "path": "token"}]}
        volumes.append({"name": "auth", "secret": secret})
    spec: JSON = {
        "selector": {"matchLabels": dict(labels)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {
                "labels": dict(labels),
                "annotations": {
                    naming.ANNOTATION_MODEL: model_path,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(HTTP_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": {
                "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
                "terminationGracePeriodSeconds": termination_grace_seconds(),
                "securityContext": pod_security_context(),
                "containers": [_server_container(job, model_path, job.spec.image or image)],
                "volumes": volumes,
            },
        },
    }
    if not autoscaled(job.spec.serving):
        spec["replicas"] = job.spec.serving.replicas  # else the HPA owns it; writing it would fight the HPA
    meta = metadata(job, name, uid, labels)
    meta["annotations"] = {naming.ANNOTATION_MODEL: model_path}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def build_serving_service(job: api.FineTuneJob, *, uid: str) -> JSON:
    name = naming.server_name(job.metadata.name)
    labels = naming.labels(job.metadata.name, naming.SERVER)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, name, uid, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(labels),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_hpa(job: api.FineTuneJob, *, uid: str) -> JSON | None:
    """An autoscaling/v2 HPA on CPU, or None when `serving.maxReplicas` is not set."""
    serving = job.spec.serving
    if not autoscaled(serving):
        return None
    name = naming.server_name(job.metadata.name)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(job, name, uid, naming.labels(job.metadata.name, naming.SERVER)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": min_replicas(serving),
            "maxReplicas": max(serving.max_replicas or 1, min_replicas(serving)),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": serving.target_cpu_utilization},
                    },
                }
            ],
        },
    }


def build_pdb(job: api.FineTuneJob, *, uid: str) -> JSON:
    """Keeps one replica up through node drains when there are two or more.

    A lone replica gets `maxUnavailable: 1`: `minAvailable: 1` would block every drain of its node.
    """
    labels = naming.labels(job.metadata.name, naming.SERVER)
    budget: JSON = {"minAvailable": 1} if min_replicas(job.spec.serving) >= 2 else {"maxUnavailable": 1}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(job, naming.server_name(job.metadata.name), uid, labels),
        "spec": {"selector": {"matchLabels": dict(labels)}, **budget},
    }


def build_service_monitor(job: api.FineTuneJob, *, uid: str) -> JSON | None:
    """A Prometheus Operator ServiceMonitor, or None unless `monitoring.serviceMonitor` is true."""
    if not job.spec.monitoring.service_monitor:
        return None
    labels = naming.labels(job.metadata.name, naming.SERVER)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(job, naming.server_name(job.metadata.name), uid, labels),
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }
