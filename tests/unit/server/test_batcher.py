"""The micro-batcher's gathering rules, with a recording stand-in for the model (no torch needed)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from finetune.server.batcher import Batcher, Overloaded, RequestTooLarge
from finetune.server.metrics import ServerMetrics
from finetune.server.model_runner import Classification, Encoded


class RecordingRunner:
    """Answers each text with its first id as the label and records the size of every forward pass."""

    def __init__(self, delay: float = 0.0) -> None:
        self.passes: list[int] = []
        self.delay = delay
        self.fail_on: int | None = None
        self.threads: set[str] = set()
        self.torch_threads: list[tuple[str, int]] = []  # (model thread, torch threads) per use_threads call
        self._torch_threads = threading.local()

    def use_threads(self, threads: int) -> None:
        self._torch_threads.value = threads
        self.torch_threads.append((threading.current_thread().name, threads))

    def encode(self, texts):
        return [Encoded([int(t)], len(t), len(t) > 3) for t in texts]

    def classify(self, batch):
        self.threads.add(threading.current_thread().name)
        assert self._torch_threads.value >= 1, "use_threads() must come before a pass"
        self.passes.append(len(batch))
        time.sleep(self.delay)
        if self.fail_on is not None and any(ids[0] == self.fail_on for ids in batch):
            raise RuntimeError("boom")
        return [Classification(str(ids[0]), 1.0, {str(ids[0]): 1.0}) for ids in batch]


def labels(answers) -> list[str | None]:
    return [None if result is None else result.label for _, result in answers]


def make(runner: RecordingRunner, **kwargs) -> Batcher:
    options = {"max_batch_size": 8, "max_wait_ms": 200.0, "max_queue": 100} | kwargs
    batcher = Batcher(runner, ServerMetrics(), **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_a_lone_request_does_not_wait_for_company():
    runner = RecordingRunner()
    batcher = make(runner, max_wait_ms=500.0)
    started = time.perf_counter()
    assert labels(await batcher.classify(["7"], timeout=5)) == ["7"]
    assert time.perf_counter() - started < 0.2  # not the 500 ms max wait
    assert runner.threads == {"finetune-model-0_0"}  # off the event loop, on the model thread
    await batcher.drain(1)


async def test_concurrent_requests_share_passes_up_to_the_max_and_keep_their_answers():
    runner = RecordingRunner(delay=0.05)
    batcher = make(runner, max_batch_size=8)
    results = await asyncio.gather(*(batcher.classify([str(i), str(i + 100)], timeout=5) for i in range(10)))
    assert [labels(result) for result in results] == [[str(i), str(i + 100)] for i in range(10)]
    assert sum(runner.passes) == 20 and max(runner.passes) <= 8 and len(runner.passes) < 10
    await batcher.drain(1)


async def test_a_request_larger_than_the_max_runs_in_chunks():
    runner = RecordingRunner()
    batcher = make(runner, max_batch_size=4)
    result = await batcher.classify([str(i) for i in range(10)], timeout=5)
    assert labels(result) == [str(i) for i in range(10)]
    assert sorted(runner.passes) == [2, 4, 4]
    await batcher.drain(1)


async def test_a_full_queue_raises_overloaded_instead_of_growing():
    runner = RecordingRunner(delay=0.2)
    batcher = make(runner, max_batch_size=1, max_queue=2)
    calls = [asyncio.ensure_future(batcher.classify([str(i)], timeout=5)) for i in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert any(isinstance(r, Overloaded) for r in results)
    assert any(isinstance(r, list) for r in results)
    await batcher.drain(5)


async def test_a_failing_pass_fails_its_requests_but_not_the_worker():
    runner = RecordingRunner()
    runner.fail_on = 13
    batcher = make(runner)
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.classify(["13"], timeout=5)
    assert labels(await batcher.classify(["1"], timeout=5)) == ["1"]
    await batcher.drain(1)


async def test_drain_finishes_queued_work_and_refuses_new_work():
    runner = RecordingRunner(delay=0.05)
    batcher = make(runner, max_batch_size=1)
    calls = [asyncio.ensure_future(batcher.classify([str(i)], timeout=5)) for i in range(4)]
    await asyncio.sleep(0.01)
    await batcher.drain(5)
    assert [labels(c.result()) for c in calls] == [["0"], ["1"], ["2"], ["3"]]
    with pytest.raises(Overloaded, match="shutting down"):
        await batcher.classify(["9"], timeout=5)


async def test_the_worker_waits_only_for_requests_already_arriving():
    runner = RecordingRunner()
    batcher = make(runner, max_wait_ms=300.0)
    arrival = batcher.arrival()  # a request is being read: worth waiting for

    async def late() -> list:
        await asyncio.sleep(0.05)
        arrival.done()
        return await batcher.classify(["2"], timeout=5)

    first, second = await asyncio.gather(batcher.classify(["1"], timeout=5), late())
    assert labels(first) == ["1"] and labels(second) == ["2"]
    assert runner.passes == [2], "the late request should have joined the first pass"
    await batcher.drain(1)


async def test_reject_policy_refuses_the_whole_request_with_a_long_text():
    runner = RecordingRunner()
    batcher = make(runner, on_long_input="reject")
    refused, fine = await asyncio.gather(
        batcher.classify(["1", "12345"], timeout=5), batcher.classify(["2"], timeout=5)
    )
    assert labels(refused) == [None, None] and refused[1][0].truncated
    assert labels(fine) == ["2"]
    await batcher.drain(1)


def test_plan_passes_groups_similar_lengths_and_covers_every_text():
    from finetune.server.batcher import plan_passes

    lengths = [50, 10, 11, 52, 12, 9, 49, 10]
    passes = plan_passes(lengths, max_size=8, overhead_tokens=64)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    # the short ones together, the long ones together: one pass of 8 would pad 5 short texts by ~40
    assert sorted(sorted(p) for p in passes) == [[0, 3, 6], [1, 2, 4, 5, 7]]
    # a cheap pass overhead splits more finely, an expensive one never splits
    assert len(plan_passes(lengths, max_size=8, overhead_tokens=1)) > 2
    assert len(plan_passes(lengths, max_size=8, overhead_tokens=10_000)) == 1
    assert [len(p) for p in plan_passes([10] * 10, max_size=4)] in ([2, 4, 4], [4, 4, 2], [4, 2, 4], [3, 3, 4])
    assert plan_passes([], max_size=4) == []


def test_plan_passes_is_optimal_against_brute_force():
    import itertools
    import random

    from finetune.server.batcher import plan_passes

    def cost(passes, lengths, overhead):
        return sum(overhead + len(p) * max(lengths[i] for i in p) for p in passes)

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(  # every way to cut the sorted order into runs of at most 3
            cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], lengths, 20)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
            if all(b - a <= 3 for a, b in itertools.pairwise((0, *cuts, len(order))))
        )
        passes = plan_passes(lengths, max_size=3, overhead_tokens=20)
        assert all(len(p) <= 3 for p in passes)
        assert cost(passes, lengths, 20) == best


async def test_one_bad_request_does_not_fail_the_others_in_its_batch():
    runner = RecordingRunner(delay=0.05)
    runner.fail_on = 13
    batcher = make(runner)
    first = asyncio.ensure_future(batcher.classify(["0"], timeout=5))  # occupies the worker
    await asyncio.sleep(0.01)
    good, bad = await asyncio.gather(batcher.classify(["1"], timeout=5), batcher.classify(["13"], timeout=5),
                                     return_exceptions=True)
    assert labels(await first) == ["0"]
    assert labels(good) == ["1"]
    assert isinstance(bad, RuntimeError)
    assert 2 in runner.passes, "the two should first have shared a pass"
    await batcher.drain(1)


async def test_lone_requests_always_take_the_first_worker_with_every_thread_first():
    runner = RecordingRunner()
    batcher = make(runner, workers=2, threads=2)
    for i in range(5):
        assert labels(await batcher.classify([str(i)], timeout=5)) == [str(i)]
    # always the same thread: alternating would leave the other's OpenMP threads spinning
    assert {name for name, _ in runner.torch_threads} == {"finetune-model-0_0"}
    assert runner.torch_threads[0][1] == 2  # every thread, until the thread plan has measured one
    await batcher.drain(1)


def test_the_thread_plan_moves_to_one_thread_when_it_is_faster_and_back_when_it_is_not():
    from finetune.server.threadplan import ThreadPlan

    plan = ThreadPlan(2, explore_every=8)
    cost = {2: 0.020, 1: 0.004}  # a neighbour on a core: two-thread passes wait at every barrier

    def run(passes: int) -> list[int]:
        chosen = []
        for _ in range(passes):
            threads = plan.choose()
            plan.observe(threads, cost[threads] * 10, 10)
            chosen.append(threads)
        return chosen

    contended = run(40)
    assert contended[:2] == [2, 1] and contended[-16:].count(1) >= 14
    cost.update({2: 0.001, 1: 0.002})  # the neighbour left
    idle = run(60)
    assert idle[-16:].count(2) >= 14


def test_one_usable_thread_leaves_the_plan_nothing_to_choose():
    from finetune.server.threadplan import ThreadPlan

    plan = ThreadPlan(1)
    assert {plan.choose() for _ in range(50)} == {1}


async def test_work_arriving_together_is_shared_evenly_by_two_workers_one_thread_each():
    runner = RecordingRunner(delay=0.3)  # longer than the max wait: the first pass is still running
    batcher = make(runner, workers=2, threads=2, max_wait_ms=50.0, max_batch_size=16)
    texts = [[str(i)] for i in range(1, 10)]  # 9 requests
    arrivals = [batcher.arrival() for _ in texts]  # all on their way in: the dispatcher waits for them

    async def request(text: list[str], arrival) -> list:
        arrival.done()
        return await batcher.classify(text, timeout=5)

    results = await asyncio.gather(*(request(t, a) for t, a in zip(texts, arrivals, strict=True)))
    assert [labels(r) for r in results] == texts
    assert sorted(runner.passes) == [4, 5], "an even share each, not 9 on one worker"
    assert runner.threads == {"finetune-model-0_0", "finetune-model-1_0"}
    assert {n for _, n in runner.torch_threads} == {1}, "two passes at once: one thread each on 2 CPUs"
    await batcher.drain(1)


async def test_a_second_worker_serves_while_the_first_is_busy():
    runner = RecordingRunner(delay=0.3)
    batcher = make(runner, workers=2, threads=2)
    started = time.perf_counter()
    first = asyncio.ensure_future(batcher.classify(["1"], timeout=5))
    await asyncio.sleep(0.05)
    assert labels(await batcher.classify(["2"], timeout=5)) == ["2"]
    assert labels(await first) == ["1"]
    assert time.perf_counter() - started < 0.55, "the passes ran one after the other (2 x 0.3 s)"
    assert runner.torch_threads == [("finetune-model-0_0", 2), ("finetune-model-1_0", 1)]
    await batcher.drain(1)


class TimedRunner(RecordingRunner):
    """Records when each pass ran and whether it was heavy (its first id above 1000)."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.spans: list[tuple[float, float, bool]] = []
        self._lock = threading.Lock()

    def classify(self, batch):
        started = time.monotonic()
        answers = super().classify(batch)
        with self._lock:
            self.spans.append((started, time.monotonic(), batch[0][0] > 1000))
        return answers


def overlapping(spans: list[tuple[float, float, bool]]) -> int:
    """Most heavy passes that ran at the same time."""
    heavy = [(s, e) for s, e, h in spans if h]
    return max((sum(s2 < e1 and s1 < e2 for s2, e2 in heavy) for s1, e1 in heavy), default=0)


async def test_heavy_requests_never_take_every_worker_and_light_ones_overtake_them():
    runner = TimedRunner(delay=0.3)
    batcher = make(runner, workers=2, max_batch_size=64, heavy_tokens=100, max_wait_ms=0.0)
    heavy = [asyncio.ensure_future(batcher.classify([str(5000 + i) * 100] * 8, timeout=30)) for i in range(3)]
    await asyncio.sleep(0.05)  # the heavy ones are queued first
    light = await batcher.classify(["7"], timeout=30)
    light_done = time.monotonic()
    await asyncio.gather(*heavy)
    assert labels(light) == ["7"]
    assert overlapping(runner.spans) == 1, runner.spans
    # The light request ran on the free worker, not after the three heavy passes queued before it.
    last_heavy_end = max(e for _, e, h in runner.spans if h)
    assert light_done < last_heavy_end
    await batcher.drain(1)


async def test_a_request_over_the_token_budget_is_refused_alone():
    runner = RecordingRunner()
    batcher = make(runner, max_request_tokens=3)
    refused, fine = await asyncio.gather(
        batcher.classify(["1", "2", "3", "4"], timeout=5), batcher.classify(["5"], timeout=5),
        return_exceptions=True,
    )
    assert isinstance(refused, RequestTooLarge) and refused.tokens == 4 and "at most 3" in str(refused)
    assert labels(fine) == ["5"]
    await batcher.drain(1)


def test_the_cost_estimate_errs_high_for_text_with_few_characters_per_token():
    from finetune.server.batcher import _Item

    future = asyncio.Future  # never awaited: only the cost is read
    english = _Item(future(loop=asyncio.new_event_loop()), texts=["a fine film " * 40])
    cjk = _Item(future(loop=asyncio.new_event_loop()), texts=["好" * 480])  # about one token a character
    assert english.cost >= len("a fine film " * 40) // 4
    assert cjk.cost >= 480


async def test_a_request_of_many_light_prompts_is_heavy_as_a_whole():
    from finetune.server.generation import GenerationControl, GenerationParams

    class GenRunner(RecordingRunner):
        def __init__(self) -> None:
            super().__init__(delay=0.2)
            self.spans: list[tuple[float, float, int]] = []

        def generate(self, requests):
            started = time.monotonic()
            time.sleep(self.delay)
            self.spans.append((started, time.monotonic(), len(requests)))
            return [[] for _ in requests]

    runner = GenRunner()
    batcher = make(runner, workers=2, heavy_tokens=100, max_wait_ms=0.0)
    params = GenerationParams(max_tokens=40, temperature=0.0)
    prompts = [[1] * 40 for _ in range(4)]  # 80 estimated tokens each: light alone, 320 together
    await batcher.generate_many(prompts, params, [GenerationControl() for _ in prompts], timeout=30)
    spans = [(s, e) for s, e, _ in runner.spans]
    assert max(sum(s2 < e1 and s1 < e2 for s2, e2 in spans) for s1, e1 in spans) == 1, runner.spans
    await batcher.drain(1)
