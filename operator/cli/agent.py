"""``hps agent``: runs a node agent (what agent pods run) until SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hps_operator.cli.security_flags import add_redis_arguments, port_number, redis_access, secret_from_env


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run a node agent: serve one model's embeddings over gRPC",
        description="Builds the tiers and the lookup path of one model, serves them over gRPC "
        "(hps.v1 and health; reflection with --reflection), applies online updates, and stops cleanly on "
        "SIGTERM. Update RPCs need a credential: give the agent a way to check one (--auth-token-file, "
        "--auth-token-env, --auth-tokenreview), or every Update is refused.",
    )
    p.add_argument("-f", "--filename", required=True, type=Path, help="EmbeddingModel YAML file")
    p.add_argument("--plan", type=Path, help="placement plan JSON (default: every table whole)")
    p.add_argument("--partition", type=int, default=0, help="model-parallel partition this agent serves")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=port_number, default=50051, help="gRPC port (0 picks a free one)")
    p.add_argument("--redis", help="L2 Redis as HOST:PORT[,HOST:PORT...] (rediss://... for TLS; default: "
                   "in-process hash map)")  # fmt: skip
    p.add_argument("--redis-cluster", action="store_true", help="the --redis addresses are a Redis Cluster")
    add_redis_arguments(p)
    p.add_argument("--rocksdb", type=Path, help="L3 RocksDB directory (default: no persistent tier)")
    p.add_argument("--rocksdb-read-only", action="store_true", help="open RocksDB read-only")
    p.add_argument("--rocksdb-shared", action="store_true",
                   help="the RocksDB directory is shared with other agents on this machine: the agent holding "
                   "its lock writes it (and the shared Redis), the others read it and take over when it stops")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the L1 cache lives")
    p.add_argument("--ready-file", type=Path, help="write this JSON file (with the bound port) once serving")
    p.add_argument("--load", action="store_true", help="load the tables from their sources before serving")
    p.add_argument("--agent-id", help="stable identity: names this agent's consumer group on the update stream")
    p.add_argument("--max-batch-keys", type=int, help="keys per request (default: spec.agent.maxBatchKeys)")
    p.add_argument("--workers", type=int, default=4, help="gRPC worker threads")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on /metrics at this port (0 picks a free one; default: none)")
    p.add_argument("--same-node-socket", type=Path, metavar="PATH",
                   help="also serve lookups to clients on this node on this Unix socket, vectors through "
                   "shared memory (node_agent.same_node.SameNodeClient); who may open the socket may read")  # fmt: skip
    p.add_argument("--reflection", action="store_true",
                   help="serve gRPC server reflection (it lists the services to anyone who asks; off by default)")

    tls = p.add_argument_group("TLS (gRPC)")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="serve gRPC over TLS with this PEM certificate chain (a mounted Secret's tls.crt); "
                     "read again when it changes, so a rotated certificate needs no restart")  # fmt: skip
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="the key of --tls-cert (tls.key)")
    tls.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                     help="require client certificates signed by this CA (mutual TLS; a Secret's ca.crt)")  # fmt: skip

    auth = p.add_argument_group("credentials (who may call Update, and reads with --auth-reads)")
    auth.add_argument("--auth-token-file", type=Path, metavar="FILE",
                      help="accept 'authorization: Bearer <token>' with the token in FILE (read again when it "
                      "changes); its holders may write and read")  # fmt: skip
    auth.add_argument("--auth-token-env", metavar="VAR", help="the same, the token in environment variable VAR")
    auth.add_argument("--auth-tokenreview", action="store_true",
                      help="verify Kubernetes service-account tokens with the API server's TokenReview API (the "
                      "agent's service account needs create on tokenreviews: ClusterRole system:auth-delegator)")  # fmt: skip
    auth.add_argument("--auth-audience", action="append", default=[], metavar="AUD",
                      help="with --auth-tokenreview: a token must be for this audience (repeatable; default: "
                      "the API server's own)")  # fmt: skip
    auth.add_argument("--auth-writers", default="", metavar="LIST",
                      help="who may call Update with a Kubernetes token: comma-separated usernames "
                      "(system:serviceaccount:NAMESPACE:NAME) and group:NAME (default: nobody)")  # fmt: skip
    auth.add_argument("--auth-reads", action="store_true",
                      help="Lookup, Describe and Stats need a credential too (default: anyone may read)")
    auth.add_argument("--auth-readers", default="", metavar="LIST",
                      help="with --auth-reads: who may read besides the writers (as --auth-writers)")  # fmt: skip
    auth.add_argument("--auth-kube-api", metavar="URL",
                      help="the API server TokenReview asks (default: https://$KUBERNETES_SERVICE_HOST:"
                      "$KUBERNETES_SERVICE_PORT)")  # fmt: skip
    auth.add_argument("--auth-kube-token-file", type=Path, metavar="FILE",
                      help="the agent's own service-account token (default: the pod's mounted one)")  # fmt: skip
    auth.add_argument("--auth-kube-ca", type=Path, metavar="FILE",
                      help="the CA of the API server (default: the pod's mounted ca.crt)")  # fmt: skip
    auth.add_argument("--no-auth", action="store_true",
                      help="INSECURE: anyone who reaches the port may call Update (a test bench only)")  # fmt: skip
    p.add_argument("--drain-seconds", type=float, default=0.0, metavar="S",
                   help="on SIGTERM, answer health checks NOT_SERVING but keep serving lookups for S seconds "
                   "first, so the pod leaves routing before it stops (default 0)")  # fmt: skip
    p.set_defaults(func=run)


def auth_options(args: argparse.Namespace) -> Any:
    """The ``--auth-*`` flags as :class:`~node_agent.auth.AuthOptions`."""
    from node_agent.auth import AuthOptions, KubernetesAPI, Principals
    from node_agent.errors import InvalidArgumentError

    if args.auth_readers and not args.auth_reads:
        raise InvalidArgumentError("--auth-readers needs --auth-reads (without it anyone may read)")
    kube_flags = (args.auth_kube_api, args.auth_kube_token_file, args.auth_kube_ca)
    if any(kube_flags) and not args.auth_tokenreview:
        raise InvalidArgumentError("--auth-kube-api, --auth-kube-token-file and --auth-kube-ca need --auth-tokenreview")
    api = (KubernetesAPI.in_cluster(url=args.auth_kube_api, token_file=args.auth_kube_token_file,
                                    ca_file=args.auth_kube_ca) if args.auth_tokenreview else None)  # fmt: skip
    return AuthOptions(
        token=secret_from_env("--auth-token-env", args.auth_token_env),
        token_file=args.auth_token_file,
        tokenreview=api,
        audiences=tuple(args.auth_audience),
        writers=Principals.parse(args.auth_writers, flag="--auth-writers"),
        readers=Principals.parse(args.auth_readers, flag="--auth-readers") if args.auth_reads else None,
        no_auth=args.no_auth,
    )


def run(args: argparse.Namespace) -> int:
    from node_agent.agent import AgentOptions, run_agent
    from node_agent.errors import InvalidArgumentError
    from node_agent.tls import ServerTLS

    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidArgumentError("--tls-cert needs --tls-key, and --tls-key needs --tls-cert")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert is not None else None
    addresses, access = redis_access(args)
    options = AgentOptions(
        model_file=args.filename,
        plan_file=args.plan,
        partition=args.partition,
        host=args.host,
        port=args.port,
        redis=tuple(addresses),
        redis_cluster=args.redis_cluster,
        redis_access=access,
        rocksdb=args.rocksdb,
        rocksdb_read_only=args.rocksdb_read_only,
        rocksdb_shared=args.rocksdb_shared,
        device=args.device,
        ready_file=args.ready_file,
        load=args.load,
        agent_id=args.agent_id,
        max_workers=args.workers,
        max_batch_keys=args.max_batch_keys,
        metrics_port=args.metrics_port,
        same_node_socket=args.same_node_socket,
        drain_s=args.drain_seconds,
        tls=tls,
        auth=auth_options(args),
        reflection=args.reflection,
    )
    return run_agent(options)
