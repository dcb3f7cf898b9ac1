"""A FineTuneJob's life, with kopf running for real against the emulator.

The tests play the JobSet controller, the kubelet, Kueue and the Deployment controller by patching
child status; the operator must turn that into phases, conditions, Events and child objects. The
trainer's result is a real run's termination message (`trained`); the gang running for real, failing
and restarting is in tests/integration/podbox.
"""

from __future__ import annotations

import asyncio

import pytest

from finetune.contracts import one_line
from finetune.operator import diagnosis, naming
from finetune.status import Progress

JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/ml/jobsets"

pytestmark = pytest.mark.timeout(120)


async def test_happy_path_to_serving(kube, running) -> None:
    await kube.create("sst2")
    jobset = await kube.wait_jobset("sst2")
    status = await kube.wait_phase("sst2", "Training")
    assert status["trainer"]["jobSetName"] == "sst2-train-1" and status["trainer"]["run"] == 1
    assert status["trainer"]["restarts"] == 0 and status["trainer"]["restartBudget"] == 3
    assert status["startTime"] and status["observedGeneration"] == 1 and status["reason"] == "Running"
    assert jobset["spec"]["suspend"] is False
    assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["completionMode"] == "Indexed"
    assert kube.live("services", "sst2") == []  # the JobSet controller makes the gang's headless Service
    assert kube.live("configmaps", "sst2") == ["sst2-train-1"]
    assert kube.live("roles") == kube.live("rolebindings") == kube.live("serviceaccounts") == ["sst2-trainer"]

    # The trainer reports progress itself (its Role allows exactly this patch): the patch a real run sent.
    patch = kube.trained.progress_patch
    Progress.model_validate(patch["status"]["training"])  # the typed contract both sides use
    await kube.api.merge_patch("/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/sst2/status", patch)
    await kube.add_pod("sst2", 1, 0, "Running")
    await kube.eventually(lambda: _trainer_active(kube, "sst2", 1), what="active pod count")
    status = await kube.status("sst2")
    assert status["progress"] == patch["status"]["progress"]  # the operator never clobbers it
    sent = {key: value for key, value in patch["status"]["training"].items() if value is not None}
    assert status["training"] == sent  # a merge patch's null removes a field (no validation yet)

    model = await kube.finish_training("sst2")
    status = await kube.wait_phase("sst2", "Deploying")
    good = kube.trained.result("good")
    assert status["modelPath"] == model == good.model_path
    assert status["metrics"] == good.metrics and set(good.metrics) >= {"accuracy", "f1", "precision", "recall"}
    assert status["headlineMetric"] == f"f1={good.metrics['f1']:.4g}"
    deployment = kube.stored("deployments", "sst2-server")
    assert deployment["spec"]["template"]["metadata"]["annotations"][naming.ANNOTATION_MODEL] == model
    assert kube.live("services", "sst2-server") == ["sst2-server"]
    assert kube.live("poddisruptionbudgets") == ["sst2-server"]
    assert kube.live("horizontalpodautoscalers") == []

    await kube.roll_out("sst2")
    status = await kube.wait_phase("sst2", "Serving")
    assert status["servingModelPath"] == model
    assert status["endpoint"] == "http://sst2-server.ml.svc.cluster.local"
    assert status["completionTime"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"SpecValid": "True", "VolumeFound": "True", "JobSetAvailable": "True", "Trained": "True",
                          "Promoted": "True", "Ready": "True", "Serving": "True"}
    events = await kube.wait_events("sst2", lambda found: found and found[-1][1] == "Serving", "the Serving Event")
    assert [reason for _, reason, _ in events] == ["Training", "Evaluating", "Deploying", "Serving"]
    for plural, name in [("jobsets", "sst2-train-1"), ("deployments", "sst2-server"), ("roles", "sst2-trainer")]:
        owner = kube.stored(plural, name)["metadata"]["ownerReferences"][0]
        assert owner["uid"] == "uid-sst2" and owner["controller"] is True


async def _trainer_active(kube, name: str, count: int) -> bool:
    return ((await kube.status(name)).get("trainer") or {}).get("active") == count


async def test_serving_disabled_ends_succeeded(kube, running) -> None:
    await kube.create("export-only", serving={"enabled": False})
    await kube.wait_jobset("export-only")
    model = await kube.finish_training("export-only")
    status = await kube.wait_phase("export-only", "Succeeded")
    assert status["modelPath"] == model
    assert "endpoint" not in status
    assert kube.live("deployments") == []


async def test_gate_rejection_leaves_serving_alone(kube, running) -> None:
    await kube.create("weak", promotion={"minValue": 0.8})
    await kube.wait_jobset("weak")
    await kube.finish_training("weak", which="weak")
    status = await kube.wait_phase("weak", "Rejected")
    f1 = kube.trained.result("weak").metrics["f1"]
    assert f"f1={f1:.4g} is below promotion.minValue 0.8" in status["message"]
    assert status["reason"] == "GateFailed"
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == "GateFailed"
    assert kube.live("deployments") == []
    await kube.wait_events("weak", lambda found: ("Warning", "Rejected") in [(t, r) for t, r, _ in found],
                           "a Warning Event Rejected")


async def test_backoff_exhausted(kube, running) -> None:
    await kube.create("flaky", scheduling={"backoffLimit": 1})
    await kube.wait_jobset("flaky")
    # What a real OOM-killed trainer pod leaves: no termination message, its last log lines (tests/real_runs.py).
    await kube.add_pod("flaky", 1, 0, "Failed", code=137, message=kube.trained.killed_log, attempt=1,
                       finished="2026-01-01T00:10:00Z")
    await kube.set_jobset_status("flaky-train-1", {"restarts": 1, "restartsCountTowardsMax": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "ReachedMaxRestarts",
         "message": "jobset failed due to reaching max number of restarts (first failed job: flaky-train-1-node-0)"}]})
    status = await kube.wait_phase("flaky", "Failed")
    assert status["reason"] == "BackoffLimitExceeded"
    assert "failed 2 times; scheduling.backoffLimit allows 1 restart(s)" in status["message"]
    assert "exited with code 137" in status["message"] and "kubectl logs flaky-train-1-node-0-0" in status["message"]
    logged = [line for line in kube.trained.killed_log.splitlines() if line.strip()][-diagnosis.LOG_LINES:]
    assert status["trainer"]["failures"][-1]["logTail"] == [one_line(x, diagnosis.LOG_LINE_CHARS) for x in logged]


async def test_invalid_spec_fails_then_recovers_when_fixed(kube, running) -> None:
    await kube.create("typo", dataset={"train": {"path": "/data/train.tsv"}}, resources={"nodes": 0})
    status = await kube.wait_phase("typo", "Failed")
    assert "spec.resources.nodes" in status["message"]
    assert "SpecValid" in {c["type"] for c in status["conditions"] if c["status"] == "False"}
    await asyncio.sleep(0.5)
    assert kube.live("jobsets") == []  # never a crash loop, never a trainer for a broken spec
    await kube.edit("typo", resources={"nodes": 1})  # still outside the volume
    await kube.eventually(lambda: _message_has(kube, "typo", "spec.dataset.train.path"), what="path message")
    await kube.edit("typo", dataset={"train": {"path": "/workspace/data/train.tsv"}})
    await kube.wait_phase("typo", "Training")
    assert kube.live("jobsets") == ["typo-train-1"]


async def _message_has(kube, name: str, text: str) -> bool:
    status = await kube.status(name)
    return text in (status.get("message") or "") and "nodes" not in status.get("message", "")


async def test_missing_volume_waits_with_a_message(kube, running) -> None:
    await kube.create("no-pvc", storage={"claimName": "later"})
    status = await kube.wait_phase("no-pvc", "Pending")
    assert "PersistentVolumeClaim 'later' not found" in status["message"]
    assert kube.live("jobsets") == []
    await kube.api.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": "later", "namespace": "ml"}})
    await kube.wait_phase("no-pvc", "Training")


async def test_kueue_queues_until_admitted(kube, running) -> None:
    await kube.create("queued", scheduling={"queueName": "team-a"})
    jobset = await kube.wait_jobset("queued")
    assert jobset["spec"]["suspend"] is True
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    status = await kube.wait_phase("queued", "Queued")
    assert "team-a" in status["message"]
    # Kueue admits the workload: it unsuspends the JobSet, and the JobSet controller starts the pods.
    await kube.api.merge_patch(f"{JOBSETS}/queued-train-1", {"spec": {"suspend": False}})
    await kube.add_pod("queued", 1, 0, "Running")
    status = await kube.wait_phase("queued", "Training")
    admitted = next(c for c in status["conditions"] if c["type"] == "Admitted")
    assert admitted["status"] == "True"


async def test_a_stuck_rollout_is_reported(kube, running) -> None:
    await kube.create("stuck")
    await kube.wait_jobset("stuck")
    await kube.finish_training("stuck")
    await kube.wait_phase("stuck", "Deploying")
    await kube.api.merge_patch("/apis/apps/v1/namespaces/ml/deployments/stuck-server/status", {"status": {
        "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0, "conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "stuck-server-7d9" has timed out progressing.'}]}})
    await kube.eventually(lambda: _message_has_text(kube, "stuck", "ProgressDeadlineExceeded"), what="stuck")
    status = await kube.status("stuck")
    assert status["phase"] == "Deploying"
    assert "kubectl describe deployment stuck-server" in status["message"]


async def _message_has_text(kube, name: str, text: str) -> bool:
    return text in (await kube.status(name)).get("message", "")


async def test_a_trainer_jobset_deleted_by_hand_fails_with_a_message(kube, running) -> None:
    await kube.create("vanished")
    await kube.wait_jobset("vanished")
    await kube.wait_phase("vanished", "Training")
    await kube.api.delete(f"{JOBSETS}/vanished-train-1")
    status = await kube.wait_phase("vanished", "Failed")
    assert "vanished-train-1 disappeared before it finished" in status["message"]
    await asyncio.sleep(0.3)
    assert kube.live("jobsets", "vanished") == []  # not silently re-created behind the user's back
