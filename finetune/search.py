"""Hyperparameter search, as a pure function of what the trials so far did.

Every decision (the next trial's parameters, whether a running trial is pruned, which trial won) is
computed from the trial records alone, with an Optuna study rebuilt in memory each time. So the same
code serves `finetune run` (records in search.json) and the operator (records in the job's status), a
killed search resumes from its records, and a resumed search proposes what the first one would have:
the sampler is seeded with (search.seed, trial number), not with a state that lives in one process.

Trials are ranked on the validation split only: the test split is looked at once, for the winner.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

from finetune.contracts import TrialRecord
from finetune.spec import FineTuneJob, FineTuneJobSpec, NumberRange, Search, lower_is_better

# search.parameters name -> (training field path, whole numbers)
TRAINING_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "learningRate": (("learning_rate",), False),
    "batchSize": (("batch_size",), True),
    "epochs": (("epochs",), False),
    "weightDecay": (("weight_decay",), False),
    "warmupRatio": (("warmup_ratio",), False),
    "loraR": (("lora", "r"), True),
    "classWeights": (("class_weights",), False),
    "groupBalance": (("group_balance",), False),
}


def direction(spec: FineTuneJobSpec) -> Literal["minimize", "maximize"]:
    return "minimize" if lower_is_better(spec.search_metric) else "maximize"


def distributions(search: Search) -> dict[str, Any]:
    """The Optuna distribution of every searched parameter (camelCase names, as in the spec)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, value in search.parameters.model_dump(by_alias=True).items():
        if value is None:
            continue
        if isinstance(value, list):  # classWeights, groupBalance: choices
            out[name] = CategoricalDistribution(value)
            continue
        whole = TRAINING_FIELDS[name][1]
        rng = NumberRange.model_validate(value)
        if rng.values is not None:
            out[name] = CategoricalDistribution([int(v) if whole else v for v in rng.values])
        elif whole:
            assert rng.low is not None and rng.high is not None
            out[name] = IntDistribution(int(rng.low), int(rng.high), log=rng.log)
        else:
            assert rng.low is not None and rng.high is not None
            out[name] = FloatDistribution(rng.low, rng.high, log=rng.log)
    return out


def trial_job(job: FineTuneJob, params: dict[str, Any]) -> FineTuneJob:
    """The job one trial trains: the search's parameters applied to training, the search section gone."""
    training = job.spec.training.model_dump()
    for name, value in params.items():
        if name not in TRAINING_FIELDS:
            raise ValueError(f"unknown search parameter {name!r}; known: {', '.join(TRAINING_FIELDS)}")
        path, whole = TRAINING_FIELDS[name]
        target = training
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = int(value) if whole else value
    if job.spec.search is not None and job.spec.search.metric:
        training["metric_for_best_model"] = job.spec.search.metric  # each trial keeps its best by that metric
    spec = job.spec.model_dump(by_alias=False)
    spec.update(training=training, search=None)
    return job.model_copy(update={"spec": FineTuneJobSpec.model_validate(spec)})


def _sampler(search: Search, number: int) -> Any:
    import optuna

    seed = search.seed * 100_003 + number  # a function of the trial, so a resumed search proposes the same
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(search.startup_trials, 1))


def _pruner(search: Search) -> Any:
    import optuna

    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=0)
    if search.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, min_early_stopping_rate=0)
    return optuna.pruners.NopPruner()


def _frozen(record: TrialRecord, dists: dict[str, Any]) -> Any:
    from optuna.trial import TrialState, create_trial

    state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL,
             "running": TrialState.RUNNING}[record.state]
    value = record.value if record.state == "complete" and record.value is not None else None
    if state == TrialState.COMPLETE and value is None:
        state = TrialState.FAIL  # finished without a single finite validation: nothing to learn from
    params = {k: v for k, v in record.params.items() if k in dists}
    return create_trial(state=state, value=value, params=params, distributions={k: dists[k] for k in params},
                        intermediate_values={i + 1: v for i, v in enumerate(record.curve) if math.isfinite(v)})


def rebuild_study(spec: FineTuneJobSpec, records: list[TrialRecord], number: int) -> Any:
    """An in-memory study holding `records`, with the sampler for trial `number`."""
    import optuna

    assert spec.search is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction(spec), sampler=_sampler(spec.search, number),
                                pruner=_pruner(spec.search))
    dists = distributions(spec.search)
    for record in sorted(records, key=lambda r: r.number):
        study.add_trial(_frozen(record, dists))
    return study


def propose(spec: FineTuneJobSpec, records: list[TrialRecord]) -> dict[str, Any]:
    """The next trial's parameters, given every trial so far (running ones included)."""
    assert spec.search is not None
    number = len(records)
    study = rebuild_study(spec, records, number)
    trial = study.ask(distributions(spec.search))
    return {k: _plain(v) for k, v in trial.params.items()}


def _plain(value: Any) -> float | int | str:
    plain = value.item() if hasattr(value, "item") else value  # numpy scalars from the samplers
    return cast(float | int | str, plain)


def should_prune(spec: FineTuneJobSpec, records: list[TrialRecord], running: TrialRecord) -> bool:
    """Whether the running trial's validation curve so far is behind the others' (spec.search.pruner)."""
    if not running.curve:
        return False
    others = [r for r in records if r.number != running.number and r.state != "running"]
    study = rebuild_study(spec, [*others, running.model_copy(update={"state": "running"})], running.number)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING")
    return bool(study.pruner.prune(study, frozen))


def best_index(curve: list[float], minimize: bool) -> int:
    return (min if minimize else max)(range(len(curve)), key=lambda i: curve[i])


def winner(spec: FineTuneJobSpec, records: list[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the best validation value that meets search.maxGroupGap (ties: the earlier)."""
    assert spec.search is not None
    limit = spec.search.max_group_gap
    eligible = [r for r in records if r.state == "complete" and r.value is not None and math.isfinite(r.value)
                and (limit is None or (r.group_gap is not None and r.group_gap <= limit))]
    if not eligible:
        return None
    sign = -1.0 if direction(spec) == "maximize" else 1.0
    return min(eligible, key=lambda r: (sign * (r.value or 0.0), r.number))


def describe_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
