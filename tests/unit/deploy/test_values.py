"""values.yaml is documented and values.schema.json guards it: helm refuses bad values before rendering.

    .venv/bin/pytest tests/unit/deploy/test_values.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[3] / "charts" / "finetune-operator"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w.-]*):")


def documented_paths() -> tuple[set[str], set[str]]:
    """(every key path in values.yaml, the paths whose line has a comment right above it)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    seen, commented = set(), set()
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m["key"]])
        stack.append((indent, m["key"]))
        seen.add(path)
        if i and lines[i - 1].strip().startswith("#"):
            commented.add(path)
    return seen, commented


def undocumented(node: dict[str, Any], seen: set[str], commented: set[str], prefix: str = "") -> list[str]:
    """Schema properties present in values.yaml with no comment of their own nor on each of their members."""
    missing = []
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        if path not in seen or path in commented:
            continue
        members = [k for k in child.get("properties", {}) if f"{path}.{k}" in seen]
        if members:
            missing += undocumented(child, seen, commented, f"{path}.")
        else:
            missing.append(path)
    return missing


def test_every_value_has_a_comment() -> None:
    seen, commented = documented_paths()
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = undocumented(schema, seen, commented)
    assert not missing, f"values.yaml: these values have no comment line above them: {missing}"
    assert set(values) <= set(schema["properties"]), "every top-level value is in values.schema.json"
    assert len(commented) >= 40


def test_schema_describes_every_property() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> None:
        for name, child in node.get("properties", {}).items():
            assert child.get("description"), f"values.schema.json: {path}{name} has no description"
            walk(child, f"{path}{name}.")

    walk(schema, "")


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["image.repository="], "/image/repository"),
        (["securityContext.readOnlyRootFilesystem=false"], "/securityContext/readOnlyRootFilesystem"),
        (["securityContext.allowPrivilegeEscalation=true"], "/securityContext/allowPrivilegeEscalation"),
        (["securityContext.capabilities.add={NET_ADMIN}"], "/securityContext/capabilities/add"),
        (["podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
        (["watch.namespaces={Team_A}"], "/watch/namespaces/0"),
        (["watch.namespaces={a,a}"], "/watch/namespaces"),
        (["metrics.port=0"], "/metrics/port"),
        (["metrics.port=http"], "/metrics/port"),
        (["operator.logLevel=TRACE"], "/operator/logLevel"),
        (["prometheusRule.errorRateThreshold=2"], "/prometheusRule/errorRateThreshold"),
        (["prometheusRule.stuckFor=half an hour"], "/prometheusRule/stuckFor"),
        (["metrics.serviceMonitor.interval=30"], "/metrics/serviceMonitor/interval"),
        (["dashboards.enabled=yes please"], "/dashboards/enabled"),
        (["imagePullSecrets[0].secret=x"], "/imagePullSecrets/0"),
        (["operator.extraEnv[0].name=A", "operator.extraEnv[0].value=1"], "/operator/extraEnv/0/value"),
        (["replicas=2"], "additional properties 'replicas' not allowed"),
    ],
)
def test_schema_rejects_bad_values(
    helm: str, sh: Callable[..., subprocess.CompletedProcess[str]], values: list[str], complaint: str
) -> None:
    cmd = [helm, "template", "x", str(CHART)]
    for v in values:
        cmd += ["--set", v]
    proc = sh(cmd, check=False)
    assert proc.returncode != 0, f"helm accepted {values}"
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_schema_accepts_documented_variants(
    helm: str, sh: Callable[..., subprocess.CompletedProcess[str]], all_on: list[str], namespaced: list[str]
) -> None:
    for values in (all_on, namespaced, ["serviceAccount.create=false", "serviceAccount.name=existing"]):
        cmd = [helm, "template", "x", str(CHART)]
        for v in values:
            cmd += ["--set", v]
        sh(cmd)


def test_existing_service_account_needs_a_name(helm: str, sh: Callable[..., Any]) -> None:
    proc = sh([helm, "template", "x", str(CHART), "--set", "serviceAccount.create=false"], check=False)
    assert proc.returncode != 0 and "serviceAccount.name is required" in proc.stderr
