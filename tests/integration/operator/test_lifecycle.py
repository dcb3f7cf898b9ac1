"""A FineTuneJob's life, with kopf running for real against the emulator.

The tests play the Job controller, the kubelet, Kueue and the Deployment controller by patching
child status; the operator must turn that into phases, conditions, Events and child objects.
"""

from __future__ import annotations

import asyncio

import pytest

from finetune.operator import naming

pytestmark = pytest.mark.timeout(120)


async def test_happy_path_to_serving(kube, running) -> None:
    await kube.create("sst2")
    job = await kube.wait_job("sst2")
    status = await kube.wait_phase("sst2", "Training")
    assert status["trainer"] == {"jobName": "sst2-train-1", "run": 1, "active": 0, "succeeded": 0, "failed": 0}
    assert status["startTime"] and status["observedGeneration"] == 1
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["suspend"] is False
    assert kube.live("services", "sst2") == ["sst2-train-1"]
    assert kube.live("configmaps", "sst2") == ["sst2-train-1"]
    assert kube.live("roles") == kube.live("rolebindings") == kube.live("serviceaccounts") == ["sst2-trainer"]

    # The trainer reports progress itself (its Role allows exactly this patch).
    progress = {"progress": "40/100", "training": {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 0.41,
                                                    "validationMetric": 0.87, "etaSeconds": 120.0}}
    await kube.api.merge_patch("/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/sst2/status",
                               {"status": progress})
    await kube.set_job_status("sst2-train-1", {"active": 1})
    await kube.eventually(lambda: _trainer_active(kube, "sst2", 1), what="active pod count")
    assert (await kube.status("sst2"))["progress"] == "40/100"  # the operator never clobbers it

    model = await kube.finish_training("sst2", metrics={"f1": 0.9, "accuracy": 0.91})
    status = await kube.wait_phase("sst2", "Deploying")
    assert status["modelPath"] == model
    assert status["metrics"] == {"f1": 0.9, "accuracy": 0.91}
    assert status["headlineMetric"] == "f1=0.9"
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
    assert conditions == {"SpecValid": "True", "VolumeFound": "True", "Trained": "True", "Promoted": "True",
                          "Ready": "True", "Serving": "True"}
    reasons = [reason for _, reason, _ in kube.events("sst2")]
    assert reasons == ["Training", "Evaluating", "Deploying", "Serving"]
    for plural, name in [("jobs", "sst2-train-1"), ("deployments", "sst2-server"), ("roles", "sst2-trainer")]:
        owner = kube.stored(plural, name)["metadata"]["ownerReferences"][0]
        assert owner["uid"] == "uid-sst2" and owner["controller"] is True


async def _trainer_active(kube, name: str, count: int) -> bool:
    return ((await kube.status(name)).get("trainer") or {}).get("active") == count


async def test_serving_disabled_ends_succeeded(kube, running) -> None:
    await kube.create("export-only", serving={"enabled": False})
    await kube.wait_job("export-only")
    await kube.finish_training("export-only")
    status = await kube.wait_phase("export-only", "Succeeded")
    assert status["modelPath"] == "/workspace/export-only/run-1"
    assert "endpoint" not in status
    assert kube.live("deployments") == []


async def test_gate_rejection_leaves_serving_alone(kube, running) -> None:
    await kube.create("weak", promotion={"minValue": 0.95})
    await kube.wait_job("weak")
    await kube.finish_training("weak", metrics={"f1": 0.9})
    status = await kube.wait_phase("weak", "Rejected")
    assert "f1=0.9 is below promotion.minValue 0.95" in status["message"]
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == "GateFailed"
    assert kube.live("deployments") == []
    assert ("Warning", "Rejected") in [(t, r) for t, r, _ in kube.events("weak")]


async def test_trainer_failure_with_a_clear_message(kube, running) -> None:
    await kube.create("bad-data")
    await kube.wait_job("bad-data")
    await kube.fail_pod("bad-data", 1, 0, 2, "SpecError: column 'label' not found in /workspace/data/train.tsv")
    await kube.set_job_status("bad-data-train-1", {"active": 0, "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
         "message": "Container trainer for pod ml/bad-data-train-1-0 failed with exit code 2"}]})
    status = await kube.wait_phase("bad-data", "Failed")
    assert "exited with code 2" in status["message"]
    assert "column 'label' not found" in status["message"]
    assert "kubectl logs job/bad-data-train-1" in status["message"]
    assert status["trainer"]["failed"] == 1
    trained = next(c for c in status["conditions"] if c["type"] == "Trained")
    assert trained["status"] == "False" and trained["reason"] == "PodFailurePolicy"


async def test_backoff_exhausted(kube, running) -> None:
    await kube.create("flaky", scheduling={"backoffLimit": 1})
    await kube.wait_job("flaky")
    await kube.set_job_status("flaky-train-1", {"failed": 2, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    status = await kube.wait_phase("flaky", "Failed")
    assert "more than scheduling.backoffLimit (1) times" in status["message"]


async def test_invalid_spec_fails_then_recovers_when_fixed(kube, running) -> None:
    await kube.create("typo", dataset={"train": {"path": "/data/train.tsv"}}, resources={"nodes": 0})
    status = await kube.wait_phase("typo", "Failed")
    assert "spec.resources.nodes" in status["message"]
    assert "SpecValid" in {c["type"] for c in status["conditions"] if c["status"] == "False"}
    await asyncio.sleep(0.5)
    assert kube.live("jobs") == []  # never a crash loop, never a Job for a broken spec
    await kube.edit("typo", resources={"nodes": 1})  # still outside the volume
    await kube.eventually(lambda: _message_has(kube, "typo", "spec.dataset.train.path"), what="path message")
    await kube.edit("typo", dataset={"train": {"path": "/workspace/data/train.tsv"}})
    await kube.wait_phase("typo", "Training")
    assert kube.live("jobs") == ["typo-train-1"]


async def _message_has(kube, name: str, text: str) -> bool:
    status = await kube.status(name)
    return text in (status.get("message") or "") and "nodes" not in status.get("message", "")


async def test_missing_volume_waits_with_a_message(kube, running) -> None:
    await kube.create("no-pvc", storage={"claimName": "later"})
    status = await kube.wait_phase("no-pvc", "Pending")
    assert "PersistentVolumeClaim 'later' not found" in status["message"]
    assert kube.live("jobs") == []
    await kube.api.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": "later", "namespace": "ml"}})
    await kube.wait_phase("no-pvc", "Training", timeout=15)


async def test_kueue_queues_until_admitted(kube, running) -> None:
    await kube.create("queued", scheduling={"queueName": "team-a"})
    job = await kube.wait_job("queued")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    status = await kube.wait_phase("queued", "Queued")
    assert "team-a" in status["message"]
    # Kueue admits the workload: it unsuspends the Job, and the Job controller starts the pods.
    await kube.api.merge_patch("/apis/batch/v1/namespaces/ml/jobs/queued-train-1", {"spec": {"suspend": False}})
    await kube.set_job_status("queued-train-1", {"active": 1})
    status = await kube.wait_phase("queued", "Training")
    admitted = next(c for c in status["conditions"] if c["type"] == "Admitted")
    assert admitted["status"] == "True"


async def test_disruption_resumes_the_same_run(kube, running) -> None:
    await kube.create("preempted")
    job = await kube.wait_job("preempted")
    output = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    await kube.set_job_status("preempted-train-1", {"active": 1})
    await kube.wait_phase("preempted", "Training")
    # The node is drained: the pod fails with DisruptionTarget; the podFailurePolicy ignores it, so the
    # Job controller starts a replacement without counting a failure, and it resumes from checkpoints.
    await kube.fail_pod("preempted", 1, 0, 143, "", [{"type": "DisruptionTarget", "status": "True",
                                                       "reason": "PreemptionByScheduler"}])
    await kube.set_job_status("preempted-train-1", {"active": 0})
    await kube.set_job_status("preempted-train-1", {"active": 1})
    await asyncio.sleep(0.5)
    status = await kube.status("preempted")
    assert status["phase"] == "Training" and status["trainer"]["run"] == 1
    assert kube.live("jobs") == ["preempted-train-1"]
    assert kube.stored("jobs", "preempted-train-1")["spec"]["template"]["spec"]["containers"][0]["command"][
        -1] == output
    await kube.finish_training("preempted")
    await kube.wait_phase("preempted", "Deploying")


async def test_a_stuck_rollout_is_reported(kube, running) -> None:
    await kube.create("stuck")
    await kube.wait_job("stuck")
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


async def test_a_trainer_job_deleted_by_hand_fails_with_a_message(kube, running) -> None:
    await kube.create("vanished")
    await kube.wait_job("vanished")
    await kube.wait_phase("vanished", "Training")
    await kube.api.delete("/apis/batch/v1/namespaces/ml/jobs/vanished-train-1")
    status = await kube.wait_phase("vanished", "Failed")
    assert "vanished-train-1 disappeared before it finished" in status["message"]
    await asyncio.sleep(0.3)
    assert kube.live("jobs", "vanished") == []  # not silently re-created behind the user's back
