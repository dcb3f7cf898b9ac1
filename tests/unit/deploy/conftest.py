"""Fixtures for the deployment-artifact tests: the real helm, kubectl and hadolint binaries, and renders.

The tools come from `scripts/install-tools.sh` (into .tools/bin). Without it a test that needs a tool
skips and names the missing tool; under CI (env CI set) a missing tool fails the test instead, so a
broken install step cannot turn the suite green.

    bash scripts/install-tools.sh && .venv/bin/pytest tests/unit/deploy -q
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import find_tool

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "finetune-operator"
MANIFESTS = ROOT / "manifests"
RELEASE = "finetune"
NAMESPACE = "finetune-system"

# Every optional feature on; the namespaced-watch variant is rendered separately.
ALL_ON = [
    "metrics.serviceMonitor.enabled=true",
    "metrics.trainerPodMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "dashboards.enabled=true",
    "imagePullSecrets[0].name=registry",
    "priorityClassName=system-cluster-critical",
    "nodeSelector.kubernetes\\.io/os=linux",
    "tolerations[0].key=dedicated",
    "tolerations[0].operator=Exists",
    "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
    ".matchExpressions[0].key=kubernetes.io/arch",
    "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
    ".matchExpressions[0].operator=Exists",
    "defaults.image=registry.example/finetune-workloads:1",
    "serviceAccount.annotations.example\\.com/role=finetune",
    "operator.extraEnv[0].name=EXTRA",
    "operator.extraEnv[0].value=enabled",
]
NAMESPACED = ["watch.namespaces={team-a,team-b}"]




def run(cmd: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure the assertion shows its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, **kwargs)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
    return proc


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def helm() -> str:
    return find_tool("helm")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return find_tool("kubectl")


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., list[dict[str, Any]]]:
    """`render(*set_values)` -> the chart's objects as `helm template` prints them (CRDs included)."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(*values: str) -> list[dict[str, Any]]:
        if values not in cache:
            cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
            for v in values:
                cmd += ["--set", v]
            cache[values] = load_all(run(cmd).stdout)
        return cache[values]

    return _render


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """`tool(name)` -> path of a test tool (skips or fails like `helm`)."""
    return find_tool


@pytest.fixture(scope="session")
def sh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`sh(cmd, check=True)` -> the finished process; asserts success with its stderr when check."""
    return run


@pytest.fixture(scope="session")
def all_on() -> list[str]:
    """`--set` values that switch every optional feature of the chart on."""
    return list(ALL_ON)


@pytest.fixture(scope="session")
def namespaced() -> list[str]:
    """`--set` values for an operator that watches two namespaces."""
    return list(NAMESPACED)
