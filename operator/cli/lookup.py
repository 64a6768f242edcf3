"""``hps lookup``: prints the vectors of some keys, asked of a running node agent."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hps_operator.cli.security_flags import TOKEN_HINT, add_client_arguments, client_security, endpoints_of


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "lookup", help="look up embedding vectors", description="Asks a node agent for the vectors of some keys."
    )
    p.add_argument("--endpoint", help="agent HOST:PORT (several: comma-separated; default: the agents of the "
                   "stack in --state-dir)")  # fmt: skip
    p.add_argument("--model", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--keys", required=True, help="comma-separated integer keys, e.g. 1,2,3")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    add_client_arguments(p)
    p.set_defaults(func=run)


def parse_keys_argument(text: str) -> Any:
    """``--keys 1,2,3`` as int64 keys, or an error naming the part that is not an integer."""
    from node_agent.errors import InvalidArgumentError
    from node_agent.wire import parse_keys_text

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InvalidArgumentError("--keys is empty: give comma-separated integer keys, e.g. --keys 1,2,3")
    for part in parts:
        try:
            int(part, 0)
        except ValueError:
            raise InvalidArgumentError(f"--keys: {part!r} is not an integer; give comma-separated integer keys, "
                                       "e.g. --keys 1,2,3") from None  # fmt: skip
    return parse_keys_text(text)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from node_agent.client import Client
    from node_agent.errors import InvalidArgumentError, UnauthenticatedError

    keys = parse_keys_argument(args.keys)
    endpoint = endpoints_of(args)
    if endpoint is None:
        raise InvalidArgumentError("give --endpoint HOST:PORT (or --state-dir DIR of a stack started with "
                                   "hps local up)")  # fmt: skip
    security = client_security(args)
    try:
        with Client(endpoint, timeout=args.timeout, **security) as client:
            vectors = client.lookup(args.model, args.table, keys)
    except UnauthenticatedError as exc:
        if "token" in security or "token_file" in security:
            raise
        raise UnauthenticatedError(f"{exc}; these agents restrict reads: {TOKEN_HINT}") from None
    if args.output == "json":
        out = {"model": args.model, "table": args.table, "keys": keys.tolist(),
               "vectors": vectors.astype(np.float64).tolist()}  # fmt: skip
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(format_vectors(keys.tolist(), vectors))
    return 0


def format_vectors(keys: list[int], vectors: Any, *, max_columns: int = 8) -> str:
    """A readable table: one row per key; wide vectors show their first and last columns."""
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    if dim <= max_columns:
        columns = list(range(dim))
    else:
        half = max_columns // 2
        columns = [*range(half), -1, *range(dim - half, dim)]
    header = ["KEY"] + [("..." if c < 0 else f"[{c}]") for c in columns]
    rows = [header]
    for key, row in zip(keys, vectors, strict=True):
        rows.append([str(key)] + [("..." if c < 0 else f"{float(row[c]):.6g}") for c in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines) + f"\n({len(keys)} keys, dim {dim}, {vectors.dtype})\n"
