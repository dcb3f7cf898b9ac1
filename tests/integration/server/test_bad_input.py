"""Every client mistake gets a 4xx with a JSON body naming the problem; none becomes a 500."""

from __future__ import annotations

import httpx
import pytest

PREDICT = "/v1/models/tiny-sst2:predict"
JSON = {"content-type": "application/json"}

# (name, method, path, raw body or JSON value, status, words the message must contain)
CASES = [
    ("malformed JSON", "POST", PREDICT, b'{"instances": ["a",', 400, "not valid JSON"),
    ("not JSON at all", "POST", PREDICT, b"instances=a", 400, "not valid JSON"),
    ("body is a list", "POST", PREDICT, ["a"], 422, "body"),
    ("instances missing", "POST", PREDICT, {"inputs": ["a"]}, 422, "instances"),
    ("instances not a list", "POST", PREDICT, {"instances": "a"}, 422, "instances"),
    ("instance is a number", "POST", PREDICT, {"instances": [1]}, 422, "instances.0"),
    ("instance object without text", "POST", PREDICT, {"instances": [{"txt": "a"}]}, 422, "instances.0"),
    ("instance text is null", "POST", PREDICT, {"instances": [{"text": None}]}, 422, "instances.0"),
    ("empty instances", "POST", PREDICT, {"instances": []}, 422, "instances"),
    ("too many instances", "POST", PREDICT, {"instances": ["a"] * 9}, 413, "at most 8"),
    ("unknown model", "POST", "/v1/models/nope:predict", {"instances": ["a"]}, 404, "nope"),
    ("unknown route", "GET", "/v2/whatever", None, 404, "Not Found"),
    ("wrong method", "GET", "/v1/feedback", None, 405, "Method Not Allowed"),
    ("body over the byte limit", "POST", PREDICT, {"instances": ["x" * 3000]}, 413, "2048 bytes"),
    ("completions on a classifier", "POST", "/v1/completions", {"prompt": "a"}, 400, "classifies"),
    ("feedback without an answer", "POST", "/v1/feedback", {"input": "a"}, 422, "exactly one"),
    ("feedback with both answers", "POST", "/v1/feedback", {"input": "a", "label": "positive", "completion": "b"},
     422, "exactly one"),
    ("feedback with an unknown label", "POST", "/v1/feedback", {"input": "a", "label": "meh"}, 422, "'meh'"),
    ("feedback with a completion", "POST", "/v1/feedback", {"input": "a", "completion": "b"}, 422, "label"),
    ("feedback input is a number", "POST", "/v1/feedback", {"input": 3, "label": "positive"}, 422, "input"),
    # JSON can carry a lone UTF-16 surrogate; no tokenizer and no UTF-8 file can (it was a 500, or a 503).
    ("lone surrogate in an instance", "POST", PREDICT, rb'{"instances": ["ok", "bad \ud800"]}', 422,
     "instances.1: holds a lone UTF-16 surrogate"),
    ("lone surrogate in an instance object", "POST", PREDICT, rb'{"instances": [{"text": "\udfff"}]}', 422,
     "instances.0.text: holds a lone UTF-16 surrogate"),
    ("lone surrogate in feedback", "POST", "/v1/feedback", rb'{"input": "\ud83d", "label": "positive"}', 422,
     "input: holds a lone UTF-16 surrogate"),
    ("NaN prediction in feedback", "POST", "/v1/feedback",
     b'{"input": "a", "label": "positive", "prediction": NaN}', 422, "prediction: must be plain JSON"),
    ("Infinity deep in a feedback prediction", "POST", "/v1/feedback",
     b'{"input": "a", "label": "positive", "prediction": {"scores": [-Infinity]}}', 422, "NaN or Infinity"),
]


@pytest.fixture(scope="module")
def server(classifier_dir, tmp_path_factory):
    from finetune.server.serving import start_in_thread
    from finetune.server.settings import ServerSettings

    settings = ServerSettings(
        model_dir=classifier_dir, port=0, max_instances=8, max_body_bytes=2048,
        feedback_path=tmp_path_factory.mktemp("fb") / "feedback.jsonl",
    )
    with start_in_thread(settings) as running:
        yield running


@pytest.mark.parametrize(("method", "path", "body", "status", "words"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_client_mistakes_get_a_4xx_naming_the_problem(server, method, path, body, status, words):
    if isinstance(body, bytes):
        answer = httpx.request(method, server.url + path, content=body, headers=JSON)
    else:
        answer = httpx.request(method, server.url + path, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert words in error["message"], error
    assert error["type"]


def test_a_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        yield b'{"instances": ["'
        for _ in range(10):
            yield b"y" * 500
        yield b'"]}'

    answer = httpx.post(server.url + PREDICT, content=chunks(), headers=JSON)
    assert answer.status_code == 413 and "bytes" in answer.json()["error"]["message"]


def test_no_mistake_ever_caused_a_5xx_and_the_server_still_answers(server, scrape):
    for case in CASES:  # run them all once more in this test, whatever order pytest chose
        body = case[3]
        kwargs = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
        httpx.request(case[1], server.url + case[2], **kwargs)
    codes = [dict(labels)["code"] for (name, labels) in scrape(server.url) if name == "finetune_server_requests_total"]
    assert codes and not [c for c in codes if c.startswith("5")]
    ok = httpx.post(server.url + PREDICT, json={"instances": ["still fine"]})
    assert ok.status_code == 200


def test_long_input_is_refused_when_configured(classifier_dir, start_server):
    running = start_server(classifier_dir, on_long_input="reject")
    answer = httpx.post(f"{running.url}{PREDICT}", json={"instances": ["short", "word " * 40]})
    assert answer.status_code == 413
    assert "input 1 has" in answer.json()["error"]["message"] and "limit is 32" in answer.json()["error"]["message"]


def test_an_empty_text_is_a_valid_instance(server):
    answer = httpx.post(server.url + PREDICT, json={"instances": ["", {"text": "   "}]})
    assert answer.status_code == 200
    assert len(answer.json()["predictions"]) == 2
