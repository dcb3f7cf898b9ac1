"""The example FineTuneJobs parse, pass the cluster rules, and build valid children."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from finetune.operator import builders
from finetune.operator.validation import validate_job
from finetune.spec import parse_job
from tests.unit.operator.jobset_schema import validate_jobset

EXAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "examples"
NAMES = ["sentiment-classification.yaml", "causal-lm-lora-multinode.yaml", "kueue-queued.yaml",
         "bias-mitigation.yaml"]


@pytest.mark.parametrize("name", NAMES)
def test_example(name: str) -> None:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    parse_job(doc)
    job = validate_job(doc)
    trainer = builders.build_trainer_jobset(job, uid="u", run=1)
    validate_jobset(trainer)
    for obj in [*builders.build_trainer_rbac(job, uid="u"), builders.build_spec_configmap(job, uid="u", run=1)]:
        kubernetes_validate.validate(obj, "1.31", strict=True)
    if name == "kueue-queued.yaml":
        assert trainer["spec"]["suspend"] is True
    if name == "causal-lm-lora-multinode.yaml":
        job_spec = trainer["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job_spec["completions"] == 2
        command = job_spec["template"]["spec"]["containers"][0]["command"]
        # 2 nodes x 8 GPUs: one world of 16 processes
        assert command[command.index("--nodes") + 1] == "2" and command[command.index("--processes") + 1] == "8"
