"""The trainer container's command exactly as the operator builds it, made runnable on this machine.

`pod_command` takes the command from `build_trainer_jobset` for a job file and replaces only what a
cluster would supply differently: the mounted job file and volume paths (a bind mount), the node rank
(the Job controller's JOB_COMPLETION_INDEX), node 0's address and the termination-log path (the
kubelet's). Everything else (the flags, their order, the process count) is the operator's.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from finetune.operator import builders
from finetune.spec import FineTuneJob, load_job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _container(job_file: Path) -> dict[str, Any]:
    """The trainer container of the JobSet the operator builds for this job (namespace `ml`)."""
    loaded = load_job(job_file)
    job = FineTuneJob(metadata={"name": loaded.metadata.name, "namespace": "ml"}, spec=loaded.spec)
    jobset = builders.build_trainer_jobset(job, uid="u", run=1)
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    return container


def container_command(job_file: Path) -> list[str]:
    """The trainer container's `command` of the JobSet the operator builds for this job."""
    return list(_container(job_file)["command"])


def container_env(job_file: Path) -> dict[str, str]:
    """The container's env variables with literal values (those from the downward API or a Secret are
    the kubelet's to fill in)."""
    return {e["name"]: e["value"] for e in _container(job_file).get("env", []) if "value" in e}


def pod_command(job_file: Path, output: Path, log: Path, node_rank: int = 0, port: int | None = None) -> list[str]:
    """The container command with this machine's paths, rank and rendezvous address."""
    command = container_command(job_file)
    values = {"-f": str(job_file), "--output": str(output), "--node-rank": str(node_rank),
              "--rendezvous": f"127.0.0.1:{port or free_port()}", "--termination-log": str(log)}
    for flag, value in values.items():
        command[command.index(flag) + 1] = value
    assert command[:2] == ["finetune", "train"], command
    return [str(Path(sys.executable).parent / "finetune"), *command[1:]]
