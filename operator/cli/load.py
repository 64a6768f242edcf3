"""``hps load``: loads a model's tables from their sources into Redis and/or RocksDB (what the loader Job runs)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from hps_operator.cli.security_flags import add_redis_arguments, redis_access

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "load",
        help="load a model's tables from their sources into Redis and/or RocksDB",
        description="Checks every table source against the model first (nothing is written if one is "
        "bad), then streams the tables into the stores given, in chunks, resumable with --checkpoint-dir.",
    )
    parser.add_argument(
        "-f",
        "--file",
        required=True,
        type=Path,
        metavar="MODEL.yaml",
        help="EmbeddingModel file; relative table sources resolve against its folder",
    )
    parser.add_argument(
        "--table",
        action="append",
        metavar="T",
        dest="tables",
        help="load only this table (repeatable); default: every table with a source",
    )
    parser.add_argument(
        "--redis",
        metavar="HOST:PORT[,HOST:PORT]",
        help="Redis address(es): several standalone servers are sharded client-side (rediss://... for TLS)",
    )
    parser.add_argument(
        "--redis-cluster", action="store_true", help="the --redis address is a Redis Cluster node"
    )
    add_redis_arguments(parser)
    parser.add_argument(
        "--redis-partitions",
        type=int,
        default=64,
        metavar="N",
        help="HASHes per table in Redis; must match the agents' (default 64)",
    )
    parser.add_argument("--rocksdb", type=Path, metavar="DIR", help="RocksDB directory (the persistent tier)")
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help="record progress here and resume an interrupted load from it",
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=65536, metavar="N", help="rows per write (default 65536)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only open and check the sources against the model; write nothing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true",
                        help="load every table again, even one Redis records as loaded from this very source "
                        "(that writes the source's rows over online updates applied since)")  # fmt: skip
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from node_agent.errors import InvalidArgumentError
    from node_agent.loader import load_model, open_source, select_tables
    from node_agent.spec import load_model_file
    from node_agent.tiers import TableLayout, open_tiers

    model = load_model_file(args.file)
    base_dir = args.file.resolve().parent
    if args.check:
        checked = [open_source(t, base_dir=base_dir) for t in select_tables(model, args.tables)]
        rows = [
            {"table": s.table, "format": s.format, "source": str(s.path), "rows": s.rows} for s in checked
        ]
        _print(rows, args.output, ("table", "format", "rows", "source"))
        return 0

    if not args.redis and args.rocksdb is None:
        raise InvalidArgumentError(
            "nothing to load into: give --redis HOST:PORT and/or --rocksdb DIR (or --check)"
        )
    addresses, access = redis_access(args)
    tiers = open_tiers(
        [TableLayout.of(t) for t in model.tables],
        model=model.name,
        redis_addresses=addresses,
        redis_access=access,
        redis_cluster=args.redis_cluster,
        redis_partitions=args.redis_partitions,
        rocksdb_path=args.rocksdb,
    )
    tables = [t.name for t in select_tables(model, args.tables)]
    marks = _LoadedMarks(model.name, addresses, access=access, cluster=args.redis_cluster) if addresses else None
    if marks is not None and not args.force:
        # A re-run (a loader Job renamed by a spec change, a retried command) must not write the
        # source's rows over online updates applied since: tables loaded from this very source stay.
        fingerprints = {t: open_source(model.table(t), base_dir=base_dir).fingerprint(model.table(t)) for t in tables}
        kept = marks.matching(fingerprints)
        for name in kept:
            log.info("table %r is already loaded from this source (online updates since are kept); "
                     "--force loads it again", name)  # fmt: skip
        tables = [t for t in tables if t not in kept]
    try:
        reports = load_model(
            model, tiers=tiers, base_dir=base_dir, tables=tables, chunk_rows=args.chunk_rows,
            progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
        ) if tables else []  # fmt: skip
    finally:
        for tier in tiers:
            tier.close()
    if marks is not None and reports:
        marks.record({r.table: open_source(model.table(r.table), base_dir=base_dir).fingerprint(model.table(r.table))
                      for r in reports})  # fmt: skip
        _mark_new_generation(model.name, addresses, access=access, cluster=args.redis_cluster)
    rows = [
        {
            **r.to_dict(),
            "MB": round(r.bytes / 2**20, 1),
            "seconds": round(r.seconds, 2),
            "rows_per_s": round(r.rows_per_s),
        }
        for r in reports
    ]
    _print(rows, args.output, ("table", "format", "rows", "MB", "seconds", "rows_per_s", "resumed_from"))
    return 0


class _LoadedMarks:
    """Which source each table of the model was loaded from, kept in every Redis shard loaded (so a
    shard that comes back empty has no mark, and its tables load again)."""

    def __init__(self, model: str, addresses: list[str], *, access: Any, cluster: bool) -> None:
        from node_agent.tiers.health import loaded_key, redis_clients

        self._key = loaded_key(model)
        self._clients = [c for _, c in redis_clients(addresses, access=access, cluster=cluster, timeout=5.0)]

    def matching(self, fingerprints: dict[str, str]) -> set[str]:
        """The tables every shard records as loaded from the given fingerprint."""
        kept = set(fingerprints)
        for client in self._clients:
            held = client.hgetall(self._key)
            recorded = {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
                        for k, v in held.items()}  # fmt: skip
            kept &= {t for t, f in fingerprints.items() if recorded.get(t) == f}
        return kept

    def record(self, fingerprints: dict[str, str]) -> None:
        for client in self._clients:
            client.hset(self._key, mapping=dict(fingerprints))  # type: ignore[arg-type]


def _mark_new_generation(model: str, addresses: list[str], *, access: Any, cluster: bool) -> None:
    """A new epoch on every Redis loaded: running agents drop their L1 (it holds rows from before the
    load), and any agent can later tell a Redis that came back without this data."""
    from node_agent.tiers.health import redis_clients, write_epoch

    for _, client in redis_clients(addresses, access=access, cluster=cluster, timeout=5.0):
        try:
            write_epoch(client, model)
        finally:
            client.close()


def _print(rows: list[dict[str, Any]], output: str, columns: tuple[str, ...]) -> None:
    if output == "json":
        print(json.dumps(rows, indent=2, sort_keys=True))
        return
    cells = [[str(c).upper() for c in columns]] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
