"""The box's pure rules against Kubernetes' own behaviour: expansion, quantities, rewriting, policy matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.podbox.jobs import intervals, match_pod_failure_policy
from tests.podbox.jobsets import matching_rule, update_condition
from tests.podbox.mapping import Rewriter, expand, quantity, resource_value


@pytest.mark.parametrize(("text", "expected"), [
    ("$(A)-$(B)", "a-b"),
    ("$$(A)", "$(A)"),  # an escaped reference stays literal
    ("$(MISSING)", "$(MISSING)"),  # an undefined reference stays as written
    ("$(A", "$(A"),  # unclosed
    ("cost $5", "cost $5"),  # a `$` that starts no expression
    ("$$", "$"),
    ("x$", "x$"),
    ("$(A)$(A)", "aa"),
    ("$()", "$()"),
])  # fmt: skip
def test_expand_follows_the_kubelet(text: str, expected: str) -> None:
    assert expand(text, {"A": "a", "B": "b"}) == expected


@pytest.mark.parametrize(("text", "millis"), [("500m", 500), ("2", 2000), ("1.5", 1500), ("1e3", 1_000_000),
                                              ("0.1", 100)])  # fmt: skip
def test_cpu_quantities(text: str, millis: int) -> None:
    assert quantity(text) * 1000 == millis


def test_memory_quantities() -> None:
    assert quantity("1Gi") == 2**30 and quantity("1G") == 10**9 and quantity("128974848") == 128974848


def test_resource_field_ref_rounds_up_and_falls_back_to_the_node() -> None:
    c: dict[str, Any] = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}
    assert resource_value(c, {"resource": "limits.cpu"}) == "2"
    assert resource_value(c, {"resource": "limits.cpu", "divisor": "1m"}) == "1500"
    assert resource_value(c, {"resource": "requests.cpu"}) == "2"  # the request defaults to the limit
    assert resource_value(c, {"resource": "limits.memory", "divisor": "1Mi"}) == "1024"
    assert int(resource_value({}, {"resource": "limits.cpu"})) >= 1  # no limit: this machine's cores
    assert resource_value({}, {"resource": "requests.cpu"}) == "0"


def rewriter(tmp: Path) -> Rewriter:
    return Rewriter(
        paths={"/workspace": tmp / "ws", "/workspace/data": tmp / "data", "/tmp": tmp / "tmp",
               "/dev/termination-log": tmp / "msg"},
        subdomains=frozenset({"gang"}), namespace="ml", declared=frozenset({29500}),
        port_for=lambda ns, sub, port: 40000 + port - 29500 if (ns, sub) == ("ml", "gang") else -1,
        own_port=lambda port: 50000,
    )  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [
    ("/workspace/x.tsv", "{t}/ws/x.tsv"),
    ("/workspace/data/train.tsv", "{t}/data/train.tsv"),  # the longest mount wins
    ("--output=/workspace/run-1", "--output={t}/ws/run-1"),
    ("/workspace", "{t}/ws"),
    ("/workspaces/x", "/workspaces/x"),  # not at a path boundary
    ("/a/workspace", "/a/workspace"),
    ("/tmp:/workspace", "{t}/tmp:{t}/ws"),
    ("/dev/termination-log", "{t}/msg"),
    ("29500", "50000"),  # a declared port
    ("29501", "29501"),
    ("job-0-0.gang:29500", "127.0.0.1:40000"),
    ("job-0-0.gang.ml.svc.cluster.local:29501", "127.0.0.1:40001"),
    ("tcp://job-0-0.gang:29500/x", "tcp://127.0.0.1:40000/x"),
    ("job-0-0.gang", "127.0.0.1"),
    ("job-0-0.other:29500", "job-0-0.other:29500"),
    ("localhost:29500", "127.0.0.1:50000"),
    ("/workspace/job-0-0.gang/x", "{t}/ws/job-0-0.gang/x"),  # inside a path: not a host
])  # fmt: skip
def test_rewriting(tmp_path: Path, text: str, expected: str) -> None:
    assert rewriter(tmp_path).value(text) == expected.format(t=tmp_path)


def test_rewriting_is_one_pass(tmp_path: Path) -> None:
    """A local folder under /tmp is not mapped again through the /tmp mount."""
    once = rewriter(tmp_path).value("/workspace/a")
    assert once == f"{tmp_path}/ws/a" and rewriter(tmp_path).path("train: /workspace/data/t.tsv\n") == (
        f"train: {tmp_path}/data/t.tsv\n")  # fmt: skip


def failed_pod(code: int, conditions: list[dict[str, Any]] | None = None, name: str = "trainer") -> dict[str, Any]:
    return {"metadata": {"name": "p-0-abcde", "namespace": "ml"},
            "status": {"phase": "Failed", "conditions": conditions or [],
                       "containerStatuses": [{"name": name, "state": {"terminated": {"exitCode": code}}}]}}


POLICY = {"rules": [
    {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [42]}},
    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
    {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [0, 1]}},
]}  # fmt: skip


def test_pod_failure_policy_messages_and_counting() -> None:
    assert match_pod_failure_policy(POLICY, failed_pod(2)) == (
        "Container trainer for pod ml/p-0-abcde failed with exit code 2 matching FailJob rule at index 2", True,
        "FailJob")  # fmt: skip
    disrupted = failed_pod(143, [{"type": "DisruptionTarget", "status": "True"}])
    assert match_pod_failure_policy(POLICY, disrupted) == (
        "Pod ml/p-0-abcde has condition DisruptionTarget matching FailJob rule at index 1", True, "FailJob")
    assert match_pod_failure_policy(POLICY, failed_pod(42)) == (None, False, "Ignore")
    assert match_pod_failure_policy(POLICY, failed_pod(2, name="sidecar")) == (None, True, "Count")
    assert match_pod_failure_policy(POLICY, failed_pod(1)) == (None, True, None)
    assert match_pod_failure_policy({"rules": [{"action": "FailJob", "onExitCodes": {
        "operator": "NotIn", "values": [5]}}]}, failed_pod(0)) == (None, True, None)  # exit 0 never matches
    assert match_pod_failure_policy(None, failed_pod(2)) == (None, True, None)


def failed_job(name: str, reason: str, message: str, when: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"jobset.sigs.k8s.io/replicatedjob-name": "node"}},
            "status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message,
                                       "lastTransitionTime": when}]}}  # fmt: skip


def test_jobset_rules_first_match_earliest_job() -> None:
    late = failed_job("js-node-1", "PodFailurePolicy", "exit code 2 matching FailJob", "2024-01-01T00:00:09Z")
    early = failed_job("js-node-0", "BackoffLimitExceeded", "backoff", "2024-01-01T00:00:01Z")
    rules = [{"name": "a", "action": "FailJobSet", "onJobFailureMessagePatterns": [r"code \d matching"]},
             {"name": "b", "action": "RestartJobSet", "targetReplicatedJobs": ["node"]}]
    rule, job = matching_rule(rules, [late, early])
    assert (rule or {}).get("name") == "a" and job is late
    rule, job = matching_rule(rules[1:], [late, early])
    assert (rule or {}).get("name") == "b" and job is early
    rule, job = matching_rule([{"name": "c", "onJobFailureReasons": ["DeadlineExceeded"]}], [late, early])
    assert rule is None and job is early


def test_condition_updates_keep_the_transition_time_on_a_new_message() -> None:
    conditions: list[dict[str, Any]] = []
    assert not update_condition(conditions, {"type": "R", "status": "False", "reason": "x", "message": ""})
    assert update_condition(conditions, {"type": "R", "status": "True", "reason": "x", "message": "m"})
    conditions[0]["lastTransitionTime"] = "then"
    assert update_condition(conditions, {"type": "R", "status": "True", "reason": "y", "message": "m"})
    assert conditions[0]["lastTransitionTime"] == "then" and conditions[0]["reason"] == "y"


def test_completed_indexes() -> None:
    assert intervals([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and intervals([]) == ""
