"""Dynamic micro-batching: concurrent requests share one forward pass, off the event loop.

A dispatcher task takes the oldest request from a bounded queue, gathers every other queued request
that fits into `max_batch_size` texts, and hands them to an idle model worker (a thread of its own) as
one batch. While that runs, new requests pile up in the queue and form the next batch, so under load the
batches grow by themselves. The dispatcher waits for stragglers (at most `max_wait_ms` after the
oldest request was queued) only under concurrency: while other model requests are still being read and
validated (`arrival()`, marked by an ASGI middleware) or when the last batch served several requests.
A lone client on an idle server goes straight to the model and pays no batching delay. Texts are
tokenized with their batch, in one tokenizer call on the model thread.

With several workers (`workers`, default 2 where 2 CPUs are usable) a second batch runs while the
first is still in its forward pass. A lone pass gets all `threads` (or one, when the thread plan found
that faster: a busy neighbour on a core stalls multi-thread passes, `threadplan.py`); under load every
pass gets an even share (one thread each on 2 CPUs: two one-thread passes did 37% more sentences/s in bf16 than one
two-thread pass, which loses time in thread barriers), and every batch takes at most a fair share of the
work in the server, so the two workers carry even loads.

The queue is bounded: when it is full, submitting raises `Overloaded` (the route answers 503 with
Retry-After) instead of letting memory grow. Generation requests with the same sampling settings share
one `generate` call the same way (`generation.py`); a seeded one runs alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from finetune.server.generation import Completion, GenerationControl, GenerationParams, GenerationRequest
from finetune.server.metrics import ServerMetrics
from finetune.server.model_runner import Classification, Encoded, ModelRunner, default_torch_threads
from finetune.server.threadplan import ThreadPlan

# One answer per text: its tokenization and its classification (None: refused as too long).
Answer = tuple[Encoded, Classification | None]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Arrival:
    """A request on its way to the queue; `done()` (idempotent) once it is queued or given up."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher: Batcher | None = batcher

    def done(self) -> None:
        if self._batcher is not None:
            self._batcher._arriving -= 1
            self._batcher = None


class RequestTooLarge(Exception):
    """A request over the per-request token budget (the route answers 413)."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the request has {tokens} tokens; this server takes at most {limit} per request "
                         "(max_request_tokens): send its texts in several requests")
        self.tokens, self.limit = tokens, limit


class Overloaded(Exception):
    """The queue is full (or the server is shutting down); the client should retry later."""


@dataclass
class _Item:
    future: asyncio.Future[Any]
    texts: list[str] = field(default_factory=list)  # classification
    prompt: list[int] = field(default_factory=list)  # generation
    params: GenerationParams | None = None
    control: GenerationControl | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    request_cost: int = 0  # the whole request's, when it came as several items (prompts)

    @property
    def size(self) -> int:
        """Rows in a forward pass: texts, or a generation's `n` choices."""
        return self.params.n if self.params is not None else max(len(self.texts), 1)

    @functools.cached_property
    def cost(self) -> int:
        """Estimated tokens, before tokenization: a third of the UTF-8 bytes (English runs about 4
        characters a token; a CJK character is 3 bytes and often a token of its own), so the estimate
        errs high rather than letting a heavy request pass as light. Computed once: the dispatcher
        reads it on every gather."""
        if self.params is not None:
            return (len(self.prompt) + self.params.max_tokens) * self.params.n
        return sum(len(text.encode("utf-8", "replace")) // 3 + 2 for text in self.texts)

    @property
    def weight(self) -> int:
        """What decides heaviness: the whole request's cost, however many items it came as."""
        return max(self.cost, self.request_cost)

    def joins(self, first: _Item, heavy_tokens: int) -> bool:
        """Whether this item may share `first`'s pass: classification with classification, generation
        with generation of the same sampling settings (never a seeded one), and never a heavy request
        with another one: a light request must not wait for a heavy one's pass."""
        if first.weight > heavy_tokens or self.weight > heavy_tokens:
            return False
        if first.params is None or self.params is None:
            return first.params is None and self.params is None
        key = first.params.batch_key()
        return key is not None and key == self.params.batch_key()


# What one extra forward pass costs, in padded tokens. Measured on MiniLM, 2 CPU cores: a pass costs
# about 2.3 ms (bf16) / 4.5 ms (fp32) before its first token, a token about 0.05 / 0.14 ms; 64 is a
# compromise (the plan is not sensitive near it: 48 to 120 all gave within 5% of the best throughput).
PASS_OVERHEAD_TOKENS = 64
# A request estimated above this many tokens is heavy (a second or more of one CPU core on MiniLM). Heavy
# requests run alone and never on every worker at once, so light ones always find a worker.
HEAVY_TOKENS = 4096


def plan_passes(lengths: list[int], max_size: int, overhead_tokens: int = PASS_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split text indices into forward passes at the least estimated cost: padding every text of a pass
    to its longest one wastes compute, and every extra pass costs a fixed overhead.

    Cost of a pass = overhead_tokens + texts x longest length. With the texts sorted by length the best
    passes are contiguous runs, so a dynamic programme over the sorted order finds the optimum exactly.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0] * (n + 1)  # best[j]: least cost of the first j sorted texts
    start = [0] * (n + 1)  # start[j]: where the last pass of that plan begins
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        best[j], start[j] = min(
            (best[i] + overhead_tokens + (j - i) * longest, i) for i in range(max(0, j - max_size), j)
        )
    passes: list[list[int]] = []
    while n > 0:
        passes.append(order[start[n] : n])
        n = start[n]
    return passes[::-1]


class Batcher:
    """The bounded queue and its model workers. `start()` inside a running loop, `drain()` to stop."""

    def __init__(
        self, runner: ModelRunner, metrics: ServerMetrics, *, max_batch_size: int, max_wait_ms: float,
        max_queue: int, on_long_input: Literal["truncate", "reject"] = "truncate", workers: int = 1,
        threads: int | None = None, heavy_tokens: int = HEAVY_TOKENS, max_request_tokens: int = 1 << 62,
    ) -> None:
        self._runner = runner
        self._max_request_tokens = max_request_tokens
        self._heavy_tokens = heavy_tokens
        self._deferred: collections.deque[_Item] = collections.deque()  # heavy, waiting for the heavy lane
        self._heavy_running = 0
        self._lane_freed = asyncio.Event()
        self._reject_long = on_long_input == "reject"
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._carry: _Item | None = None  # taken from the queue but did not fit into the last batch
        self._arriving = 0  # model requests being read and validated, not yet queued
        self._last_batch = 1  # requests in the last forward pass: the concurrency we have seen lately
        self._in_flight = 0  # texts in running passes
        self._closing = False
        self._threads = threads or default_torch_threads()
        self._plan = ThreadPlan(self._threads)
        self._idle = set(range(workers))
        self._idle_changed = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._passes: set[asyncio.Task[None]] = set()
        # One thread per worker, for its whole life: torch's thread settings and OpenMP team are per thread.
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"finetune-model-{i}") for i in range(workers)
        ]

    async def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the first worker's thread (loading, warm-up), where torch calls already live."""
        return await asyncio.get_running_loop().run_in_executor(self._executors[0], fn, *args)

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="finetune-batcher")

    @property
    def _busy(self) -> int:
        """Workers running a batch."""
        return len(self._executors) - len(self._idle)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None) + len(self._deferred)

    def _heavy(self, item: _Item) -> bool:
        return item.weight > self._heavy_tokens

    @property
    def _heavy_lane_free(self) -> bool:
        """Heavy passes may occupy every worker but one (with a single worker, that one)."""
        return self._heavy_running < max(1, len(self._executors) - 1)

    def arrival(self) -> Arrival:
        """Mark a request that reached the server but not yet the queue (see the module docstring)."""
        self._arriving += 1
        return Arrival(self)

    async def classify(self, texts: list[str], timeout: float) -> list[Answer]:
        """Tokenize and classify `texts` in a shared forward pass; answers keep the order of `texts`."""
        result: list[Answer] = await self._submit(_Item(self._future(), texts=texts), timeout)
        return result

    async def generate_many(
        self, prompts: list[list[int]], params: GenerationParams, controls: list[GenerationControl], timeout: float
    ) -> list[list[Completion]]:
        """Several prompts of one request, queued together or not at all (a full queue refuses the whole
        request, never half of it), heavy or light together."""
        items = [_Item(self._future(), prompt=p, params=params, control=c) for p, c in zip(prompts, controls,
                                                                                            strict=True)]
        total = sum(item.cost for item in items)
        for item in items:
            item.request_cost = total
        if self._queue.maxsize - self._queue.qsize() < len(items) and not self._closing:
            raise Overloaded(f"the request queue is full ({self._queue.maxsize} waiting)")
        for item in items:
            self._enqueue(item)
        try:
            return await asyncio.wait_for(asyncio.gather(*(item.future for item in items)), timeout)
        except (TimeoutError, asyncio.CancelledError):
            for item in items:
                item.future.cancel()
                if item.control is not None:
                    item.control.cancelled.set()  # stop generating for a client that is no longer waiting
            raise

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def enqueue_generation(
        self, prompt: list[int], params: GenerationParams, control: GenerationControl
    ) -> asyncio.Future[list[Completion]]:
        """Queue a generation now (raises Overloaded at once) and return its future, for streaming."""
        item = _Item(self._future(), prompt=prompt, params=params, control=control)
        self._enqueue(item)
        return item.future

    def _enqueue(self, item: _Item) -> None:
        if self._closing:
            raise Overloaded("the server is shutting down")
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Overloaded(f"the request queue is full ({self._queue.maxsize} waiting)") from None
        self._metrics.queue_depth.set(self.depth)

    async def _submit(self, item: _Item, timeout: float) -> Any:
        self._enqueue(item)
        # wait_for cancels the future on timeout; the worker skips cancelled items.
        return await asyncio.wait_for(item.future, timeout)

    async def _dispatch(self) -> None:
        """Gather a batch whenever a worker is idle, and give it to the lowest-numbered idle worker.

        Always preferring the same worker matters: an idle worker's OpenMP threads keep spinning for a
        while after its pass, so alternating lone requests between two workers made them contend with
        each other's spinning threads (+2 ms per one-sentence request).
        """
        loop = asyncio.get_running_loop()
        while True:
            while not self._idle:
                self._idle_changed.clear()
                await self._idle_changed.wait()
            batch = await self._gather()
            batch = [item for item in batch if not item.future.done()]
            self._metrics.queue_depth.set(self.depth)
            if not batch:
                continue
            worker = min(self._idle)
            self._idle.discard(worker)
            self._in_flight += sum(item.size for item in batch)
            heavy = any(self._heavy(item) for item in batch)
            self._heavy_running += heavy
            # A heavy pass takes its share of the threads even when alone: a light pass may start beside it.
            lone = not heavy and self._lone()
            threads = self._plan.choose() if lone else max(1, self._threads // len(self._executors))
            task = loop.create_task(self._run_pass(batch, worker, threads, heavy, lone))
            self._passes.add(task)
            task.add_done_callback(self._passes.discard)

    def _lone(self) -> bool:
        """Nothing else running, queued or arriving besides the pass being dispatched: it may take every
        thread (as the thread plan says). Under load every pass gets an even share, so that overlapping
        passes never ask for more threads than there are CPUs."""
        return self._busy == 1 and self.depth == 0 and self._arriving == 0

    def _fair_share(self, taken: int) -> int:
        """Most texts the next batch may take: an even share of all the work in the server (running,
        queued, arriving) per worker. Without it, clients answered by one pass come back together and
        form the next batch together, and two workers settled into uneven cohorts (23 and 9 requests at
        concurrency 32); with it they even out, +14% requests/s at concurrency 32 and a shorter p99."""
        total = taken + self._queue.qsize() + self._arriving + self._in_flight
        return max(1, min(self._max_batch, -(-total // len(self._executors))))

    async def _run_pass(
        self, batch: list[_Item], worker: int, threads: int, heavy: bool = False, lone: bool = False
    ) -> None:
        started = time.perf_counter()
        try:
            await self._process_isolated(batch, worker, threads)
            if lone:
                self._plan.observe(threads, time.perf_counter() - started, sum(item.cost for item in batch))
        finally:
            if heavy:
                self._heavy_running -= 1
                self._lane_freed.set()
            self._in_flight -= sum(item.size for item in batch)
            self._idle.add(worker)
            self._idle_changed.set()

    async def _process_isolated(self, batch: list[_Item], worker: int, threads: int) -> None:
        """Run a batch; if it fails, run its requests one by one so only the culprit gets the error."""
        try:
            await self._process(batch, worker, threads)
            return
        except Exception as err:  # a failure fails requests, never the worker
            if len(batch) == 1:
                logger.exception("forward pass failed")
                if not batch[0].future.done():
                    batch[0].future.set_exception(err)
                return
        logger.warning("a batch of %d requests failed; retrying them one by one", len(batch))
        for item in batch:
            if not item.future.done():
                await self._process_isolated([item], worker, threads)

    async def _first(self) -> _Item:
        """The request the next pass starts with: the oldest one, except that a heavy request waits
        (deferred, in order) while the heavy lane is full."""
        while True:
            if self._deferred and self._heavy_lane_free:
                return self._deferred.popleft()
            item, self._carry = self._carry, None
            if item is None:
                item = await self._next_or_lane_freed() if self._deferred else await self._queue.get()
            if item is None:
                continue
            if self._heavy(item) and not self._heavy_lane_free:
                self._deferred.append(item)
                continue
            return item

    async def _next_or_lane_freed(self) -> _Item | None:
        """The next queued request, or None as soon as a heavy pass ends."""
        self._lane_freed.clear()
        getter = asyncio.ensure_future(self._queue.get())
        freed = asyncio.ensure_future(self._lane_freed.wait())
        await asyncio.wait({getter, freed}, return_when=asyncio.FIRST_COMPLETED)
        freed.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()  # a cancelled Queue.get leaves its item in the queue
        return None

    async def _gather(self) -> list[_Item]:
        first = await self._first()
        batch, texts = [first], first.size
        if self._heavy(first) or (first.params is not None and first.params.batch_key() is None):
            return batch  # heavy or seeded: alone
        deadline = first.enqueued + self._max_wait
        if self._queue.empty():
            # Let requests already read by the server reach the queue first. With work already queued,
            # go on at once: the next pass then overlaps the answers of the last one being sent.
            await asyncio.sleep(0)
        limit = self._fair_share(texts)
        while texts < limit:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                # Waiting pays off only under concurrency: requests on their way in, or a last pass
                # that served several. A lone client never waits.
                if remaining <= 0 or (self._arriving == 0 and self._last_batch <= 1):
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if texts + item.size > limit or not item.joins(first, self._heavy_tokens):
                self._carry = item
                break
            batch.append(item)
            texts += item.size
        self._last_batch = len(batch)
        return batch

    async def _process(self, batch: list[_Item], worker: int, threads: int) -> None:
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_wait.observe(started - item.enqueued)
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        if batch[0].params is not None:
            requests = [GenerationRequest(i.prompt, i.params or GenerationParams(), i.control or GenerationControl())
                        for i in batch]
            results = await loop.run_in_executor(self._executors[worker], self._generate, requests, threads)
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
            return
        groups = [item.texts for item in batch]
        answers = await loop.run_in_executor(self._executors[worker], self._classify_groups, groups, threads)
        for item, answer in zip(batch, answers, strict=True):
            if item.future.done():
                continue
            if isinstance(answer, RequestTooLarge):
                item.future.set_exception(answer)
            else:
                item.future.set_result(answer)

    def _generate(self, requests: list[GenerationRequest], threads: int) -> list[list[Completion]]:
        self._runner.use_threads(threads)
        return self._runner.generate(requests)

    def _classify_groups(self, groups: list[list[str]], threads: int) -> list[list[Answer] | RequestTooLarge]:
        """Tokenize every text of the batch in one call, then classify in passes of at most max_batch_size."""
        self._runner.use_threads(threads)
        encoded = self._runner.encode([text for group in groups for text in group])
        per_group: list[list[Encoded]] = []
        offset = 0
        for texts in groups:
            per_group.append(encoded[offset : offset + len(texts)])
            offset += len(texts)
        # A request with a text over the limit is refused whole when the policy says reject, and one over
        # the token budget always (counted as the model would see it, after truncation).
        over = [sum(len(e.ids) for e in group) for group in per_group]
        refused = [(self._reject_long and any(e.truncated for e in group)) or tokens > self._max_request_tokens
                   for group, tokens in zip(per_group, over, strict=True)]
        todo = [e.ids for group, skip in zip(per_group, refused, strict=True) if not skip for e in group]
        results: list[Classification | None] = [None] * len(todo)
        for chunk in plan_passes([len(ids) for ids in todo], self._max_batch):
            for index, result in zip(chunk, self._runner.classify([todo[i] for i in chunk]), strict=True):
                results[index] = result
        answers: list[list[Answer] | RequestTooLarge] = []
        taken = iter(results)
        for group, skip, tokens in zip(per_group, refused, over, strict=True):
            if tokens > self._max_request_tokens:
                answers.append(RequestTooLarge(tokens, self._max_request_tokens))
            else:
                answers.append([(e, None if skip else next(taken)) for e in group])
        return answers

    async def drain(self, timeout: float) -> int:
        """Refuse new work, finish what is queued or running (bounded by `timeout`), then stop."""
        self._closing = True
        left = self.depth
        deadline = time.monotonic() + timeout
        while (self.depth or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in [self._dispatcher, *self._passes]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=False)
        return left
