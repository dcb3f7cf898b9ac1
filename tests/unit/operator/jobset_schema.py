"""A built JobSet checked the way a cluster would: JobSet's typed models, the Job schema, the webhook.

`kubeflow-trainer-api` ships pydantic models of JobSet v1alpha2 (failure-policy rules with
`onJobFailureMessagePatterns` included). Parsing and dumping a JobSet through them must give back the
same document: a misspelt or misplaced field would be dropped, a wrong type refused. Each replicated
Job's template is then validated as a batch/v1 Job against the Kubernetes schemas, and the checks of
JobSet's admission webhook that a builder can get wrong are repeated here (pkg/webhooks in
kubernetes-sigs/jobset).
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet

K8S_VERSION = "1.31"
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# JobSet's webhook accepts these onJobFailureReasons (the reasons of a failed batch/v1 Job).
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded",
                       "PodFailurePolicy"}
ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
           "RestartJobAndIgnoreMaxRestarts"}


def validate_jobset(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and obj["kind"] == "JobSet"
    parsed = JobsetV1alpha2JobSet.from_dict(obj)
    assert parsed is not None
    assert parsed.to_dict() == obj, "the JobSet models drop or change a field: misspelt or misplaced?"
    name = obj["metadata"]["name"]
    spec = obj["spec"]
    replicated = {rj["name"]: rj for rj in spec["replicatedJobs"]}
    for rj_name, rj in replicated.items():
        template = rj["template"]
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {**template.get("metadata", {}), "name": f"{name}-{rj_name}-0"},
               "spec": template["spec"]}
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        completions = template["spec"].get("completions", 1)
        longest_pod = f"{name}-{rj_name}-{rj['replicas'] - 1}-{completions - 1}-abcde"
        assert len(longest_pod) <= 63 and DNS_1035.match(longest_pod), f"pod name {longest_pod} too long"
    for rule in (spec.get("failurePolicy") or {}).get("rules") or []:
        assert RULE_NAME.match(rule["name"]), rule["name"]
        assert rule["action"] in ACTIONS, rule
        assert set(rule.get("onJobFailureReasons") or []) <= JOB_FAILURE_REASONS, rule
        assert set(rule.get("targetReplicatedJobs") or []) <= set(replicated), rule
        for pattern in rule.get("onJobFailureMessagePatterns") or []:
            re.compile(pattern)  # RE2 is a subset of Python's syntax for what a builder writes
    subdomain = (spec.get("network") or {}).get("subdomain")
    if subdomain:
        assert len(subdomain) <= 63 and DNS_1035.match(subdomain), subdomain
