"""The FineTuneJob status, typed once: the operator writes it, the CRD schema is generated from it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.contracts import Progress
from finetune.spec import Model

Phase = Literal[
    "Pending", "Queued", "Training", "Evaluating", "Rejected", "Deploying", "Serving", "Succeeded", "Failed"
]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class Condition(Model):
    """A Kubernetes-style condition."""

    type: str = Field(..., description="SpecValid, VolumeFound, Admitted, Trained, Promoted, Serving or Ready.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="What happened and, on failure, what to change.")
    last_transition_time: str | None = Field(None, description="RFC 3339 time of the last change.")
    observed_generation: int | None = Field(None, description="Spec generation this condition is about.")


class PodFailure(Model):
    """The first trainer pod that failed in one attempt of the gang, kept after the pod is gone."""

    pod: str = Field(..., description="Pod name.")
    node_rank: int | None = Field(None, description="The pod's node rank (completion index).")
    attempt: int = Field(0, description="Gang attempt (JobSet restart attempt) the pod belonged to.")
    exit_code: int | None = Field(None, description="The trainer container's exit code.")
    reason: str = Field("", description="Why it ended: PermanentError, Disruption, OOMKilled, Error, ...")
    message: str = Field("", description="The trainer's own one-line error, or the kubelet's reason.")
    log_tail: list[str] = Field(default_factory=list, description="Last log lines of the pod.")
    finished_at: str | None = Field(None, description="When it ended (RFC 3339).")
    counts_against_budget: bool = Field(True, description="False for a disruption (preemption, drain, eviction).")


class Trainer(Model):
    """The trainer JobSet of the current run: one pod per node, restarted as a gang."""

    job_set_name: str | None = Field(None, description="JobSet (jobset.x-k8s.io/v1alpha2) running the training.")
    run: int = Field(0, description="Training run number; a training-field edit starts a new run.")
    active: int = Field(0, description="Trainer pods running.")
    succeeded: int = Field(0, description="Trainer pods finished.")
    failed: int = Field(0, description="Trainer pods failed.")
    restarts: int = Field(0, description="Gang restarts so far, for any cause.")
    restarts_counted: int = Field(0, description="Restarts that used the budget (disruptions do not).")
    restart_budget: int = Field(0, description="scheduling.backoffLimit: counted restarts allowed.")
    failures: list[PodFailure] = Field(
        default_factory=list, description="The first failed pod of each failed attempt, oldest first (last 10)."
    )


class FineTuneJobStatus(Model):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = Field(None, description="Where the job is in its life cycle.")
    reason: str | None = Field(None, description="CamelCase reason of the phase, e.g. Unschedulable, Restarted.")
    message: str | None = Field(None, description="Human-readable summary of the phase.")
    observed_generation: int | None = Field(None, description="Last spec generation acted on.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    start_time: str | None = Field(None, description="When training started.")
    completion_time: str | None = Field(None, description="When the job reached Serving, Succeeded or Failed.")
    progress: str | None = Field(None, description="step/total steps, for kubectl get.")
    training: Progress | None = Field(None, description="Detailed training progress.")
    trainer: Trainer | None = Field(None, description="The trainer Job.")
    model_path: str | None = Field(None, description="Exported model directory in the artifact volume.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Test metrics of the latest run.")
    headline_metric: str | None = Field(None, description="The gated metric and its value, e.g. f1=0.912.")
    serving_model_path: str | None = Field(None, description="Model directory the server runs now.")
    serving_metrics: dict[str, float] = Field(default_factory=dict, description="Test metrics of the served model.")
    endpoint: str | None = Field(None, description="In-cluster URL of the inference Service.")
