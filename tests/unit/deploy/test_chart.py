"""The Helm chart: lint, render with default values and with every option on, validate every object.

Real `helm` (v4) renders; every built-in object is validated offline against the Kubernetes JSON schemas
(`kubernetes-validate`, strict: unknown fields fail) for the oldest and newest supported versions.

    bash scripts/install-tools.sh && .venv/bin/pytest tests/unit/deploy/test_chart.py -q
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from finetune.crd import render_crd

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "finetune-operator"
# Chart.yaml's kubeVersion floor, and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
DASHBOARDS = {"training", "serving", "model-quality", "operator"}

Render = Callable[..., list[dict[str, Any]]]


def kinds(objects: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in objects:
        out[o["kind"]] = out.get(o["kind"], 0) + 1
    return out


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects if o["kind"] == "Deployment"]


def test_helm_lint_passes_strict(helm: str, sh: Callable[..., Any], all_on: list[str]) -> None:
    sh([helm, "lint", "--strict", str(CHART)])
    sh([helm, "lint", "--strict", str(CHART), *[a for v in all_on for a in ("--set", v)]])


def test_default_render_has_the_operator_and_nothing_optional(render: Render) -> None:
    objects = render()
    assert kinds(objects) == {
        "CustomResourceDefinition": 1,
        "ServiceAccount": 1,
        "ClusterRole": 2,
        "ClusterRoleBinding": 2,
        "Deployment": 1,
        "Service": 1,
        "ConfigMap": len(DASHBOARDS),
    }
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/finetune-dev/finetune:0.1.0"
    assert container["args"] == [
        "--log-level=INFO", "operator", "--metrics-port=8080", "--health-port=8081", "--standalone",
        "--image=ghcr.io/finetune-dev/finetune:0.1.0",
    ]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_all_options_render_monitoring_objects(render: Render, all_on: list[str]) -> None:
    found = kinds(render(*all_on))
    assert {k: found.get(k) for k in PROMETHEUS_OPERATOR_KINDS} == dict.fromkeys(PROMETHEUS_OPERATOR_KINDS, 1)
    (pod,) = [s for _, s in pod_specs(render(*all_on))]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "--image=registry.example/finetune-workloads:1" in pod["containers"][0]["args"]
    assert env["EXTRA"] == "enabled"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-cluster-critical"


def test_watching_listed_namespaces_binds_only_there(render: Render, namespaced: list[str]) -> None:
    objects = render(*namespaced)
    # Only the cluster-scoped rules (CRD and namespace observation) stay bound cluster-wide.
    (cluster_binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert cluster_binding["roleRef"]["name"] == "finetune-operator-cluster"
    (cluster_role,) = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-cluster")]
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert resources == {"customresourcedefinitions", "namespaces"}
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == {("ClusterRole", "finetune-operator")}
    (_, pod) = pod_specs(objects)[0]
    args = pod["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


@pytest.mark.parametrize("variant", ["default", "all-on", "namespaced"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(
    render: Render, all_on: list[str], namespaced: list[str], variant: str, version: str
) -> None:
    values = {"default": [], "all-on": all_on, "namespaced": namespaced}[variant]
    checked, problems = 0, []
    for obj in render(*values):
        if obj["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue  # not Kubernetes built-ins: see test_prometheus_operator_objects_are_well_formed
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {err.message}")
        checked += 1
    if problems:
        pytest.fail(f"invalid for Kubernetes {version}:\n" + "\n".join(problems), pytrace=False)
    assert checked >= 8


def test_prometheus_operator_objects_are_well_formed(render: Render, all_on: list[str]) -> None:
    """No offline schema ships for monitoring.coreos.com; check the fields Prometheus Operator reads."""
    objects = {o["kind"]: o for o in render(*all_on) if o["kind"] in PROMETHEUS_OPERATOR_KINDS}
    for obj in objects.values():
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["namespace"] == "finetune-system"
    sm = objects["ServiceMonitor"]["spec"]
    (service,) = [o for o in render(*all_on) if o["kind"] == "Service"]
    assert sm["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in sm["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    pm = objects["PodMonitor"]["spec"]
    assert pm["podMetricsEndpoints"][0]["honorLabels"] is True  # keeps the trainer's `job` label
    assert pm["selector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    for group in objects["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_rules_pass_promtool(
    render: Render, all_on: list[str], tool: Callable[[str], str], sh: Callable[..., Any], tmp_path: Path
) -> None:
    (rule,) = [o for o in render(*all_on) if o["kind"] == "PrometheusRule"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    out = sh([tool("promtool"), "check", "rules", str(path)]).stdout
    assert "SUCCESS: 7 rules found" in out, out


@pytest.mark.parametrize("variant", ["default", "all-on"])
def test_every_pod_is_hardened(render: Render, all_on: list[str], variant: str) -> None:
    specs = pod_specs(render(*(all_on if variant == "all-on" else [])))
    assert specs
    for name, pod in specs:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, c["name"])
            assert sc.get("privileged", False) is False
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])
            assert c["livenessProbe"] and c["readinessProbe"], (name, c["name"])


def test_crd_in_chart_is_the_generated_one() -> None:
    chart_crd = (CHART / "crds" / "finetunejobs.finetune.dev.yaml").read_text()
    assert chart_crd == (ROOT / "manifests" / "crd.yaml").read_text(), (
        "charts/finetune-operator/crds/ differs from manifests/crd.yaml: `finetune crd > manifests/crd.yaml && "
        "cp manifests/crd.yaml charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml`"
    )
    assert chart_crd == render_crd()


def test_dashboards_ship_as_sidecar_configmaps(render: Render) -> None:
    maps = [o for o in render() if o["kind"] == "ConfigMap"]
    assert len(maps) == len(DASHBOARDS)
    shipped = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        shipped[key.removeprefix("finetune-").removesuffix(".json")] = json.loads(text)
    assert set(shipped) == DASHBOARDS
    for name, board in shipped.items():
        assert board == json.loads((CHART / "dashboards" / f"{name}.json").read_text())


def test_dashboards_can_be_switched_off_and_moved(render: Render) -> None:
    assert not [o for o in render("dashboards.enabled=false") if o["kind"] == "ConfigMap"]
    moved = [o for o in render("dashboards.namespace=monitoring") if o["kind"] == "ConfigMap"]
    assert {o["metadata"]["namespace"] for o in moved} == {"monitoring"}


def test_notes_tell_the_user_what_to_do_next(helm: str, sh: Callable[..., Any], namespaced: list[str]) -> None:
    cmd = [helm, "install", "finetune", str(CHART), "--dry-run=client", "-n", "finetune-system"]
    notes = sh(cmd).stdout.split("NOTES:", 1)[1]
    assert "rollout status deployment/finetune-operator" in notes
    assert "kubectl get ftj" in notes and "every namespace" in notes
    assert "prometheusRule.enabled=true" in notes and "helm show crds" in notes
    scoped = sh([*cmd, "--set", namespaced[0]]).stdout.split("NOTES:", 1)[1]
    assert "team-a, team-b" in scoped
