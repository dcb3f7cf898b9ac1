"""`python -m finetune.trainer.elastic <torchrun arguments>`: torch's elastic launcher, in a process of
its own under `finetune train`, that also says what went wrong first.

torchrun only prints its "root cause" report; here the launcher's own exceptions are read and left as a
`FirstFailure` in $FINETUNE_OUTCOME_DIR:
- a rank failed: the first one by the time torch observed it. That tells the rank that was killed (and
  so left no outcome) from the ranks that then failed waiting for it;
- the launcher was stopped by a signal (SIGTERM when the pod is deleted): not a training failure;
- there was no rendezvous with node 0 (it never came up, or its address does not resolve).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from finetune.contracts import FirstFailure, one_line


def leave_first_failure(report: FirstFailure) -> None:
    folder = os.environ.get("FINETUNE_OUTCOME_DIR")
    if folder:
        path = Path(folder) / FirstFailure.FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(report.model_dump_json(by_alias=True))
        tmp.replace(path)


def main(argv: list[str]) -> int:
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as run_untyped

    from finetune.trainer.entry import die_with_parent

    die_with_parent()
    os.environ["FINETUNE_LAUNCHER_PID"] = str(os.getpid())  # for the ranks' own die_with_parent
    try:
        run: Any = run_untyped
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        signal = failure.signal_name() if failure.exitcode < 0 else None
        leave_first_failure(FirstFailure(rank=rank, exit_code=failure.exitcode, signal=signal))
        return 1
    except SignalException as err:
        leave_first_failure(FirstFailure(kind="signal", exit_code=-int(err.sigval), signal=err.sigval.name,
                                         message=f"stopped by {err.sigval.name}"))
        return 128 + int(err.sigval)
    except (RendezvousError, DistNetworkError) as err:
        leave_first_failure(FirstFailure(kind="rendezvous", message=one_line(f"{type(err).__name__}: {err}", 300)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
