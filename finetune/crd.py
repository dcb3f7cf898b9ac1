"""Generate the FineTuneJob CustomResourceDefinition from the typed spec and status models.

Pydantic's JSON Schema becomes a structural OpenAPI v3 schema: `$ref`s inlined, `anyOf [X, null]`
turned into `nullable: true`, titles dropped, free-form objects (affinity, tolerations) marked to keep
their fields. `manifests/crd.yaml` is this output; a test fails when the two differ.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from finetune import spec as api
from finetune.status import FineTuneJobStatus

JSON = dict[str, Any]


def _inline(node: Any, defs: JSON) -> Any:
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**target, **extra}, defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def _structural(node: Any) -> Any:
    """Rewrite one JSON Schema node into the subset Kubernetes accepts."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        nullable = len(options) < len(any_of)
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        node = {**options[0], **node}
        if nullable:
            node["nullable"] = True
    node.pop("title", None)
    # JSON Schema 2020-12 writes exclusive bounds as numbers; Kubernetes' OpenAPI v3.0 wants a boolean flag.
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(flag)
        if isinstance(value, int | float) and not isinstance(value, bool):
            node[bound] = node.pop(flag)
            node[flag] = True
    # Unknown fields are pruned by the API server anyway; structural schemas forbid `false` here.
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("type") == "object" and "properties" not in node:
        extra = node.get("additionalProperties")
        if extra in (None, True) or extra == {}:
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array" and node.get("items") == {}:
        node["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if node.get("default") is None:
        node.pop("default", None)
    if "properties" in node:
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key])
    return node


def openapi_schema(model: type[api.Model]) -> JSON:
    """The structural OpenAPI v3 schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_inline(raw, defs))  # type: ignore[no-any-return]


def printer_columns() -> list[JSON]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
        {"name": "Metric", "type": "string", "jsonPath": ".status.headlineMetric"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        # `kubectl get ftj -o wide`: what the phase means right now, and what to do about it.
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    ]


def build_crd() -> JSON:
    """The CustomResourceDefinition as a dict."""
    spec_schema = openapi_schema(api.FineTuneJobSpec)
    status_schema = openapi_schema(FineTuneJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune", "app.kubernetes.io/part-of": "finetune"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": [api.SHORT_NAME],
                "categories": ["all", "ml"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Fine-tune a pre-trained language model, evaluate it and serve it.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as YAML, exactly as committed in manifests/crd.yaml."""
    header = "# Generated by `finetune crd` from finetune/spec.py and finetune/status.py. Do not edit.\n"
    body: str = yaml.safe_dump(build_crd(), sort_keys=False, width=100)
    return header + body
