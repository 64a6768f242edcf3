"""``hps operator run``: the kopf operator that turns EmbeddingModels into agents, Redis and a plan."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import re
import signal
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from hps_operator.core.rollout import DEFAULT_SWITCH_GRACE_S

from node_agent.errors import InvalidArgumentError

if TYPE_CHECKING:
    from hps_operator.kopf_handlers.leader import LeaderElector
    from hps_operator.kopf_handlers.registry import OperatorConfig

#: the environment the chart sets; each is the default of the flag beside it
IMAGE_ENV = "HPS_AGENT_IMAGE"
PULL_POLICY_ENV = "HPS_AGENT_IMAGE_PULL_POLICY"
METRICS_PORT_ENV = "HPS_OPERATOR_METRICS_PORT"
METRICS_ADDRESS_ENV = "HPS_OPERATOR_METRICS_ADDRESS"
#: set by the chart from the pod's metadata (the downward API): a leader's identity and Lease namespace
POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
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
                     help=f"serve Prometheus metrics on http://ADDRESS:PORT/metrics (default: ${METRICS_PORT_ENV}; "
                     "unset: no metrics endpoint)")  # fmt: skip
    run.add_argument("--metrics-address", default=os.environ.get(METRICS_ADDRESS_ENV) or "127.0.0.1",
                     metavar="ADDRESS", help=f"the address the metrics endpoint binds (default: ${METRICS_ADDRESS_ENV}, "
                     "else 127.0.0.1; the chart gives the pod's IP)")  # fmt: skip
    run.add_argument("--resync-seconds", type=float, default=60.0, metavar="S",
                     help="how often each model is checked for drift (default 60)")  # fmt: skip
    run.add_argument("--drain-seconds", type=float, default=DEFAULT_SWITCH_GRACE_S, metavar="S",
                     help="how long old shards keep serving after a rebalance switches routing, so clients "
                     f"re-read it (default {DEFAULT_SWITCH_GRACE_S:g})")  # fmt: skip
    pace = run.add_argument_group("the partition autoscaler's pace (spec.autoscaling.partitions)")
    pace.add_argument("--partition-widen-after", type=float, metavar="S",
                      help="seconds the hit rate must stay below the target before widening (default 600)")  # fmt: skip
    pace.add_argument("--partition-narrow-after", type=float, metavar="S",
                      help="seconds it must stay well above before narrowing (default 1800)")  # fmt: skip
    pace.add_argument("--partition-cooldown", type=float, metavar="S",
                      help="seconds after a change before the next decision (default 900)")  # fmt: skip
    pace.add_argument("--partition-min-lookups", type=int, metavar="N",
                      help="keys a sample needs to count (default 10000)")  # fmt: skip
    run.add_argument("--leader-elect", action="store_true",
                     help="run several replicas: only the one holding the Lease reconciles, another takes "
                     "over within --lease-seconds when it dies")  # fmt: skip
    run.add_argument("--leader-election-namespace", default=os.environ.get(POD_NAMESPACE_ENV) or "default",
                     metavar="NS", help=f"namespace of the Lease (default: ${POD_NAMESPACE_ENV}, else default)")
    run.add_argument("--leader-election-id", default="hps-operator", metavar="NAME",
                     help="name of the Lease (default hps-operator)")  # fmt: skip
    run.add_argument("--lease-seconds", type=float, default=10.0, metavar="S",
                     help="how long a silent leader keeps the Lease (default 10; renewed every S/5)")  # fmt: skip
    run.set_defaults(func=run_operator)


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    """What ``hps operator run`` was asked for, as the registry's configuration."""
    from hps_operator.core.reconcile import Options
    from hps_operator.kopf_handlers.registry import OperatorConfig

    tunables = {name: value for name, value in (
        ("widen_after_s", args.partition_widen_after), ("narrow_after_s", args.partition_narrow_after),
        ("cooldown_s", args.partition_cooldown), ("min_lookups", args.partition_min_lookups)) if value is not None}  # fmt: skip
    options = Options(image=args.image, drain_seconds=args.drain_seconds, image_pull_policy=args.image_pull_policy,
                      partition_tunables=tunables)  # fmt: skip
    return OperatorConfig(options, resync_seconds=args.resync_seconds, metrics_port=args.metrics_port,
                          metrics_address=args.metrics_address, user_agent=f"hps-operator ({_identity()})")  # fmt: skip


def _identity() -> str:
    """This replica's name: its pod's (the chart sets ``POD_NAME``), else host and process."""
    return os.environ.get(POD_NAME_ENV) or f"{socket.gethostname()}-{os.getpid()}"


def run_operator(args: argparse.Namespace) -> int:
    """Runs kopf until interrupted; with ``--leader-elect``, only while this process holds the Lease.
    A leader that loses the Lease stops and exits 1, so its pod restarts as a follower."""
    import kopf
    from hps_operator.kopf_handlers.registry import build_registry, configure

    settings = kopf.OperatorSettings()
    configure(settings)
    stop, lost = threading.Event(), threading.Event()
    config = operator_config(args)
    elector = None
    if args.leader_elect:
        elector = _elector(args)
        _stop_on_signals(stop)
        # a follower serves its metrics too (hps_operator_leader 0): every replica behind the metrics
        # Service answers a scrape, and kopf's start-up finds the endpoint already open
        if config.metrics_port is not None:
            config.metrics.serve(config.metrics_port, config.metrics_address)
        config.metrics.leader.set(0)
        with _follower_probe(args.liveness_endpoint):
            leading = elector.wait_for_leadership(stop)
        if not leading:
            config.metrics.stop()
            return 0
        threading.Thread(target=elector.keep_leading, args=(lost, stop), name="leader-lease", daemon=True).start()
    config.metrics.leader.set(1)
    registry = build_registry(config)
    lost_before_stop: list[bool] = []
    if elector is not None:

        @kopf.on.cleanup(registry=registry)
        def release_stop_flag(**_: Any) -> None:
            """kopf waits for its stop flag (``lost``) in a thread of the loop's default executor, which
            the loop joins on closing: stopped by a signal, kopf would wait for it until the kubelet's
            SIGKILL. Raise it on the way out, remembering whether the Lease was lost first."""
            lost_before_stop.append(lost.is_set())
            lost.set()

    try:
        kopf.run(
            registry=registry,
            settings=settings,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness_endpoint,
            # without --standalone kopf peers when its peering CRD exists and runs alone otherwise
            standalone=True if args.standalone else None,
            stop_flag=lost if elector is not None else None,
        )
    finally:
        stop.set()
        was_lost = lost_before_stop[0] if lost_before_stop else lost.is_set()
        if elector is not None and not was_lost:
            elector.release()
    return 1 if was_lost else 0


def _elector(args: argparse.Namespace) -> LeaderElector:
    from hps_operator.kopf_handlers.kube_api import KubeApi
    from hps_operator.kopf_handlers.leader import LeaderElector

    if args.lease_seconds < 2:
        raise InvalidArgumentError(f"--lease-seconds must be at least 2, got {args.lease_seconds:g}")
    identity = _identity()
    return LeaderElector(KubeApi.from_environment(user_agent=f"hps-operator ({identity})"),
                         namespace=args.leader_election_namespace, identity=identity, name=args.leader_election_id, lease_duration_s=args.lease_seconds,
                         renew_every_s=args.lease_seconds / 5)  # fmt: skip


@contextlib.contextmanager
def _follower_probe(liveness_url: str | None) -> Iterator[None]:
    """While a follower waits for the Lease, its liveness endpoint answers 200 (kopf serves it only
    once leading), so the kubelet does not restart a healthy follower."""
    if not liveness_url:
        yield
        return
    parts = urllib.parse.urlsplit(liveness_url)

    class Probe(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == (parts.path or "/") else 404)
            self.end_headers()
            self.wfile.write(b"following: waiting for the leader Lease\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), Probe)
    thread = threading.Thread(target=server.serve_forever, name="follower-probe", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()  # kopf binds the same port once leading


def _stop_on_signals(stop: threading.Event) -> None:
    """While a follower waits, SIGTERM/SIGINT end the wait (kopf installs its own once it runs)."""

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
