"""The FineTuneJob spec model: defaults, field names and readable validation errors."""

from pathlib import Path
from typing import Any

import pytest

from finetune.spec import SpecError, load_job, parse_spec


def spec_dict(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task": "text-classification",
        "model": {"path": "/models/minilm"},
        "dataset": {"train": {"path": "/data/train.tsv"}, "textColumn": "sentence"},
    }
    base.update(overrides)
    return base


def test_defaults_are_filled() -> None:
    spec = parse_spec(spec_dict())
    assert spec.training.method == "full"
    assert spec.training.max_length == 128
    assert spec.resources.nodes == 1
    assert spec.serving.enabled is True
    assert spec.dataset.format_of(spec.dataset.train.path) == "tsv"
    assert spec.headline_metric == "f1"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"task": "summarize"}, "spec.task: got 'summarize'; input should be 'text-classification' or 'causal-lm'"),
        ({"model": {}}, "set exactly one of model.name (hub id) or model.path"),
        ({"model": {"name": "a", "path": "/b"}}, "set exactly one of model.name"),
        ({"resources": {"nodes": 0}}, "spec.resources.nodes: Input should be greater than or equal to 1"),
        ({"training": {"method": "qlora"}}, "spec.training.method: got 'qlora'; input should be 'full' or 'lora'"),
        ({"training": {"learningRate": -1}}, "spec.training.learningRate: Input should be greater than 0"),
        ({"training": {"epochz": 3}}, "spec.training.epochz: unknown field"),
        ({"dataset": {"textColumn": "x"}}, "spec.dataset.train: Field required"),
        # A typo in a metric name is found before any training, not as a gate rejection afterwards.
        ({"promotion": {"metric": "acuracy"}}, "spec.promotion.metric: text-classification does not produce a "
                                               "metric 'acuracy'; use one of accuracy, f1, precision, recall"),
        ({"training": {"metricForBestModel": "perplexity"}},
         "spec.training.metricForBestModel: text-classification does not produce a metric 'perplexity'"),
        ({"task": "causal-lm", "promotion": {"metric": "rougeL"}},
         "causal-lm does not produce a metric 'rougeL'; use one of loss, perplexity (generation metrics need "
         "completions to compare"),
    ],
)
def test_validation_errors_name_field_and_allowed_values(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_dict(**overrides))
    assert expected in str(err.value)


def test_causal_lm_needs_completion_with_prompt() -> None:
    with pytest.raises(SpecError, match="completionColumn is required"):
        parse_spec(spec_dict(task="causal-lm", dataset={"train": {"path": "a.jsonl"}, "promptColumn": "q"}))


def test_unknown_extension_needs_format() -> None:
    spec = parse_spec(spec_dict(dataset={"train": {"path": "/data/train.txt"}}))
    with pytest.raises(SpecError, match="set dataset.format to one of csv, jsonl, parquet, tsv"):
        spec.dataset.format_of(spec.dataset.train.path)


def test_load_job_resolves_relative_paths(tmp_path: Path) -> None:
    job_file = tmp_path / "jobs" / "job.yaml"
    job_file.parent.mkdir()
    job_file.write_text(
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: demo}\n"
        "spec:\n  task: text-classification\n  model: {path: ../model}\n"
        "  dataset: {train: {path: data/train.tsv}}\n"
    )
    job = load_job(job_file)
    assert job.metadata.name == "demo"
    assert job.spec.dataset.train.path == str(tmp_path / "jobs" / "data" / "train.tsv")
    assert job.spec.model.path == str(tmp_path / "model")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "must hold one FineTuneJob mapping"),
        ("spec: [", "is not valid YAML"),
        ("apiVersion: v1\nkind: FineTuneJob\nspec: {}\n", "apiVersion: got 'v1'"),
        # The allowed value as it must be written (not lower-cased into the typo itself).
        ("apiVersion: finetune.dev/v1alpha1\nkind: finetunejob\nspec: {}\n",
         "kind: got 'finetunejob'; input should be 'FineTuneJob'"),
    ],
)
def test_bad_job_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected):
        load_job(path)
