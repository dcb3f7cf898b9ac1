"""The search's decisions as functions of its records: proposals, pruning, the winner, the spec's rules."""

from __future__ import annotations

from typing import Any

import pytest

from finetune.contracts import TrialRecord
from finetune.search import propose, should_prune, trial_job, winner
from finetune.spec import FineTuneJob, SpecError, parse_job


def job(search: dict[str, Any], **spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {"task": "text-classification", "model": {"path": "/m"},
                            "dataset": {"train": {"path": "/d.csv"}}, "search": search}
    return parse_job({"metadata": {"name": "s"}, "spec": {**base, **spec}})


SEARCH = {"trials": 6, "seed": 3, "parameters": {"learningRate": {"low": 1e-5, "high": 1e-3, "log": True},
                                                 "batchSize": {"values": [8, 16, 32]}}}


def done(number: int, params: dict[str, Any], curve: list[float], gap: float | None = None) -> TrialRecord:
    return TrialRecord(number=number, params=params, state="complete", curve=curve, value=max(curve),
                       group_gap=gap)


@pytest.mark.parametrize("algorithm", ["tpe", "random"])
def test_proposals_are_in_range_and_the_same_after_a_resume(algorithm: str) -> None:
    spec = job({**SEARCH, "algorithm": algorithm}).spec
    records: list[TrialRecord] = []
    for n in range(1, 6):
        params = propose(spec, records)
        assert 1e-5 <= params["learningRate"] <= 1e-3 and params["batchSize"] in (8, 16, 32)
        assert isinstance(params["batchSize"], int) and isinstance(params["learningRate"], float)
        # A search that restarts from the records proposes what the first one did.
        assert propose(spec, list(records)) == params
        records.append(done(n, params, [0.5 + params["learningRate"] * 100]))


def test_the_trial_job_is_the_spec_with_its_parameters_and_no_search() -> None:
    search_job = job({**SEARCH, "metric": "accuracy"}, training={"method": "lora"})
    trial = trial_job(search_job, {"learningRate": 2e-4, "batchSize": 16.0})
    assert trial.spec.search is None
    assert trial.spec.training.learning_rate == 2e-4 and trial.spec.training.batch_size == 16
    assert trial.spec.training.metric_for_best_model == "accuracy", "each trial keeps its best by the search metric"
    assert trial_job(job({"parameters": {"loraR": {"values": [4]}}}, training={"method": "lora"}),
                     {"loraR": 4}).spec.training.lora.r == 4
    with pytest.raises(ValueError, match="unknown search parameter"):
        trial_job(search_job, {"learning_rate": 1e-4})
    with pytest.raises(ValueError):
        trial_job(search_job, {"batchSize": 0})  # the trial's spec is validated like any other


def test_the_median_pruner_stops_a_trial_behind_the_finished_ones() -> None:
    spec = job({**SEARCH, "startupTrials": 1}).spec
    finished = [done(1, {}, [0.7, 0.8, 0.9])]
    assert should_prune(spec, finished, TrialRecord(number=2, params={}, curve=[0.4]))
    assert not should_prune(spec, finished, TrialRecord(number=2, params={}, curve=[0.75]))
    assert not should_prune(spec, [], TrialRecord(number=1, params={}, curve=[0.1])), "no startup trial yet"
    none = job({**SEARCH, "pruner": "none"}).spec
    assert not should_prune(none, finished, TrialRecord(number=2, params={}, curve=[0.1]))


def test_loss_is_minimised() -> None:
    spec = job({**SEARCH, "startupTrials": 1, "metric": "loss"}, task="causal-lm").spec
    finished = [TrialRecord(number=1, params={}, state="complete", curve=[1.0, 0.5], value=0.5)]
    assert should_prune(spec, finished, TrialRecord(number=2, params={}, curve=[3.0]))
    best = winner(spec, [*finished, TrialRecord(number=2, params={}, state="complete", curve=[0.4], value=0.4)])
    assert best is not None and best.number == 2


def test_the_winner_is_the_best_complete_trial_within_the_group_gap() -> None:
    records = [done(1, {}, [0.90], gap=0.10), done(2, {}, [0.88], gap=0.02), done(3, {}, [0.88], gap=0.01),
               TrialRecord(number=4, params={}, state="pruned", curve=[0.95]),
               TrialRecord(number=5, params={}, state="failed")]
    best = winner(job(SEARCH).spec, records)
    assert best is not None and best.number == 1, "pruned and failed trials never win"
    fair = winner(job({**SEARCH, "maxGroupGap": 0.03}, evaluation={"groupColumn": "g"}).spec, records)
    assert fair is not None and fair.number == 2, "ties go to the earlier trial"
    assert winner(job({**SEARCH, "maxGroupGap": 0.001}, evaluation={"groupColumn": "g"}).spec, records) is None


@pytest.mark.parametrize(("search", "spec", "message"), [
    ({"parameters": {}}, {}, "name at least one parameter"),
    ({**SEARCH, "metric": "acuracy"}, {}, "validates on accuracy, f1"),
    ({**SEARCH, "trials": 2, "parallel": 3}, {}, "parallel cannot exceed"),
    ({"parameters": {"loraR": {"values": [4]}}}, {}, "needs training.method: lora"),
    ({**SEARCH, "maxGroupGap": 0.05}, {}, "need evaluation.groupColumn"),
    ({"parameters": {"learningRate": {"low": 0, "high": 1e-3, "log": True}}}, {}, "log: true needs low > 0"),
    ({"parameters": {"learningRate": {"low": 1e-3, "high": 1e-5}}}, {}, "low <= high"),
    ({"parameters": {"learningRate": {"values": [1e-4], "low": 1e-5}}}, {}, "either values"),
])
def test_searches_that_cannot_run_are_refused_with_the_field(search: dict[str, Any], spec: dict[str, Any],
                                                              message: str) -> None:
    with pytest.raises(SpecError, match=message):
        job(search, **spec)


def test_mitigation_needs_a_group_column_and_classification() -> None:
    with pytest.raises(SpecError, match="need evaluation.groupColumn"):
        job(SEARCH, training={"groupBalance": "sample"})
    with pytest.raises(SpecError, match="text-classification only"):
        parse_job({"spec": {"task": "causal-lm", "model": {"path": "/m"}, "dataset": {"train": {"path": "/d"}},
                            "training": {"classWeights": "balanced"}}})
