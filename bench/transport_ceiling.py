"""What the transports alone allow: the agent's own serving code — its gRPC service with the
:class:`~node_agent.client.Client`, and its same-node socket with the
:class:`~node_agent.same_node.SameNodeClient` — in front of a lookup that is a NumPy gather from the
whole table in RAM (an L1 that holds every row and costs nothing), beside plain Redis (pipelined HMGET)
and the in-process NumPy gather, in the same run, on the lookup benchmark's keys and defaults
(``hps bench lookup``: 500k rows x dim 64 fp32, batches of 4096 Zipf 1.05 keys).

No cache, policy or tier work can make an agent faster than its ceiling here, so this bounds what the
lookup benchmark's ``hps/redis`` can reach through each transport. ``budget_ms`` is the batch time a 5x
target allows (plain Redis's mean batch time / 5); ``left_for_the_lookup_ms`` is that budget less the
ceiling's own mean batch time: what remains for the cache, the tiers and the deduplication — negative
when the transport alone spends more than the budget.

The server runs in a process of its own (``--serve``, started by this script) as an agent does, with
the same allocator tuning; systems run in turn, ``--repeat`` times, and each ratio is the median of
each run's own ratio. Written to ``bench/results/transport-ceiling.json``.

    .venv/bin/python bench/transport_ceiling.py [--duration 10] [--repeat 3] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from node_agent.errors import InvalidArgumentError
from node_agent.local.lookup_bench import (
    TARGETS,
    LookupBenchConfig,
    RedisHashBaseline,
    SystemResult,
    measure,
    zipf_batches,
)
from node_agent.spec import TableSpec

RESULTS = Path(__file__).resolve().parent / "results" / "transport-ceiling.json"
SYSTEMS = {
    "grpc_ceiling": "the agent's gRPC service over TCP, its lookup a NumPy gather of every row in RAM",
    "same_node_ceiling": "the agent's same-node socket (rows via shared memory), the same lookup",
    "redis": "plain Redis, pipelined HMGET",
    "numpy": "NumPy gather from the dense table, in process",
}
MODEL, TABLE = "bench", "emb"


def bench_table(config: LookupBenchConfig) -> np.ndarray:
    """The lookup benchmark's table (the same seed): both processes make it instead of sending it."""
    rng = np.random.default_rng(config.seed + 1)
    return rng.standard_normal((config.rows, config.dim), dtype=np.float32)


class DenseLookup:
    """The lookup path's serving contract over a table held whole in RAM: a lookup is a gather."""

    degraded = False
    device = "cpu"

    def __init__(self, table: np.ndarray) -> None:
        self._table = table
        self._spec = TableSpec(TABLE, rows=table.shape[0], dim=table.shape[1], dtype="float32")

    def tables(self) -> Mapping[str, TableSpec]:
        return {TABLE: self._spec}

    def lookup(self, table: str, keys: np.ndarray) -> np.ndarray:
        return self._table[keys]

    def lookup_many(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {table: self.lookup(table, keys) for table, keys in batch.items()}

    def update(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        raise InvalidArgumentError("this benchmark's table is read-only")

    def stats(self) -> dict[str, Any]:
        return {"device": self.device, "degraded": False}


def serve_forever(folder: Path, config: LookupBenchConfig) -> None:
    """The server process: serves the table until its stdin closes (the benchmark ended or died)."""
    from node_agent.allocator import keep_freed_memory
    from node_agent.same_node import SameNodeServer
    from node_agent.server import serve

    keep_freed_memory()  # as the agent does at start
    running = serve(DenseLookup(bench_table(config)), model=MODEL,  # type: ignore[arg-type]
                    max_batch_keys=max(config.batch, 1 << 16))  # fmt: skip
    near = SameNodeServer(running.servicer, folder / "ceiling.sock").start()
    (folder / "endpoint.tmp").write_text(running.endpoint)
    (folder / "endpoint.tmp").rename(folder / "endpoint")
    sys.stdin.read()
    near.stop()
    running.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per system and run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of every system, in turn")
    parser.add_argument("--concurrency", type=int, default=1, help="callers at once (numpy runs alone)")
    parser.add_argument("--write", default=str(RESULTS))
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = replace(LookupBenchConfig(), duration=args.duration, warmup=args.warmup, repeat=args.repeat,
                     concurrency=args.concurrency)  # fmt: skip
    if args.serve:
        serve_forever(Path(args.serve), config)
        return 0

    from node_agent.allocator import keep_freed_memory
    from node_agent.client import Client
    from node_agent.local.redis_servers import start_redis
    from node_agent.same_node import SameNodeClient

    keep_freed_memory()  # as `hps bench` does for its callers
    table = bench_table(config)
    batches = zipf_batches(config)
    timing = {"duration": config.duration, "warmup": config.warmup, "expected": table[batches[0]]}
    distinct = float(np.mean([np.unique(b).shape[0] for b in batches[:200]]))
    with tempfile.TemporaryDirectory(prefix="hps-ceiling-") as tmp:
        folder = Path(tmp)
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--duration", "0"],
                                  stdin=subprocess.PIPE)  # fmt: skip
        redis_server = start_redis(folder / "redis")
        try:
            deadline = time.monotonic() + 120
            while not (folder / "endpoint").exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the ceiling server did not start")
                time.sleep(0.1)
            baseline = RedisHashBaseline(redis_server.client(), dim=config.dim, hashes=config.redis_hashes)
            print(f"redis: loading {config.rows} rows ...", file=sys.stderr)
            baseline.load(table)
            with Client((folder / "endpoint").read_text(), timeout=30.0) as remote, \
                    SameNodeClient(folder / "ceiling.sock", timeout=30.0) as near:  # fmt: skip
                fetches = {
                    "grpc_ceiling": lambda k: remote.lookup(MODEL, TABLE, k),
                    "same_node_ceiling": lambda k: near.lookup(MODEL, TABLE, k),
                    "redis": baseline.fetch,
                    "numpy": lambda k: table[k],
                }
                runs: dict[str, list[SystemResult]] = {name: [] for name in SYSTEMS}
                for run in range(config.repeat):
                    for name, fetch in fetches.items():
                        callers = config.concurrency if name != "numpy" else 1
                        print(f"run {run + 1}/{config.repeat}: {name}: {config.duration:g} s, {callers} caller(s)",
                              file=sys.stderr)  # fmt: skip
                        runs[name].append(measure(fetch, batches, concurrency=callers, **timing))
        finally:
            server.communicate(timeout=30)  # closes its stdin: it stops
            redis_server.stop(hard=True)
    result = summarise(runs, config, distinct)
    Path(args.write).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ceilings", "exact")}, indent=2))
    return 0


def summarise(runs: dict[str, list[SystemResult]], config: LookupBenchConfig,
              distinct: float) -> dict[str, Any]:  # fmt: skip
    """Each system's medians, and for each ceiling its ratios to plain Redis and NumPy (the median of
    each run's own ratio) and the time a 5x-Redis target leaves for the lookup itself."""
    results = {name: SystemResult.median(rs) for name, rs in runs.items()}
    target = TARGETS["hps_over_redis"]
    out: dict[str, Any] = {name: results[name].to_dict() for name in runs}
    out["runs"] = {name: [r.to_dict() for r in rs] for name, rs in runs.items()}
    ceilings = {}
    for name in ("grpc_ceiling", "same_node_ceiling"):
        each = {peer: [a.keys_per_s / b.keys_per_s for a, b in zip(runs[name], runs[peer], strict=True)]
                for peer in ("redis", "numpy")}  # fmt: skip
        # mean batch times from keys/s: with several callers, what each batch costs the machine
        redis_batch_ms = config.batch / results["redis"].keys_per_s * 1e3
        own_batch_ms = config.batch / results[name].keys_per_s * 1e3
        budget = redis_batch_ms / target
        ceilings[name] = {
            "ceiling/redis": round(statistics.median(each["redis"]), 3),
            "ceiling/redis each run": [round(r, 3) for r in each["redis"]],
            "ceiling/numpy": round(statistics.median(each["numpy"]), 4),
            "batch_ms": round(own_batch_ms, 4),
            "budget_ms": round(budget, 4),
            "left_for_the_lookup_ms": round(budget - own_batch_ms, 4),
            "p99_ms": results[name].p99_ms,
        }
    out["ceilings"] = ceilings
    out["exact"] = all(r.exact for r in results.values())
    out["systems"] = SYSTEMS
    out["config"] = {**asdict(config), "systems": list(SYSTEMS), "mean_distinct_keys_per_batch": round(distinct, 1),
                     "answer_bytes_per_batch": round(distinct * config.dim * 4)}  # fmt: skip
    out["environment"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "machine": platform.machine()}  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
