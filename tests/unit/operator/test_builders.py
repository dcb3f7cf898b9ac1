"""Every child manifest validates against the Kubernetes schemas, and says what the issue asks."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from finetune.operator import builders, naming
from finetune.spec import FineTuneJob
from tests.unit.operator.jobset_schema import validate_jobset

K8S_VERSION = "1.31"
UID = "0b7c-uid"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

VARIANTS: dict[str, dict[str, Any]] = {
    "single-gpu": {},
    "cpu-only": {"resources": {"gpusPerNode": 0}},
    "multi-node-lora": {
        "task": "causal-lm",
        "dataset": {"promptColumn": "prompt", "completionColumn": "completion"},
        "training": {"method": "lora"},
        "resources": {
            "nodes": 4,
            "gpusPerNode": 8,
            "cpu": "32",
            "memory": "256Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
                        ]
                    }
                }
            },
            "priorityClassName": "training",
        },
        "scheduling": {"activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": 3600, "backoffLimit": 5},
    },
    "kueue": {"scheduling": {"queueName": "team-a"}},
    "own-service-account": {"resources": {"serviceAccountName": "trainer-sa"}},
    "autoscaled-monitored": {
        "serving": {"replicas": 2, "maxReplicas": 6, "cpu": "2", "memory": "4Gi", "gpus": 1, "authSecretName": "tok"},
        "monitoring": {"serviceMonitor": True},
        "image": "registry.example.com/finetune:dev",
    },
    "long-name": {"resources": {"nodes": 1024}},
    "digits-in-name": {},
}


def all_objects(job: FineTuneJob) -> list[dict[str, Any]]:
    objs = [
        builders.build_spec_configmap(job, uid=UID, run=3),
        *builders.build_trainer_rbac(job, uid=UID),
        builders.build_serving_deployment(job, uid=UID, model_path="/workspace/m/run-3"),
        builders.build_serving_service(job, uid=UID),
        builders.build_pdb(job, uid=UID),
    ]
    hpa = builders.build_hpa(job, uid=UID)
    return objs + ([hpa] if hpa else [])


def variant(job_builder: Callable[..., FineTuneJob], name: str) -> FineTuneJob:
    job_name = {"long-name": "a" * 63, "digits-in-name": "m-7b-lora-2024"}.get(name, "sst2")
    return job_builder(name=job_name, **VARIANTS[name])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_object_is_valid_kubernetes(job_builder: Callable[..., FineTuneJob], name: str) -> None:
    job = variant(job_builder, name)
    jobset = builders.build_trainer_jobset(job, uid=UID, run=3)
    validate_jobset(jobset)
    for obj in [*all_objects(job), jobset]:
        if obj is not jobset:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        meta = obj["metadata"]
        assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [builders.owner_reference(job, UID)]
        assert meta["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGER
        assert meta["labels"][naming.LABEL_INSTANCE] == job.metadata.name


def test_the_validators_reject_a_broken_object(job_builder: Callable[..., FineTuneJob]) -> None:
    trainer = builders.build_trainer_jobset(job_builder(), uid=UID, run=1)
    broken = copy.deepcopy(trainer)
    pod_spec(broken)["containers"][0]["gpus"] = 1
    with pytest.raises((kubernetes_validate.ValidationError, AssertionError)):
        validate_jobset(broken)
    misplaced = copy.deepcopy(trainer)
    misplaced["spec"]["failurePolicy"]["rules"][0]["onJobFailureMessagePattern"] = ["x"]
    with pytest.raises(AssertionError, match="drop or change a field"):
        validate_jobset(misplaced)
    too_long = builders.build_trainer_jobset(job_builder(name="a" * 63, resources={"nodes": 1024}), uid=UID, run=1)
    too_long["metadata"]["name"] += "xyz"
    with pytest.raises(AssertionError, match="too long"):
        validate_jobset(too_long)


def job_template(jobset: dict[str, Any]) -> dict[str, Any]:
    [replicated] = jobset["spec"]["replicatedJobs"]
    return replicated["template"]["spec"]  # type: ignore[no-any-return]


def pod_spec(jobset: dict[str, Any]) -> dict[str, Any]:
    return job_template(jobset)["template"]["spec"]  # type: ignore[no-any-return]


def flags(cmd: list[str]) -> dict[str, str]:
    assert cmd[:2] == ["finetune", "train"]
    return dict(zip(cmd[2::2], cmd[3::2], strict=True))


@pytest.mark.parametrize(
    ("resources", "nodes", "processes"),
    [({}, "1", "1"), ({"gpusPerNode": 0}, "1", "1"), ({"gpusPerNode": 4}, "1", "4"),
     ({"nodes": 3, "gpusPerNode": 8}, "3", "8"), ({"nodes": 2, "gpusPerNode": 0}, "2", "1")],
)
def test_every_pod_runs_finetune_train(
    job_builder: Callable[..., FineTuneJob], resources: dict[str, int], nodes: str, processes: str
) -> None:
    trainer = builders.build_trainer_jobset(job_builder(resources=resources), uid=UID, run=2)
    container = pod_spec(trainer)["containers"][0]
    assert flags(container["command"]) == {
        "-f": "/etc/finetune/job.yaml",
        "--output": "/workspace/sst2/run-2",
        "--nodes": nodes,
        "--node-rank": "$(JOB_COMPLETION_INDEX)",
        "--processes": processes,
        "--rendezvous": "$(FINETUNE_RENDEZVOUS_HOST):$(FINETUNE_RENDEZVOUS_PORT)",
        "--termination-log": "/dev/termination-log",
    }
    env = {e["name"]: e for e in container["env"]}
    # JobSet names pod 0 `<jobset>-node-0-0` and serves `<hostname>.<subdomain>` through its Service.
    assert env["FINETUNE_RENDEZVOUS_HOST"]["value"] == "sst2-train-2-node-0-0.sst2-train-2"
    assert trainer["spec"]["network"]["subdomain"] == "sst2-train-2"
    assert env["FINETUNE_RENDEZVOUS_PORT"]["value"] == "29500"
    assert env["FINETUNE_CPUS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_trainer_jobset_shape(job_builder: Callable[..., FineTuneJob]) -> None:
    job = job_builder(**VARIANTS["multi-node-lora"])
    trainer = builders.build_trainer_jobset(job, uid=UID, run=1, image="img:1")
    assert trainer["spec"]["suspend"] is False
    assert trainer["spec"]["ttlSecondsAfterFinished"] == 3600
    assert trainer["spec"]["network"]["publishNotReadyAddresses"] is True
    [replicated] = trainer["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 1  # one Indexed Job: its pods are the gang, one per node
    spec = job_template(trainer)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0  # any pod failure fails the Job; the JobSet decides for the gang
    assert spec["activeDeadlineSeconds"] == 86400
    pod = pod_spec(trainer)
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "sst2-trainer"
    assert pod["priorityClassName"] == "training"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod["affinity"]
    container = pod["containers"][0]
    assert container["image"] == "img:1"
    assert container["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_JOB_NAME"] == "sst2"
    assert env["FINETUNE_JOB_NAMESPACE"] == "ml"
    assert env["HF_HOME"] == "/workspace/.cache/huggingface"
    assert env["FINETUNE_METRICS_PORT"] == "9090"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"job-spec": "/etc/finetune", "workspace": "/workspace", "dshm": "/dev/shm", "tmp": "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "data"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["job-spec"]["configMap"] == {"name": "sst2-train-1"}
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsUser"] == 1000


def test_failure_rules_tell_permanent_errors_from_disruptions(job_builder: Callable[..., FineTuneJob]) -> None:
    """The Job's messages (Kubernetes' own formats) against the JobSet's rules, evaluated as JobSet does."""
    trainer = builders.build_trainer_jobset(job_builder(scheduling={"backoffLimit": 5}), uid=UID, run=1)
    policy = trainer["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5
    pod_rules = job_template(trainer)["podFailurePolicy"]["rules"]
    disruption = next(i for i, r in enumerate(pod_rules) if "onPodConditions" in r)
    exit_two = next(i for i, r in enumerate(pod_rules) if r.get("onExitCodes", {}).get("values") == [2])
    assert pod_rules[disruption]["action"] == pod_rules[exit_two]["action"] == "FailJob"
    cases = {
        ("PodFailurePolicy", f"Container trainer for pod ml/p-0 failed with exit code 2 matching FailJob rule at "
                             f"index {exit_two}"): "FailJobSet",
        ("PodFailurePolicy", f"Pod ml/p-1 has condition DisruptionTarget matching FailJob rule at index "
                             f"{disruption}"): "RestartJobSetAndIgnoreMaxRestarts",
        ("BackoffLimitExceeded", "Job has reached the specified backoff limit"): "RestartJobSet",
        ("DeadlineExceeded", "Job was active longer than specified deadline"): "FailJobSet",
    }
    for (reason, message), action in cases.items():
        matched = next(
            (r["action"] for r in policy["rules"]
             if reason in (r.get("onJobFailureReasons") or [reason])
             and any(re.search(p, message) for p in r.get("onJobFailureMessagePatterns") or [".*"])),
            "RestartJobSet",  # JobSet's default action: restart, counted against maxRestarts
        )
        assert matched == action, (reason, message)


def test_kueue_jobset_starts_suspended_with_the_queue_label(job_builder: Callable[..., FineTuneJob]) -> None:
    trainer = builders.build_trainer_jobset(job_builder(**VARIANTS["kueue"]), uid=UID, run=1)
    assert trainer["spec"]["suspend"] is True
    assert trainer["metadata"]["labels"][naming.KUEUE_QUEUE_LABEL] == "team-a"


def test_spec_image_wins_over_the_operator_default(job_builder: Callable[..., FineTuneJob]) -> None:
    job = job_builder(image="mine:2")
    trainer = builders.build_trainer_jobset(job, uid=UID, run=1, image="default:1")
    assert pod_spec(trainer)["containers"][0]["image"] == "mine:2"


def test_spec_configmap_holds_the_whole_job(job_builder: Callable[..., FineTuneJob]) -> None:
    import yaml

    from finetune.spec import parse_job

    job = job_builder(training={"epochs": 2})
    cm = builders.build_spec_configmap(job, uid=UID, run=1)
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert doc["apiVersion"] == "finetune.dev/v1alpha1" and doc["kind"] == "FineTuneJob"
    assert doc["metadata"]["name"] == "sst2"
    assert parse_job(doc).spec == job.spec
    assert cm["metadata"]["annotations"][naming.ANNOTATION_TRAINING_HASH] == builders.training_hash(job.spec)


def test_rbac_is_limited_to_the_jobs_own_status(job_builder: Callable[..., FineTuneJob]) -> None:
    sa, role, binding = builders.build_trainer_rbac(job_builder(), uid=UID)
    assert sa["kind"] == "ServiceAccount"
    assert role["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["sst2"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sst2-trainer", "namespace": "ml"}]
    own = builders.build_trainer_rbac(job_builder(**VARIANTS["own-service-account"]), uid=UID)
    assert [o["kind"] for o in own] == ["Role", "RoleBinding"]
    assert own[1]["subjects"][0]["name"] == "trainer-sa"


@pytest.mark.parametrize(
    ("field", "value", "retrains"),
    [
        ("training", {"epochs": 5}, True),
        ("dataset", {"train": {"path": "/workspace/other.tsv"}}, True),
        ("image", "other:1", True),
        ("serving", {"replicas": 5}, False),
        ("promotion", {"minValue": 0.5}, False),
        ("monitoring", {"serviceMonitor": True}, False),
        ("resources", {"nodes": 2}, False),
    ],
)
def test_training_hash_changes_only_with_training_fields(
    job_builder: Callable[..., FineTuneJob], field: str, value: Any, retrains: bool
) -> None:
    before = builders.training_hash(job_builder().spec)
    after = builders.training_hash(job_builder(**{field: value}).spec)
    assert (before != after) is retrains


def test_output_dir(job_builder: Callable[..., FineTuneJob]) -> None:
    assert builders.output_dir(job_builder(), 4) == "/workspace/sst2/run-4"
    assert builders.output_dir(job_builder(storage={"outputPath": "/workspace/out/"}), 4) == "/workspace/out"


def test_serving_deployment(job_builder: Callable[..., FineTuneJob]) -> None:
    job = job_builder(serving={"replicas": 3, "cpu": "2", "memory": "4Gi", "precision": "fp32"})
    dep = builders.build_serving_deployment(job, uid=UID, model_path="/workspace/sst2/run-1", image="img:1")
    spec = dep["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "finetune", "serve", "--model", "/workspace/sst2/run-1", "--host", "0.0.0.0", "--port", "8080",
        "--name", "sst2", "--feedback-path", "/workspace/sst2/feedback/feedback.jsonl",
    ]  # fmt: skip
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_SERVE_PRECISION"] == "fp32" and env["FINETUNE_SERVE_MAX_BATCH_SIZE"] == "32"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    notes = spec["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == "8080"
    assert notes[naming.ANNOTATION_MODEL] == "/workspace/sst2/run-1"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_new_model_changes_only_the_pod_template(job_builder: Callable[..., FineTuneJob]) -> None:
    job = job_builder()
    old = builders.build_serving_deployment(job, uid=UID, model_path="/workspace/sst2/run-1")
    new = builders.build_serving_deployment(job, uid=UID, model_path="/workspace/sst2/run-2")
    assert old["spec"]["selector"] == new["spec"]["selector"]
    assert old["spec"]["template"] != new["spec"]["template"]
    assert builders.stamp_hash(old)["metadata"]["annotations"][naming.ANNOTATION_HASH] != builders.stamp_hash(new)[
        "metadata"
    ]["annotations"][naming.ANNOTATION_HASH]


def test_autoscaling_leaves_replicas_to_the_hpa(job_builder: Callable[..., FineTuneJob]) -> None:
    job = job_builder(**VARIANTS["autoscaled-monitored"])
    dep = builders.build_serving_deployment(job, uid=UID, model_path="/workspace/m")
    assert "replicas" not in dep["spec"]
    hpa = builders.build_hpa(job, uid=UID)
    assert hpa is not None
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 6
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FINETUNE_SERVE_AUTH_TOKEN_FILE"] == "/etc/finetune-auth/token"
    assert env["FINETUNE_SERVE_MAX_BATCH_SIZE"] == "32"
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth")
    assert volume["secret"] == {"secretName": "tok", "items": [{"key": "token", "path": "token"}]}
    assert builders.build_hpa(job_builder(), uid=UID) is None


@pytest.mark.parametrize(("replicas", "budget"), [(1, {"maxUnavailable": 1}), (3, {"minAvailable": 1})])
def test_pdb_never_blocks_a_drain_of_a_lone_replica(
    job_builder: Callable[..., FineTuneJob], replicas: int, budget: dict[str, int]
) -> None:
    pdb = builders.build_pdb(job_builder(serving={"replicas": replicas}), uid=UID)
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == budget


def test_service_and_monitor_select_the_server(job_builder: Callable[..., FineTuneJob]) -> None:
    job = job_builder(**VARIANTS["autoscaled-monitored"])
    svc = builders.build_serving_service(job, uid=UID)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    monitor = builders.build_service_monitor(job, uid=UID)
    assert monitor is not None
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == svc["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert builders.build_service_monitor(job_builder(), uid=UID) is None


def test_an_old_jobset_that_prunes_the_message_patterns_is_detected(job_builder: Callable[..., FineTuneJob]) -> None:
    """JobSet before v0.10 has no onJobFailureMessagePatterns in its CRD schema; the API server drops it."""
    jobset = builders.build_trainer_jobset(job_builder(), uid=UID, run=1)
    assert builders.failure_rules_kept(jobset)
    pruned = copy.deepcopy(jobset)
    for rule in pruned["spec"]["failurePolicy"]["rules"]:
        rule.pop("onJobFailureMessagePatterns", None)
    assert not builders.failure_rules_kept(pruned)


def test_the_server_pod_and_finetune_run_get_the_same_server_settings(
        job_builder: Callable[..., FineTuneJob], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One `serving` mapping: the settings `finetune serve` reads from the Deployment's environment equal the
    ones `finetune run` passes to the server, for every field the mapping has."""
    from finetune.run import server_settings
    from finetune.server.settings import ServerSettings

    job = job_builder(serving={"maxBatchSize": 7, "maxWaitMs": 2.5, "precision": "fp32"})
    dep = builders.build_serving_deployment(job, uid=UID, model_path="/workspace/sst2/run-1", image="img:1")
    for var in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
        if var["name"].startswith("FINETUNE_SERVE_") and "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    in_pod = ServerSettings(model_dir=tmp_path)
    local = server_settings(job, tmp_path, "127.0.0.1", 0)
    keys = job.spec.serving.server_settings().keys()
    assert keys and all(getattr(in_pod, k) == getattr(local, k) for k in keys)
    assert (in_pod.max_batch_size, in_pod.max_wait_ms, in_pod.precision) == (7, 2.5, "fp32")


def test_the_server_pod_is_given_longer_to_stop_than_the_server_promises_to_drain(
    job_builder: Callable[..., FineTuneJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings as the pod gets them (its FINETUNE_SERVE_* env): Kubernetes' default 30 s grace period
    would SIGKILL a server that is still finishing requests."""
    from finetune.server.settings import ServerSettings

    dep = builders.build_serving_deployment(job_builder(), uid=UID, model_path="/workspace/sst2/run-1")
    pod = dep["spec"]["template"]["spec"]
    for variable in pod["containers"][0]["env"]:
        if variable["name"].startswith("FINETUNE_SERVE_") and "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    settings = ServerSettings(model_dir=Path("/workspace/sst2/run-1"))
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_seconds() > 30
