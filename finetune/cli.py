"""The `finetune` command.

    finetune train -f job.yaml --output out/ [--processes N]   # what a trainer pod runs
    finetune serve --model out/model [--port 8080]             # what a server pod runs
    finetune run -f job.yaml                                   # the whole flow on this machine
    finetune crd                                               # print the CRD
    finetune operator                                          # run the kopf operator

Each component registers its own sub-command so its flags live beside its code. Bad input exits
non-zero with one readable line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from finetune.spec import SpecError

# Modules with a `register(subparsers)`; imported lazily inside their handlers so `finetune crd` stays fast.
COMMAND_MODULES = (
    "finetune.trainer.cli",
    "finetune.server.cli",
    "finetune.run",
    "finetune.operator.cli",
)


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _crd(_: argparse.Namespace) -> int:
    from finetune.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub)
    crd = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition (YAML)")
    crd.set_defaults(func=_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except (SpecError, UserError) as err:
        print(f"finetune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
