"""Loading speed of each storage tier: rows/s of loading a table (default 1M rows x dim 64, float32) from a
``.npy`` source into a local redis-server, RocksDB and the in-process hash map, plus a random fetch.

Prints a table and writes ``bench/results/load.json``. Run: ``python bench/load.py [--rows N] [--dim D]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from node_agent.loader import load_table
from node_agent.local.redis_servers import start_redis
from node_agent.spec import TableSpec
from node_agent.tiers import HashMapTier, RedisTier, RocksDBTier, TableLayout, Tier

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"


def measure(name: str, make: Callable[[list[TableLayout]], Tier], table: TableSpec, *, chunk_rows: int,
            fetch_keys: int, seed: int) -> dict[str, Any]:  # fmt: skip
    tier = make([TableLayout.of(table)])
    try:
        report = load_table(table, tiers=[tier], chunk_rows=chunk_rows)
        keys = np.random.default_rng(seed).choice(table.rows, size=fetch_keys, replace=False).astype(np.int64)
        started = time.perf_counter()
        _, found = tier.fetch(table.name, keys)
        fetch_s = time.perf_counter() - started
        assert found.all(), f"{name}: loaded rows missing"
        return {
            "tier": name,
            "rows": report.rows,
            "dim": table.dim,
            "dtype": table.dtype,
            "seconds": round(report.seconds, 3),
            "rows_per_s": round(report.rows_per_s),
            "MB_per_s": round(report.bytes / report.seconds / 2**20, 1),
            "fetch_keys": fetch_keys,
            "fetch_rows_per_s": round(fetch_keys / fetch_s),
        }
    finally:
        tier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--fetch-keys", type=int, default=65536)
    parser.add_argument("--tiers", default="redis,rocksdb,hashmap")
    parser.add_argument("--redis-shards", default="1,2",
                        help="shard counts to load Redis with (standalone servers sharded by the client); one "
                             "redis-server is single-threaded, so loading scales with shards")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hps-bench-load-") as tmp:
        work = Path(tmp)
        vectors = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
        np.save(work / "vectors.npy", vectors)
        del vectors
        table = TableSpec("bench", rows=args.rows, dim=args.dim, source=str(work / "vectors.npy"))
        makers: dict[str, Callable[[list[TableLayout]], Tier]] = {
            "hashmap": HashMapTier,
            "rocksdb": lambda layouts: RocksDBTier(work / "rocksdb", layouts),
        }
        results = []
        for name in args.tiers.split(","):
            if name != "redis":
                results.append(measure(name, makers[name], table, chunk_rows=args.chunk_rows,
                                       fetch_keys=min(args.fetch_keys, args.rows), seed=1))  # fmt: skip
                continue
            for shards in (int(n) for n in args.redis_shards.split(",")):
                servers = [start_redis(work / f"redis-{shards}-{i}") for i in range(shards)]
                try:
                    addresses = [s.address for s in servers]
                    result = measure(f"redis x{shards}", lambda layouts, a=addresses: RedisTier(  # type: ignore[misc]
                        layouts, addresses=a, model="bench"), table, chunk_rows=args.chunk_rows,
                        fetch_keys=min(args.fetch_keys, args.rows), seed=1)  # fmt: skip
                    results.append(result)
                finally:
                    for server in servers:
                        server.stop(hard=True)

    columns = ("tier", "rows", "dim", "seconds", "rows_per_s", "MB_per_s", "fetch_rows_per_s")
    print("  ".join(f"{c:>16}" for c in columns))
    for r in results:
        print("  ".join(f"{r[c]!s:>16}" for c in columns))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    args.output.write_text(
        json.dumps({"benchmark": "load", "machine": machine, "results": results}, indent=2) + "\n"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
