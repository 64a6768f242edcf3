"""Measures embedding lookups on the same seeded Zipf keys: the HPS agent over gRPC in two configurations,
plain Redis read with pipelined HMGET (what a feature-store user has), and a NumPy gather from the dense
table in RAM (the in-process limit). ``hps bench lookup`` and ``bench/lookup.py`` both run it.

The two agent configurations differ only in their L2 (volatile) tier; both have an L1 holding
``cache_ratio`` of the rows and are asked over gRPC by the :class:`~node_agent.client.Client`:

* ``hps``: L2 is Redis (a local stack: ``redis-server`` + one agent), as the issue defines the target;
* ``hps_inproc``: L2 is the agent's in-process hash map, loaded at agent start — HPS's own default
  volatile database, where Redis is optional.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: the issue's targets at rows 500k, dim 64, batch 4096, alpha 1.05, cache 10%, 2 cores
TARGETS = {"hps_over_redis": 5.0, "hps_over_numpy": 0.25, "hps_p99_ms": 3.0}

#: every system the benchmark knows, in the order it runs and reports them, with what each one is
SYSTEMS: dict[str, str] = {
    "hps": "agent over gRPC, L1 + L2 Redis",
    "hps_inproc": "agent over gRPC, L1 + L2 in-process hash map",
    "redis": "plain Redis, pipelined HMGET",
    "numpy": "NumPy gather from the dense table",
}

Fetch = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LookupBenchConfig:
    rows: int = 500_000
    dim: int = 64
    batch: int = 4096
    alpha: float = 1.05
    cache_ratio: float = 0.10
    duration: float = 10.0
    warmup: float = 2.0
    seed: int = 0
    device: str = "auto"
    #: callers issuing batches at once, for hps, hps_inproc and redis alike (numpy always runs alone:
    #: it is the single-thread in-process limit)
    concurrency: int = 1
    #: which of :data:`SYSTEMS` to run (``hps`` and its ratios need ``redis`` and ``numpy`` beside it)
    systems: tuple[str, ...] = tuple(SYSTEMS)
    #: hashes the Redis baseline spreads the rows over (one HMGET per hash touched per batch)
    redis_hashes: int = 64
    #: keys drawn up front (in whole batches) and cycled through; every system sees the same sequence.
    #: Many times the L1 capacity, so cycling does not flatter the cache's hit rate
    pool_keys: int = 2_000_000

    @property
    def pool_batches(self) -> int:
        return max(8, math.ceil(self.pool_keys / self.batch))


@dataclass(frozen=True)
class SystemResult:
    keys_per_s: float
    p50_ms: float
    p99_ms: float
    batches: int
    seconds: float
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("keys_per_s", "p50_ms", "p99_ms", "seconds"):
            out[k] = round(out[k], 4 if k != "keys_per_s" else 1)
        return out


def zipf_batches(config: LookupBenchConfig) -> np.ndarray:
    """``(pool_batches, batch)`` int64 keys: ranks drawn from a Zipf(alpha) bounded to ``rows``, mapped
    to row ids through a seeded permutation so the hot rows are scattered over the table."""
    rng = np.random.default_rng(config.seed)
    weights = np.arange(1, config.rows + 1, dtype=np.float64) ** -config.alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(config.pool_batches * config.batch), side="right")
    ranks = np.minimum(ranks, config.rows - 1)
    ids = rng.permutation(config.rows).astype(np.int64)
    return ids[ranks].reshape(config.pool_batches, config.batch)


def measure(fetch: Fetch, batches: np.ndarray, *, duration: float, warmup: float,
            expected: np.ndarray, concurrency: int = 1) -> SystemResult:  # fmt: skip
    """Warms up, then calls ``fetch`` on the batches in turn for ``duration`` seconds from
    ``concurrency`` threads at once; per-batch latency percentiles and keys/s over the whole measured
    span. ``exact`` compares the first batch's answer with ``expected``."""
    exact = bool(np.array_equal(fetch(batches[0]), expected))
    warm_until = time.perf_counter() + warmup
    i = 0
    while time.perf_counter() < warm_until or i < 3:
        fetch(batches[i % len(batches)])
        i += 1
    concurrency = max(1, concurrency)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    # the bound keeps a runaway fast system from filling memory with latencies
    per_caller_limit = 10_000_000 // concurrency
    start = time.perf_counter()
    stop_at = start + duration
    ends = [start] * concurrency
    failures: list[BaseException] = []

    def caller(index: int) -> None:
        mine = latencies[index]
        now = time.perf_counter()
        try:
            while now < stop_at and len(mine) < per_caller_limit:
                t0 = now
                fetch(batches[(index + len(mine) * concurrency) % len(batches)])
                now = time.perf_counter()
                mine.append(now - t0)
        except BaseException as exc:  # surfaced after the join: a failed system has no result
            failures.append(exc)
        ends[index] = now

    if concurrency == 1:
        caller(0)
    else:
        threads = [threading.Thread(target=caller, args=(t,), name=f"bench-{t}") for t in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(duration + 120)
    if failures:
        raise failures[0]
    elapsed = max(ends) - start
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    keys = lat.shape[0] * batches.shape[1]
    return SystemResult(
        keys_per_s=keys / elapsed,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        batches=int(lat.shape[0]),
        seconds=elapsed,
        exact=exact,
    )


class RedisHashBaseline:
    """The competent feature-store way to keep embeddings in Redis: rows spread over ``hashes`` hashes
    (field = the 8-byte key, value = the raw row), read with one pipelined HMGET per hash a batch
    touches, keys deduplicated first."""

    def __init__(self, client: Any, *, dim: int, hashes: int, prefix: str = "bench:feast") -> None:
        self.client = client
        self.dim = dim
        self.hashes = hashes
        self.names = [f"{prefix}:{h}" for h in range(hashes)]

    def load(self, table: np.ndarray, *, chunk: int = 2048) -> None:
        ids = np.arange(len(table), dtype=np.int64)
        for h in range(self.hashes):
            own = ids[ids % self.hashes == h]
            for lo in range(0, len(own), chunk):
                part = own[lo : lo + chunk]
                fields = part.astype("<i8").tobytes()
                values = np.ascontiguousarray(table[part]).tobytes()
                row = self.dim * table.itemsize
                mapping = {fields[i * 8 : i * 8 + 8]: values[i * row : (i + 1) * row] for i in range(len(part))}
                self.client.hset(self.names[h], mapping=mapping)

    def fetch(self, keys: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(keys, return_inverse=True)
        owner = unique % self.hashes
        order = np.argsort(owner, kind="stable")
        sorted_keys = unique[order]
        bounds = np.searchsorted(owner[order], np.arange(self.hashes + 1))
        raw = sorted_keys.astype("<i8").tobytes()
        pipe = self.client.pipeline(transaction=False)
        for h in range(self.hashes):
            lo, hi = int(bounds[h]), int(bounds[h + 1])
            if hi > lo:
                pipe.hmget(self.names[h], [raw[i * 8 : i * 8 + 8] for i in range(lo, hi)])
        values = b"".join(v for reply in pipe.execute() for v in reply)
        rows = np.frombuffer(values, dtype=np.float32).reshape(len(unique), self.dim)
        out = np.empty_like(rows)
        out[order] = rows
        return out[inverse]


def run_lookup_bench(config: LookupBenchConfig, *, workdir: str | Path | None = None,
                     say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Runs the three systems one after the other on one machine and returns the JSON-able result."""
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        return _run(config, root, say)


def _run(config: LookupBenchConfig, root: Path, say: Callable[[str], None]) -> dict[str, Any]:
    import redis

    from node_agent.local.stack import LocalStack

    unknown = sorted(set(config.systems) - set(SYSTEMS))
    if unknown:
        from node_agent.errors import InvalidArgumentError

        raise InvalidArgumentError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    rng = np.random.default_rng(config.seed + 1)
    table = rng.standard_normal((config.rows, config.dim), dtype=np.float32)
    batches = zipf_batches(config)
    expected = table[batches[0]]
    model_file = _write_model(root, table, config)
    timing = {"duration": config.duration, "warmup": config.warmup, "expected": expected}
    results: dict[str, SystemResult] = {}
    agent_stats: dict[str, Any] = {}
    with_caller = f", {config.concurrency} callers" if config.concurrency > 1 else ""

    if "hps" in config.systems or "redis" in config.systems:
        stack = LocalStack(root / "state")
        say(f"starting a local stack (redis + 1 agent, L1 {config.cache_ratio:.0%} of {config.rows} rows) ...")
        t0 = time.perf_counter()
        state = stack.up(model_file, agents=1, device=config.device).state
        say(f"  up in {time.perf_counter() - t0:.1f} s at {state.endpoints[0]}")
        try:
            if "hps" in config.systems:
                say(f"hps ({SYSTEMS['hps']}): {config.duration:g} s of batches of {config.batch}{with_caller} ...")
                results["hps"], agent_stats["hps"] = _measure_agent(state.endpoints[0], batches, config, timing)
            if "redis" in config.systems:
                host, port = state.redis_addresses[0].rsplit(":", 1)
                pool = redis.ConnectionPool(host=host, port=int(port), password=stack.redis_password(),
                                            socket_timeout=30)  # fmt: skip
                baseline = RedisHashBaseline(redis.Redis(connection_pool=pool), dim=config.dim,
                                             hashes=config.redis_hashes)  # fmt: skip
                say(f"redis: loading {config.rows} rows into {config.redis_hashes} hashes ...")
                baseline.load(table)
                say(f"redis ({SYSTEMS['redis']}): {config.duration:g} s{with_caller} ...")
                results["redis"] = measure(baseline.fetch, batches, concurrency=config.concurrency, **timing)
                pool.disconnect()
        finally:
            stack.down(purge=True)

    if "hps_inproc" in config.systems:
        stack = LocalStack(root / "state-inproc")
        say("starting an agent whose L2 is its in-process hash map (it loads the table itself) ...")
        t0 = time.perf_counter()
        state = stack.up(model_file, agents=1, device=config.device, no_redis=True).state
        say(f"  up in {time.perf_counter() - t0:.1f} s at {state.endpoints[0]}")
        try:
            say(f"hps_inproc ({SYSTEMS['hps_inproc']}): {config.duration:g} s{with_caller} ...")
            results["hps_inproc"], agent_stats["hps_inproc"] = _measure_agent(state.endpoints[0], batches,
                                                                              config, timing)  # fmt: skip
        finally:
            stack.down(purge=True)

    if "numpy" in config.systems:
        say(f"numpy ({SYSTEMS['numpy']}): {config.duration:g} s ...")
        results["numpy"] = measure(lambda k: table[k], batches, **timing)

    out: dict[str, Any] = {name: results[name].to_dict() for name in SYSTEMS if name in results}
    out["systems"] = {name: SYSTEMS[name] for name in out}
    out["config"] = asdict(config)
    out["ratios"], out["targets"] = _ratios("hps", results)
    if "hps_inproc" in results:
        out["ratios_inproc"], out["targets_inproc"] = _ratios("hps_inproc", results)
    out["hps_agent_stats"] = agent_stats.get("hps")
    out["hps_inproc_agent_stats"] = agent_stats.get("hps_inproc")
    out["environment"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "machine": platform.machine()}  # fmt: skip
    return out


def _measure_agent(endpoint: str, batches: np.ndarray, config: LookupBenchConfig,
                   timing: dict[str, Any]) -> tuple[SystemResult, Any]:  # fmt: skip
    """One agent over gRPC through the client inference services use; its Stats after."""
    from node_agent.client import Client

    with Client(endpoint, timeout=30.0) as client:
        result = measure(lambda k: client.lookup("bench", "emb", k), batches,
                         concurrency=config.concurrency, **timing)  # fmt: skip
        return result, _jsonable(client.stats("bench"))


def _ratios(name: str, results: dict[str, SystemResult]) -> tuple[dict[str, float], dict[str, Any]]:
    """The agent ``name``'s keys/s over redis's and numpy's, under the issue's names ``hps/redis`` and
    ``hps/numpy`` (the result's ``ratios`` for ``hps``, ``ratios_inproc`` for ``hps_inproc``), and which
    targets it meets; a ratio whose systems did not run is left out."""
    ratios: dict[str, float] = {}
    met: dict[str, bool] = {}
    agent = results.get(name)
    if agent is not None:
        if "redis" in results:
            ratios["hps/redis"] = round(agent.keys_per_s / results["redis"].keys_per_s, 3)
            met["hps_over_redis"] = ratios["hps/redis"] >= TARGETS["hps_over_redis"]
        if "numpy" in results:
            ratios["hps/numpy"] = round(agent.keys_per_s / results["numpy"].keys_per_s, 4)
            met["hps_over_numpy"] = ratios["hps/numpy"] >= TARGETS["hps_over_numpy"]
        met["hps_p99_ms"] = agent.p99_ms <= TARGETS["hps_p99_ms"]
    return ratios, {**TARGETS, "met": met}


def _write_model(root: Path, table: np.ndarray, config: LookupBenchConfig) -> Path:
    data = root / "data" / "emb"
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / "vectors.npy", table)
    cache_bytes = max(1, math.ceil(config.cache_ratio * table.shape[0])) * table.shape[1] * table.itemsize
    model_file = root / "bench.yaml"
    # updates off: a stream consumer would take CPU from the measured path; RocksDB off: every row is
    # in Redis, so the persistent tier would never be read and only slows the load
    model_file.write_text(
        "apiVersion: hps.dev/v1alpha1\nkind: EmbeddingModel\nmetadata: {name: bench}\nspec:\n"
        f"  tables:\n  - {{name: emb, rows: {table.shape[0]}, dim: {table.shape[1]}, dtype: float32, "
        "source: file://data/emb}\n"
        f"  cache: {{memoryPerGPU: {cache_bytes}, policy: lru}}\n"
        "  volatileStore: {type: redis}\n  persistentStore: {type: none}\n  updates: {enabled: false}\n"
        f"  agent: {{maxBatchKeys: {max(config.batch, 1 << 16)}}}\n"
    )
    return model_file


def _jsonable(value: Any) -> Any:
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The result as a small text table plus each agent's ratios against the targets."""
    cfg = result["config"]
    callers = f"  {cfg['concurrency']} callers" if cfg.get("concurrency", 1) > 1 else ""
    lines = [
        f"rows {cfg['rows']}  dim {cfg['dim']}  batch {cfg['batch']}  alpha {cfg['alpha']}  "
        f"cache {cfg['cache_ratio']:.0%}  {cfg['duration']:g} s each{callers}  ({result['environment']['cpus']} cpus)",
        f"{'system':<12}{'keys/s':>14}{'p50 ms':>10}{'p99 ms':>10}{'batches':>10}  exact  what",
    ]
    for name, what in SYSTEMS.items():
        if name not in result:
            continue
        r = result[name]
        lines.append(f"{name:<12}{r['keys_per_s']:>14,.0f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                     f"{r['batches']:>10}  {'yes' if r['exact'] else 'NO ':<5}  {what}")  # fmt: skip
    for name, ratios_key, targets_key in (("hps", "ratios", "targets"), ("hps_inproc", "ratios_inproc", "targets_inproc")):
        if name not in result:
            continue
        ratios, met = result[ratios_key], result[targets_key]["met"]
        parts = []
        if "hps/redis" in ratios:
            parts.append(f"/redis {ratios['hps/redis']:.2f}x (target >= {TARGETS['hps_over_redis']:.0f}x: "
                         f"{'met' if met['hps_over_redis'] else 'not met'})")  # fmt: skip
        if "hps/numpy" in ratios:
            parts.append(f"/numpy {ratios['hps/numpy']:.1%} (target >= {TARGETS['hps_over_numpy']:.0%}: "
                         f"{'met' if met['hps_over_numpy'] else 'not met'})")  # fmt: skip
        parts.append(f"p99 {result[name]['p99_ms']:.2f} ms (target <= {TARGETS['hps_p99_ms']:.0f} ms: "
                     f"{'met' if met['hps_p99_ms'] else 'not met'})")
        lines.append(f"{name}: " + "   ".join(parts))
    return "\n".join(lines)
