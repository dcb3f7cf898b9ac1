"""Progress a person (and the operator) can follow; only the main process reports.

- On a terminal: a progress bar with loss and ETA. Otherwise: one JSON line per logging step on stderr.
- With FINETUNE_METRICS_PORT set: Prometheus gauges `finetune_trainer_*` on that port.
- With FINETUNE_JOB_NAME and FINETUNE_JOB_NAMESPACE set (in a trainer pod): a merge patch of this
  job's own `status` subresource with step, loss and ETA, using the pod's ServiceAccount, which the
  operator's per-job Role allows for this one FineTuneJob only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from finetune.contracts import Progress
from finetune.trainer.checkpoint import TrainState

log = logging.getLogger(__name__)
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def service_account_dir() -> Path:
    """Where the pod's ServiceAccount token and CA are mounted; FINETUNE_SERVICE_ACCOUNT_DIR moves it
    (tests point it at a stand-in API server's files)."""
    return Path(os.environ.get("FINETUNE_SERVICE_ACCOUNT_DIR") or SA_DIR)
STATUS_EVERY_S = 15.0


class TrainerGauges:
    """The trainer's Prometheus gauges, in a registry of their own."""

    NAMES = ("step", "total_steps", "epoch", "loss", "learning_rate", "samples_per_second",
             "tokens_per_second", "validation_metric")

    def __init__(self, job: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.gauges = {
            n: Gauge(f"finetune_trainer_{n}", f"Trainer {n.replace('_', ' ')}", ["job"], registry=self.registry)
            for n in self.NAMES
        }
        self.job = job
        start_http_server(port, registry=self.registry)

    def set(self, **values: float | None) -> None:
        for name, value in values.items():
            if value is not None:
                self.gauges[name].labels(job=self.job).set(value)


class StatusPatcher:
    """Merge-patches the job's status subresource through the in-cluster API; failures only log."""

    def __init__(self, name: str, namespace: str) -> None:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.url = (f"https://{host}:{port}/apis/finetune.dev/v1alpha1/namespaces/{namespace}"
                    f"/finetunejobs/{name}/status")
        self.last = 0.0

    def patch(self, status: dict[str, Any], force: bool = False) -> None:
        import ssl
        import urllib.request

        if not force and time.monotonic() - self.last < STATUS_EVERY_S:
            return
        self.last = time.monotonic()
        token = (service_account_dir() / "token").read_text().strip()
        req = urllib.request.Request(
            self.url, data=json.dumps({"status": status}).encode(), method="PATCH",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
        )
        ctx = ssl.create_default_context(cafile=str(service_account_dir() / "ca.crt"))
        try:
            urllib.request.urlopen(req, context=ctx, timeout=5).close()
        except OSError as err:
            log.warning("could not report progress to the FineTuneJob status: %s", err)


def write_trial_progress(path: Path, metric: str, state: TrainState, total: int, finished: bool) -> None:
    """trial.json, atomically: what the search driver (and the sibling trials' pruners) read."""
    from finetune.contracts import TrialProgress
    from finetune.trainer.atomic import write_json

    outcome = ("pruned" if state.pruned_at else "complete") if finished else "running"
    progress = TrialProgress(metric=metric, history=state.history, best_step=state.best_step,
                             steps=state.global_step, total_steps=total, finished=finished, state=outcome,
                             pruned_at=state.pruned_at)
    write_json(path, progress.document())


class Reporter:
    def __init__(self, job_name: str, is_main: bool, log_steps: int, trial_file: Path | None = None) -> None:
        self.is_main, self.log_steps, self.trial_file = is_main, log_steps, trial_file
        self.total = 0
        self.started = time.monotonic()
        self.bar: Any = None
        self.tty = sys.stderr.isatty()
        self.window: list[float] = []
        self.last_val: float | None = None
        self.gauges: TrainerGauges | None = None
        self.patcher: StatusPatcher | None = None
        if not is_main:
            return
        if port := os.environ.get("FINETUNE_METRICS_PORT"):
            self.gauges = TrainerGauges(job_name, int(port))
        name, ns = os.environ.get("FINETUNE_JOB_NAME"), os.environ.get("FINETUNE_JOB_NAMESPACE")
        if name and ns and "KUBERNETES_SERVICE_HOST" in os.environ and (service_account_dir() / "token").exists():
            self.patcher = StatusPatcher(name, ns)

    def on_step(self, state: TrainState, total: int, loss: float, lr: float, per_epoch: int) -> None:
        if not self.is_main:
            return
        self.total = total
        self.window.append(loss)
        rate = state.samples_seen / state.train_seconds if state.train_seconds else 0.0
        tok_rate = state.tokens_seen / state.train_seconds if state.train_seconds else 0.0
        eta = state.train_seconds / max(state.global_step, 1) * (total - state.global_step)
        epoch = state.global_step / per_epoch
        if self.tty:
            self._bar(total).update(state.global_step - self._bar(total).n)
            self._bar(total).set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if state.global_step % self.log_steps and state.global_step != total:
            return
        mean_loss = sum(self.window) / len(self.window)
        self.window.clear()
        record = {"step": state.global_step, "total_steps": total, "epoch": round(epoch, 3),
                  "loss": round(mean_loss, 5), "learning_rate": lr, "samples_per_second": round(rate, 2),
                  "tokens_per_second": round(tok_rate, 1), "eta_seconds": round(eta, 1)}
        if not self.tty:
            sys.stderr.write(json.dumps(record) + "\n")
        if self.gauges:
            self.gauges.set(step=state.global_step, total_steps=total, epoch=epoch, loss=mean_loss,
                            learning_rate=lr, samples_per_second=rate, tokens_per_second=tok_rate)
        if self.patcher:
            progress = Progress(step=state.global_step, total_steps=total, epoch=round(epoch, 3), loss=mean_loss,
                                validation_metric=self.last_val, eta_seconds=eta)
            self.patcher.patch({"progress": f"{state.global_step}/{total}",
                                "training": progress.model_dump(mode="json", by_alias=True)})

    def on_eval(self, state: TrainState, metrics: dict[str, float], metric: str) -> None:
        if not self.is_main:
            return
        self.last_val = metrics.get(metric)
        if self.trial_file is not None:
            write_trial_progress(self.trial_file, metric, state, self.total, finished=False)
        record = {"step": state.global_step, "validation": metrics}
        if self.tty:
            self._bar(0).write(f"step {state.global_step}: validation {json.dumps(metrics)}")
        else:
            sys.stderr.write(json.dumps(record) + "\n")
        if self.gauges:
            self.gauges.set(validation_metric=self.last_val)

    def _bar(self, total: int) -> Any:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finished(self) -> None:
        """A last status patch; the result itself reaches the operator through the launcher's
        termination message (`finetune train --termination-log`)."""
        if self.is_main and self.patcher:
            self.patcher.patch({"progress": "done"}, force=True)
