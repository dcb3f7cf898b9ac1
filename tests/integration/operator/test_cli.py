"""`finetune operator` as a user starts it: a real process that finds the cluster through KUBECONFIG."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get(url: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return 0, ""


async def test_finetune_operator_command(kube, tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        f"""
apiVersion: v1
kind: Config
current-context: emulator
clusters: [{{name: emulator, cluster: {{server: "{str(kube.emulator.url).rstrip('/')}"}}}}]
users: [{{name: tester, user: {{token: test-token}}}}]
contexts: [{{name: emulator, context: {{cluster: emulator, user: tester}}}}]
"""
    )
    metrics, health = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(config), "FINETUNE_IMAGE": "registry.local/finetune:test"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    finetune = Path(sys.executable).parent / "finetune"
    proc = await asyncio.create_subprocess_exec(
        str(finetune), "operator", "--standalone", "--metrics-port", str(metrics), "--health-port", str(health),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await kube.eventually(lambda: _up(f"http://127.0.0.1:{health}/healthz"), timeout=60, what="/healthz")
        await kube.create("from-cli")
        jobset = await kube.wait_jobset("from-cli")
        pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "registry.local/finetune:test"
        await kube.add_pod("from-cli", 1, 0, "Running")
        await kube.wait_phase("from-cli", "Training")
        status, text = await get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and 'finetune_operator_jobs{phase="Training"} 1.0' in text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 0, output[-3000:]
    # Both kopf's watches and our own calls used the kubeconfig's credentials.
    creates = [r for r in list(kube.emulator._requests) if r.method == "POST" and "/jobsets" in str(r.url)]
    watches = [r for r in list(kube.emulator._requests) if r.params.get("watch") == "true"]
    assert creates and watches
    assert {r.headers.get("Authorization") for r in creates + watches} == {"Bearer test-token"}
    # Pods, JobSets and Deployments are watched with a server-side label selector: on a shared cluster
    # the operator never streams other teams' pods.
    selectors = {str(r.url.path).rsplit("/", 1)[-1]: r.params.get("labelSelector") for r in watches}
    for plural, component in (("pods", "trainer"), ("jobsets", "trainer"), ("deployments", "server")):
        assert selectors.get(plural) == (
            f"app.kubernetes.io/managed-by=finetune-operator,app.kubernetes.io/component={component}"), selectors


async def _up(url: str) -> bool:
    status, _ = await get(url)
    return status == 200
