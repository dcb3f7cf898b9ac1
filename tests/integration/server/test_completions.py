"""OpenAI-compatible /v1/completions on a tiny GPT-2, streaming, overload and timeouts."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest


@pytest.fixture(scope="module")
def server(causal_dir, tmp_path_factory):
    from finetune.server.serving import start_in_thread
    from finetune.server.settings import ServerSettings

    settings = ServerSettings(model_dir=causal_dir, port=0, feedback_path=tmp_path_factory.mktemp("fb") / "f.jsonl")
    with start_in_thread(settings) as running:
        yield running


def complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def test_greedy_completion_matches_the_models_own_generate(server, causal_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answer = complete(server, prompt="the film is", max_tokens=12, temperature=0)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-gpt"
    choice = body["choices"][0]
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    ids = tokenizer("the film is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert choice["text"] == expected
    assert body["usage"]["prompt_tokens"] == ids.shape[1]
    assert body["usage"]["completion_tokens"] == out.shape[1] - ids.shape[1]
    assert choice["finish_reason"] in ("length", "stop")


def test_seeded_sampling_is_reproducible(server):
    first = complete(server, prompt=["a", "b"], max_tokens=10, temperature=1.0, top_p=0.9, seed=7).json()
    again = complete(server, prompt=["a", "b"], max_tokens=10, temperature=1.0, top_p=0.9, seed=7).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1]


def test_stop_sequence_cuts_the_text(server):
    full = complete(server, prompt="the film is", max_tokens=20, temperature=0).json()["choices"][0]["text"]
    stop = full[3:5]
    cut = complete(server, prompt="the film is", max_tokens=20, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_streaming_sends_the_same_text_as_server_sent_events(server):
    whole = complete(server, prompt="the film is", max_tokens=15, temperature=0).json()["choices"][0]
    pieces, finish = [], None
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "the film is", "max_tokens": 15, "temperature": 0, "stream": True}) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        pieces.append(choice["text"])
        finish = choice["finish_reason"] or finish
    assert "".join(pieces) == whole["text"]
    assert finish == whole["finish_reason"]
    assert len(events) > 3, "text should arrive in several events"


def test_long_prompt_keeps_its_end_and_says_so(server):
    answer = complete(server, prompt="word " * 400, max_tokens=5, temperature=0).json()
    assert answer["choices"][0]["truncated"] is True
    assert answer["usage"]["prompt_tokens"] == 256 - 5


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prompt": "a", "max_tokens": 256}, 422, "context of 256"),
        ({"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "a", "temperature": -1}, 422, "temperature"),
        ({"prompt": 5}, 422, "prompt"),
        ({"prompt": []}, 422, "empty"),
        ({"prompt": ["a", "b"], "stream": True}, 422, "single prompt"),
        ({"prompt": "a", "model": "gpt-4"}, 404, "gpt-4"),
        ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 422, "at most 4"),
    ],
)
def test_bad_completion_requests(server, body, status, words):
    answer = complete(server, **body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]


def test_predict_on_a_causal_model_points_to_completions(server):
    answer = httpx.post(f"{server.url}/v1/models/tiny-gpt:predict", json={"instances": ["a"]})
    assert answer.status_code == 400 and "/v1/completions" in answer.json()["error"]["message"]


def test_feedback_for_a_causal_model_takes_a_completion(server, scrape):
    ok = httpx.post(f"{server.url}/v1/feedback", json={"input": "q", "completion": "a", "prediction": "b"})
    assert ok.status_code == 200
    assert httpx.post(f"{server.url}/v1/feedback", json={"input": "q", "label": "x"}).status_code == 422
    assert scrape(server.url)[("finetune_server_feedback_total", (("label", "completion"),))] == 1


async def _burst(url: str, count: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(client.post(url, json=body) for _ in range(count)))


def test_a_full_queue_answers_503_with_retry_after(causal_dir, start_server, scrape):
    server = start_server(causal_dir, max_queue=2)
    answers = asyncio.run(_burst(f"{server.url}/v1/completions", 12, {"prompt": "a", "max_tokens": 120,
                                                                     "temperature": 0}))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 503 in codes, codes
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # overload is not a failure
    assert scrape(server.url)[("finetune_server_generated_tokens_total", ())] > 0


def test_a_slow_request_gets_504(causal_dir, start_server):
    server = start_server(causal_dir, request_timeout_s=0.05)
    answers = asyncio.run(_burst(f"{server.url}/v1/completions", 4, {"prompt": "a", "max_tokens": 200,
                                                                    "temperature": 0}))
    assert 504 in [a.status_code for a in answers]
    timed_out = next(a for a in answers if a.status_code == 504)
    assert timed_out.json()["error"]["type"] == "timeout"


def test_an_empty_prompt_is_answered(server):
    answer = complete(server, prompt="", max_tokens=3, temperature=0)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
