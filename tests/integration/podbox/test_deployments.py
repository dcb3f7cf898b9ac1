"""A Deployment through the box: a real HTTP server behind a readiness probe, a crash, a rolling update."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import aiohttp

from finetune.operator import k8s
from tests.integration.podbox.builders import DEPLOYMENTS, NS, SLOW, get, label, present, true_condition
from tests.podbox import PodBox

POD_NAME = re.compile(r"^web-[bcdfghjklmnpqrstvwxz2456789]{1,10}-[bcdfghjklmnpqrstvwxz2456789]{5}$")


def server(version: str) -> dict[str, Any]:
    """`python -m http.server` on containerPort 8080, serving /workspace/site-<version>; ready once it has
    ready.txt."""
    return {
        "name": "server",
        "image": "finetune:test",
        "command": ["python", "-m", "http.server", "8080", "--bind", "127.0.0.1",
                    "--directory", f"/workspace/site-{version}"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/ready.txt", "port": "http"}, "periodSeconds": 1},
        "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
    }  # fmt: skip


def deployment(version: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                "containers": [server(version)],
                "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "data"}}]}},
        },
    }  # fmt: skip


def site(workspace: Path, version: str, ready: bool) -> None:
    folder = workspace / f"site-{version}"
    folder.mkdir(exist_ok=True)
    if ready:
        (folder / "ready.txt").write_text(version)


def ready(pod: dict[str, Any]) -> bool:
    return true_condition(pod, "Ready") is not None


async def fetch(box: PodBox, pod_name: str) -> str:
    url = f"http://127.0.0.1:{box.port(pod_name, 8080)}/ready.txt"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def rolled_out(api: k8s.Api, generation: int) -> dict[str, Any] | None:
    found = await api.get(f"{DEPLOYMENTS}/web")
    status = (found or {}).get("status") or {}
    progressing = true_condition(found, "Progressing")
    done = (status.get("observedGeneration") == generation and status.get("updatedReplicas") == 1
            and status.get("replicas") == 1 and status.get("availableReplicas") == 1
            and progressing is not None and progressing["reason"] == "NewReplicaSetAvailable")  # fmt: skip
    return found if done else None


async def test_a_deployment_rolls_out_restarts_a_crash_and_rolls_a_new_template(box: PodBox, api: k8s.Api,
                                                                                workspace: Path) -> None:  # fmt: skip
    site(workspace, "v1", ready=True)
    await api.create(deployment("v1"))
    first = await box.wait_for(lambda: rolled_out(api, 1), SLOW, "v1 rolled out")
    assert true_condition(first, "Available") is not None
    [old] = box.pods("web-")
    old_name = old["metadata"]["name"]
    assert POD_NAME.match(old_name) and old_name.startswith(f"web-{label(old, 'pod-template-hash')}-")
    assert await fetch(box, old_name) == "v1"

    # A crash: restartPolicy Always restarts the container, which becomes ready again.
    await box.kill(old_name, signal.SIGKILL)
    crashed = await box.wait_for(lambda: _restarted(box, old_name), SLOW, "the server restarted and ready")
    assert crashed["restartCount"] == 1 and crashed["lastState"]["terminated"]["exitCode"] == 137
    assert await fetch(box, old_name) == "v1"

    # A new template: the new pod starts; the old one stays until the new one is ready (maxUnavailable 0).
    site(workspace, "v2", ready=False)
    await api.merge_patch(f"{DEPLOYMENTS}/web", {"spec": {"template": {"spec": {"containers": [server("v2")]}}}})
    new = await box.wait_for(lambda: _new_pod_running(box, old_name), SLOW, "the v2 pod running")
    assert not ready(new)
    assert [ready(p) for p in box.pods(old_name)] == [True] and old_name in box.processes()
    assert (await get(api, f"{DEPLOYMENTS}/web"))["metadata"]["generation"] == 2

    (workspace / "site-v2" / "ready.txt").write_text("v2")
    second = await box.wait_for(lambda: rolled_out(api, 2), SLOW, "v2 rolled out")
    await box.wait_for(lambda: not box.pods(old_name) and old_name not in box.processes(), SLOW, "old pod gone")
    assert [p["metadata"]["name"] for p in box.pods("web-")] == [new["metadata"]["name"]]
    assert await fetch(box, new["metadata"]["name"]) == "v2"
    rs = f"web-{label(new, 'pod-template-hash')}"
    progressing = present(true_condition(second, "Progressing"))
    assert progressing["message"] == f'ReplicaSet "{rs}" has successfully progressed.'
    assert box.errors == []


def _restarted(box: PodBox, pod_name: str) -> dict[str, Any] | None:
    pods = box.pods(pod_name)
    statuses = pods[0]["status"].get("containerStatuses") or [] if pods else []
    return statuses[0] if statuses and statuses[0]["restartCount"] == 1 and statuses[0]["ready"] else None


def _new_pod_running(box: PodBox, old_name: str) -> dict[str, Any] | None:
    new = [p for p in box.pods("web-") if p["metadata"]["name"] != old_name]
    return new[0] if new and new[0]["status"].get("phase") == "Running" else None
