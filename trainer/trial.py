"""A search trial prunes itself: after each validation it compares its curve with its finished siblings'.

The siblings are the other folders of OUT/trials/, each with its trial.json: the same files on a laptop
and on a cluster's shared volume, so `finetune run` and the operator get the same decision, and it is
made at the validation itself (a driver polling from outside would see a fast trial several validations
late). Only finished siblings count, as in Optuna's own pruners; the verdict is the main rank's, shared
with every rank so they stop after the same step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.contracts import TRIAL_FILE, TrialProgress, TrialRecord
from finetune.spec import FineTuneJob, lower_is_better

log = logging.getLogger(__name__)


def sibling_records(folder: Path, minimize: bool) -> list[TrialRecord]:
    """The finished trials beside `folder` (OUT/trials/<n>), as search records."""
    records = []
    for other in sorted(folder.parent.iterdir()) if folder.parent.is_dir() else []:
        if other == folder or not other.name.isdigit():
            continue
        progress = TrialProgress.read_if_valid(other / TRIAL_FILE)
        if progress is None or progress.state == "running":
            continue
        curve = progress.curve
        value = (min(curve) if minimize else max(curve)) if curve else None
        records.append(TrialRecord(number=int(other.name), params={}, state=progress.state, curve=curve,
                                   value=value))
    return records


class TrialPruner:
    """Called by the loop after each validation with the run's history; True: stop this trial (pruned)."""

    def __init__(self, search_job: FineTuneJob, folder: Path, accelerator: Any) -> None:
        self.spec, self.folder, self.acc = search_job.spec, folder, accelerator
        self.metric = self.spec.search_metric
        self.number = int(folder.name) if folder.name.isdigit() else 0

    def __call__(self, history: list[dict[str, Any]]) -> bool:
        verdict = self.decide(history) if self.acc.is_main_process else False
        return self.agree(verdict)

    def decide(self, history: list[dict[str, Any]]) -> bool:
        from finetune.search import should_prune

        curve = [float(h[self.metric]) for h in history if isinstance(h.get(self.metric), int | float)]
        siblings = sibling_records(self.folder, lower_is_better(self.metric))
        me = TrialRecord(number=self.number, params={}, curve=curve)
        pruned = should_prune(self.spec, siblings, me)
        if pruned:
            log.info("trial %d pruned after validation %d: %s %.4f is behind the %d finished trials", self.number,
                     len(curve), self.metric, curve[-1], len(siblings))
        return pruned

    def agree(self, verdict: bool) -> bool:
        if self.acc.num_processes == 1:
            return verdict
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(verdict)], dtype=torch.int64, device=self.acc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
