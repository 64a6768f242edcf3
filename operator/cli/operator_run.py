"""``hps operator run``: the kopf operator that turns EmbeddingModels into agents, Redis and a plan."""

from __future__ import annotations

import argparse
import os

DEFAULT_IMAGE_ENV = "HPS_AGENT_IMAGE"
DEFAULT_IMAGE = "ghcr.io/hps-operator/hps:latest"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("operator", help="the Kubernetes operator (kopf)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser(
        "run",
        help="watch EmbeddingModels and reconcile their children",
        description="Runs the operator until interrupted. Credentials: the pod's service account in a "
        "cluster, otherwise $KUBECONFIG or ~/.kube/config.",
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve this namespace (repeatable; globs such as 'ml-*' allowed)")  # fmt: skip
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (the default)")
    run.add_argument("--liveness-endpoint", "--liveness", metavar="URL",
                     help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")  # fmt: skip
    run.add_argument("--standalone", action="store_true",
                     help="no peering with other operator instances (run exactly one replica)")  # fmt: skip
    run.add_argument("--image", default=os.environ.get(DEFAULT_IMAGE_ENV, DEFAULT_IMAGE),
                     help=f"agent image for models without spec.agent.image (default: ${DEFAULT_IMAGE_ENV} or "
                     f"{DEFAULT_IMAGE})")  # fmt: skip
    run.add_argument("--resync-seconds", type=float, default=60.0, metavar="S",
                     help="how often each model is checked for drift (default 60)")  # fmt: skip
    run.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                     help="how long old shards keep serving after a rebalance switches routing (default 30)")  # fmt: skip
    run.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace) -> int:
    import kopf
    from hps_operator.core.reconcile import Options
    from hps_operator.kopf_handlers.registry import OperatorConfig, build_registry, configure

    config = OperatorConfig(Options(image=args.image, drain_seconds=args.drain_seconds),
                            resync_seconds=args.resync_seconds)  # fmt: skip
    settings = kopf.OperatorSettings()
    configure(settings)
    kopf.run(
        registry=build_registry(config),
        settings=settings,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness_endpoint,
        # without --standalone kopf peers when its peering CRD exists and runs alone otherwise
        standalone=True if args.standalone else None,
    )
    return 0
