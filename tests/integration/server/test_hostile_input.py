"""Hostile and sloppy clients: a poisoned request fails alone, curl's form content type works, the
feedback store stays strict JSON, and an export without its tokenizer never becomes ready."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from finetune.server.serving import ServeError, start_in_thread
from finetune.server.settings import ServerSettings

POISON = [  # raw bodies, each a client mistake that once became a 500 or a 503
    rb'{"instances": ["fine", "\ud800"]}',
    rb'{"instances": [{"text": "a\udc00b"}]}',
    b'{"instances": ["a", 7]}',
    b'{"instances": [',
]


@pytest.fixture(scope="module")
def server(classifier_dir, tmp_path_factory):
    settings = ServerSettings(model_dir=classifier_dir, port=0, max_wait_ms=50,
                              feedback_path=tmp_path_factory.mktemp("fb") / "feedback.jsonl")
    with start_in_thread(settings) as running:
        yield running


def predict_url(server) -> str:
    return f"{server.url}/v1/models/{server.name}:predict"


async def _mix(url: str, good: list[str], rounds: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        good_calls = [client.post(url, json={"instances": [text]}) for _ in range(rounds) for text in good]
        bad_calls = [client.post(url, content=body, headers={"content-type": "application/json"})
                     for _ in range(rounds) for body in POISON]
        answers = await asyncio.gather(*good_calls, *bad_calls)
    return list(answers[: len(good_calls)]), list(answers[len(good_calls):])


def test_poisoned_requests_in_a_busy_batch_fail_alone(server, scrape):
    texts = ["a gorgeous film", "dull and long", "fine", "the worst", "moving"]
    alone = {t: httpx.post(predict_url(server), json={"instances": [t]}).json()["predictions"][0] for t in texts}
    good, bad = asyncio.run(_mix(predict_url(server), texts, rounds=6))
    assert [a.status_code for a in good] == [200] * len(good)
    for answer, text in zip(good, texts * 6, strict=True):
        prediction = answer.json()["predictions"][0]
        assert prediction["label"] == alone[text]["label"]
        assert prediction["score"] == pytest.approx(alone[text]["score"], abs=1e-5)
    assert sorted({a.status_code for a in bad}) == [400, 422]
    codes = [dict(labels)["code"] for (name, labels) in scrape(server.url) if name == "finetune_server_requests_total"]
    assert not [c for c in codes if c.startswith("5")]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):
    """`curl -d '{...}'` (the docs' examples) sends a form content type."""
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"instances": ["a gorgeous film"]}).encode()
    request = httpx.Request("POST", predict_url(server), content=body, headers=headers)
    assert request.headers.get("content-type") == content_type
    answer = httpx.Client().send(request)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] in ("negative", "positive")


def test_form_data_that_is_not_json_names_the_expected_body(server):
    answer = httpx.post(predict_url(server), data={"instances": "a"})
    assert answer.status_code == 400
    assert "JSON object" in answer.json()["error"]["message"]


def test_the_feedback_store_stays_strict_json(server, tmp_path):
    path = tmp_path / "strict.jsonl"
    settings = ServerSettings(model_dir=server_dir(server), port=0, feedback_path=path)
    with start_in_thread(settings) as running:
        ok = httpx.post(f"{running.url}/v1/feedback",
                        json={"input": "a", "label": "positive", "prediction": {"score": 0.5}})
        refused = httpx.post(f"{running.url}/v1/feedback", headers={"content-type": "application/json"},
                             content=b'{"input": "b", "label": "positive", "prediction": NaN}')
    assert ok.status_code == 200 and refused.status_code == 422

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} in the store")

    records = [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]
    assert [r["input"] for r in records] == ["a"]


def server_dir(server):
    return server._server.config.app.state.server.settings.model_dir


@pytest.mark.parametrize("keep", [["tokenizer_config.json"], ["tokenizer_config.json", "special_tokens_map.json"]])
def test_an_export_without_its_tokenizer_files_never_becomes_ready(classifier_dir, tmp_path, keep):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(classifier_dir, broken)
    for name in ("tokenizer.json", "vocab.txt"):
        (broken / name).unlink(missing_ok=True)
    for path in broken.iterdir():
        if "token" in path.name and path.name not in keep:
            path.unlink()
    with pytest.raises(ServeError, match="did not become ready: .*tokenizer"):
        start_in_thread(ServerSettings(model_dir=broken, port=0, feedback_path=tmp_path / "f.jsonl"))


def test_a_tokenizer_from_another_model_never_becomes_ready(classifier_dir, causal_dir, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(classifier_dir, mixed)
    for path in mixed.iterdir():
        if "token" in path.name or path.name == "vocab.txt":
            path.unlink()
    for path in causal_dir.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt"):
            shutil.copy(path, mixed / path.name)
    with pytest.raises(ServeError, match="did not become ready: .*tokenizer"):
        start_in_thread(ServerSettings(model_dir=mixed, port=0, feedback_path=tmp_path / "f.jsonl"))


def test_a_request_over_the_token_budget_gets_413_and_others_are_served(classifier_dir, start_server):
    running = start_server(classifier_dir, max_request_tokens=40)
    url = f"{running.url}/v1/models/{running.name}:predict"
    heavy = httpx.post(url, json={"instances": ["a fine film with a long cast list and more"] * 6})
    assert heavy.status_code == 413, heavy.text
    error = heavy.json()["error"]
    assert error["type"] == "too_many_tokens" and "at most 40 per request" in error["message"]
    assert httpx.post(url, json={"instances": ["fine"]}).status_code == 200


def test_a_completion_over_the_token_budget_gets_413(causal_dir, start_server):
    running = start_server(causal_dir, max_request_tokens=100)
    answer = httpx.post(f"{running.url}/v1/completions", json={"prompt": "a", "max_tokens": 30, "n": 4})
    assert answer.status_code == 413 and "(prompt + max_tokens) x n" in answer.json()["error"]["message"]
    assert httpx.post(f"{running.url}/v1/completions", json={"prompt": "a", "max_tokens": 30}).status_code == 200
