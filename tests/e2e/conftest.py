"""The end-to-end suite runs against the cluster KUBECONFIG points to, with the chart already installed.

Without a reachable cluster every test skips and says why. To keep a stray KUBECONFIG from pointing the
suite at a real cluster, only kind contexts (`kind-*`) are used unless FINETUNE_E2E_CONTEXT names the
context explicitly.

    kind create cluster && kind load docker-image finetune:e2e
    helm install finetune charts/finetune-operator -n finetune-system --create-namespace \\
        --set image.repository=finetune --set image.tag=e2e --set image.pullPolicy=Never --wait
    KUBECONFIG=~/.kube/config FINETUNE_E2E_IMAGE=finetune:e2e .venv/bin/pytest tests/e2e -m e2e -v
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = os.environ.get("FINETUNE_E2E_OPERATOR_NAMESPACE", "finetune-system")
IMAGE = os.environ.get("FINETUNE_E2E_IMAGE", "finetune:e2e")


def kubectl_path() -> str | None:
    local = ROOT / ".tools" / "bin" / "kubectl"
    return str(local) if os.access(local, os.X_OK) else shutil.which("kubectl")


def no_cluster_reason() -> str | None:
    """Why the suite cannot run here, or None when a kind (or named) cluster answers."""
    config = os.environ.get("KUBECONFIG")
    if not config:
        return "no cluster: KUBECONFIG is not set (the e2e suite runs in the e2e GitHub workflow on kind)"
    kubectl = kubectl_path()
    if not kubectl:
        return "no kubectl in .tools/bin or PATH (bash scripts/install-tools.sh)"
    ctx = subprocess.run([kubectl, "config", "current-context"], capture_output=True, text=True, timeout=20)
    if ctx.returncode != 0:
        return f"KUBECONFIG={config} has no current context: {ctx.stderr.strip()}"
    context = ctx.stdout.strip()
    if not context.startswith("kind-") and context != os.environ.get("FINETUNE_E2E_CONTEXT"):
        return f"context {context!r} is not a kind cluster; set FINETUNE_E2E_CONTEXT={context} to allow it"
    probe = subprocess.run([kubectl, "version", "-o", "json", "--request-timeout=10s"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or "serverVersion" not in probe.stdout:
        return f"KUBECONFIG={config} reaches no cluster: {probe.stderr.strip()[:300]}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    ours = [item for item in items if here in item.path.parents]
    if not ours:
        return
    reason = no_cluster_reason()
    for item in ours:
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


class Kubectl:
    """kubectl against the test cluster; JSON in and out."""

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, *args: str, stdin: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.path, *args], input=stdin, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}{proc.stdout}"
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, *objects: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        text = "---\n".join(yaml.safe_dump(o) for o in objects)
        return self.run("apply", "-f", "-", stdin=text, check=check)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    path = kubectl_path()
    assert path, "kubectl disappeared after collection"
    return Kubectl(path)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (in the background)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)
