"""``hps operator run``: the kopf operator that turns EmbeddingModels into agents, Redis and a plan."""

from __future__ import annotations

import argparse
import os
import re
from typing import TYPE_CHECKING

from hps_operator.core.rollout import DEFAULT_SWITCH_GRACE_S

if TYPE_CHECKING:
    from hps_operator.kopf_handlers.registry import OperatorConfig

#: the environment the chart sets; each is the default of the flag beside it
IMAGE_ENV = "HPS_AGENT_IMAGE"
PULL_POLICY_ENV = "HPS_AGENT_IMAGE_PULL_POLICY"
METRICS_PORT_ENV = "HPS_OPERATOR_METRICS_PORT"
DEFAULT_IMAGE = "ghcr.io/hps-operator/hps:latest"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _namespace(text: str) -> str:
    # kopf's namespace scanning is off (least privilege), so a glob would silently match nothing
    if len(text) > 63 or not _DNS_LABEL.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a namespace name (a DNS-1123 label; no globs)")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    return int(text)


def _pull_policy(text: str) -> str:
    if text not in PULL_POLICIES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(PULL_POLICIES)}")
    return text


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
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS", type=_namespace,
                       help="serve this namespace (repeatable; exact names)")  # fmt: skip
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="serve every namespace (the default)"
    )
    run.add_argument("--liveness-endpoint", "--liveness", metavar="URL",
                     help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")  # fmt: skip
    run.add_argument("--standalone", action="store_true",
                     help="no peering with other operator instances (run exactly one replica)")  # fmt: skip
    run.add_argument("--image", default=os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE,
                     help=f"agent image for models without spec.agent.image (default: ${IMAGE_ENV} or "
                     f"{DEFAULT_IMAGE})")  # fmt: skip
    run.add_argument("--image-pull-policy", type=_pull_policy, default=os.environ.get(PULL_POLICY_ENV) or None,
                     metavar="POLICY", help=f"imagePullPolicy of agent and loader containers: "
                     f"{', '.join(PULL_POLICIES)} (default: ${PULL_POLICY_ENV}, else Kubernetes' default)")  # fmt: skip
    run.add_argument("--metrics-port", type=_port, default=os.environ.get(METRICS_PORT_ENV) or None, metavar="PORT",
                     help=f"serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: ${METRICS_PORT_ENV}; "
                     "unset: no metrics endpoint)")  # fmt: skip
    run.add_argument("--resync-seconds", type=float, default=60.0, metavar="S",
                     help="how often each model is checked for drift (default 60)")  # fmt: skip
    run.add_argument("--drain-seconds", type=float, default=DEFAULT_SWITCH_GRACE_S, metavar="S",
                     help="how long old shards keep serving after a rebalance switches routing, so clients "
                     f"re-read it (default {DEFAULT_SWITCH_GRACE_S:g})")  # fmt: skip
    run.set_defaults(func=run_operator)


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    """What ``hps operator run`` was asked for, as the registry's configuration."""
    from hps_operator.core.reconcile import Options
    from hps_operator.kopf_handlers.registry import OperatorConfig

    options = Options(
        image=args.image, drain_seconds=args.drain_seconds, image_pull_policy=args.image_pull_policy
    )
    return OperatorConfig(options, resync_seconds=args.resync_seconds, metrics_port=args.metrics_port)


def run_operator(args: argparse.Namespace) -> int:
    import kopf
    from hps_operator.kopf_handlers.registry import build_registry, configure

    settings = kopf.OperatorSettings()
    configure(settings)
    kopf.run(
        registry=build_registry(operator_config(args)),
        settings=settings,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness_endpoint,
        # without --standalone kopf peers when its peering CRD exists and runs alone otherwise
        standalone=True if args.standalone else None,
    )
    return 0
