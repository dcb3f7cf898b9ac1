"""What a user sees when a run cannot start, restarts, or waits in Kueue: reason, message, Events.

The tests play the scheduler, the kubelet, the JobSet controller and Kueue by writing what each of them
writes (pod conditions, container states, JobSet status, a Workload); the operator must turn it into a
FineTuneJob status a user can act on. The gang failing and restarting for real: tests/integration/podbox.
"""

from __future__ import annotations

import pytest

from finetune.contracts import one_line
from finetune.operator import diagnosis, k8s, naming
from finetune.operator.testing import declare, server_url

pytestmark = pytest.mark.timeout(120)
JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/ml/jobsets"
WORKLOADS = "/apis/kueue.x-k8s.io/v1beta1/namespaces/ml/workloads"


async def _reason(kube, name: str, reason: str) -> dict | None:
    status = await kube.status(name)
    return status if status.get("reason") == reason else None


async def test_an_unschedulable_gang_is_pending_with_the_schedulers_words(kube, running) -> None:
    await kube.create("big", resources={"nodes": 2, "gpusPerNode": 8})
    await kube.wait_jobset("big")
    await kube.add_pod("big", 1, 0, "Running")
    await kube.add_pod("big", 1, 1, "Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available"}])
    status = await kube.eventually(lambda: _reason(kube, "big", "Unschedulable"), what="Unschedulable")
    assert status["phase"] == "Pending"
    assert "big-train-1-node-0-1" in status["message"]
    assert "cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." in status["message"]
    # The scheduler finds room: the pod runs, and the job is training.
    await kube.api.merge_patch(f"/api/v1/namespaces/ml/pods/{_pod_name('big', 1, 0)}/status", {"status": {
        "phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}})
    await kube.eventually(lambda: _reason(kube, "big", "Running"), what="Running")


def _pod_name(owner: str, index: int, attempt: int) -> str:
    return f"{naming.trainer_name(owner, 1)}-node-0-{index}-a{attempt}pen"


async def test_an_image_that_cannot_be_pulled(kube, running) -> None:
    await kube.create("typo-image", image="registry.example.com/finetune:nope")
    await kube.wait_jobset("typo-image")
    await kube.add_pod("typo-image", 1, 0, "Pending", waiting={
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "registry.example.com/finetune:nope": not found'})
    status = await kube.eventually(lambda: _reason(kube, "typo-image", "ImagePullBackOff"), what="image pull")
    assert status["phase"] == "Pending"
    assert 'ImagePullBackOff: Back-off pulling image "registry.example.com/finetune:nope"' in status["message"]


async def test_a_failed_rank_and_the_gang_restart(kube, running) -> None:
    await kube.create("crash", resources={"nodes": 2, "gpusPerNode": 0})
    await kube.wait_jobset("crash")
    # Rank 1 is OOM-killed first; rank 0 then loses its peer. The JobSet restarts the gang once. What the
    # two pods say is what a real run said (tests/real_runs.py): node 0's message, node 1's last log lines.
    await kube.add_pod("crash", 1, 0, "Failed", code=76, message=kube.trained.peer_lost,
                       finished="2026-01-01T00:00:03Z")  # the victim may well be seen ending first
    await kube.add_pod("crash", 1, 1, "Failed", code=137, message=kube.trained.killed_log,
                       finished="2026-01-01T00:00:03Z")
    await kube.set_jobset_status("crash-train-1", {"restarts": 1, "restartsCountTowardsMax": 1, "conditions": [
        {"type": "RestartingJobSet", "status": "True", "reason": "DefaultFailurePolicy"}]})
    await kube.add_pod("crash", 1, 0, "Running", attempt=1)
    await kube.add_pod("crash", 1, 1, "Running", attempt=1)
    # The restart may be reported before the new attempt's pods are seen: wait for both (a loaded machine).
    status = await kube.eventually(lambda: _restarted_and_running(kube, "crash", 2), what="Restarted, 2 running")
    assert status["phase"] == "Training"
    assert "restart 1 (1 of 3 allowed failure restarts used) after pod crash-train-1-node-0-1" in status["message"]
    assert "(rank 1) exited with code 137" in status["message"]
    trainer = status["trainer"]
    assert trainer["restarts"] == trainer["restartsCounted"] == 1 and trainer["restartBudget"] == 3
    [first] = trainer["failures"]
    last_line = one_line(kube.trained.killed_log.splitlines()[-1], diagnosis.LOG_LINE_CHARS)
    assert first["nodeRank"] == 1 and first["exitCode"] == 137 and first["logTail"][-1] == last_line
    assert trainer["active"] == 2 and trainer["failed"] == 0  # counts are of the running attempt
    await kube.eventually(lambda: _has_event(kube, "crash", "TrainerRestarted"), what="a restart Event")


async def _restarted_and_running(kube, name: str, active: int) -> dict | None:
    status = await _reason(kube, name, "Restarted")
    return status if status and status.get("trainer", {}).get("active") == active else None


async def _has_event(kube, name: str, reason: str) -> bool:
    return reason in [r for _, r, _ in kube.events(name)]


async def test_a_permanent_error_fails_at_once_with_the_trainers_line(kube, running) -> None:
    await kube.create("bad")
    await kube.wait_jobset("bad")
    line = kube.trained.message("bad_data").message
    assert "column 'stars' not found" in line  # the trainer's own words, from a real run
    await kube.add_pod("bad", 1, 0, "Failed", code=2, message=kube.trained.bad_data, finished="2026-01-01T00:00:03Z")
    await kube.set_jobset_status("bad-train-1", {"conditions": [
        {"type": "Failed", "status": "True", "reason": "FailJobSetFailurePolicyAction",
         "message": "applying FailJobSet failure policy action (first failed job: bad-train-1-node-0)"}]})
    status = await kube.wait_phase("bad", "Failed")
    assert status["reason"] == "PermanentError"
    assert line in status["message"] and "a retry cannot fix" in status["message"]
    trained = next(c for c in status["conditions"] if c["type"] == "Trained")
    assert trained["status"] == "False" and trained["reason"] == "PermanentError"


async def test_kueue_says_why_the_trainer_waits(kube, running) -> None:
    declare(kube.emulator, kueue=True)
    await kube.create("waits", scheduling={"queueName": "team-a"})
    await kube.wait_jobset("waits")
    await kube.wait_phase("waits", "Queued")
    await kube.api.create({
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": "jobset-waits-train-1-4c1e2", "namespace": "ml",
                     "ownerReferences": [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                                          "name": "waits-train-1", "uid": "u"}]},
        "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                   "message": "couldn't assign flavors to pod set node: insufficient unused "
                                              "quota for cpu in flavor default, 4 more needed"}]},
    })
    status = await kube.eventually(lambda: _message_has(kube, "waits", "insufficient unused quota"), what="Kueue")
    assert status["phase"] == "Queued"
    assert status["message"].startswith("waiting for Kueue to admit the trainer (LocalQueue 'team-a'): couldn't")


async def _message_has(kube, name: str, text: str) -> dict | None:
    status = await kube.status(name)
    return status if text in (status.get("message") or "") else None


@pytest.fixture()
def no_jobset(kmock):
    """A cluster without JobSet's CRD."""
    declare(kmock, namespaces=("ml",), jobset=False)
    kmock.objects["v1/persistentvolumeclaims", "ml", "data"] = {"metadata": {"name": "data", "namespace": "ml"}}
    return kmock


async def test_without_the_jobset_api_nothing_is_created(no_jobset, trained) -> None:
    from tests.integration.operator.conftest import Kube

    async with k8s.Api(k8s.Cluster(server=server_url(no_jobset))) as api, Kube(no_jobset, api, trained).operator():
        kube = Kube(no_jobset, api, trained)
        await kube.create("early")
        status = await kube.eventually(lambda: _reason(kube, "early", "JobSetMissing"), what="JobSetMissing")
        assert status["phase"] == "Pending"
        assert "kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases" in status["message"]
        condition = next(c for c in status["conditions"] if c["type"] == "JobSetAvailable")
        assert condition["status"] == "False"
        for plural in ("configmaps", "roles", "serviceaccounts", "rolebindings"):
            assert kube.live(plural, "early") == [], plural
        # The platform team installs JobSet: the job goes ahead on its own.
        declare(no_jobset, jobset=True)
        await kube.wait_phase("early", "Training")
        assert kube.live("jobsets", "early") == ["early-train-1"]


async def test_a_jobset_too_old_for_the_failure_rules_creates_nothing(kube, running, monkeypatch) -> None:
    """An API server whose JobSet CRD (before v0.10) has no onJobFailureMessagePatterns prunes it: the
    dry run shows it, and the job waits with the upgrade command instead of failing on every preemption."""
    answer = kube.emulator._dry_run_create

    def old_jobset(request):  # the pruning an old CRD schema does
        if request.resource.plural == "jobsets":
            for rule in request.data["spec"]["failurePolicy"]["rules"]:
                rule.pop("onJobFailureMessagePatterns", None)
        return answer(request)

    monkeypatch.setattr(kube.emulator, "_dry_run_create", old_jobset)
    await kube.create("old")
    status = await kube.eventually(lambda: _reason(kube, "old", "JobSetTooOld"), what="JobSetTooOld")
    assert status["phase"] == "Pending" and "older than v0.10.0" in status["message"]
    assert kube.live("jobsets", "old") == [] and kube.live("configmaps", "old") == []
    monkeypatch.setattr(kube.emulator, "_dry_run_create", answer)  # JobSet upgraded
    await kube.wait_phase("old", "Training")


async def test_endless_disruptions_stop_the_run(kube, running) -> None:
    """Disruptions use no budget, so JobSet would restart a trainer evicted again and again forever."""
    await kube.create("evicted", scheduling={"maxDisruptions": 2})
    await kube.wait_jobset("evicted")
    await kube.set_jobset_status("evicted-train-1", {"restarts": 2, "restartsCountTowardsMax": 0})
    await kube.eventually(lambda: _reason(kube, "evicted", "Restarted"), what="two free restarts")
    await kube.set_jobset_status("evicted-train-1", {"restarts": 3, "restartsCountTowardsMax": 0})
    status = await kube.wait_phase("evicted", "Failed")
    assert status["reason"] == "DisruptionLimitExceeded" and "disrupted 3 times" in status["message"]
    await kube.eventually(lambda: _gone(kube, "evicted-train-1"), what="the JobSet deleted")


async def _gone(kube, name: str) -> bool:
    return name not in kube.live("jobsets")


async def test_a_refused_jobset_fails_with_the_api_servers_words(kube, running, monkeypatch) -> None:
    """A webhook or policy engine refusing the JobSet is not retried forever in silence."""
    from aiohttp import web

    answer = kube.emulator._dry_run_create

    def policy(request):  # e.g. a Kyverno/Gatekeeper rule on trainer images
        if request.resource.plural == "jobsets":
            return web.json_response({"kind": "Status", "code": 422, "message": 'admission webhook '
                                      '"validate.kyverno.svc" denied the request: images must come from '
                                      'registry.corp'}, status=422)
        return answer(request)

    monkeypatch.setattr(kube.emulator, "_dry_run_create", policy)
    await kube.create("refused")
    status = await kube.wait_phase("refused", "Failed")
    assert status["reason"] == "TrainerRefused" and "images must come from registry.corp" in status["message"]
    assert kube.live("jobsets", "refused") == [] and kube.live("roles", "refused") == []
