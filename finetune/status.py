"""The FineTuneJob status, typed once: the operator writes it, the CRD schema is generated from it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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


class Progress(Model):
    """Training progress reported by the trainer's main process."""

    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps planned.")
    epoch: float = Field(0.0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    validation_metric: float | None = Field(None, description="Latest validation value of the headline metric.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to the end of training.")


class Trainer(Model):
    """The trainer Job of the current run."""

    job_name: str | None = Field(None, description="batch/v1 Job running the training.")
    run: int = Field(0, description="Training run number; a training-field edit starts a new run.")
    active: int = Field(0, description="Trainer pods running.")
    succeeded: int = Field(0, description="Trainer pods finished.")
    failed: int = Field(0, description="Trainer pods failed.")


class FineTuneJobStatus(Model):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = Field(None, description="Where the job is in its life cycle.")
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
