"""Least privilege, checked against the real operator: its API calls against kmock vs the chart's role.

The real operator (kopf, `standalone` and cluster-wide as the chart runs it) drives FineTuneJobs through
their life cycle against kmock's Kubernetes emulator, declared with `finetune.operator.testing.declare`
as the operator's own integration tests do. The test plays the user, the JobSet controller, the kubelet,
Kueue and the Deployment controller. The operator's requests carry a bearer token the test side does not send, so
kmock's request log separates the operator's calls from the test's. The trainer pods' termination
messages are those of real trainer runs (the `trained` session fixture, tests/real_runs.py). Then:
- every call the operator made is allowed by the chart's ClusterRole;
- every (group, resource, verb) the ClusterRole grants was used, or is listed in UNEXERCISED with the
  code path that needs it.
Discovery (`/api`, `/apis/...` without a resource) is a non-resource URL every authenticated user may
read (`system:discovery`), so the role does not grant it.

    .venv/bin/pytest tests/unit/deploy/test_rbac.py -q
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "finetune-operator"
TOKEN = "operator-under-rbac-test"
NS = "ml"
FTJS = f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs"
JOBSETS = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
Triple = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# Grants the scenario below does not reach, each with the operator code path that needs it.
UNEXERCISED: dict[Triple, str] = {
    ("finetune.dev", "finetunejobs/status", "get"):
        "builders.build_trainer_rbac grants it to the trainer; a Role grants only what its creator holds",
    ("", "services", "patch"):
        "Reconciler.ensure re-applies the server Service when its content hash changes (operator upgrade)",
    ("monitoring.coreos.com", "servicemonitors", "patch"):
        "Reconciler.ensure re-applies the ServiceMonitor when its content hash changes (operator upgrade)",
}

pytestmark = pytest.mark.timeout(180)


# -- the chart's rules and the operator's calls -------------------------------------------------------

def chart_rules(helm: str, sh: Callable[..., subprocess.CompletedProcess[str]], *values: str) -> list[dict[str, Any]]:
    cmd = [helm, "template", "finetune", str(CHART), "-s", "templates/rbac.yaml"]
    for v in values:
        cmd += ["--set", v]
    roles = [d for d in yaml.safe_load_all(sh(cmd).stdout) if d and d["kind"] == "ClusterRole"]
    assert len(roles) == 2, "a namespaced-rules role and a cluster-scoped-rules role"
    return [rule for role in roles for rule in role["rules"]]


def granted(rules: list[dict[str, Any]]) -> set[Triple]:
    triples = set()
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], f"wildcard in {rule}"
        assert not rule.get("resourceNames"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                triples |= {(group, resource, verb) for verb in rule["verbs"]}
    return triples


def verb(request: Any) -> str:
    method, action = str(request.method.value).upper(), request.action
    if action is None:
        raise AssertionError(f"cannot classify {method} {request.url}")
    if action.name == "UPDATE":
        return "patch" if method == "PATCH" else "update"
    return {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}[action.name]


def operator_calls(emulator: kmock.KubernetesEmulator) -> set[Triple]:
    calls = set()
    for request in list(emulator):
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            continue  # the test acting as user, Job controller, kubelet
        resource = request.resource
        if resource is None or not getattr(resource, "plural", None):
            continue  # discovery: a non-resource URL
        plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
        calls.add((resource.group or "", plural, verb(request)))
    return calls


# -- the operator, the user and the missing controllers -----------------------------------------------

@asynccontextmanager
async def operator_with_token(emulator: kmock.KubernetesEmulator) -> AsyncIterator[None]:
    """The operator as the chart runs it (standalone, every namespace), authenticating with TOKEN.

    kopf gets an event loop of its own in a thread: it cancels every task of the loop it runs in.
    """
    import kopf

    from finetune.operator import k8s
    from finetune.operator.testing import FAST_CONFIG

    memo = kopf.Memo(config=FAST_CONFIG, cluster=k8s.Cluster(server=str(emulator.url).rstrip("/"), token=TOKEN))
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, memo=memo, stop_flag=stop, ready_flag=ready))
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=main, name="operator-under-rbac-test", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 20), f"the operator did not start: {errors}"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not errors, errors


class Cluster:
    """The user and the controllers kmock lacks, through plain HTTP without the operator's token."""

    def __init__(self, api: Any, trained: Any) -> None:
        self.api = api
        self.trained = trained

    async def eventually(self, what: str, check: Callable[[], Awaitable[Any]], timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if last := await check():
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")

    async def create(self, name: str, **spec: Any) -> None:
        body = {
            "task": "text-classification",
            "model": {"name": "distilbert-base-uncased"},
            "dataset": {"train": {"path": "/workspace/data/train.tsv"}},
            "storage": {"claimName": "data"},
            "promotion": {"minValue": 0.8},
            **spec,
        }
        await self.api.create({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {
            "name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1}, "spec": body})

    async def edit(self, name: str, **spec: Any) -> None:
        body = await self.api.get(f"{FTJS}/{name}")
        generation = int(body["metadata"].get("generation") or 1) + 1  # kmock does not count generations
        await self.api.merge_patch(f"{FTJS}/{name}", {"metadata": {"generation": generation}, "spec": spec})

    async def status(self, name: str) -> dict[str, Any]:
        return ((await self.api.get(f"{FTJS}/{name}")) or {}).get("status") or {}

    async def phase(self, name: str, phase: str, model: str | None = None) -> None:
        async def check() -> bool:
            s = await self.status(name)
            return s.get("phase") == phase and (model is None or s.get("servingModelPath") == model)

        await self.eventually(f"{name} {phase} {model or ''}", check)

    async def trainer_ends(self, owner: str, run: int, which: str) -> str:
        """Kubelet and JobSet controller: pod 0 ends as the real run `which` did, the JobSet finishes."""
        from finetune.operator import naming

        name = naming.trainer_name(owner, run)
        await self.eventually(f"JobSet {name}", lambda: self.api.get(f"{JOBSETS}/{name}"))
        ended = self.trained.message(which)
        code, message = ended.exit_code, getattr(self.trained, which)
        model = ended.result.model_path if ended.result is not None else ""
        phase = "Failed" if code else "Succeeded"
        await self.api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-node-0-0-{phase.lower()}", "namespace": NS,
            "labels": {**naming.run_labels(owner, run), naming.COMPLETION_INDEX: "0"},
            "annotations": {naming.COMPLETION_INDEX: "0"}},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": code, "message": message}}}]}})
        condition = {"type": "Failed", "status": "True", "reason": "FailJobSetFailurePolicyAction"} if code \
            else {"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}
        await self.api.merge_patch(f"{JOBSETS}/{name}/status", {"status": {"conditions": [condition]}})
        return model

    async def admit(self, owner: str, run: int) -> None:
        """Kueue: the Workload waits for quota, then Kueue unsuspends the JobSet."""
        from finetune.operator import naming

        name = naming.trainer_name(owner, run)
        await self.eventually(f"JobSet {name}", lambda: self.api.get(f"{JOBSETS}/{name}"))
        await self.api.create({"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload", "metadata": {
            "name": f"jobset-{name}", "namespace": NS, "ownerReferences": [
                {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "name": name, "uid": "u"}]},
            "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "message": "no quota"}]}})

        async def says_why() -> bool:
            return "no quota" in (await self.status(owner)).get("message", "")

        await self.eventually("Kueue's message", says_why)
        await self.api.merge_patch(f"{JOBSETS}/{name}", {"spec": {"suspend": False}})

    async def roll_out(self, owner: str) -> None:
        """Deployment controller: every replica updated and available."""
        from finetune.operator import naming

        path = f"{DEPLOYMENTS}/{naming.server_name(owner)}"
        await self.eventually("the server Deployment", lambda: self.api.get(path))
        await self.api.merge_patch(f"{path}/status", {"status": {
            "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2, "readyReplicas": 2}})

    async def gone(self, path: str) -> bool:
        return await self.api.get(path) is None


async def drive_life_cycles(cluster: Cluster) -> None:
    """Serving with autoscaling and a ServiceMonitor, a retrain, edits that remove children, a failed
    trainer, deletion: the paths on which the operator uses each kind of API call."""
    # No threshold: the weak real model serves first, the good one replaces it on the retrain.
    await cluster.create("served", serving={"replicas": 2, "maxReplicas": 4}, monitoring={"serviceMonitor": True},
                         promotion={})
    await cluster.create("broken")
    await cluster.create("queued", scheduling={"queueName": "team-a"})
    await cluster.trainer_ends("broken", 1, "bad_data")
    await cluster.admit("queued", 1)
    model = await cluster.trainer_ends("served", 1, "weak")
    await cluster.phase("served", "Deploying")
    await cluster.roll_out("served")
    await cluster.phase("served", "Serving", model)
    await cluster.phase("broken", "Failed")
    # A training edit: run 2 replaces run 1's trainer objects, and its model is served.
    await cluster.edit("served", training={"epochs": 2})
    model = await cluster.trainer_ends("served", 2, "good")
    await cluster.phase("served", "Serving", model)
    # Serving edits: a bigger autoscaler, then none, then no serving at all.
    hpa = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/served-server"

    async def hpa_max_6() -> bool:
        return ((await cluster.api.get(hpa)) or {}).get("spec", {}).get("maxReplicas") == 6

    await cluster.edit("served", serving={"maxReplicas": 6})
    await cluster.eventually("HPA update", hpa_max_6)
    await cluster.edit("served", serving={"maxReplicas": None, "replicas": 1})
    await cluster.eventually("HPA deletion", lambda: cluster.gone(hpa))
    await cluster.edit("served", serving={"enabled": False})
    await cluster.eventually("server deletion", lambda: cluster.gone(f"{DEPLOYMENTS}/served-server"))
    await cluster.api.delete(f"{FTJS}/served")
    await cluster.eventually("FineTuneJob deletion", lambda: cluster.gone(f"{FTJS}/served"))


async def test_chart_role_is_exactly_what_the_operator_uses(
    kmock: kmock.KubernetesEmulator, helm: str, sh: Callable[..., Any], trained: Any
) -> None:
    from finetune.operator import k8s
    from finetune.operator.testing import declare

    declare(kmock, namespaces=(NS,), kueue=True)
    kmock.objects["v1/persistentvolumeclaims", NS, "data"] = {"metadata": {"name": "data", "namespace": NS}}
    kmock.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
        kind="ServiceMonitor", singular="servicemonitor", namespaced=True,
        verbs={"list", "watch", "get", "patch", "create", "delete", "update"},
    )
    async with k8s.Api(k8s.Cluster(server=str(kmock.url).rstrip("/"))) as api, operator_with_token(kmock):
        await drive_life_cycles(Cluster(api, trained))

    used = operator_calls(kmock)
    grants = granted(chart_rules(helm, sh))
    assert len(used) >= 15, f"the scenario recorded too few operator calls: {sorted(used)}"
    denied = sorted(used - grants)
    assert not denied, f"the operator made calls the chart's ClusterRole does not allow: {denied}"
    unused = sorted(grants - used - set(UNEXERCISED))
    assert not unused, f"the chart grants what the operator never used: {unused}"
    stale = sorted(set(UNEXERCISED) & used)
    assert not stale, f"UNEXERCISED lists grants the scenario now uses: {stale}"


def test_listed_namespaces_add_only_namespace_discovery(helm: str, sh: Callable[..., Any]) -> None:
    """Told which namespaces to watch, kopf lists and watches namespaces to learn which exist
    (kopf/_core/reactor/observation.py, namespace_observer; without the right it logs a warning and
    assumes they exist). kmock 0.8 cannot serve `GET /api/v1/namespaces` (its path parser fails), so
    this mode is checked against the rendered roles rather than recorded."""
    every = granted(chart_rules(helm, sh))
    listed = granted(chart_rules(helm, sh, "watch.namespaces={team-a}"))
    assert listed - every == {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert every <= listed
