"""Bearer-token auth on and off, and a graceful SIGTERM drain of a real `finetune serve` process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

PREDICT = "/v1/models/tiny-sst2:predict"


def test_without_a_token_everything_is_open(classifier_dir, start_server):
    server = start_server(classifier_dir)
    assert httpx.post(server.url + PREDICT, json={"instances": ["a"]}).status_code == 200


@pytest.mark.parametrize("source", ["env", "file"])
def test_with_a_token_inference_and_feedback_need_it(classifier_dir, start_server, tmp_path, monkeypatch, source):
    if source == "env":
        monkeypatch.setenv("FINETUNE_SERVE_AUTH_TOKEN", "s3cret")
        server = start_server(classifier_dir)
    else:
        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")  # a mounted Secret often ends with a newline
        server = start_server(classifier_dir, auth_token_file=token_file)
    body = {"instances": ["a"]}
    missing = httpx.post(server.url + PREDICT, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    wrong = httpx.post(server.url + PREDICT, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    # the token is checked before the body is read: no parse errors, no size checks for strangers
    assert httpx.post(server.url + PREDICT, content=b"{not json").status_code == 401
    assert httpx.post(server.url + "/v1/completions", content=b"x" * 2_000_000).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.post(server.url + PREDICT, json=body, headers=good).status_code == 200
    feedback = {"input": "a", "label": "positive"}
    assert httpx.post(server.url + "/v1/feedback", json=feedback).status_code == 401
    assert httpx.post(server.url + "/v1/feedback", json=feedback, headers=good).status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/v1/models/tiny-sst2"):
        assert httpx.get(server.url + open_path).status_code == 200, open_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited before becoming ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server never became ready")


async def _in_flight_then_sigterm(url: str, proc: subprocess.Popen[bytes]) -> tuple[list[httpx.Response], int]:
    """Six long generations, SIGTERM while they run; returns the answers and how many ended after SIGTERM."""
    body = {"prompt": "the film", "max_tokens": 200, "temperature": 0}
    finished: list[float] = []

    async def call(client: httpx.AsyncClient) -> httpx.Response:
        answer = await client.post(f"{url}/v1/completions", json=body)
        finished.append(time.monotonic())
        return answer

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=6)) as client:
        calls = [asyncio.ensure_future(call(client)) for _ in range(6)]
        await asyncio.sleep(0.3)  # all six are accepted: one generating, the rest queued
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answers = await asyncio.gather(*calls)
    return answers, sum(t > signalled for t in finished)


def test_sigterm_finishes_in_flight_requests_then_exits(causal_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "FINETUNE_SERVE_FEEDBACK_PATH": str(tmp_path / "feedback.jsonl")}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune.cli", "serve", "--model", str(causal_dir), "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[3],
        )
        try:
            _wait_ready(url, proc)
            answers, after_sigterm = asyncio.run(_in_flight_then_sigterm(url, proc))
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text()
    assert after_sigterm >= 2, "the requests finished before SIGTERM; the test proved nothing"
    assert [a.status_code for a in answers] == [200] * 6, output
    assert all(a.json()["usage"]["completion_tokens"] > 0 for a in answers)
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "server stopped: drained" in output and "feedback store closed" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_a_rotated_token_file_takes_effect_without_a_restart(classifier_dir, start_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first")
    server = start_server(classifier_dir, auth_token_file=token_file)
    body = {"instances": ["a"]}
    assert httpx.post(server.url + PREDICT, json=body, headers={"Authorization": "Bearer first"}).status_code == 200
    replacement = tmp_path / "token.new"
    replacement.write_text("second")
    os.utime(replacement, (time.time() + 5, time.time() + 5))  # a visibly newer file, as a Secret update
    replacement.replace(token_file)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = httpx.post(server.url + PREDICT, json=body, headers={"Authorization": "Bearer second"})
        if answer.status_code == 200:
            break
        time.sleep(0.2)
    assert answer.status_code == 200
    assert httpx.post(server.url + PREDICT, json=body, headers={"Authorization": "Bearer first"}).status_code == 401
