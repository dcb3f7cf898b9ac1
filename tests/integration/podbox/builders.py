"""Builders for the small JobSets, Jobs and Deployments the box's tests run, and readers of their status."""

from __future__ import annotations

import copy
from typing import Any

from finetune.operator import k8s

NS = "ml"
JOBSETS = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"
SLOW = 120.0  # the bound for anything that starts Python: the machine is shared and often loaded


def container(code: str, *args: str, **extra: Any) -> dict[str, Any]:
    """A `python -c` container named trainer with the workspace mounted; `python` resolves through PATH."""
    return {
        "name": "trainer",
        "image": "finetune:test",
        "command": ["python", "-c", code, *args],
        "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
        **extra,
    }


def pod_spec(*containers: dict[str, Any], volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "containers": list(containers),
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "data"}}, *(volumes or [])],
    }


def jobset(name: str, spec: dict[str, Any], *, pods: int = 1, failure_policy: dict[str, Any] | None = None,
           pod_failure_policy: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A JobSet like the operator's: one replicatedJob `node` of one Indexed Job with `pods` pods."""
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed", "completions": pods, "parallelism": pods, "backoffLimit": 0,
        "template": {"metadata": {"labels": {"app": name}}, "spec": copy.deepcopy(spec)},
    }  # fmt: skip
    if pod_failure_policy is not None:
        job_spec["podFailurePolicy"] = pod_failure_policy
    body: dict[str, Any] = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": job_spec}}],
        },
    }
    if failure_policy is not None:
        body["spec"]["failurePolicy"] = failure_policy
    return body


async def get(api: k8s.Api, path: str) -> dict[str, Any]:
    found: dict[str, Any] | None = await api.get(path)
    assert found is not None, f"no object at {path}"
    return found


def conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The object's status conditions by type."""
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def true_condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    found = conditions(obj).get(kind)
    return found if found is not None and found.get("status") == "True" else None


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return (statuses[0].get("state") or {}).get("terminated") if statuses else None


async def events(api: k8s.Api, involved: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about one object, in creation order."""
    found = await api.list(f"/api/v1/namespaces/{NS}/events")
    mine = [e for e in found if (e.get("involvedObject") or {}).get("name") == involved]
    return [(e["type"], e["reason"], e["message"]) for e in mine]


def label(obj: dict[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(key)


def ended(pod: dict[str, Any]) -> dict[str, Any]:
    """The first container's terminated state, which must be there."""
    found = terminated(pod)
    assert found is not None, f"pod {pod['metadata']['name']} has not terminated"
    return found


def present(value: dict[str, Any] | None) -> dict[str, Any]:
    assert value is not None
    return value
