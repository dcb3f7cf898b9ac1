"""What a FineTuneJob needs to run in a cluster, beyond what the typed spec already checks.

`finetune.spec.parse_job` rejects unknown tasks, `nodes < 1` and the like. In a cluster the trainer
and the server see only the artifact volume (mounted at /workspace), so every data and model path must
lie inside it. Each problem becomes one line that names the field and says what to change.
"""

from __future__ import annotations

import posixpath
from typing import Any

from finetune.spec import FineTuneJob, ObjectMeta, SpecError, parse_spec

WORKSPACE = "/workspace"


def _inside_workspace(field: str, path: str, claim: str | None) -> str | None:
    """An error line when `path` is not an absolute path inside the mounted volume."""
    where = f"the volume (claim {claim!r}) mounted at {WORKSPACE}" if claim else WORKSPACE
    if not posixpath.isabs(path):
        return (
            f"{field}: {path!r} is relative; in a cluster use an absolute path inside {where}, "
            f"e.g. {WORKSPACE}/{path.lstrip('./')}"
        )
    normal = posixpath.normpath(path)
    if normal != WORKSPACE and not normal.startswith(WORKSPACE + "/"):
        return f"{field}: {path!r} is outside {where}; copy the files into the volume and point here"
    return None


def cluster_problems(job: FineTuneJob) -> list[str]:
    """Every reason this valid spec cannot run in a cluster (empty when it can)."""
    spec = job.spec
    claim = spec.storage.claim_name
    problems: list[str] = []
    name = job.metadata.name
    if not name[:1].isalpha():
        problems.append(
            f"metadata.name: {name!r} must start with a letter: it names the trainer JobSet and the server's "
            f"Service, which Kubernetes requires to be DNS-1035 labels; rename it, e.g. 'm-{name}'"
        )
    if not claim:
        problems.append(
            "spec.storage.claimName: name the PersistentVolumeClaim that holds the data and receives the "
            f"model; every trainer and server pod mounts it at {WORKSPACE}"
        )
    files = {
        "spec.dataset.train.path": spec.dataset.train,
        "spec.dataset.validation.path": spec.dataset.validation,
        "spec.dataset.test.path": spec.dataset.test,
    }
    paths = {field: f.path for field, f in files.items() if f is not None}
    if spec.model.path:
        paths["spec.model.path"] = spec.model.path
    if spec.storage.output_path:
        paths["spec.storage.outputPath"] = spec.storage.output_path
    for field, path in paths.items():
        problem = _inside_workspace(field, path, claim)
        if problem:
            problems.append(problem)
    for field, data_file in files.items():
        if data_file is not None:
            try:
                spec.dataset.format_of(data_file.path)
            except SpecError as err:
                problems.append(f"{err} ({field})")
    return problems


def validate_job(body: dict[str, Any]) -> FineTuneJob:
    """The typed FineTuneJob of a cluster object; raises SpecError listing everything to fix."""
    meta = body.get("metadata") or {}
    spec = parse_spec(body.get("spec") or {})
    job = FineTuneJob(metadata=ObjectMeta(name=meta.get("name"), namespace=meta.get("namespace")), spec=spec)
    problems = cluster_problems(job)
    if problems:
        raise SpecError("; ".join(problems))
    return job
