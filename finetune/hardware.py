"""What this machine can do, for choices the trainer and the server make alike."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_has_bf16() -> bool:
    """Native bf16 on the CPU (AVX512-BF16, AMX): bf16 autocast is then several times faster than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _quota(text: str) -> float | None:
    """CPUs that a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD": no limit) allows."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup (a pod's CPU limit), the tightest along its ancestors.

    cgroup v2: `cpu.max` in the process's own group (found through /proc/self/cgroup; inside a container
    that is usually /sys/fs/cgroup itself) and every parent. cgroup v1: cpu.cfs_quota_us / cfs_period_us.
    """
    limits: list[float] = []
    own = next((line.split(":", 2)[2].strip() for line in (_read(proc_cgroup) or "").splitlines()
                if line.startswith("0::")), "/")
    folder = root / own.lstrip("/")
    while True:
        found = _quota(_read(folder / "cpu.max") or "")
        if found is not None:
            limits.append(found)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota and period and quota.strip().lstrip("-").isdigit() and period.strip().isdigit():
        found = _quota(f"{quota.strip()} {period.strip()}")
        if found is not None:
            limits.append(found)
    return min(limits) if limits else None


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity (cpuset), capped by its cgroup's CPU quota, rounded up.

    os.cpu_count() is the node's cores: a pod limited to 2 CPUs on a 64-core node would start 64
    threads per process and spend its quota being throttled.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit)) if limit else cores)
