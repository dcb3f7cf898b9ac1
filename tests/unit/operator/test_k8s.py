"""The operator finds the cluster like kubectl does, and addresses objects by their API paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.operator import k8s


def test_cluster_from_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.write_text(
        """
apiVersion: v1
kind: Config
current-context: lab
clusters:
- name: lab
  cluster: {server: "https://10.0.0.1:6443", insecure-skip-tls-verify: true}
users:
- name: me
  user: {token: sekret}
contexts:
- name: lab
  context: {cluster: lab, user: me}
"""
    )
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cluster = k8s.Cluster.discover()
    assert cluster.server == "https://10.0.0.1:6443"
    assert cluster.bearer() == "sekret"
    assert cluster.insecure is True


def test_paths() -> None:
    assert k8s.collection_path("v1", "pods", "ml") == "/api/v1/namespaces/ml/pods"
    assert k8s.collection_path("batch/v1", "jobs", "ml") == "/apis/batch/v1/namespaces/ml/jobs"
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ml"}}
    assert k8s.object_path(obj) == "/apis/apps/v1/namespaces/ml/deployments/d"
    assert k8s.object_path(obj, "status") == "/apis/apps/v1/namespaces/ml/deployments/d/status"
