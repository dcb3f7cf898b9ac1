"""Fixtures for the server's integration tests: tiny exported model directories and a live server.

The model directories follow the trainer's export contract (CONTEXT: model + tokenizer at the top level,
metrics.json, baseline.json), built in seconds: a WordPiece / byte-level BPE tokenizer trained on the fly
and a 2-layer BERT / GPT-2 with random weights.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune import contracts
from finetune.server.serving import RunningServer, start_in_thread
from finetune.server.settings import ServerSettings
from finetune.spec import Task

SST2 = Path(__file__).resolve().parents[3] / "data" / "sst2"
LABELS = ["negative", "positive"]
TOKEN_LIMIT = 32
CAUSAL_CONTEXT = 256  # room for generations long enough to be in flight when SIGTERM comes
LENGTH_EDGES = [0, 8, 12, 16, 24, 1e9]


def sst2_sentences(split: str = "train", limit: int = 400) -> list[str]:
    with (SST2 / f"{split}.tsv").open(encoding="utf-8") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["sentence"].strip() for _, row in zip(range(limit), rows, strict=False)]


def length_baseline(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    counts = [sum(lo <= n < hi for n in lengths) for lo, hi in itertools.pairwise(LENGTH_EDGES)]
    return {"edges": LENGTH_EDGES, "fractions": [c / len(lengths) for c in counts]}


def write_export_files(path: Path, task: Task, name: str, baseline: dict[str, Any], tokenizer: Any) -> None:
    """The export contract's two files, through its typed models (what a real run writes is read by
    tests/integration/server/test_real_export.py)."""
    (path / "baseline.json").write_text(json.dumps(contracts.Baseline.model_validate(baseline).document()))
    metrics = contracts.ExportMetrics(task=task, name=name, model_version=f"{task[:4]}0123456789abcdef",
                                      tokenizer_fingerprint=contracts.tokenizer_fingerprint(tokenizer),
                                      headline_metric="f1" if task == "text-classification" else "perplexity")
    (path / "metrics.json").write_text(json.dumps(metrics.document()))  # last: the export is complete


def build_classifier(path: Path, name: str = "tiny-sst2") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    texts = sst2_sentences()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    raw.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=TOKEN_LIMIT,
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=raw.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # make the untrained head opinionated so labels differ between inputs
        model.classifier.weight.mul_(40.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    baseline = {"task": "text-classification", "label_distribution": {"negative": 0.5, "positive": 0.5},
                "input_length": length_baseline(tokenizer, texts)}
    write_export_files(path, "text-classification", name, baseline, tokenizer)
    return path


def build_causal(path: Path, name: str = "tiny-gpt") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = sst2_sentences()
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_max_length=CAUSAL_CONTEXT,
    )
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=raw.get_vocab_size(), n_positions=CAUSAL_CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=raw.token_to_id("<|endoftext|>"), bos_token_id=raw.token_to_id("<|endoftext|>"))
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    baseline = {"task": "causal-lm", "label_distribution": {}, "input_length": length_baseline(tokenizer, texts)}
    write_export_files(path, "causal-lm", name, baseline, tokenizer)
    return path


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("export") / "tiny-sst2")


@pytest.fixture(scope="session")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal(tmp_path_factory.mktemp("export") / "tiny-gpt")


StartServer = Callable[..., RunningServer]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start the real app under uvicorn on 127.0.0.1 (free port); stopped at the end of the test."""
    running: list[RunningServer] = []

    def start(model_dir: Path, **overrides: Any) -> RunningServer:
        overrides.setdefault("feedback_path", tmp_path / "feedback.jsonl")
        settings = ServerSettings(model_dir=model_dir, host="127.0.0.1", port=0, **overrides)
        server = start_in_thread(settings, ready_timeout=120)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_metrics(url: str) -> Samples:
    """GET /metrics and index every sample by (name, sorted labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def scrape() -> Callable[[str], Samples]:
    return scrape_metrics


@pytest.fixture(scope="session")
def sst2_holdout() -> list[str]:
    """Real SST-2 training sentences the baseline did not see (the same population)."""
    return sst2_sentences("train", limit=600)[400:]


@pytest.fixture(autouse=True, scope="module")
def _keep_torch_threads() -> Iterator[None]:
    """A server in this process sets torch's (process-wide) thread count; give the next tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
