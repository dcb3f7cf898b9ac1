"""A model that cannot load and a feedback store that cannot open: loud, but never a crash loop of 500s."""

from __future__ import annotations

import shutil

import httpx
import pytest

from finetune.server.serving import ServeError, start_in_thread
from finetune.server.settings import ServerSettings


def test_a_model_that_fails_to_load_never_becomes_ready(classifier_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(classifier_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ServeError, match="did not become ready: .*Error"):
        start_in_thread(ServerSettings(model_dir=broken, port=0, feedback_path=tmp_path / "f.jsonl"))


def test_a_directory_that_is_no_export_is_refused_before_binding(tmp_path):
    with pytest.raises(ServeError, match="no config.json"):
        start_in_thread(ServerSettings(model_dir=tmp_path, port=0))


def test_an_unwritable_feedback_store_only_disables_feedback(classifier_dir, start_server, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    server = start_server(classifier_dir, feedback_path=blocker / "feedback.jsonl")
    ok = httpx.post(f"{server.url}/v1/models/{server.name}:predict", json={"instances": ["fine"]})
    assert ok.status_code == 200
    refused = httpx.post(f"{server.url}/v1/feedback", json={"input": "a", "label": "positive"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "feedback_unavailable"


def test_ready_only_after_load_and_warm_up(classifier_dir, tmp_path, monkeypatch):
    import threading
    import time

    from finetune.server.model_runner import ModelRunner
    from finetune.server.serving import _uvicorn_server

    release = threading.Event()
    real_warm_up = ModelRunner.warm_up

    def slow_warm_up(self: ModelRunner) -> None:
        release.wait(30)  # hold the server between "loaded" and "warmed up"
        real_warm_up(self)

    monkeypatch.setattr(ModelRunner, "warm_up", slow_warm_up)
    server = _uvicorn_server(
        ServerSettings(model_dir=classifier_dir, port=0, feedback_path=tmp_path / "f.jsonl"), own_process=False
    )
    thread = threading.Thread(target=server.run, daemon=True)  # type: ignore[attr-defined]
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"  # type: ignore[attr-defined]
        assert httpx.get(f"{url}/healthz").status_code == 200
        loading = httpx.get(f"{url}/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(f"{url}/v1/models/tiny-sst2:predict", json={"instances": ["a"]})
        assert early.status_code == 503 and early.json()["error"]["type"] == "not_ready"
        assert "retry-after" in early.headers
        release.set()
        while httpx.get(f"{url}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.post(f"{url}/v1/models/tiny-sst2:predict", json={"instances": ["a"]}).status_code == 200
    finally:
        release.set()
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(30)
