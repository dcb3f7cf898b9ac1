"""Pieces every child manifest shares: metadata with the owner reference, the content hash, and the
restricted security context (Pod Security Standard "restricted") of every container we run."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from finetune import spec as api
from finetune.operator import naming

JSON = dict[str, Any]
DEFAULT_IMAGE = "ghcr.io/finetune-dev/finetune:0.1.0"
RUN_AS_USER = 1000


def owner_reference(job: api.FineTuneJob, uid: str) -> JSON:
    """Makes the FineTuneJob the controller of a child, so deleting it deletes the child."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(job: api.FineTuneJob, name: str, uid: str, labels: dict[str, str]) -> JSON:
    """Name, namespace, labels and the owner reference of a child."""
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner_reference(job, uid)],
    }


def manifest_hash(obj: JSON) -> str:
    """A short hash of a manifest's content (its own hash annotation excluded)."""
    meta = dict(obj.get("metadata") or {})
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k != naming.ANNOTATION_HASH}
    body = {**obj, "metadata": {**meta, "annotations": notes}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def stamp_hash(obj: JSON) -> JSON:
    """Annotate `obj` with its content hash: a reconcile rewrites a child only when the hash differs."""
    obj["metadata"].setdefault("annotations", {})[naming.ANNOTATION_HASH] = manifest_hash(obj)
    return obj


def pod_security_context() -> JSON:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        # The artifact volume becomes writable for the non-root user.
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> JSON:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
