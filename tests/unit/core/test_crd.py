"""The CRD is generated from the spec model and committed: the two must not drift apart."""

from pathlib import Path
from typing import Any

import yaml

from finetune.crd import build_crd, render_crd

ROOT = Path(__file__).resolve().parents[3]


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out.extend(walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(walk(value, f"{path}[{i}]"))
    return out


def test_committed_crd_matches_generated() -> None:
    committed = (ROOT / "manifests" / "crd.yaml").read_text()
    assert committed == render_crd(), "manifests/crd.yaml is stale: run `make crd`"


def test_crd_names_and_columns() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("FineTuneJob", "finetunejobs", ["ftj"])
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "Metric", "Endpoint", "Age"} <= columns


def test_schema_is_structural_and_documented() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if path.startswith(".properties.spec.") and path.endswith(".properties"):
            for name, child in node.items():
                assert child.get("description"), f"{path}.{name} has no description for kubectl explain"
    training = schema["properties"]["spec"]["properties"]["training"]["properties"]
    for field in ("method", "epochs", "learningRate", "batchSize", "maxLength"):
        assert field in training
    assert training["method"]["enum"] == ["full", "lora"]
    assert yaml.safe_load(render_crd())["kind"] == "CustomResourceDefinition"
