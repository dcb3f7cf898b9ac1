"""A FineTuneJob's trainer gang and server run for real: the four scenarios of a cluster's daily life.

    .venv/bin/python -m pytest tests/integration/gang -q
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest

from finetune.operator import naming

pytestmark = pytest.mark.timeout(900)


def _predict(port: int, name: str, texts: list[str]) -> dict:
    body = json.dumps({"instances": texts}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{name}:predict", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


async def test_two_cpu_nodes_form_one_world_and_the_model_serves(gang) -> None:
    await gang.apply("sst2")
    status = await gang.wait_phase("sst2", "Serving")
    metrics = gang.metrics("sst2")
    assert metrics["training"]["world_size"] == 2  # two pods, one gloo world (not two separate copies)
    # What the operator gated on is what the trainer measured (from node 0's real termination message).
    assert status["metrics"]["f1"] == pytest.approx(metrics["test"]["f1"])
    assert status["modelPath"] == "/workspace/sst2/run-1"  # the container's own path, as in a cluster
    assert status["trainer"]["restarts"] == 0 and status["trainer"]["failures"] == []
    [server] = gang.box.pods(naming.server_name("sst2"))
    answer = _predict(gang.box.port(server["metadata"]["name"], 8080), "sst2", ["a great and lovely film"])
    assert len(answer["predictions"]) == 1


async def _has_checkpoint(output: Path) -> bool:
    return any((output / "checkpoints").glob("step-*"))


async def test_a_killed_rank_restarts_the_gang_which_resumes(gang) -> None:
    await gang.apply("kill", training={"epochs": 8, "checkpointSteps": 3, "evalSteps": 1000},
                     serving={"enabled": False}, scheduling={"backoffLimit": 2})
    await gang.box.wait_for(lambda: _has_checkpoint(gang.output("kill")), 600, "a first checkpoint")
    [rank1] = [p for p in gang.trainer_pods("kill", attempt=0)
               if p["metadata"]["annotations"][naming.COMPLETION_INDEX] == "1"]
    await gang.box.kill(rank1["metadata"]["name"], signal.SIGKILL)
    status = await gang.wait_phase("kill", "Succeeded")
    trainer = status["trainer"]
    assert trainer["restarts"] == 1 and trainer["restartsCounted"] == 1 and trainer["restartBudget"] == 2
    [first] = trainer["failures"]  # the root cause, not rank 0 losing its peer afterwards
    assert first["pod"] == rank1["metadata"]["name"] and first["nodeRank"] == 1
    assert first["exitCode"] == 128 + signal.SIGKILL and first["countsAgainstBudget"] is True
    training = gang.metrics("kill")["training"]
    assert training["resumed_from_step"] > 0 and training["world_size"] == 2
    assert (gang.output("kill") / "model.safetensors").exists()


async def test_a_disruption_restarts_without_using_the_budget(gang) -> None:
    """Node 0 is preempted mid-training; node 1 then loses its peer. The survivor must not fail its Job
    first (that would count against the budget): it waits, and the disruption decides a free restart."""
    await gang.apply("preempted", training={"epochs": 8, "checkpointSteps": 3, "evalSteps": 1000},
                     scheduling={"backoffLimit": 0}, serving={"enabled": False})
    await gang.box.wait_for(lambda: _has_checkpoint(gang.output("preempted")), 600, "training under way")
    [node0] = [p for p in gang.trainer_pods("preempted", attempt=0)
               if p["metadata"]["annotations"][naming.COMPLETION_INDEX] == "0"]
    await gang.box.disrupt(node0["metadata"]["name"], reason="PreemptionByScheduler")
    status = await gang.wait_phase("preempted", "Succeeded")
    trainer = status["trainer"]
    assert trainer["restarts"] == 1 and trainer["restartsCounted"] == 0  # backoffLimit 0, and still it ran
    [first] = trainer["failures"]
    assert first["pod"] == node0["metadata"]["name"]
    assert first["reason"] == "PreemptionByScheduler" and first["countsAgainstBudget"] is False
    assert gang.metrics("preempted")["training"]["resumed_from_step"] > 0


async def test_bad_data_fails_at_once_with_the_trainers_own_line(gang) -> None:
    await gang.apply("bad", resources={"nodes": 1}, dataset={"labelColumn": "stars"})
    status = await gang.wait_phase("bad", "Failed")
    assert status["reason"] == "PermanentError"
    assert "column 'stars' not found" in status["message"] and "a retry cannot fix" in status["message"]
    trainer = status["trainer"]
    assert trainer["restarts"] == 0  # never retried
    [first] = trainer["failures"]
    assert first["exitCode"] == 2 and first["reason"] == "PermanentError"
    assert "column 'stars' not found" in first["message"]
