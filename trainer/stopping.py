"""Stop at a step boundary on SIGTERM or SIGINT (Ctrl-C), with a checkpoint, so a rerun resumes there.

The first signal asks the training loop to stop after the step it is in; every rank learns it at the
same step (one tiny all-reduce per step when there are several), saves the checkpoint with the others
and exits 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), saying "stopped at step N;
rerun to resume". A second signal stops the process at once. The launcher forwards each signal to the
trainer once (the trainer runs in a process group of its own, away from the terminal's Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Training stopped on request; `step` is where a rerun resumes."""

    def __init__(self, step: int, total: int, signum: int) -> None:
        self.step, self.total, self.signum = step, total, signum
        name = signal.Signals(signum).name
        where = f"at step {step} of {total} (checkpoint saved)" if step else "before the first step"
        super().__init__(f"stopped by {name} {where}; rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal this process was asked to stop by, if any."""

    def __init__(self) -> None:
        self.signum = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum:
            log.error("second %s: stopping now, without a checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s: stopping after the current step (send it again to stop at once)",
                    signal.Signals(signum).name)

    def agreed(self, accelerator: Any) -> int:
        """The signal any rank got (0: none), the same on every rank; a collective with several ranks."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int64, device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


requested = StopRequest()
