"""CPU limits from the cgroup: what a pod's CPU limit looks like from inside, as cgroup files on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune import hardware
from finetune.trainer.cli import thread_count


def tree(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 mount at tmp_path/cg with `cpu.max` files, and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cg"
    for folder, text in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


@pytest.mark.parametrize(
    ("own", "limits", "expected"),
    [
        ("/", {".": "max 100000"}, None),  # no limit
        ("/", {".": "250000 100000"}, 2.5),  # a container's own view: 2.5 CPUs
        ("/kubepods/pod1/c1", {"kubepods/pod1/c1": "150000 100000"}, 1.5),
        ("/kubepods/pod1/c1", {"kubepods/pod1": "300000 100000", "kubepods/pod1/c1": "max 100000"}, 3.0),
        ("/kubepods/pod1/c1", {"kubepods": "100000 100000", "kubepods/pod1/c1": "400000 100000"}, 1.0),
        ("/", {".": "garbage"}, None),
    ],
)
def test_the_tightest_quota_along_the_cgroup_path(tmp_path: Path, own: str, limits: dict[str, str],
                                                  expected: float | None) -> None:
    root, proc = tree(tmp_path, own, limits)
    assert hardware.cgroup_cpu_limit(root, proc) == expected


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware.cgroup_cpu_limit(tmp_path, tmp_path / "missing") == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert hardware.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_threads_follow_the_quota_and_never_exceed_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: 3.5)  # a pod limited to 3.5 CPUs
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: set(range(64)))  # on a 64-core node
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("FINETUNE_CPUS", raising=False)
    assert hardware.available_cpus() == 4
    assert thread_count(1) == "4" and thread_count(2) == "2" and thread_count(8) == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_count(1) == "1", "the user's OMP_NUM_THREADS is an upper bound"
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert thread_count(1) == "4", "but never more threads than the pod has CPUs"
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setenv("FINETUNE_CPUS", "6")
    assert thread_count(2) == "3", "the limit the operator passes down counts too"
