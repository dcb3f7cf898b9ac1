"""The e2e GitHub workflow builds the image, installs the chart on kind with that image, runs tests/e2e.

No runner is available here, so this reads the workflow; the suite itself is tests/e2e.

    .venv/bin/pytest tests/unit/deploy/test_workflow.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
WORKFLOW = ROOT / ".github" / "workflows" / "e2e.yaml"


def steps() -> list[dict[str, Any]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] <= 90
    return job["steps"]  # type: ignore[no-any-return]


def index_of(text: str) -> int:
    for i, step in enumerate(steps()):
        if text in (step.get("run") or "") or text in (step.get("uses") or ""):
            return i
    raise AssertionError(f"no workflow step runs or uses {text!r}")


def test_steps_run_in_order() -> None:
    order = [
        index_of("hadolint Dockerfile"),
        index_of('docker build --tag "$IMAGE" .'),
        index_of("helm/kind-action@"),
        index_of('kind load docker-image "$IMAGE"'),
        index_of("helm install finetune charts/finetune-operator"),
        index_of("pytest tests/e2e -m e2e"),
    ]
    assert order == sorted(order), order


def test_chart_is_installed_with_the_built_image() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow["env"]["IMAGE"] == "finetune:e2e"
    install = steps()[index_of("helm install")]["run"]
    for flag in ("image.repository=finetune", "image.tag=e2e", "image.pullPolicy=Never", "--wait"):
        assert flag in install
    run = steps()[index_of("pytest tests/e2e")]
    assert run["env"]["FINETUNE_E2E_IMAGE"] == "${{ env.IMAGE }}"


def test_failure_dumps_the_operator_log() -> None:
    last = steps()[-1]
    assert last["if"] == "failure()" and "logs deployment/finetune-operator" in last["run"]
