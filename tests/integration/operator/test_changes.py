"""Spec edits, deletion, operator restarts, many jobs at once, and the operator's own /metrics."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from finetune.operator import naming

pytestmark = pytest.mark.timeout(180)


async def serve(kube, name: str, **overrides) -> dict:
    """Create a FineTuneJob and drive it to Serving."""
    await kube.create(name, **overrides)
    await kube.wait_jobset(name)
    await kube.finish_training(name)
    await kube.wait_phase(name, "Deploying")
    await kube.roll_out(name)
    return await kube.wait_phase(name, "Serving")


def model_of(kube, name: str) -> str:
    deployment = kube.stored("deployments", naming.server_name(name))
    return deployment["spec"]["template"]["metadata"]["annotations"][naming.ANNOTATION_MODEL]


async def test_serving_edit_rerolls_only_the_deployment(kube, running) -> None:
    await serve(kube, "edit-serving")
    await kube.edit("edit-serving", serving={"replicas": 3, "maxReplicas": 5, "cpu": "3"})
    await kube.eventually(lambda: _hpa(kube, "edit-serving-server"), what="the HPA")
    deployment = kube.stored("deployments", "edit-serving-server")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "3"
    assert kube.stored("horizontalpodautoscalers", "edit-serving-server")["spec"]["minReplicas"] == 3
    status = await kube.status("edit-serving")
    assert status["trainer"]["run"] == 1 and status["observedGeneration"] == 2
    assert kube.live("jobsets", "edit-serving") == ["edit-serving-train-1"]  # no new training run
    assert model_of(kube, "edit-serving") == kube.trained.result("good").model_path


async def _hpa(kube, name: str) -> bool:
    return name in kube.live("horizontalpodautoscalers")


async def test_training_edit_starts_a_new_run_and_keeps_serving_until_the_gate(kube, running) -> None:
    weak, good = kube.trained.result("weak"), kube.trained.result("good")
    await kube.create("retrain", promotion={"minImprovement": 0.01})
    await kube.wait_jobset("retrain")
    await kube.finish_training("retrain", which="weak")
    await kube.wait_phase("retrain", "Deploying")
    await kube.roll_out("retrain")
    await kube.wait_phase("retrain", "Serving")
    # A model no better than the one serving: rejected, and the first model keeps serving.
    await kube.edit("retrain", training={"epochs": 2})
    await kube.wait_jobset("retrain", run=2)
    status = await kube.wait_phase("retrain", "Training")
    assert status["trainer"]["run"] == 2 and "modelPath" not in status and "progress" not in status
    await kube.eventually(lambda: _only_jobset(kube, "retrain", "retrain-train-2"), what="the old run's trainer gone")
    assert status["servingModelPath"] == weak.model_path
    await kube.finish_training("retrain", run=2, which="weak_again")
    status = await kube.wait_phase("retrain", "Rejected")
    assert "less than promotion.minImprovement" in status["message"]
    assert f"still serving {weak.model_path}" in status["message"]
    assert model_of(kube, "retrain") == weak.model_path
    assert status["endpoint"]
    # A better model: passes the gate and rolls out.
    await kube.edit("retrain", training={"epochs": 3})
    await kube.wait_jobset("retrain", run=3)
    await kube.finish_training("retrain", run=3, which="good")
    # The emulator does not bump metadata.generation, so the old rollout status looks current and the
    # phase may go straight to Serving; a real cluster shows Deploying until the new pods are ready.
    await kube.eventually(lambda: _serving_model(kube, "retrain", good.model_path), what="run 3 served")
    assert model_of(kube, "retrain") == good.model_path
    status = await kube.wait_phase("retrain", "Serving")
    assert status["servingModelPath"] == good.model_path
    assert status["servingMetrics"]["f1"] == good.metrics["f1"]


async def _only_jobset(kube, owner: str, name: str) -> bool:
    return kube.live("jobsets", owner) == [name]


async def _serving_model(kube, name: str, path: str) -> bool:
    return (await kube.status(name)).get("servingModelPath") == path


async def test_deletion_leaves_children_to_the_garbage_collector(kube, running) -> None:
    await serve(kube, "gone")
    children = {p: kube.live(p, "gone") for p in ("jobsets", "services", "configmaps", "deployments", "roles",
                                                 "rolebindings", "serviceaccounts", "poddisruptionbudgets")}
    await kube.delete("gone")
    await kube.eventually(lambda: _deleted(kube, "gone"), what="the FineTuneJob gone")
    await asyncio.sleep(0.5)
    for plural, names in children.items():
        assert names, plural
        for name in names:
            refs = kube.stored(plural, name)["metadata"]["ownerReferences"]
            assert refs == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "gone",
                             "uid": "uid-gone", "controller": True, "blockOwnerDeletion": True}]
    # Nothing is re-created for a deleted owner, even when a child changes afterwards.
    await kube.set_jobset_status("gone-train-1", {"restarts": 0})
    await asyncio.sleep(0.3)
    assert kube.live("finetunejobs") == []


async def _deleted(kube, name: str) -> bool:
    return name not in kube.live("finetunejobs")


async def test_restart_mid_reconcile_creates_no_duplicates(kube) -> None:
    async with kube.operator():
        await kube.create("restart")
        await kube.wait_jobset("restart")
        await kube.wait_phase("restart", "Training")
    # The operator died between creating the Job and recording it in the status.
    await kube.api.merge_patch("/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/restart/status",
                               {"status": {"trainer": None, "phase": None, "conditions": None}})
    async with kube.operator():
        status = await kube.wait_phase("restart", "Training")
        assert status["trainer"]["run"] == 1
        assert kube.live("jobsets", "restart") == ["restart-train-1"]
    # While no operator runs, the training finishes; the next operator picks it up from the Job.
    await kube.finish_training("restart")
    async with kube.operator():
        await kube.wait_phase("restart", "Deploying")
        await kube.roll_out("restart")
        status = await kube.wait_phase("restart", "Serving")
        await kube.wait_events("restart", lambda found: "Serving" in [r for _, r, _ in found], "the Serving Event")
    assert kube.live("jobsets", "restart") == ["restart-train-1"]
    assert kube.live("deployments", "restart") == ["restart-server"]
    assert status["metrics"] == kube.trained.result("good").metrics
    reasons = [reason for _, reason, _ in kube.events("restart")]
    assert reasons.count("Serving") == 1


async def test_a_hundred_jobs_at_once(kube, running) -> None:
    names = [f"bulk-{i:03d}" for i in range(100)]
    started = time.monotonic()
    await asyncio.gather(*(kube.create(n) for n in names))
    await kube.eventually(lambda: _all_phase(kube, names, "Training"), timeout=120, what="100 jobs training")
    created = time.monotonic() - started
    assert len(kube.live("jobsets", "bulk-")) == 100
    await asyncio.gather(*(kube.finish_training(n) for n in names))
    await kube.eventually(lambda: _all_phase(kube, names, "Deploying"), timeout=120, what="100 jobs deploying")
    await asyncio.gather(*(kube.roll_out(n) for n in names))
    await kube.eventually(lambda: _all_phase(kube, names, "Serving"), timeout=120, what="100 jobs serving")
    assert len(kube.live("deployments", "bulk-")) == 100
    print(f"100 FineTuneJobs: all trainer Jobs in {created:.1f}s, all Serving in {time.monotonic() - started:.1f}s")


async def _all_phase(kube, names: list[str], phase: str) -> bool:
    phases = {(obj.get("status") or {}).get("phase") for (res, _, key), obj in kube.emulator.objects.items()
              if getattr(res, "plural", None) == "finetunejobs" and key in names and not obj.deleted}
    return phases == {phase} and len(names) > 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


async def test_operator_metrics(kube) -> None:
    port = free_port()
    async with kube.operator(metrics_port=port, metrics_host="127.0.0.1"):
        before = await scrape(port)
        await serve(kube, "observed")
        await kube.create("rejected", promotion={"minValue": 0.8})
        await kube.wait_jobset("rejected")
        await kube.finish_training("rejected", which="weak")
        await kube.wait_phase("rejected", "Rejected")
        after = await scrape(port)
    assert after['finetune_operator_jobs{phase="Serving"}'] == 1
    assert after['finetune_operator_jobs{phase="Rejected"}'] == 1
    assert after['finetune_operator_jobs{phase="Training"}'] == 0

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('finetune_operator_trainer_runs_total{outcome="succeeded"}') == 1
    assert delta('finetune_operator_trainer_runs_total{outcome="rejected"}') == 1
    assert delta('finetune_operator_reconcile_duration_seconds_count{handler="finetunejob"}') >= 2
    assert delta('finetune_operator_reconcile_duration_seconds_count{handler="trainer-jobset"}') >= 2
    assert 'finetune_operator_reconcile_errors_total{handler="finetunejob"}' in after


async def test_turning_serving_off_removes_the_server(kube, running) -> None:
    await serve(kube, "switch-off")
    await kube.edit("switch-off", serving={"enabled": False})
    status = await kube.wait_phase("switch-off", "Succeeded")
    assert "endpoint" not in status and "servingModelPath" not in status
    assert kube.live("deployments", "switch-off") == [] and kube.live("services", "switch-off-server") == []
    assert kube.live("jobsets", "switch-off") == ["switch-off-train-1"]  # no retraining either


async def test_service_monitor_only_when_its_crd_exists(kube, running) -> None:
    status = await serve(kube, "monitored", monitoring={"serviceMonitor": True})
    assert "ServiceMonitor CRD (Prometheus Operator) is missing" in status["message"]
    kube.emulator.resources["monitoring.coreos.com/v1/servicemonitors"] = kube.emulator.ResourceInfo(
        kind="ServiceMonitor", namespaced=True, verbs={"get", "list", "create", "patch", "delete"}
    )
    await kube.edit("monitored", serving={"replicas": 2, "cpu": "2"})
    await kube.eventually(lambda: _has(kube, "servicemonitors", "monitored-server"), what="the ServiceMonitor")
    monitor = kube.stored("servicemonitors", "monitored-server")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    await kube.eventually(lambda: _message_clean(kube, "monitored"), what="the CRD warning cleared")


async def _message_clean(kube, name: str) -> bool:
    status = await kube.status(name)
    return status.get("phase") == "Serving" and "missing" not in status.get("message", "")


async def _has(kube, plural: str, name: str) -> bool:
    return name in kube.live(plural)


async def test_a_broken_edit_fails_without_touching_the_server_and_a_fix_restores_it(kube, running) -> None:
    await serve(kube, "oops")
    await kube.edit("oops", resources={"nodes": 0})
    status = await kube.wait_phase("oops", "Failed")
    assert status["message"].startswith("invalid spec: spec.resources.nodes")
    assert model_of(kube, "oops") == kube.trained.result("good").model_path  # the server keeps running
    await kube.edit("oops", resources={"nodes": 1})
    status = await kube.wait_phase("oops", "Serving")
    assert {c["type"]: c["status"] for c in status["conditions"]}["SpecValid"] == "True"
    assert not status["message"].startswith("invalid spec")
    assert kube.live("jobsets", "oops") == ["oops-train-1"]
