"""`make demo`: fine-tune the bundled MiniLM on SST-2 sentiment, evaluate, serve, ask it a few questions.

    python -m finetune.demo [--output runs/sst2-sentiment] [--processes 1]

Trains with `data/demo-job.yaml` (13,500 training sentences, one epoch; the 872 SST-2 dev sentences are the
held-out test set), applies the job's quality gate, starts the real inference server on a free
loopback port and sends it sentences the model has never seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from finetune.run import server_settings, train_and_gate

JOB = Path(__file__).resolve().parents[1] / "data" / "demo-job.yaml"
SENTENCES = [
    "a gorgeous , witty and heartfelt film that i would happily watch again",
    "the plot is a mess and the jokes fall flat for two long hours",
    "an uneven but often moving portrait of a family in crisis",
    "i kept checking my watch ; tedious , predictable and far too long",
    "the performances are terrific and the score is unforgettable",
]


def show(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ask(url: str, name: str) -> None:
    import httpx

    response = httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": SENTENCES}, timeout=60)
    response.raise_for_status()
    show(f"POST {url}/v1/models/{name}:predict")
    for text, pred in zip(SENTENCES, response.json()["predictions"], strict=True):
        show(f"  {pred['label']:>8}  {pred['score']:.3f}  {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/sst2-sentiment", help="where the model is exported")
    parser.add_argument("--processes", type=int, default=1, help="local training processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    show(f"== training {JOB.name} -> {output}")
    job, code, metrics, output = train_and_gate(str(JOB), output, args.processes)
    if metrics is None:
        return code
    show("== test metrics on the SST-2 dev set (held out):")
    show("  " + json.dumps({k: round(v, 4) for k, v in metrics.test_numbers().items()}))
    t = metrics.training
    show(f"  {t.steps} steps, {t.samples_per_second} samples/s, wall time {t.wall_time_seconds} s")
    if code != 0:
        return code
    from finetune.server.serving import start_in_thread

    show("== serving the exported model")
    with start_in_thread(server_settings(job, output, "127.0.0.1", 0)) as server:
        show(f"  ready at {server.url}")
        ask(server.url, server.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
