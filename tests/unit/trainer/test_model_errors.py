"""Loading the base model: a wrong model is permanent (exit 2), a hub or network outage is transient (75)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.contracts import TransientError
from finetune.spec import ModelSource, SpecError
from finetune.trainer import models


def test_an_uncached_hub_id_offline_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real transformers call with the hub unreachable (offline mode, nothing cached). The libraries read
    HF_HUB_OFFLINE when imported, so the flag is set where they keep it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TransientError, match="network: cannot reach the model hub huggingface.co for "
                                             "'someone/never-cached'"):
        models.load_tokenizer(ModelSource(name="someone/never-cached"))


def test_an_unreachable_hub_fails_at_once_as_a_network_error_naming_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a minute of the hub client's retries and then a permanent error: one probe, exit 75's error."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for proxy in models.PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(TransientError, match=rf"^network: cannot reach the model hub at 127.0.0.1:{port} to "
                                             r"download 'someone/never-cached' \(Connection refused\)"):
        models.load_tokenizer(ModelSource(name="someone/never-cached"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: (tmp / "file.bin").write_bytes(b"x") and tmp / "file.bin", "is a file"),
        (lambda tmp: tmp, "holds no config.json"),
    ],
)
def test_a_bad_model_path_is_permanent_and_says_which(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=message):
        models.resolve_source(ModelSource(path=str(make(tmp_path))))


class _Response:
    """What huggingface_hub keeps of an HTTP answer: enough for its errors to be built as the hub raises them."""

    def __init__(self, status: int) -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}
        self.request = None
        self.url = "https://huggingface.co/api/models/x/y"


def _wrapped(err: BaseException) -> OSError:
    """transformers raises an OSError whose cause is the hub's own error."""
    try:
        raise OSError("x/y is not a local folder and is not a valid model identifier") from err
    except OSError as wrapped:
        return wrapped


def test_hub_answers_are_classified_by_the_hubs_own_errors() -> None:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    missing = _wrapped(RepositoryNotFoundError("404 Repository Not Found", response=_Response(404)))  # type: ignore[arg-type]
    assert isinstance(models.load_failure("the model", "x/y", missing), SpecError)
    outage = _wrapped(HfHubHTTPError("503 Service Unavailable", response=_Response(503)))  # type: ignore[arg-type]
    assert isinstance(models.load_failure("the model", "x/y", outage), TransientError)
    throttled = _wrapped(HfHubHTTPError("429 Too Many Requests", response=_Response(429)))  # type: ignore[arg-type]
    assert isinstance(models.load_failure("the model", "x/y", throttled), TransientError)
    assert isinstance(models.load_failure("the model", "x/y", _wrapped(ConnectionError("reset"))), TransientError)
    assert isinstance(models.load_failure("the model", "x/y", OSError("corrupt weights")), SpecError)


def test_a_cached_model_loads_offline_when_the_hub_cannot_be_reached(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """An air-gapped cluster with a filled HF_HOME: no minute of retries per file, the cache is used."""
    import socket

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someorg--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someorg--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--cached" / "refs" / "main").write_text("abc")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for proxy in models.PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    models.check_hub_reachable("someorg/cached", None)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises(TransientError, match="network: cannot reach the model hub at 127.0.0.1"):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        models.check_hub_reachable("someorg/not-cached", None)
