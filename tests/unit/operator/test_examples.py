"""The example FineTuneJobs parse, pass the cluster rules, and build valid children."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from finetune.operator import builders
from finetune.operator.validation import validate_job
from finetune.spec import parse_job

EXAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "examples"
NAMES = ["sentiment-classification.yaml", "causal-lm-lora-multinode.yaml", "kueue-queued.yaml"]


@pytest.mark.parametrize("name", NAMES)
def test_example(name: str) -> None:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    parse_job(doc)
    job = validate_job(doc)
    trainer = builders.build_trainer_job(job, uid="u", run=1)
    kubernetes_validate.validate(trainer, "1.31", strict=True)
    if name == "kueue-queued.yaml":
        assert trainer["spec"]["suspend"] is True
    if name == "causal-lm-lora-multinode.yaml":
        assert trainer["spec"]["completions"] == 2
        command = trainer["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--num_processes") + 1] == "16"
