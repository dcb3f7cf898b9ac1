"""What crosses a process boundary between the trainer, its launcher and the operator, typed once.

- Every training process (rank) leaves a `RankOutcome` file for the launcher of its pod
  (`finetune train`), which reads them all once torch's launcher returns.
- The launcher condenses them into one `TerminationMessage`, the pod's `/dev/termination-log`, which
  the kubelet copies into the pod status and the operator reads with this same model.

- The export beside the model: `metrics.json` (`ExportMetrics`: the test and validation metrics, what
  happened to the data and how training went; written last, so a folder holding it holds a complete
  export) and `baseline.json` (`Baseline`: the training data's label and input-length distributions, the
  server's drift baseline). Written by the trainer; read by `finetune run` (the gate), the launcher (a
  finished run's result and identity) and the server (task, name, version, tested precision). Keys are
  snake_case; unknown keys are kept (a newer trainer may add some), known keys must have their type.
- The trainer's progress patch of its FineTuneJob's status (`Progress`, part of `finetune.status`).

Exit codes of `finetune train` (and so of a trainer container): 0 done; 2 the spec or the data is
wrong (permanent: a retry cannot help); 75 a transient outside failure (model hub or network down);
76 this node only lost a peer (another rank or node died first: the cause is elsewhere; it waits
before exiting so the cause's pod fails its Job first); anything else is retryable too (a crash, a
kill, out of memory).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.spec import Model, Task

EXIT_OK = 0
EXIT_PERMANENT = 2
EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL
EXIT_PEER_LOST = 76
# The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096
LOG_TAIL_LINES = 20


class TransientError(RuntimeError):
    """An outside failure that a later attempt may not meet: the model hub or the network is down."""


class TrainerResult(Model):
    """The result of a finished run, written by global rank 0."""

    model_path: str = Field(..., description="Exported model directory (what the server loads).")
    metrics: dict[str, float] = Field(default_factory=dict, description="Test metrics by name.")
    headline_metric: str | None = Field(None, description="The metric the gate and `kubectl get` show.")
    world_size: int = Field(1, ge=1, description="Training processes that formed the run's world.")
    steps: int = Field(0, ge=0, description="Optimizer steps done.")
    resumed_from_step: int = Field(0, ge=0, description="Checkpoint step the run resumed from; 0 = fresh.")

    @field_validator("metrics", mode="before")
    @classmethod
    def _finite_numbers(cls, value: object) -> object:
        """Keeps only finite numbers: NaN is not JSON and a bool is no metric."""
        if not isinstance(value, dict):
            return value
        return {
            str(k): float(v)
            for k, v in value.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }


class RankOutcome(Model):
    """What one training process leaves for its launcher when it ends (normally or by an error)."""

    rank: int = Field(..., ge=0, description="Global rank of the process.")
    exit_code: int = Field(..., description="The process's exit code.")
    permanent: bool = Field(False, description="True when a retry cannot help (exit code 2).")
    message: str = Field("", description="One line: the error, or what was done.")
    result: TrainerResult | None = Field(None, description="Global rank 0 on success.")

    def write(self, folder: Path) -> None:
        """Atomically, so a launcher never reads half a file."""
        tmp = folder / f".rank-{self.rank}.json.tmp"
        tmp.write_text(self.model_dump_json(by_alias=True))
        tmp.replace(folder / f"rank-{self.rank}.json")

    @classmethod
    def read_all(cls, folder: Path) -> list[RankOutcome]:
        """Every rank's outcome in `folder`, by rank; unreadable files are skipped."""
        found = []
        for path in sorted(folder.glob("rank-*.json")):
            try:
                found.append(cls.model_validate_json(path.read_text()))
            except (OSError, ValidationError):
                continue
        return sorted(found, key=lambda o: o.rank)


class FirstFailure(Model):
    """What torch's elastic launcher saw go wrong first on one node: a rank that failed (perhaps killed
    before it could say why), the launcher itself stopped by a signal, or no rendezvous with node 0."""

    kind: Literal["rank", "signal", "rendezvous"] = Field("rank", description="What went wrong.")
    rank: int | None = Field(None, ge=0, description="Global rank of the first failed process (kind rank).")
    exit_code: int = Field(1, description="Its exit code; negative for a signal.")
    signal: str | None = Field(None, description="The signal that ended it (SIGKILL, SIGTERM, ...), if one did.")
    message: str = Field("", description="One line, for kind signal and rendezvous.")

    FILE: ClassVar[str] = "first-failure.json"


class TerminationMessage(Model):
    """A trainer pod's termination message: its result on success, its first error otherwise."""

    exit_code: int = Field(..., description="The pod's (launcher's) exit code.")
    permanent: bool = Field(False, description="True when a retry cannot help.")
    message: str = Field("", description="One line: the trainer's own error, or what was done.")
    node_rank: int = Field(0, ge=0, description="The pod's node rank (completion index).")
    failed_rank: int | None = Field(None, description="Global rank whose failure ended the pod, if one did.")
    result: TrainerResult | None = Field(None, description="The run's result (the pod holding global rank 0).")
    log_tail: list[str] = Field(default_factory=list, description="Last log lines of the pod.")

    def encode(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """JSON within the kubelet's limit: the oldest log lines go first, then the message is cut."""
        doc = self.model_copy()
        while True:
            text = doc.model_dump_json(by_alias=True, exclude_defaults=True)
            if len(text.encode()) <= limit:
                return text
            if doc.log_tail:
                doc.log_tail = doc.log_tail[1:]
            elif len(doc.message) > 200:
                doc.message = doc.message[: len(doc.message) // 2] + "…"
            elif doc.result is not None and doc.result.metrics:
                # Keep the message valid JSON: drop metrics (by longest name first) before anything else.
                longest = max(doc.result.metrics, key=len)
                doc.result = doc.result.model_copy(
                    update={"metrics": {k: v for k, v in doc.result.metrics.items() if k != longest}}
                )
            else:
                return TerminationMessage(exit_code=doc.exit_code, permanent=doc.permanent,
                                          message="termination message too large", node_rank=doc.node_rank
                                          ).model_dump_json(by_alias=True)

    @classmethod
    def decode(cls, text: str | None) -> TerminationMessage | None:
        """The typed message, or None when the text is not one (e.g. the kubelet's log fallback)."""
        if not text or not text.lstrip().startswith("{"):
            return None
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError):
            return None


def one_line(text: str, limit: int = 500) -> str:
    """White space collapsed, cut to `limit` characters: what fits a status message or a log line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"

class Progress(Model):
    """Training progress reported by the trainer's main process (status.training of the FineTuneJob)."""

    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps planned.")
    epoch: float = Field(0.0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    validation_metric: float | None = Field(None, description="Latest validation value of the headline metric.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to the end of training.")


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
    tokenizer_fingerprint: str = Field(
        "", description="tokenizer_fingerprint() of the exported tokenizer: the server refuses any other one."
    )
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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id, added tokens included): equal for the
    tokenizer the trainer exported and the one the server loads back, different for another model's."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()[:16]


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


TRIAL_FILE = "trial.json"
SEARCH_FILE = "search.json"


class TrialProgress(Artifact):
    """trial.json: a search trial's validation curve, written by its trainer at every validation and at the
    end (`finetune train --trial`); the search driver reads it to prune the trial and to rank it."""

    metric: str = Field(..., description="The validation metric the trial is ranked by.")
    history: list[dict[str, float | None]] = Field(default_factory=list, description="Every validation, in order.")
    best_step: int | None = None
    steps: int = Field(0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(0, ge=0)
    finished: bool = Field(False, description="Training ended (its last checkpoint holds the end state).")
    state: Literal["running", "complete", "pruned"] = "running"
    pruned_at: int | None = Field(None, description="The validation (1-based) after which the trial pruned itself.")

    @property
    def curve(self) -> list[float]:
        """The metric at each validation (the intermediate values a pruner compares)."""
        return [float(v) for h in self.history if isinstance(v := h.get(self.metric), int | float)]

    @property
    def best(self) -> dict[str, float | None]:
        return next((h for h in self.history if h.get("step") == self.best_step), {})


TrialState = Literal["running", "complete", "pruned", "failed"]


class TrialRecord(Model):
    """One trial in search.json."""

    number: int = Field(..., ge=0)
    params: dict[str, float | int | str] = Field(..., description="Search parameters (camelCase, as in the spec).")
    state: TrialState = "running"
    curve: list[float] = Field(default_factory=list, description="The search metric at each validation.")
    value: float | None = Field(None, description="The search metric at the trial's best validation.")
    validation: dict[str, float | None] = Field(default_factory=dict, description="All metrics at that validation.")
    group_gap: float | None = Field(None, description="Validation f1 gap between groups at that validation.")
    pruned_at: int | None = Field(None, description="The validation (1-based) after which it was pruned.")
    wall_seconds: float = 0.0
    output: str = Field("", description="The trial's output folder.")
    message: str = ""


class SearchReport(Artifact):
    """search.json: every trial's parameters and outcome, and which one won."""

    metric: str
    direction: Literal["maximize", "minimize"]
    algorithm: str
    pruner: str
    trials_planned: int
    trials: list[TrialRecord] = Field(default_factory=list)
    best_trial: int | None = None
    model_path: str | None = Field(None, description="The winner's export (tested, gated and served).")
    test: dict[str, float] = Field(default_factory=dict, description="The winner's test metrics (only its).")
