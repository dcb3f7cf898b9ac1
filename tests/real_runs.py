"""What the trainer really leaves behind, from real runs of the trainer pod's command (once per session).

Tests of everything that reads the trainer's output (the operator's status, its diagnosis, RBAC's
scenario) take these termination messages and logs instead of writing their own copies:

- `good`, `good_node1`: node 0's and node 1's messages of a 2-node CPU run that trains well;
- `weak`, `weak_again`: two runs of one barely-trained model (two output folders: a model that did not
  improve);
- `bad_data`: a run whose label column does not exist (exit 2, the trainer's one-line error);
- `peer_lost`, `killed_log`: a 2-node run whose node 1 is SIGKILLed mid-training (an OOM kill of the
  pod): node 0's message (it lost its peer, exit 76) and the last log lines node 1 left, which is what
  the kubelet reports for a container killed before it could write a message;
- `progress_patch`: the first status merge patch the `good` run's trainer sent to its FineTuneJob
  (to a stand-in API server over HTTPS, tests/status_capture.py), with the container's own env.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.contracts import EXIT_PEER_LOST, EXIT_PERMANENT, TerminationMessage, TrainerResult
from tests.integration.pod_command import container_env, free_port, pod_command
from tests.integration.synthetic import synthetic_rows, write_tsv
from tests.status_capture import TOKEN, StatusCapture

BOUND = 600.0  # seconds; the machine is shared, a bound is never a timing assertion
KUBELET_LOG_LINES = 80  # FallbackToLogsOnError keeps the last 80 lines (at most 2048 bytes)


@dataclasses.dataclass(frozen=True)
class Trained:
    good: str
    good_node1: str
    weak: str
    weak_again: str
    bad_data: str
    peer_lost: str
    killed_log: str
    progress_patch: dict[str, Any]

    def message(self, which: str) -> TerminationMessage:
        message = TerminationMessage.decode(getattr(self, which))
        assert message is not None, getattr(self, which)
        return message

    def result(self, which: str) -> TrainerResult:
        result = self.message(which).result
        assert result is not None, which
        return result


def write_job(folder: Path, model: Path, data: Path, *, nodes: int = 1, training: dict[str, Any] | None = None,
              **sections: Any) -> Path:
    """A small CPU job for the tiny model; `training` merges into its training section, `sections` replace."""
    spec = {
        "task": "text-classification",
        "model": {"path": str(model)},
        "dataset": {"train": {"path": str(data)}, "textColumn": "review", "labelColumn": "sentiment"},
        "training": {"epochs": 1, "batchSize": 16, "learningRate": 3e-3, "maxLength": 32, "warmupRatio": 0.0,
                     **(training or {})},
        "resources": {"nodes": nodes, "gpusPerNode": 0},
        **sections,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": folder.name}, "spec": spec}))
    return path


def start_nodes(job: Path, folder: Path, nodes: int, **env: str) -> list[subprocess.Popen[bytes]]:
    """Each node's pod command as its own process group (a pod), on one rendezvous port."""
    port = free_port()
    procs = []
    for rank in range(nodes):
        command = pod_command(job, folder / "out", folder / f"termination-{rank}", node_rank=rank, port=port)
        with open(folder / f"node-{rank}.log", "wb") as out:
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}))
    return procs


def wait_all(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    try:
        return [p.wait(timeout=BOUND) for p in procs]
    finally:
        stop(procs)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """No run outlives its test session, whatever happened."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_nodes(folder: Path, job: Path, nodes: int, expect: int, **env: str) -> list[str]:
    procs = start_nodes(job, folder, nodes, **env)
    codes = wait_all(procs)
    logs = [(folder / f"node-{r}.log").read_text()[-3000:] for r in range(nodes)]
    assert codes == [expect] * nodes, (codes, logs)
    return [(folder / f"termination-{r}").read_text() for r in range(nodes)]


def peer_lost_run(folder: Path, job: Path) -> tuple[str, str]:
    """Node 1 SIGKILLed (the whole pod) once training is under way: node 0 loses its peer."""
    procs = start_nodes(job, folder, 2, FINETUNE_PEER_LOST_WAIT_SECONDS="0")
    deadline = time.monotonic() + BOUND
    try:
        while not any((folder / "out" / "checkpoints").glob("step-*")):
            assert procs[0].poll() is None and procs[1].poll() is None, "a node ended before training was under way"
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        os.killpg(procs[1].pid, signal.SIGKILL)
        codes = [p.wait(timeout=BOUND) for p in procs]
    finally:
        stop(procs)
    assert codes[0] == EXIT_PEER_LOST, (codes, (folder / "node-0.log").read_text()[-3000:])
    lines = (folder / "node-1.log").read_text().splitlines()[-KUBELET_LOG_LINES:]
    return (folder / "termination-0").read_text(), "\n".join(lines)[-2048:]


def first_progress_patch(patches: list[dict[str, Any]], env: dict[str, str]) -> dict[str, Any]:
    """The first patch, checked to be what the trainer's Role allows: a merge patch of its own job's status."""
    assert patches, "the trainer sent no status patch"
    first = patches[0]
    name, namespace = env["FINETUNE_JOB_NAME"], env["FINETUNE_JOB_NAMESPACE"]
    assert first["path"] == f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status"
    assert first["authorization"] == f"Bearer {TOKEN}"
    assert first["content_type"] == "application/merge-patch+json"
    body: dict[str, Any] = first["body"]
    return body


def train_all(root: Path, model: Path) -> Trained:
    data = write_tsv(root / "train.tsv", synthetic_rows(400, seed=1), ("review", "sentiment", "locale"))
    weak = {"maxSteps": 1, "learningRate": 1e-6}
    good_job = write_job(root / "good", model, data, nodes=2, training={"epochs": 6})
    with StatusCapture(root / "good" / "serviceaccount") as api:
        good, good_node1 = run_nodes(root / "good", good_job, 2, 0, **container_env(good_job), **api.env)
    progress_patch = first_progress_patch(api.patches, container_env(good_job))
    [weak_message] = run_nodes(root / "weak", write_job(root / "weak", model, data, training=weak), 1, 0)
    [weak_again] = run_nodes(root / "weak-again", write_job(root / "weak-again", model, data, training=weak), 1, 0)
    bad = write_job(root / "bad-data", model, data, dataset={
        "train": {"path": str(data)}, "textColumn": "review", "labelColumn": "stars"})
    [bad_data] = run_nodes(root / "bad-data", bad, 1, EXIT_PERMANENT)
    long_run = write_job(root / "peer-lost", model, data, nodes=2,
                         training={"epochs": 50, "checkpointSteps": 2, "evalSteps": 1000})
    peer_lost, killed_log = peer_lost_run(root / "peer-lost", long_run)
    trained = Trained(good, good_node1, weak_message, weak_again, bad_data, peer_lost, killed_log, progress_patch)
    assert trained.result("good").metrics["f1"] > trained.result("weak").metrics["f1"] + 0.05
    assert trained.result("good").world_size == 2
    return trained
