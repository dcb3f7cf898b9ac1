"""The peer server for benchmarks/server_throughput.py: Infinity (`infinity-emb` on PyPI), in its own virtualenv.

Infinity pins its own transformers (< 5) and FastAPI stack, so it cannot share the project's .venv. The
benchmark creates the virtualenv on first use (about two minutes; later runs reuse it) at
`$XDG_CACHE_HOME/finetune-bench/infinity-venv` (`~/.cache/...` by default), or wherever `--peer-venv` says.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

INFINITY_VERSION = "0.0.78"  # the newest release when written; resolves with torch 2.13 without conflicts
# The CPU build of torch first: installed on its own it is found locally or as the CPU wheel, whereas
# resolving it as infinity-emb's dependency pulls the multi-GB CUDA wheels.
TORCH_PIN = "torch==2.13.0"
PINS = (f"infinity-emb[torch,server]=={INFINITY_VERSION}", "transformers==4.57.6")  # what 0.0.78 resolved to
# Infinity's torch engine with its defaults (torch.compile on; BetterTransformer is a no-op without
# optimum), except: fp32 like ours and the raw limit; no result cache (the load repeats the 872 dev
# sentences, so a cache would measure lookups, not the model); warning-level logs like ours (an access
# log line per request costs CPU the servers share).
FLAGS = ("--engine", "torch", "--device", "cpu", "--dtype", "float32", "--no-vector-disk-cache",
         "--log-level", "warning")


def default_venv() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return cache / "finetune-bench" / "infinity-venv"


def installed_version(venv: pathlib.Path) -> str | None:
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "bin" / "infinity_emb").exists()):
        return None
    # -I and a cwd outside the repo: on sys.path, the repo's operator/ package would shadow the stdlib's
    probe = subprocess.run(
        [str(python), "-I", "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"],
        capture_output=True, text=True, check=False, cwd=venv.parent,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venv(venv: pathlib.Path) -> pathlib.Path:
    """The virtualenv with exactly INFINITY_VERSION, created (or re-created for another version) if needed."""
    if installed_version(venv) == INFINITY_VERSION:
        return venv
    print(f"installing infinity-emb {INFINITY_VERSION} into {venv} (once; about two minutes)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, cwd=venv.parent)
    pip = [str(venv / "bin" / "python"), "-I", "-m", "pip", "install", "--quiet"]
    for step in ([TORCH_PIN], [TORCH_PIN, *PINS]):  # torch again with the rest, so pip keeps that build
        done = subprocess.run([*pip, *step], capture_output=True, text=True, check=False, cwd=venv.parent)
        if done.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(step)} in {venv} failed:\n{done.stderr[-3000:]}")
    found = installed_version(venv)
    if found != INFINITY_VERSION:
        raise RuntimeError(f"{venv} has infinity-emb {found}, not {INFINITY_VERSION}")
    return venv


def command(venv: pathlib.Path, model_dir: pathlib.Path, name: str, port: int, batch_size: int = 32) -> list[str]:
    """`infinity_emb v2` serving the exported classifier directory on 127.0.0.1:port, under `name`."""
    return [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--batch-size", str(batch_size), *FLAGS]


def environment() -> dict[str, str]:
    """Offline (the model is a local directory) and no usage statistics."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                "INFINITY_ANONYMOUS_USAGE_STATS": "0"})
    return env


ROUTE = "/classify"
READY = "/health"


def request_body(name: str, text: str) -> bytes:
    """One sentence per request, like ours: Infinity's classify body."""
    return json.dumps({"model": name, "input": [text]}).encode()


def check_answer(body: bytes) -> None:
    """An Infinity classify answer has one list of {label, score} per input."""
    data = json.loads(body)["data"]
    if not (len(data) == 1 and {"label", "score"} <= set(data[0][0])):
        raise RuntimeError(f"unexpected Infinity answer: {body[:300]!r}")
