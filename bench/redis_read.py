"""What the compiled HMGET reply reader (``node_agent/tiers/resp.c``) is worth: the Redis tier's read of
a lookup's misses, with the replies parsed in C straight into the rows and with hiredis (the fallback),
in alternating rounds on the same real ``redis-server``, the same keys and the same process.

The keys are the lookup benchmark's (``hps bench lookup`` defaults: 500k rows x dim 64 fp32, batches of
4096 Zipf 1.05 keys); each batch's misses are its distinct keys outside the 10% hottest rows, what an
ideal 10% L1 would send to Redis (~460 keys a batch). Reported per reader: the read's median wall time,
this process's CPU per read and Redis's own time per read (``INFO commandstats``), medians over rounds,
written to ``bench/results/redis-read.json``.

    .venv/bin/python bench/redis_read.py [--rounds 5] [--batches 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from node_agent.local.lookup_bench import LookupBenchConfig, zipf_batches
from node_agent.local.redis_servers import start_redis
from node_agent.tiers import redis_tier
from node_agent.tiers.base import TableLayout
from node_agent.tiers.redis_tier import RedisTier

RESULTS = Path(__file__).resolve().parent / "results" / "redis-read.json"


def misses_of(config: LookupBenchConfig, batches: int) -> list[np.ndarray]:
    pool = zipf_batches(config)
    keys, counts = np.unique(pool, return_counts=True)
    hot = np.zeros(config.rows, dtype=bool)
    hot[keys[np.argsort(-counts, kind="stable")[: int(config.rows * config.cache_ratio)]]] = True
    out = []
    for batch in pool[:batches]:
        distinct = np.unique(batch)
        out.append(distinct[~hot[distinct]])
    return out


def one_round(tier: RedisTier, client: Any, misses: list[np.ndarray], table: np.ndarray) -> dict[str, float]:
    client.config_resetstat()
    walls = []
    cpu = time.process_time()
    for keys in misses:
        started = time.perf_counter()
        values, found = tier.fetch("emb", keys)
        walls.append(time.perf_counter() - started)
        if not found.all() or not np.array_equal(values, table[keys]):
            raise AssertionError("the tier answered a wrong or missing row")
    cpu = time.process_time() - cpu
    redis_usec = client.info("commandstats")["cmdstat_hmget"]["usec"]
    return {
        "read_p50_ms": statistics.median(walls) * 1e3,
        "cpu_ms_per_read": cpu / len(misses) * 1e3,
        "redis_ms_per_read": redis_usec / len(misses) / 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each reader, alternating")
    parser.add_argument("--batches", type=int, default=300, help="reads a round")
    parser.add_argument("--write", default=str(RESULTS))
    args = parser.parse_args()
    if redis_tier._feed_rows is None:
        print("the compiled reply reader was not built (no C compiler): nothing to compare", file=sys.stderr)
        return 1
    config = LookupBenchConfig()
    table = np.random.default_rng(config.seed + 1).standard_normal((config.rows, config.dim), dtype=np.float32)
    misses = misses_of(config, args.batches)
    compiled = redis_tier._feed_rows
    with tempfile.TemporaryDirectory(prefix="hps-redis-read-") as workdir:
        server = start_redis(workdir)
        try:
            tier = RedisTier([TableLayout("emb", config.dim, np.dtype(np.float32))], addresses=[server.address],
                             model="bench")  # fmt: skip
            for lo in range(0, config.rows, 50_000):
                keys = np.arange(lo, min(lo + 50_000, config.rows))
                tier.insert("emb", keys, table[keys])
            rounds: dict[str, list[dict[str, float]]] = {"compiled": [], "hiredis": []}
            for _ in range(args.rounds):
                for reader in rounds:
                    redis_tier._feed_rows = compiled if reader == "compiled" else None
                    rounds[reader].append(one_round(tier, server.client(), misses, table))
            redis_tier._feed_rows = compiled
            tier.close()
        finally:
            server.stop(hard=True)
    settings = {"rows": config.rows, "dim": config.dim, "batch": config.batch, "alpha": config.alpha,
                "cache_ratio": config.cache_ratio, "rounds": args.rounds, "reads_per_round": args.batches,
                "mean_keys_per_read": round(float(np.mean([len(m) for m in misses])), 1)}  # fmt: skip
    result: dict[str, Any] = {"config": settings}
    for reader, runs in rounds.items():
        result[reader] = {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}
        result[reader]["each_round"] = runs
    result["hiredis/compiled"] = {
        key: round(result["hiredis"][key] / result["compiled"][key], 3) for key in ("read_p50_ms", "cpu_ms_per_read")
    }
    Path(args.write).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2, default=str)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
