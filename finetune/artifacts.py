"""The export contract, typed once: what `finetune train` leaves beside the model, and who reads it.

- `metrics.json` (`ExportMetrics`): the test and validation metrics, what happened to the data and how
  training went. Written last, so a folder holding it holds a complete export. Read by `finetune run`
  (the gate), the launcher (a finished run's result, the run identity), the server (task, name,
  version, the precision it was tested in) and the operator (through the termination message).
- `baseline.json` (`Baseline`): the training data's label and input-length distributions, which the
  server's drift gauges compare live traffic with.

Keys are snake_case as written since the first version. Unknown keys are kept (a newer trainer may add
some); known keys must have their type, so a reader never meets a string where it expects a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.spec import Task

METRICS_FILE = "metrics.json"
BASELINE_FILE = "baseline.json"


class ArtifactError(ValueError):
    """An export file that is missing, not JSON, or not of the contract's shape."""


class Artifact(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @classmethod
    def read(cls, path: Path) -> Any:
        try:
            return cls.model_validate_json(path.read_text())
        except OSError as err:
            raise ArtifactError(f"cannot read {path}: {err.strerror}") from None
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:3])
            raise ArtifactError(f"{path} is not a valid {path.name}: {problems}") from None

    @classmethod
    def read_if_valid(cls, path: Path) -> Any:
        """The file's model, or None when it is missing or does not fit the contract."""
        try:
            return cls.read(path)
        except ArtifactError:
            return None

    def document(self) -> dict[str, Any]:
        """The JSON document (strict JSON: no NaN or infinity)."""
        document: dict[str, Any] = json.loads(self.model_dump_json())
        return document


class TrainingSummary(Artifact):
    """How the run went (metrics.json `training`)."""

    method: str = "full"
    world_size: int = Field(1, ge=1)
    samples_per_second: float = 0.0
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    wall_time_seconds: float | None = None
    steps: int = Field(0, ge=0)
    best_step: int | None = None
    resumed_from_step: int = Field(0, ge=0)
    training_hash: str | None = Field(None, description="Run identity (finetune.trainer.identity).")
    epochs: float = 0
    stopped_early: bool = False
    mixed_precision: str = "no"
    history: list[dict[str, float | None]] = Field(default_factory=list)


class ExportMetrics(Artifact):
    """metrics.json."""

    task: Task
    name: str
    model_version: str = ""
    headline_metric: str
    validation: dict[str, float | None] = Field(default_factory=dict, description="None: not finite (NaN).")
    test: dict[str, Any] = Field(default_factory=dict, description="Numbers, per_class, confusion_matrix, groups.")
    data: dict[str, Any] = Field(default_factory=dict, description="What the data layer did (rows, cleaning).")
    training: TrainingSummary = Field(default_factory=TrainingSummary)

    @classmethod
    def in_folder(cls, folder: Path) -> ExportMetrics:
        return cls.read(folder / METRICS_FILE)  # type: ignore[no-any-return]

    def test_numbers(self) -> dict[str, float]:
        """The test metrics that are finite numbers: what the gate and the status can show."""
        return {k: float(v) for k, v in self.test.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class LengthHistogram(Artifact):
    edges: list[float] = Field(default_factory=list, description="Bin edges; the last one a large sentinel.")
    fractions: list[float] = Field(default_factory=list, description="Share of inputs per bin.")


class Baseline(Artifact):
    """baseline.json."""

    task: Task
    label_distribution: dict[str, float] = Field(default_factory=dict)
    input_length: LengthHistogram = Field(default_factory=LengthHistogram)

    @classmethod
    def in_folder(cls, folder: Path) -> Baseline | None:
        return cls.read_if_valid(folder / BASELINE_FILE)  # type: ignore[no-any-return]
