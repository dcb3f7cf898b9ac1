"""Real Prometheus scraping a real `finetune serve` and a real `finetune train`, all on 127.0.0.1.

Prometheus is Debian's package (put in .tools/bin by scripts/install-tools.sh) and loads the chart's
PrometheusRule, rendered by the real `helm`. Without those tools the tests skip with the reason;
under CI (env CI set) they fail instead.

    bash scripts/install-tools.sh && .venv/bin/pytest tests/integration/monitoring -q
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.tools import find_tool

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "finetune-operator"
FINETUNE = str(Path(sys.executable).parent / "finetune")
SCRAPE_INTERVAL = "500ms"
# Labels a ServiceMonitor / PodMonitor would add in a cluster; the dashboards filter on them.
SERVER_TARGET = {"namespace": "ml", "service": "sst2-server", "pod": "sst2-server-7d9f-abcde"}
TRAINER_TARGET = {"namespace": "ml", "pod": "sst2-train-1-0-xyz12"}
TRAINER_JOB = "sst2"
# Thresholds low enough that the latency and drift alerts fire on the test's traffic.
TRIGGER = ["prometheusRule.latencyP99Seconds=0.000001", "prometheusRule.driftThreshold=0.000001"]




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def server_fixtures() -> ModuleType:
    """The server tests' model builders (tiny exported classifier), loaded by path: tests are no package."""
    path = ROOT / "tests" / "integration" / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("monitoring_server_fixtures", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(**extra: str) -> dict[str, str]:
    # One torch thread per process: other suites run beside this one on two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    return {name: find_tool(name) for name in ("helm", "prometheus", "promtool")}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monitoring")


@pytest.fixture(scope="session")
def model_dir(workdir: Path) -> Path:
    return Path(server_fixtures().build_classifier(workdir / "model", name="sst2"))


@dataclass
class Trainer:
    """A `finetune train` run whose main process serves finetune_trainer_* gauges on `port`."""

    port: int
    proc: subprocess.Popen[bytes] | None
    log: Path
    missing: str | None = None  # why the trainer's metrics cannot be tested, when they cannot


@pytest.fixture(scope="session")
def trainer(tools: dict[str, str], workdir: Path, model_dir: Path) -> Iterator[Trainer]:
    """Start a short real training run early; Prometheus scrapes it while it trains."""
    port, log = free_port(), workdir / "trainer.log"
    try:
        from finetune.trainer.report import TrainerGauges  # noqa: F401  (the metrics endpoint)
    except ImportError as err:
        yield Trainer(port, None, log, missing=f"finetune.trainer.report.TrainerGauges ({err})")
        return
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": TRAINER_JOB},
        "spec": {
            "task": "text-classification",
            "model": {"path": str(model_dir)},
            "dataset": {"train": {"path": str(ROOT / "data" / "sst2" / "train.tsv")},
                        "textColumn": "sentence", "labelColumn": "label", "maxSamples": 600},
            # Small steps and an early validation: the gauges change within seconds of the start. Enough
            # epochs that a fast machine is still training when Prometheus scrapes; stopped at teardown.
            "training": {"epochs": 50, "batchSize": 8, "maxLength": 32, "logSteps": 1, "evalSteps": 6,
                         "checkpointSteps": 100000},
        },
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [FINETUNE, "train", "-f", str(workdir / "job.yaml"), "--output", str(workdir / "trained")],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(FINETUNE_METRICS_PORT=str(port)), cwd=workdir,
        )
    yield Trainer(port, proc, log)
    stop(proc)


@pytest.fixture(scope="session")
def server(tools: dict[str, str], workdir: Path, model_dir: Path) -> Iterator[str]:
    """`finetune serve` as a user runs it, on a free loopback port."""
    port, log = free_port(), workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [FINETUNE, "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
             "--feedback-path", str(workdir / "feedback.jsonl"), "--torch-threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", proc, 120, log)
        yield url
    finally:
        stop(proc)


def render_rules(helm: str, *values: str) -> dict[str, Any]:
    """The chart's PrometheusRule spec (groups), as `helm template` renders it."""
    cmd = [helm, "template", "finetune", str(CHART), "-s", "templates/prometheusrule.yaml",
           "--set", "prometheusRule.enabled=true"]
    for v in values:
        cmd += ["--set-json", v]  # --set would read 0.000001 as a string
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    (rule,) = [d for d in yaml.safe_load_all(out) if d]
    return rule["spec"]  # type: ignore[no-any-return]


@dataclass
class Prometheus:
    url: str
    rules: dict[str, Any]
    started: float = field(default_factory=time.time)

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr, **({"time": str(at)} if at else {})}
        return httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30).json()  # type: ignore[no-any-return]

    def query_range(self, expr: str) -> dict[str, Any]:
        """The expression over everything scraped so far, at 1 s steps."""
        params = {"query": expr, "start": str(self.started), "end": str(time.time()), "step": "1"}
        return httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=30).json()  # type: ignore[no-any-return]

    def get(self, path: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}{path}", timeout=30).json()  # type: ignore[no-any-return]

    def wait_for(self, expr: str, timeout: float, why: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr).get("data", {}).get("result", [])
            if result:
                return result  # type: ignore[no-any-return]
            time.sleep(0.25)
        raise AssertionError(f"Prometheus has no {expr} after {timeout}s: {why}")


@pytest.fixture(scope="session")
def prometheus(
    tools: dict[str, str], workdir: Path, server: str, trainer: Trainer
) -> Iterator[Prometheus]:
    rules = render_rules(tools["helm"], *TRIGGER)
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
    check = subprocess.run([tools["promtool"], "check", "rules", str(workdir / "rules.yaml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    scrape: list[dict[str, Any]] = [{
        "job_name": "sst2-server",
        "static_configs": [{"targets": [server.removeprefix("http://")], "labels": SERVER_TARGET}],
    }]
    if trainer.proc is not None:
        # honor_labels: the trainer's own `job` label (the FineTuneJob) wins, as with the chart's PodMonitor.
        scrape.append({"job_name": "trainers", "honor_labels": True,
                       "static_configs": [{"targets": [f"127.0.0.1:{trainer.port}"], "labels": TRAINER_TARGET}]})
    config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s",
                         "scrape_timeout": SCRAPE_INTERVAL},
              "rule_files": [str(workdir / "rules.yaml")], "scrape_configs": scrape}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [tools["prometheus"], f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", proc, 60, log)
        yield Prometheus(url, rules, started=time.time() - 1)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def trained(prometheus: Prometheus, trainer: Trainer) -> Trainer:
    """Wait until Prometheus has scraped the trainer at two or more steps and after a validation."""
    if trainer.missing or trainer.proc is None:
        pytest.skip(f"trainer metrics endpoint missing: {trainer.missing}")
    query = f'finetune_trainer_step{{job="{TRAINER_JOB}"}}'
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        result = prometheus.query_range(query)["data"]["result"]
        validated = prometheus.query_range(f'finetune_trainer_validation_metric{{job="{TRAINER_JOB}"}}')
        if result and len({v for _, v in result[0]["values"]}) >= 2 and validated["data"]["result"]:
            return trainer
        if trainer.proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(
        f"Prometheus did not scrape two trainer steps and a validation (trainer exit code {trainer.proc.poll()}); "
        f"log:\n{trainer.log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="session")
def traffic(server: str, prometheus: Prometheus) -> dict[str, float]:
    """Real inference traffic: SST-2 sentences in small concurrent batches, feedback, a few bad calls.

    Spread over a few seconds so rate() sees several scrapes; enough inputs (> drift_min_samples) for
    the drift gauges to get a value.
    """
    from concurrent.futures import ThreadPoolExecutor

    # Prometheus hands new targets to its scrapers only every 5 s: traffic sent before the first scrape
    # would all land in one sample and every rate() over it would read 0.
    prometheus.wait_for('up{job="sst2-server"} == 1', 30, "the first scrape of the server")
    sentences = server_fixtures().sst2_sentences("dev", limit=160)
    predict = f"{server}/v1/models/sst2:predict"
    counts: dict[str, float] = {"predict": 0, "feedback": 0, "errors": 0}

    def call(chunk: list[str]) -> httpx.Response:
        return httpx.post(predict, json={"instances": chunk}, timeout=30)

    with ThreadPoolExecutor(4) as pool:
        for round_ in range(8):  # ~4 s of traffic
            chunks = [sentences[i:i + 5] for i in range(round_ * 20, round_ * 20 + 20, 5)]
            for resp in pool.map(call, chunks):
                assert resp.status_code == 200, resp.text
                counts["predict"] += 1
                prediction = resp.json()["predictions"][0]
            label = prediction.get("label", "positive") if isinstance(prediction, dict) else "positive"
            fb = httpx.post(f"{server}/v1/feedback", json={"input": sentences[round_], "label": label}, timeout=10)
            assert fb.status_code in (200, 201, 202), fb.text
            counts["feedback"] += 1
            bad = httpx.post(predict, json={"instances": []}, timeout=10)
            counts["errors"] += int(bad.status_code >= 400)
            time.sleep(0.5)
    prometheus.wait_for('finetune_server_drift_psi{feature="input_length"}', 20, "the drift gauge")
    prometheus.wait_for("finetune_server_feedback_total", 20, "feedback counter")
    counts["ended"] = time.time()
    time.sleep(2)  # a few more scrapes after the last request, so every rate() window has two samples
    return counts
