"""OpenAI-compatible /v1/completions on a tiny GPT-2, streaming, overload and timeouts."""

from __future__ import annotations

import asyncio
import json
import time

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


def raw_complete(server, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (rb'{"prompt": "a \ud800"}', 422, "prompt: holds a lone UTF-16 surrogate"),
        (rb'{"prompt": ["ok", "\udfff"]}', 422, "prompt.1: holds a lone UTF-16 surrogate"),
        (rb'{"prompt": "a", "stop": "\ud800"}', 422, "stop: holds a lone UTF-16 surrogate"),
        (b'{"prompt": "a", "seed": 18446744073709551616}', 422, "seed"),
        (b'{"prompt": "a", "seed": -1}', 422, "seed"),
        (b'{"prompt": "a", "temperature": NaN}', 422, "temperature"),
        (b'{"prompt": "a", "top_p": Infinity}', 422, "top_p"),
        (b'{"prompt": [1, -2]}', 422, "prompt.1"),
        (b'{"prompt": [99999]}', 422, "vocabulary size"),
        (b'{"prompt": {"text": "a"}}', 422, "a list of token ids"),
        (b'{"prompt": "a", "echo": true}', 400, "echo: not supported"),
        (b'{"prompt": "a", "best_of": 3}', 400, "best_of: not supported"),
        (b'{"prompt": "a", "logit_bias": {"5": 10}}', 400, "logit_bias: not supported"),
        (b'{"prompt": "a", "max_token": 5}', 400, "max_token: not a field"),
        (b'{"prompt": "a", "logprobs": 6}', 422, "logprobs"),
        (b'{"prompt": "a", "n": 2, "stream": true}', 422, "n=1"),
        (b'{"prompt": "a", "stream": true, "seed": -5}', 422, "seed"),  # refused before any event is sent
    ],
)
def test_hostile_completion_requests_get_a_4xx_naming_the_field(server, scrape, body, status, words):
    answer = raw_complete(server, body)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert words in answer.json()["error"]["message"]
    codes = [dict(labels)["code"] for (name, labels) in scrape(server.url) if name == "finetune_server_requests_total"]
    assert not [c for c in codes if c.startswith("5")]


def test_neutral_values_of_unimplemented_fields_are_served(server):
    answer = complete(server, prompt="a", max_tokens=3, temperature=0, echo=False, best_of=1, presence_penalty=0,
                      frequency_penalty=0.0, logit_bias={}, user="client-7")
    assert answer.status_code == 200, answer.text


def test_a_vanishing_temperature_is_greedy_decoding(server):
    greedy = complete(server, prompt="the film is", max_tokens=8, temperature=0).json()["choices"][0]["text"]
    tiny = complete(server, prompt="the film is", max_tokens=8, temperature=1e-300)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy


def test_n_gives_n_choices_per_prompt_in_order(server, causal_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    body = complete(server, prompt=["the film is", "a"], n=3, max_tokens=6, temperature=1.0, seed=3).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    again = complete(server, prompt=["the film is", "a"], n=3, max_tokens=6, temperature=1.0, seed=3).json()
    assert [c["text"] for c in body["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in body["choices"][:3]}) > 1, "sampled choices should differ"
    # OpenAI's usage: each prompt once, every choice's completion tokens
    prompt_tokens = len(tokenizer("the film is")["input_ids"]) + len(tokenizer("a")["input_ids"])
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert 6 <= body["usage"]["completion_tokens"] <= 36


def test_logprobs_are_the_models_own_log_probabilities(server, causal_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    body = complete(server, prompt="the film is", max_tokens=6, temperature=0, logprobs=2).json()
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    prompt = tokenizer("the film is")["input_ids"]
    generated = tokenizer(choice["text"])["input_ids"]
    with torch.inference_mode():
        direct = model(torch.tensor([prompt + generated])).logits[0].log_softmax(-1)
    for step, (token, value) in enumerate(zip(generated, logprobs["token_logprobs"], strict=False)):
        assert value == pytest.approx(float(direct[len(prompt) + step - 1, token]), abs=1e-4)
        assert value == pytest.approx(max(logprobs["top_logprobs"][step].values()), abs=1e-4)  # greedy = top-1
    assert logprobs["text_offset"][0] == len("the film is")


def test_token_id_prompts_answer_like_their_text(server, causal_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(causal_dir)("the film is")["input_ids"]
    by_text = complete(server, prompt="the film is", max_tokens=6, temperature=0).json()
    by_ids = complete(server, prompt=ids, max_tokens=6, temperature=0).json()
    both = complete(server, prompt=[ids, ids[:2]], max_tokens=6, temperature=0).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] == both["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert len(both["choices"]) == 2


async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def test_concurrent_greedy_requests_share_a_generate_call_and_keep_their_own_text(causal_dir, start_server,
                                                                                    scrape):
    server = start_server(causal_dir, model_workers=1, max_wait_ms=200)
    prompts = ["the film is", "a", "an uneven but often moving portrait", "dull", "the plot is a mess and"]
    bodies = [{"prompt": p, "max_tokens": 4 + i * 3, "temperature": 0, "stop": ["zz"]} for i, p in enumerate(prompts)]
    alone = [complete(server, **body).json()["choices"][0] for body in bodies]
    before = scrape(server.url)
    together = asyncio.run(_concurrent(f"{server.url}/v1/completions", bodies * 4))
    after = scrape(server.url)
    for answer, expected in zip(together, alone * 4, strict=True):
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (expected["text"], expected["finish_reason"])
    passes = after[("finetune_server_batch_size_count", ())] - before[("finetune_server_batch_size_count", ())]
    requests = after[("finetune_server_batch_size_sum", ())] - before[("finetune_server_batch_size_sum", ())]
    assert requests == 20 and passes <= 10, f"{passes} generate calls for 20 requests"


@pytest.fixture
def recorded_generations(monkeypatch):
    """Every generate call the in-process server makes: its requests' prompt count and its completions."""
    from finetune.server.model_runner import ModelRunner

    calls: list[list[list]] = []
    original = ModelRunner.generate

    def record(self, requests):
        out = original(self, requests)
        calls.append(out)
        return out

    monkeypatch.setattr(ModelRunner, "generate", record)
    return calls


def test_a_client_that_leaves_stops_its_generation(causal_dir, start_server, recorded_generations):
    server = start_server(causal_dir, model_workers=1)
    body = {"prompt": "the film is", "max_tokens": 200, "temperature": 0}
    assert complete(server, **body).json()["choices"][0]["finish_reason"] == "length"  # runs 200 tokens alone
    batcher = server._server.config.app.state.server.batcher
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 200 tokens
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 60
    while (batcher._busy or len(recorded_generations) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)  # warm-up, the first request, then the abandoned one
    abandoned = recorded_generations[-1][0][0]
    assert abandoned.completion_tokens < 200, "the abandoned generation ran to max_tokens"


def test_a_full_queue_refuses_a_multi_prompt_request_whole(causal_dir, start_server, recorded_generations):
    server = start_server(causal_dir, max_queue=2, model_workers=1)
    before = len(recorded_generations)
    answer = complete(server, prompt=["a", "b", "c", "d"], max_tokens=3, temperature=0)
    assert answer.status_code == 503, answer.text
    batcher = server._server.config.app.state.server.batcher
    # Any prompt of the refused request that got in is queued, running or done by now: none may be.
    assert (batcher.depth, batcher._busy, len(recorded_generations)) == (0, 0, before)


def test_logprobs_cover_every_generated_token_even_for_byte_pieces(server):
    for seed in range(12):
        body = complete(server, prompt="the film is", max_tokens=12, temperature=1.0, seed=seed, logprobs=3).json()
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
        if choice["finish_reason"] == "length":
            assert len(logprobs["tokens"]) == 12, (seed, choice["text"])
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
        for value, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
            assert max(top.values()) >= value - 1e-6  # the alternatives hold the likeliest token
