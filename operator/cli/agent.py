"""``hps agent``: runs a node agent (what agent pods run) until SIGTERM."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run a node agent: serve one model's embeddings over gRPC",
        description="Builds the tiers and the lookup path of one model, serves them over gRPC "
        "(hps.v1, health, reflection), applies online updates, and stops cleanly on SIGTERM.",
    )
    p.add_argument("-f", "--filename", required=True, type=Path, help="EmbeddingModel YAML file")
    p.add_argument("--plan", type=Path, help="placement plan JSON (default: every table whole)")
    p.add_argument("--partition", type=int, default=0, help="model-parallel partition this agent serves")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    p.add_argument("--redis", help="L2 Redis as HOST:PORT[,HOST:PORT...] (default: in-process hash map)")
    p.add_argument("--redis-cluster", action="store_true", help="the --redis addresses are a Redis Cluster")
    p.add_argument("--redis-password-env", metavar="VAR", help="environment variable holding the Redis password")
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
                   "shared memory (node_agent.same_node.SameNodeClient)")
    p.add_argument("--drain-seconds", type=float, default=0.0, metavar="S",
                   help="on SIGTERM, answer health checks NOT_SERVING but keep serving lookups for S seconds "
                   "first, so the pod leaves routing before it stops (default 0)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from node_agent.agent import AgentOptions, run_agent
    from node_agent.errors import InvalidArgumentError

    password = None
    if args.redis_password_env:
        password = os.environ.get(args.redis_password_env)
        if password is None:
            raise InvalidArgumentError(f"--redis-password-env: environment variable {args.redis_password_env} is not set")
    options = AgentOptions(
        model_file=args.filename,
        plan_file=args.plan,
        partition=args.partition,
        host=args.host,
        port=args.port,
        redis=tuple(a.strip() for a in (args.redis or "").split(",") if a.strip()),
        redis_cluster=args.redis_cluster,
        redis_password=password,
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
    )
    return run_agent(options)
