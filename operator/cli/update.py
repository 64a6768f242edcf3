"""``hps update``: overwrites some rows of a table, through the model's update stream or one agent."""

from __future__ import annotations

import argparse
from typing import Any

from hps_operator.cli.security_flags import (
    TOKEN_HINT,
    add_client_arguments,
    add_redis_arguments,
    client_security,
    endpoints_of,
    redis_access,
)


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "update",
        help="overwrite embedding rows (online update)",
        description="With --redis: publishes to the model's Redis Stream, which every agent applies "
        "(with --endpoint or --state-dir too, the table, the dim and the values' range are checked first, "
        "and with --endpoint the stream name is asked of the agent; with neither, an agent rejects a bad "
        "entry and counts it in its stats). "
        "With --endpoint alone: the Update RPC of that agent, which needs a credential (--token-file, "
        "--token-env, or --state-dir for a stack started with hps local up).",
    )
    p.add_argument("--endpoint", help="agent HOST:PORT (several: comma-separated; default with --state-dir and "
                   "no --redis: the stack's agents)")  # fmt: skip
    p.add_argument("--redis", help="Redis HOST:PORT[,...] holding the model's update stream (rediss://... for TLS)")
    p.add_argument("--redis-cluster", action="store_true")
    add_redis_arguments(p)
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
    add_client_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from hps_operator.cli.lookup import parse_keys_argument

    from node_agent.errors import InvalidArgumentError, UnauthenticatedError
    from node_agent.wire import as_vectors

    endpoint = args.endpoint or (endpoints_of(args) if not args.redis else None)
    if not endpoint and not args.redis:
        raise InvalidArgumentError("give --endpoint (Update RPC) or --redis (update stream), or both "
                                   "(or --state-dir DIR of a stack started with hps local up)")  # fmt: skip
    if args.wait_replicas and not (args.redis and (args.stream or not endpoint)):
        raise InvalidArgumentError("--wait-replicas needs --redis (and --stream when --endpoint is given too)")
    addresses, access = redis_access(args, local_role="producer")
    keys = parse_keys_argument(args.keys)
    try:
        vectors = as_vectors(np.load(args.vectors_file, allow_pickle=False), rows=int(keys.size))
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"--vectors-file {args.vectors_file}: {exc}") from None
    to_stream = bool(addresses) and (args.stream or not endpoint)
    security = {} if to_stream else client_security(args)
    try:
        return _send(args, endpoint, keys, vectors, addresses, access, security)
    except UnauthenticatedError as exc:
        if str(exc).startswith("Redis at"):  # Redis refused the user (the agents' refusals name the RPC)
            given = "the password in $" + args.redis_password_env if args.redis_password_env else "no password"
            raise UnauthenticatedError(
                f"{exc} ({given}): pass --redis-user NAME and --redis-password-env VAR, VAR an environment variable "
                "holding the password (a stack started with hps local: --state-dir DIR gives its producer's)"
            ) from None
        if "token" in security or "token_file" in security:
            raise
        raise UnauthenticatedError(f"{exc}; {TOKEN_HINT}") from None


def _send(args: argparse.Namespace, endpoint: str | None, keys: Any, vectors: Any, addresses: list[str],
          access: Any, security: dict[str, Any]) -> int:  # fmt: skip
    if addresses and (args.stream or not endpoint):
        # straight to the stream; a stack given by --state-dir is asked first whether its agents would
        # take it (without one nothing is checked here: an agent rejects a bad entry and counts it)
        from node_agent.updates import UpdatePublisher

        checker = endpoint or endpoints_of(args)
        if checker:
            from node_agent.client import Client

            with Client(checker, timeout=args.timeout, **client_security(args)) as client:
                vectors = client.checked_vectors(args.model, args.table, vectors)

        with UpdatePublisher(addresses, access=access, cluster=args.redis_cluster, stream=args.stream,
                             model=args.model) as publisher:  # fmt: skip
            entry = publisher.publish(args.table, keys, vectors, wait_replicas=args.wait_replicas,
                                      wait_timeout_ms=args.wait_timeout_ms)  # fmt: skip
        held = f", held by {args.wait_replicas} replica(s)" if args.wait_replicas else ""
        print(f"published {keys.size} rows of {args.model}/{args.table} to {publisher.stream} as {entry}{held}")
        return 0
    from node_agent.client import Client

    assert endpoint is not None
    with Client(endpoint, timeout=args.timeout, redis=addresses or None, redis_access=access,
                redis_cluster=args.redis_cluster, **security) as client:  # fmt: skip
        rows = client.update(args.model, args.table, keys, vectors)
    how = "published to the model's update stream" if addresses else f"applied by {endpoint}"
    print(f"{rows} rows of {args.model}/{args.table} {how}")
    return 0
