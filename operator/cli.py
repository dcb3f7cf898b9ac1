"""`finetune operator`: run the FineTuneJob operator (kopf).

    finetune operator                         # all namespaces, cluster from KUBECONFIG or in-cluster
    finetune operator -n team-a -n team-b     # only these namespaces
    finetune operator --metrics-port 8080 --health-port 8081 --image ghcr.io/finetune-dev/finetune:0.1.0

It finds the cluster like kubectl: the pod's ServiceAccount when running in a cluster, else
$KUBECONFIG / ~/.kube/config and its current context.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from finetune.operator.objects import DEFAULT_IMAGE


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the FineTuneJob operator (kopf)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable); default: all"
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of GET /metrics (0: none)")
    parser.add_argument("--health-port", type=int, default=8081, help="port of kopf's GET /healthz (0: none)")
    parser.add_argument(
        "--image",
        default=os.environ.get("FINETUNE_IMAGE") or DEFAULT_IMAGE,
        help="trainer and server image when a FineTuneJob names none (env FINETUNE_IMAGE)",
    )
    parser.add_argument(
        "--standalone", action="store_true", help="skip kopf peering (run exactly one operator replica)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    import finetune.operator.main  # noqa: F401  (registers the handlers)
    from finetune.operator.config import OperatorConfig

    config = OperatorConfig(image=args.image, metrics_port=args.metrics_port or None)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        memo=kopf.Memo(config=config),
    )
    return 0
