"""``hps update``: overwrites some rows of a table, through the model's update stream or one agent."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "update",
        help="overwrite embedding rows (online update)",
        description="With --redis: publishes to the model's Redis Stream, which every agent applies "
        "(with --endpoint too, the table and dim are checked and the stream name asked of the agent). "
        "With --endpoint alone: the Update RPC of that agent.",
    )
    p.add_argument("--endpoint", help="agent HOST:PORT (several: comma-separated)")
    p.add_argument("--redis", help="Redis HOST:PORT[,...] holding the model's update stream")
    p.add_argument("--redis-cluster", action="store_true")
    p.add_argument("--redis-password-env", metavar="VAR", help="environment variable holding the Redis password")
    p.add_argument("--stream", help="stream name (default: hps:{MODEL}:updates, or what the agent reports)")
    p.add_argument("--model", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--keys", required=True, help="comma-separated integer keys")
    p.add_argument("--vectors-file", required=True, help=".npy file of shape (len(keys), dim)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                   help="with --redis: fail unless N Redis replicas hold the entry (Redis WAIT)")
    p.add_argument("--wait-timeout-ms", type=int, default=1000, metavar="MS",
                   help="how long --wait-replicas waits (default: 1000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from hps_operator.cli.lookup import parse_keys_argument

    from node_agent.errors import InvalidArgumentError, UnauthenticatedError
    from node_agent.wire import as_vectors

    if not args.endpoint and not args.redis:
        raise InvalidArgumentError("give --endpoint (Update RPC) or --redis (update stream), or both")
    if args.wait_replicas and not (args.redis and (args.stream or not args.endpoint)):
        raise InvalidArgumentError("--wait-replicas needs --redis (and --stream when --endpoint is given too)")
    password = None
    if args.redis_password_env:
        password = os.environ.get(args.redis_password_env)
        if password is None:
            raise InvalidArgumentError(f"--redis-password-env: environment variable {args.redis_password_env} is not set")
    keys = parse_keys_argument(args.keys)
    try:
        vectors = as_vectors(np.load(args.vectors_file, allow_pickle=False), rows=int(keys.size))
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"--vectors-file {args.vectors_file}: {exc}") from None
    try:
        return _send(args, keys, vectors, password)
    except UnauthenticatedError as exc:
        given = f"the password in ${args.redis_password_env}" if args.redis_password_env else "no password"
        raise UnauthenticatedError(
            f"{exc} ({given}): pass --redis-password-env VAR, VAR an environment variable holding the password "
            "(a stack started with hps local keeps it in STATE_DIR/redis.password)"
        ) from None


def _send(args: argparse.Namespace, keys: Any, vectors: Any, password: str | None) -> int:
    if args.redis and (args.stream or not args.endpoint):
        # straight to the stream: nothing to ask an agent
        from node_agent.updates import UpdatePublisher

        with UpdatePublisher(args.redis, password=password, cluster=args.redis_cluster, stream=args.stream,
                             model=args.model) as publisher:  # fmt: skip
            entry = publisher.publish(args.table, keys, vectors, wait_replicas=args.wait_replicas,
                                      wait_timeout_ms=args.wait_timeout_ms)  # fmt: skip
        held = f", held by {args.wait_replicas} replica(s)" if args.wait_replicas else ""
        print(f"published {keys.size} rows of {args.model}/{args.table} to {publisher.stream} as {entry}{held}")
        return 0
    from node_agent.client import Client

    with Client(args.endpoint, timeout=args.timeout, redis=args.redis, redis_password=password,
                redis_cluster=args.redis_cluster) as client:  # fmt: skip
        rows = client.update(args.model, args.table, keys, vectors)
    how = "published to the model's update stream" if args.redis else f"applied by {args.endpoint}"
    print(f"{rows} rows of {args.model}/{args.table} {how}")
    return 0
