"""`kubectl apply -k manifests/` installs the same objects as `helm install`.

manifests/finetune-operator.yaml and manifests/monitoring/monitoring.yaml are the chart rendered with the
release name `finetune` in namespace `finetune-system`, minus Helm's own labels. After a chart change,
regenerate them (the test says so when they are stale):

    UPDATE_MANIFESTS=1 .venv/bin/pytest tests/unit/deploy/test_kustomize.py -q
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "manifests"
HEADER = (
    "# Generated from charts/finetune-operator (release finetune, namespace finetune-system) by\n"
    "# `UPDATE_MANIFESTS=1 pytest tests/unit/deploy/test_kustomize.py`. Do not edit: change the chart.\n"
)
MONITORING = [
    "metrics.serviceMonitor.enabled=true",
    "metrics.trainerPodMonitor.enabled=true",
    "prometheusRule.enabled=true",
]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

Render = Callable[..., list[dict[str, Any]]]


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `5e-05` (as kustomize writes 5.0e-05) is a string; YAML 1.2 says float."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def kustomize(kubectl: str, sh: Callable[..., Any], path: Path) -> list[dict[str, Any]]:
    return [o for o in yaml.load_all(sh([kubectl, "kustomize", str(path)]).stdout, Loader=Yaml12Loader) if o]


def plain(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without Helm's bookkeeping labels, managed by kustomize instead."""
    obj = yaml.safe_load(yaml.safe_dump(obj))

    def fix(labels: dict[str, str] | None) -> None:
        if labels is not None:
            labels.pop("helm.sh/chart", None)
            if labels.get("app.kubernetes.io/managed-by") == "Helm":
                labels["app.kubernetes.io/managed-by"] = "kustomize"

    fix(obj["metadata"].get("labels"))
    template = obj.get("spec", {}).get("template")
    if template:
        fix(template["metadata"].get("labels"))
    return obj


def dump(objects: list[dict[str, Any]]) -> str:
    return HEADER + "".join("---\n" + yaml.safe_dump(o, sort_keys=False, width=120) for o in objects)


def check_golden(path: Path, objects: list[dict[str, Any]]) -> None:
    expected = dump(objects)
    if os.environ.get("UPDATE_MANIFESTS"):
        path.write_text(expected)
    this = Path(__file__).relative_to(ROOT)
    assert path.read_text() == expected, (
        f"{path.relative_to(ROOT)} is stale: run `UPDATE_MANIFESTS=1 .venv/bin/pytest {this}`"
    )


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def test_generated_manifests_match_the_chart(render: Render) -> None:
    base = [plain(o) for o in render() if o["kind"] != "CustomResourceDefinition"]
    check_golden(MANIFESTS / "finetune-operator.yaml", base)
    monitoring = [plain(o) for o in render(*MONITORING) if o["kind"] in MONITORING_KINDS]
    check_golden(MANIFESTS / "monitoring" / "monitoring.yaml", monitoring)


def test_kustomize_renders_the_chart_objects(
    kubectl: str, sh: Callable[..., Any], render: Render
) -> None:
    objects = kustomize(kubectl, sh, MANIFESTS)
    got = {key(o): o for o in objects}
    want = {key(o): plain(o) for o in render()}
    namespace = ("Namespace", "", "finetune-system")
    assert set(got) == set(want) | {namespace}
    for k, obj in want.items():
        assert got[k] == obj, f"{k} differs between kustomize and helm"
    labels = got[namespace]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("version", ["1.31.0", kubernetes_validate.latest_version()])
def test_kustomize_output_validates(kubectl: str, sh: Callable[..., Any], version: str) -> None:
    objects = kustomize(kubectl, sh, MANIFESTS)
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {err.message}")
    assert not problems, f"invalid for Kubernetes {version}:\n" + "\n".join(problems)


def test_monitoring_kustomization_adds_the_prometheus_operator_objects(
    kubectl: str, sh: Callable[..., Any]
) -> None:
    objects = kustomize(kubectl, sh, MANIFESTS / "monitoring")
    assert {o["kind"] for o in objects} == MONITORING_KINDS
    assert {o["metadata"]["namespace"] for o in objects} == {"finetune-system"}
