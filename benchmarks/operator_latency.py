"""Operator benchmark against kmock's Kubernetes emulator: creation-to-trainer-Job latency, reconciles
per second and the operator's peak RSS, with N FineTuneJobs created at once.

    .venv/bin/python benchmarks/operator_latency.py            # 500 FineTuneJobs
    .venv/bin/python benchmarks/operator_latency.py --jobs 100

The operator runs as a real `finetune operator` process (so its RSS is its own) and finds the
emulator through a KUBECONFIG; this script plays the user, the JobSet controller, the kubelet and the
Deployment controller. Latency is measured at the emulator: from the FineTuneJob's POST arriving to
the trainer JobSet's POST arriving. The emulator (`finetune.operator.testing.FastEmulator`) shares this
process's single CPU-bound event loop, so the figures bound the operator from below on a real API
server only loosely: they are for comparing operator versions on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kmock import Server

from finetune.contracts import TerminationMessage, TrainerResult
from finetune.operator import k8s, naming
from finetune.operator.testing import FastEmulator, declare, server_url

NS = "bench"
FTJS = f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs"
def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "task": "text-classification",
            "model": {"name": "distilbert-base-uncased"},
            "dataset": {"train": {"path": "/workspace/data/train.tsv"}},
            "storage": {"claimName": "data"},
            "promotion": {"minValue": 0.5},
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def scrape(port: int) -> float:
    """Total reconciles the operator has timed."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("finetune_operator_reconcile_duration_seconds_count")
    )


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    shown = time.monotonic()
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
        if time.monotonic() - shown > 10:
            print(f"... still waiting for {what}", file=sys.stderr, flush=True)
            shown = time.monotonic()
    raise SystemExit(f"timed out waiting for {what}")


def phases(emulator: FastEmulator) -> list[str]:
    return [
        (obj.get("status") or {}).get("phase", "")
        for (res, _, _), obj in emulator.objects.items()
        if res.plural == "finetunejobs" and not obj.deleted
    ]


async def main(jobs: int, operator_log: str) -> None:
    emulator = FastEmulator()
    async with emulator, Server(emulator):
        declare(emulator, namespaces=(NS,))
        emulator.objects["v1/persistentvolumeclaims", NS, "data"] = {"metadata": {"name": "data"}}
        server = server_url(emulator)
        workdir = Path(tempfile.mkdtemp())
        config = workdir / "kubeconfig"
        config.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "e",
            "clusters": [{"name": "e", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "e", "context": {"cluster": "e", "user": "u"}}],
        }))  # fmt: skip
        metrics, health = free_port(), free_port()
        finetune = Path(sys.executable).parent / "finetune"
        proc = await asyncio.create_subprocess_exec(
            str(finetune), "--log-level", "WARNING", "operator", "--standalone",
            "--metrics-port", str(metrics), "--health-port", str(health),
            env={**os.environ, "KUBECONFIG": str(config)}, stderr=open(operator_log, "wb"),  # noqa: SIM115
        )  # fmt: skip
        try:
            async with k8s.Api(k8s.Cluster(server=server), connections=32) as api:

                async def healthy() -> bool:
                    try:
                        return await scrape(metrics) >= 0
                    except aiohttp.ClientError:
                        return False

                await wait_for(healthy, 60, "the operator to start")
                await asyncio.sleep(1.0)  # let its watches settle
                names = [f"bench-{i:04d}" for i in range(jobs)]
                before = await scrape(metrics)
                cpu_before, emulator_before = cpu_of(proc.pid), time.process_time()
                started = time.perf_counter()
                await asyncio.gather(*(api.create(ftj(n)) for n in names))

                async def all_jobs() -> bool:
                    return all(("jobsets", naming.trainer_name(n, 1)) in emulator.arrivals for n in names)

                await wait_for(all_jobs, 600, "every trainer JobSet")
                stages = {"all trainer JobSets created": time.perf_counter() - started}
                latencies = [
                    emulator.arrivals[("jobsets", naming.trainer_name(n, 1))] - emulator.arrivals[("finetunejobs", n)]
                    for n in names
                ]
                # Play the kubelet and the controllers: every run succeeds, every rollout completes.
                await bounded(finish(api, n) for n in names)

                async def all_phase(phase: str) -> bool:
                    return phases(emulator).count(phase) == jobs

                await wait_for(lambda: all_phase("Deploying"), 600, "every Deploying")
                stages["all Deploying (after the runs finished)"] = time.perf_counter() - started
                await bounded(roll_out(api, n) for n in names)
                await wait_for(lambda: all_phase("Serving"), 600, "every Serving")
                elapsed = time.perf_counter() - started
                await asyncio.sleep(0.5)
                reconciles = await scrape(metrics) - before
            cpu_seconds = cpu_of(proc.pid) - cpu_before
            emulator_cpu = time.process_time() - emulator_before
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
    print(f"FineTuneJobs created at once:         {jobs}")
    print(f"creation -> trainer JobSet created:      p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms, "
          f"mean {statistics.mean(latencies) * 1000:.0f} ms")
    for stage, seconds in stages.items():
        print(f"  {stage}: {seconds:.1f} s after the first creation")
    print(f"creation -> all {jobs} Serving:        {elapsed:.1f} s")
    print(f"reconciles:                           {reconciles:.0f} in {elapsed:.1f} s = "
          f"{reconciles / elapsed:.1f} reconciles/s")
    print(f"operator CPU during the run:          {cpu_seconds:.1f} s = "
          f"{cpu_seconds / max(reconciles, 1) * 1000:.1f} ms per reconcile "
          f"(emulator and this driver: {emulator_cpu:.1f} s)")
    print(f"operator peak RSS (VmHWM):            {peak_kib / 1024:.0f} MiB")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


async def bounded(calls: Any, limit: int = 32) -> None:
    """Run the controller-side calls at most `limit` at a time, as real controllers' rate limits do."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Any) -> None:
        async with gate:
            await call

    await asyncio.gather(*(one(c) for c in calls))


async def finish(api: k8s.Api, name: str) -> None:
    job = naming.trainer_name(name, 1)
    result = TrainerResult(model_path=f"/workspace/{name}/run-1", metrics={"f1": 0.9}, headline_metric="f1")
    message = TerminationMessage(exit_code=0, result=result).encode()
    await api.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job}-node-0-0", "namespace": NS,
                     "labels": {**naming.run_labels(name, 1), naming.COMPLETION_INDEX: "0"},
                     "annotations": {naming.COMPLETION_INDEX: "0"}},
        "status": {"phase": "Succeeded", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": message}}}]},
    })  # fmt: skip
    await api.merge_patch(
        f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets/{job}/status",
        {"status": {"conditions": [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}]}},
    )


async def roll_out(api: k8s.Api, name: str) -> None:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{naming.server_name(name)}"
    ready = {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "readyReplicas": 1}
    await api.merge_patch(f"{path}/status", {"status": ready})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="FineTuneJobs created at once")
    parser.add_argument("--operator-log", default=os.devnull, help="file for the operator's stderr")
    options = parser.parse_args()
    asyncio.run(main(options.jobs, options.operator_log))
