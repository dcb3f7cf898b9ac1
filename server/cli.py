"""`finetune serve`: serve a model exported by `finetune train`.

    finetune serve --model out/model                       # http://127.0.0.1:8080
    finetune serve --model out/model --host 0.0.0.0 --port 8080 --feedback-path /data/feedback.jsonl

Every flag also reads from `FINETUNE_SERVE_<FLAG>` (e.g. FINETUNE_SERVE_MAX_BATCH_SIZE); flags win.
The bearer token comes from --auth-token-file or FINETUNE_SERVE_AUTH_TOKEN.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# flag -> ServerSettings field, for the flags that map one to one
_FLAGS: dict[str, tuple[type, str]] = {
    "--name": (str, "served model name in URLs (default: metrics.json 'name', else the directory name)"),
    "--feedback-path": (Path, "JSONL file for POST /v1/feedback (default: MODEL/feedback.jsonl)"),
    "--max-batch-size": (int, "most texts in one forward pass (default 32)"),
    "--max-wait-ms": (float, "longest a request waits to share a forward pass (default 5)"),
    "--max-queue": (int, "requests waiting for the model before 503 (default 256)"),
    "--max-instances": (int, "most instances per request before 413 (default 64)"),
    "--request-timeout-s": (float, "seconds before a request gets 504 (default 30)"),
    "--auth-token-file": (Path, "file holding the bearer token for inference and feedback routes"),
    "--max-length": (int, "token limit per input (default: the tokenizer's)"),
    "--on-long-input": (str, "truncate (default) or reject (413) inputs over the token limit"),
    "--torch-threads": (int, "torch intra-op threads (default: the CPUs this process may use)"),
    "--model-workers": (int, "forward passes that may run at once, sharing the threads (default 2)"),
    "--precision": (str, "auto (default: bf16 if the model was tested in bf16 and the CPU has it), fp32, bf16"),
    "--device": (str, "auto (default: the GPU when torch sees one), cpu, cuda"),
}
_CHOICES = {"--on-long-input": ("truncate", "reject"), "--device": ("auto", "cpu", "cuda")}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an exported model over HTTP", description=__doc__.split("\n")[0],
    )
    parser.add_argument("--model", required=True, type=Path, metavar="DIR", help="directory from finetune train")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; pods use 0.0.0.0)")
    parser.add_argument("--port", default=None, type=int, help="TCP port (default 8080)")
    for flag, (kind, text) in _FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(flag), help=text)
    parser.set_defaults(func=_handle)


def settings_from_args(args: argparse.Namespace) -> Any:
    from finetune.server.settings import ServerSettings

    given = {"model_dir": args.model, "host": args.host, "port": args.port}
    given |= {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _FLAGS}
    # Only flags actually given override the environment.
    return ServerSettings(**{key: value for key, value in given.items() if value is not None})


def _handle(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from finetune.cli import UserError
    from finetune.server.serving import ServeError, serve

    try:
        serve(settings_from_args(args))
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    except ServeError as err:
        raise UserError(str(err)) from None
    return 0
