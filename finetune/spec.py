"""The FineTuneJob API, written once.

The operator, the trainer and `finetune run` all parse a FineTuneJob with these models, and the CRD's
OpenAPI schema is generated from them (`finetune.crd`). Field descriptions become `kubectl explain` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAME = "ftj"

Task = Literal["text-classification", "causal-lm"]
DataFormat = Literal["csv", "tsv", "jsonl", "parquet"]
FORMAT_BY_SUFFIX: dict[str, DataFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


LOWER_IS_BETTER = ("loss", "perplexity", "error")
CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall")
CAUSAL_VALIDATION_METRICS = ("loss", "perplexity")
GENERATION_METRICS = ("rougeL", "bleu", "exact_match")


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities and error rates improve downwards; every other metric upwards."""
    name = metric.lower()
    return any(word in name for word in LOWER_IS_BETTER)


class SpecError(ValueError):
    """A FineTuneJob that can never run as written; the message says which field and what to change."""


class Model(BaseModel):
    """Base for every spec type: camelCase names as in Kubernetes, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


class ModelSource(Model):
    """The pre-trained model to start from: a hub id or a directory, exactly one of them."""

    name: str | None = Field(None, description="Hugging Face hub id, e.g. distilbert-base-uncased.")
    path: str | None = Field(None, description="Directory holding a from_pretrained-loadable model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust its authors."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.name is None) == (self.path is None):
            raise ValueError("spec.model: set exactly one of model.name (hub id) or model.path (directory)")
        return self

    @property
    def source(self) -> str:
        return self.path or self.name or ""


class DataFile(Model):
    """One data file."""

    path: str = Field(..., min_length=1, description="File path (inside the mounted data volume in a cluster).")


class Cleaning(Model):
    """Optional cleaning steps, applied in this order; each reports how many rows it removed."""

    strip_urls: bool = Field(False, description="Remove http(s) and www links from the text.")
    strip_html: bool = Field(False, description="Remove HTML tags and unescape entities.")
    normalize_whitespace: bool | None = Field(
        None, description="Collapse runs of white space and trim the ends. Default: on for text-classification; "
        "off for causal-lm, whose prompt templates and completions' leading spaces are part of what is learned.",
    )
    drop_empty: bool = Field(True, description="Drop rows whose text is empty after cleaning.")
    drop_duplicates: bool = Field(False, description="Drop rows whose text (and label) repeat an earlier row.")

    def for_task(self, task: Task) -> Cleaning:
        """The steps that run for `task`: unset options take the task's default."""
        if self.normalize_whitespace is not None:
            return self
        return self.model_copy(update={"normalize_whitespace": task == "text-classification"})


class Split(Model):
    """How a lone train file is split; used only for the splits not given as files."""

    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of rows for validation.")
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of rows for the held-out test set.")
    seed: int = Field(42, description="Seed of the stratified shuffle.")


class Dataset(Model):
    """Where the data is and which columns mean what."""

    train: DataFile = Field(..., description="Training data.")
    validation: DataFile | None = Field(None, description="Validation data; split from train when absent.")
    test: DataFile | None = Field(None, description="Held-out test data; split from train when absent.")
    format: DataFormat | None = Field(None, description="File format; inferred from the extension when absent.")
    text_column: str = Field("text", description="Column with the input text.")
    label_column: str = Field("label", description="Column with the class label (text-classification).")
    label_names: dict[str, str] = Field(
        default_factory=dict, description="Display names for label values, e.g. {'0': negative, '1': positive}."
    )

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value: object) -> object:
        """YAML reads `{0: negative}` and `{true: positive}` with number and bool keys: labels are text."""
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return value
    prompt_column: str | None = Field(None, description="Column with the prompt (causal-lm).")
    completion_column: str | None = Field(None, description="Column with the target completion (causal-lm).")
    messages_column: str | None = Field(
        None, description="Column with chat turns [{role, content}] rendered by the chat template (causal-lm)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    cleaning: Cleaning = Field(default_factory=Cleaning, description="Cleaning steps.")
    split: Split = Field(default_factory=Split, description="Split of a lone train file.")

    def format_of(self, path: str) -> DataFormat:
        if self.format:
            return self.format
        fmt = FORMAT_BY_SUFFIX.get(Path(path).suffix.lower())
        if fmt is None:
            allowed = ", ".join(sorted(set(FORMAT_BY_SUFFIX.values())))
            raise SpecError(
                f"spec.dataset.format: cannot infer the format of {path!r} from its extension; "
                f"set dataset.format to one of {allowed}"
            )
        return fmt


class EarlyStopping(Model):
    """Stop when the validation metric has not improved for `patience` evaluations."""

    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class Lora(Model):
    """LoRA adapter settings (training.method: lora)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; a sensible default per architecture when absent."
    )


class Training(Model):
    """Hyperparameters."""

    method: Literal["full", "lora"] = Field("full", description="Fine-tune every weight, or LoRA adapters only.")
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(16, ge=1, le=4096, description="Examples per process per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches summed per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and norms).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with a rising learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per example; longer inputs are truncated.")
    seed: int = Field(42, description="Seed for weights, shuffling and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPUs; fp32 on CPUs (bf16 autocast "
        "collapses on a CPU shared with other work)."
    )
    eval_steps: int | None = Field(None, ge=1, description="Validate every N steps; once per epoch when absent.")
    checkpoint_steps: int = Field(200, ge=1, description="Save a resumable checkpoint every N steps.")
    checkpoints_kept: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_steps: int = Field(10, ge=1, description="Log loss and throughput every N steps.")
    metric_for_best_model: str | None = Field(
        None, description="Validation metric that picks the best model; f1 (classification), perplexity (causal-lm)."
    )
    early_stopping: EarlyStopping | None = Field(None, description="Stop when validation stops improving.")
    lora: Lora = Field(default_factory=Lora, description="LoRA settings.")
    packing: bool = Field(True, description="causal-lm: pack examples into padding-free batches.")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="text-classification: balanced = weight each class's loss by n / (classes x its "
        "rows), so a rare class counts as much as a common one.",
    )
    group_balance: Literal["none", "reweight", "sample"] = Field(
        "none", description="text-classification, with evaluation.groupColumn: reweight = weight each row's "
        "loss by n / (groups x its group's rows); sample = draw each epoch's rows group-balanced (rare groups "
        "oversampled, same rows per epoch). The bias mitigation for a group the data under-represents.",
    )


class NumberRange(Model):
    """One searched parameter: a list of values, or a range from low to high (log: sampled on a log scale)."""

    values: list[float] | None = Field(None, min_length=1, description="The values to choose from.")
    low: float | None = Field(None, description="Smallest value of the range.")
    high: float | None = Field(None, description="Largest value of the range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates).")

    @model_validator(mode="after")
    def _values_or_range(self) -> NumberRange:
        if (self.values is None) == (self.low is None and self.high is None):
            raise ValueError("give either values: [...] or low and high")
        if self.values is None and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError("a range needs low <= high")
        if self.log and (self.low or 0) <= 0:
            raise ValueError("log: true needs low > 0")
        return self


class SearchParameters(Model):
    """What the search varies; each one unset keeps the value in training."""

    learning_rate: NumberRange | None = Field(None, description="training.learningRate, e.g. low 1e-5, high "
                                              "1e-3, log true.")
    batch_size: NumberRange | None = Field(None, description="training.batchSize (whole numbers).")
    epochs: NumberRange | None = Field(None, description="training.epochs.")
    weight_decay: NumberRange | None = Field(None, description="training.weightDecay.")
    warmup_ratio: NumberRange | None = Field(None, description="training.warmupRatio.")
    lora_r: NumberRange | None = Field(None, description="training.lora.r (whole numbers; method lora).")
    class_weights: list[Literal["none", "balanced"]] | None = Field(
        None, min_length=1, description="training.classWeights choices.")
    group_balance: list[Literal["none", "reweight", "sample"]] | None = Field(
        None, min_length=1, description="training.groupBalance choices (needs evaluation.groupColumn).")


class Search(Model):
    """Hyperparameter search: trials are ordinary training runs with their own output folders, compared on
    the validation split; only the best is tested, gated and served (the test set stays untouched)."""

    parameters: SearchParameters = Field(..., description="The parameters to vary.")
    trials: int = Field(8, ge=1, le=1000, description="Trials to run, pruned ones included.")
    parallel: int = Field(1, ge=1, le=64, description="Trials that run at once.")
    metric: str | None = Field(None, description="Validation metric to optimise; training.metricForBestModel "
                               "or the task's headline metric when absent.")
    algorithm: Literal["tpe", "random"] = Field(
        "tpe", description="tpe: Optuna's model-based sampler; random: independent draws.")
    pruner: Literal["median", "successive-halving", "none"] = Field(
        "median", description="Stop a trial early when its validation curve is behind the others' (median) or in "
        "the bottom share at each rung (successive-halving).")
    startup_trials: int = Field(2, ge=0, description="Trials that finish before any is pruned (and before tpe "
                                "models the results).")
    seed: int = Field(0, description="Seed of the sampler: the same seed proposes the same trials.")
    max_group_gap: float | None = Field(
        None, ge=0, le=1, description="Only a trial whose validation f1 gap between evaluation.groupColumn groups "
        "is at most this may win.")


class Evaluation(Model):
    """Held-out evaluation."""

    group_column: str | None = Field(None, description="Column whose values get their own metrics (bias check).")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="causal-lm: tokens generated per test prompt.")
    max_test_samples: int | None = Field(None, ge=1, description="Evaluate on at most this many test rows.")


class Resources(Model):
    """What each trainer pod gets and where it runs."""

    nodes: int = Field(1, ge=1, le=1024, description="Trainer pods (machines).")
    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs per pod; 0 trains on CPUs.")
    cpu: str | None = Field(None, description="CPU request and limit per pod, e.g. '8'.")
    memory: str | None = Field(None, description="Memory request and limit per pod, e.g. 64Gi.")
    shm_size: str = Field("8Gi", description="Size of /dev/shm (memory-backed) for data loaders and NCCL.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity rules.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the trainer pods.")
    service_account_name: str | None = Field(None, description="ServiceAccount of the trainer pods.")


class Storage(Model):
    """The artifact volume: data in, checkpoints and the exported model out."""

    claim_name: str | None = Field(None, description="PersistentVolumeClaim mounted at /workspace in every pod.")
    output_path: str | None = Field(
        None, description="Output directory inside the volume; /workspace/<job name> when absent."
    )


class Scheduling(Model):
    """Shared-cluster scheduling."""

    queue_name: str | None = Field(
        None, description="Kueue LocalQueue; the trainer JobSet waits suspended until Kueue admits the whole gang."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Limit on one training attempt's wall time (a gang restart starts a new attempt)."
    )
    backoff_limit: int = Field(
        3, ge=0, description="Gang restarts after real failures; disruptions do not count, exit code 2 never restarts."
    )
    max_disruptions: int = Field(
        10, ge=0, description="Gang restarts after disruptions (preemption, eviction) before the run fails: they do "
        "not use backoffLimit, and a trainer evicted again and again must not hold its GPUs forever.",
    )
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the finished trainer JobSet.")


class Serving(Model):
    """The inference Deployment."""

    enabled: bool = Field(True, description="Serve the model once it passes its quality gate.")
    replicas: int = Field(1, ge=0, le=1000, description="Server replicas (the minimum when autoscaling).")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale up to this many replicas (HPA).")
    target_cpu_utilization: int = Field(70, ge=1, le=100, description="HPA CPU target, percent.")
    cpu: str | None = Field(None, description="CPU request per server pod.")
    memory: str | None = Field(None, description="Memory request per server pod.")
    gpus: int = Field(0, ge=0, le=8, description="GPUs per server pod.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Requests gathered into one forward pass.")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a request waits for others to batch with.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Classification compute: auto = bf16 when the model was tested in bf16 and the node's CPU has "
        "native bf16 (the tested numbers, about twice as fast), else fp32; fp32 = the exported weights' exact scores.",
    )
    auth_secret_name: str | None = Field(None, description="Secret whose key 'token' guards the inference routes.")

    def server_settings(self) -> dict[str, Any]:
        """These fields as `finetune serve` settings (ServerSettings field names): the one mapping that the
        operator's Deployment (as FINETUNE_SERVE_* variables) and `finetune run` both use."""
        return {"max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms, "precision": self.precision}


class Promotion(Model):
    """The quality gate between evaluation and serving."""

    metric: str | None = Field(None, description="Test metric to gate on; the task's headline metric when absent.")
    min_value: float | None = Field(None, description="Reject the model when the metric is below this.")
    max_value: float | None = Field(None, description="Reject the model when the metric is above this (loss).")
    min_improvement: float | None = Field(
        None, description="Reject unless the metric beats the model now serving by at least this much."
    )


class Monitoring(Model):
    """Prometheus integration."""

    service_monitor: bool = Field(False, description="Create a ServiceMonitor for the server (Prometheus Operator).")


class Export(Model):
    """What the trainer writes at the end."""

    merge_adapters: bool = Field(True, description="lora: also write a merged model that loads without peft.")
    keep_checkpoints: bool = Field(
        False, description="Keep the step checkpoints and checkpoints/best after a successful export (they "
        "hold the optimizer state: several times the model's size).",
    )


class FineTuneJobSpec(Model):
    """A fine-tuning job: data and model in, an evaluated (and optionally served) model out."""

    task: Task = Field(..., description="text-classification or causal-lm.")
    model: ModelSource = Field(..., description="The pre-trained model to fine-tune.")
    dataset: Dataset = Field(..., description="Training, validation and test data.")
    training: Training = Field(default_factory=Training, description="Hyperparameters.")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Held-out evaluation.")
    export: Export = Field(default_factory=Export, description="Export options.")
    resources: Resources = Field(default_factory=Resources, description="Trainer pods.")
    storage: Storage = Field(default_factory=Storage, description="Artifact volume.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Queueing and limits.")
    serving: Serving = Field(default_factory=Serving, description="Inference Deployment.")
    promotion: Promotion = Field(default_factory=Promotion, description="Quality gate before serving.")
    monitoring: Monitoring = Field(default_factory=Monitoring, description="Prometheus integration.")
    search: Search | None = Field(None, description="Hyperparameter search; one training run when absent.")
    image: str | None = Field(None, description="Trainer and server image; the operator's default when absent.")

    @model_validator(mode="after")
    def _task_columns(self) -> FineTuneJobSpec:
        d = self.dataset
        if self.task == "causal-lm":
            given = [c for c in (d.prompt_column, d.messages_column) if c]
            if d.prompt_column and not d.completion_column:
                raise ValueError("spec.dataset.completionColumn is required with dataset.promptColumn")
            if len(given) > 1:
                raise ValueError("spec.dataset: set promptColumn or messagesColumn, not both")
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> FineTuneJobSpec:
        """A metric name the task never produces would only be found after training, as a gate rejection."""
        checks = (("training.metricForBestModel", self.training.metric_for_best_model, self.validation_metrics),
                  ("promotion.metric", self.promotion.metric, self.test_metrics))
        for field, name, known in checks:
            if name is not None and name not in known:
                hint = (" (generation metrics need completions to compare: dataset.promptColumn or "
                        "messagesColumn)" if name in GENERATION_METRICS and self.task == "causal-lm" else "")
                raise ValueError(f"spec.{field}: {self.task} does not produce a metric {name!r}; "
                                 f"use one of {', '.join(known)}{hint}")
        return self

    @model_validator(mode="after")
    def _balance_needs(self) -> FineTuneJobSpec:
        t, search = self.training, self.search
        wants_groups = t.group_balance != "none" or bool(search and (
            search.max_group_gap is not None or set(search.parameters.group_balance or []) - {"none"}))
        if wants_groups and not self.evaluation.group_column:
            raise ValueError("spec.training.groupBalance and spec.search.maxGroupGap need evaluation.groupColumn "
                             "(the column that names each row's group)")
        balances = t.class_weights != "none" or wants_groups
        if balances and self.task != "text-classification":
            raise ValueError("spec.training.classWeights and groupBalance apply to text-classification only")
        return self

    @model_validator(mode="after")
    def _search_fits(self) -> FineTuneJobSpec:
        search = self.search
        if search is None:
            return self
        if search.metric is not None and search.metric not in self.validation_metrics:
            raise ValueError(f"spec.search.metric: {self.task} validates on {', '.join(self.validation_metrics)}, "
                             f"not {search.metric!r} (the search never looks at the test split)")
        if search.parameters.lora_r is not None and self.training.method != "lora":
            raise ValueError("spec.search.parameters.loraR needs training.method: lora")
        if not any(v is not None for v in search.parameters.model_dump().values()):
            raise ValueError("spec.search.parameters: name at least one parameter to vary")
        if search.parallel > search.trials:
            raise ValueError("spec.search.parallel cannot exceed search.trials")
        return self

    @property
    def search_metric(self) -> str:
        """The validation metric a search optimises."""
        return (self.search.metric if self.search and self.search.metric else None) or self.headline_metric

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        """What the trainer measures on the validation split (metricForBestModel picks among them)."""
        return CLASSIFICATION_METRICS if self.task == "text-classification" else CAUSAL_VALIDATION_METRICS

    @property
    def test_metrics(self) -> tuple[str, ...]:
        """The test metrics a run of this spec reports (what the quality gate can look at)."""
        if self.task == "text-classification":
            return CLASSIFICATION_METRICS
        d = self.dataset
        generates = bool(d.prompt_column or d.messages_column)
        return CAUSAL_VALIDATION_METRICS + (GENERATION_METRICS if generates else ())

    @property
    def headline_metric(self) -> str:
        if self.training.metric_for_best_model:
            return self.training.metric_for_best_model
        return "f1" if self.task == "text-classification" else "perplexity"


class ObjectMeta(BaseModel):
    """The part of metadata the project reads."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("finetune-job", min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None


class FineTuneJob(BaseModel):
    """A whole FineTuneJob document, as `kubectl apply -f` takes it."""

    model_config = ConfigDict(extra="forbid")
    api_version: Literal["finetune.dev/v1alpha1"] = Field("finetune.dev/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None


def format_validation_error(err: ValidationError, prefix: str = "spec") -> str:
    """One line per problem: the field path in camelCase, what was found and what is allowed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        where = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg[:1].lower()}{msg[1:]}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        if msg.startswith("spec."):
            lines.append(msg)
        else:
            lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_spec(data: dict[str, Any]) -> FineTuneJobSpec:
    """Validate a spec dict (as kopf hands it); raises SpecError with a readable message."""
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def parse_job(data: dict[str, Any]) -> FineTuneJob:
    """Validate a whole FineTuneJob document; raises SpecError with a readable message."""
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, prefix="")) from None


def load_job(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob YAML file; relative data and model paths resolve against the file's folder."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(f"job file {file} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise SpecError(f"cannot read job file {file}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"job file {file} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"job file {file} must hold one FineTuneJob mapping, found {type(data).__name__}")
    job = parse_job({k: v for k, v in data.items() if k != "status"})
    return resolve_paths(job, file.resolve().parent)


def resolve_paths(job: FineTuneJob, base: Path) -> FineTuneJob:
    """Make the spec's relative file paths absolute against `base` (the job file's folder)."""

    def fix(p: str) -> str:
        return p if Path(p).is_absolute() else str((base / p).resolve())

    ds = job.spec.dataset
    files = {k: getattr(ds, k) for k in ("train", "validation", "test")}
    updates = {k: f.model_copy(update={"path": fix(f.path)}) for k, f in files.items() if f is not None}
    spec = job.spec.model_copy(update={"dataset": ds.model_copy(update=updates)})
    if spec.model.path:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"path": fix(spec.model.path)})})
    return job.model_copy(update={"spec": spec})
