"""Measures embedding lookups on the same seeded Zipf keys: the HPS agent in three configurations,
plain Redis read with pipelined HMGET (what a feature-store user has), and a NumPy gather from the dense
table in RAM (the in-process limit). ``hps bench lookup`` and ``bench/lookup.py`` both run it.

The agent configurations all have an L1 holding ``cache_ratio`` of the rows (``policy``, with the
cache's default TinyLFU admission) and differ in their L2 tier and in how the caller reaches them:

* ``hps``: L2 is Redis (a local stack: ``redis-server`` + one agent), asked over TCP gRPC through the
  :class:`~node_agent.client.Client`, as the issue defines the target;
* ``hps_same_node``: the same agent, asked through its same-node socket
  (:class:`~node_agent.same_node.SameNodeClient`: Unix socket, rows through shared memory);
* ``hps_inproc``: L2 is the agent's in-process hash map, loaded at agent start — HPS's own default
  volatile database, where Redis is optional — asked over TCP gRPC;
* ``hps_inproc_same_node``: that agent through its same-node socket;
* ``hps_tls``: ``hps`` with TLS everywhere (``hps local up --tls``: the client to the agent over gRPC
  TLS, the agent to Redis over TLS as its ACL user), on a stack of its own;
* ``hps_inproc_tls``: ``hps_inproc`` over gRPC TLS (its L2 is in process: the cost of gRPC's TLS alone).

What TLS costs is reported side by side (``tls``: each TLS system's keys/s over its plaintext twin's,
the median of each run's own ratio). Every system's answers are checked against the table before its
warm-up and again after its measured span (when its cache is warm): ``exact`` is both.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

#: the issue's targets at rows 500k, dim 64, batch 4096, alpha 1.05, cache 10%, 2 cores
TARGETS = {"hps_over_redis": 5.0, "hps_over_numpy": 0.25, "hps_p99_ms": 3.0}

#: every system the benchmark knows, in the order it runs and reports them, with what each one is
SYSTEMS: dict[str, str] = {
    "hps": "agent over TCP gRPC, L1 + L2 Redis",
    "hps_same_node": "the same agent over its same-node socket (Unix socket, rows via shared memory)",
    "hps_inproc": "agent over TCP gRPC, L1 + L2 in-process hash map",
    "hps_inproc_same_node": "the in-process agent over its same-node socket",
    "hps_tls": "hps with TLS: gRPC TLS to the agent, the agent to Redis over TLS",
    "hps_inproc_tls": "hps_inproc over gRPC TLS",
    "redis": "plain Redis, pipelined HMGET",
    "redis_mget": "plain Redis, a string key per row, one MGET per batch (the other layout; not run by default)",
    "numpy": "NumPy gather from the dense table",
}
#: what runs unless asked otherwise
DEFAULT_SYSTEMS = ("hps", "hps_same_node", "hps_inproc", "hps_inproc_same_node", "hps_tls", "hps_inproc_tls",
                   "redis", "numpy")  # fmt: skip
#: the agent systems, and the key their ratios are reported under
AGENT_RATIOS = {"hps": "ratios", "hps_same_node": "ratios_same_node", "hps_inproc": "ratios_inproc",
                "hps_inproc_same_node": "ratios_inproc_same_node", "hps_tls": "ratios_tls",
                "hps_inproc_tls": "ratios_inproc_tls"}
#: each TLS system and its plaintext twin: the same agent configuration, the same keys
TLS_TWINS = {"hps_tls": "hps", "hps_inproc_tls": "hps_inproc"}

Fetch = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LookupBenchConfig:
    rows: int = 500_000
    dim: int = 64
    batch: int = 4096
    alpha: float = 1.05
    cache_ratio: float = 0.10
    #: the L1's eviction policy (spec.cache.policy): LFU keeps Zipf's head better than LRU
    policy: str = "lfu"
    duration: float = 10.0
    warmup: float = 2.0
    seed: int = 0
    device: str = "auto"
    #: callers issuing batches at once, for the agents and redis alike (numpy always runs alone: it
    #: is the single-thread in-process limit)
    concurrency: int = 1
    #: runs of every system, one after the other in turn; the result reports each system's medians
    repeat: int = 1
    #: which of :data:`SYSTEMS` to run (an agent's ratios need ``redis`` and ``numpy`` beside it)
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
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

    @classmethod
    def median(cls, runs: list[SystemResult]) -> SystemResult:
        """Each figure's median over ``runs``; exact only if every run was."""
        return cls(
            keys_per_s=statistics.median(r.keys_per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            batches=int(statistics.median(r.batches for r in runs)),
            seconds=statistics.median(r.seconds for r in runs),
            exact=all(r.exact for r in runs),
        )


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
    span. ``exact`` compares the first batch's answer with ``expected`` before the warm-up and after the
    measured span (a warm cache answers then)."""
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
    exact = exact and bool(np.array_equal(fetch(batches[0]), expected))
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


class RedisStringBaseline:
    """The other way to keep embeddings in plain Redis: one string key per row (``prefix`` + the 8-byte
    key, value the raw row), a batch's distinct keys read with one MGET."""

    def __init__(self, client: Any, *, dim: int, prefix: bytes = b"bench:row:") -> None:
        self.client = client
        self.dim = dim
        self.prefix = prefix

    def _names(self, keys: np.ndarray) -> list[bytes]:
        raw = keys.astype("<i8").tobytes()
        return [self.prefix + raw[i : i + 8] for i in range(0, len(raw), 8)]

    def load(self, table: np.ndarray, *, chunk: int = 4096) -> None:
        for lo in range(0, len(table), chunk):
            keys = np.arange(lo, min(lo + chunk, len(table)), dtype=np.int64)
            values = np.ascontiguousarray(table[keys]).tobytes()
            row = self.dim * table.itemsize
            self.client.mset(dict(zip(self._names(keys), (values[i : i + row] for i in range(0, len(values), row)),
                                      strict=True)))  # fmt: skip

    def fetch(self, keys: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(keys, return_inverse=True)
        values = b"".join(self.client.mget(self._names(unique)))
        return np.frombuffer(values, dtype=np.float32).reshape(len(unique), self.dim)[inverse.reshape(-1)]


def run_lookup_bench(config: LookupBenchConfig, *, workdir: str | Path | None = None,
                     say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Runs the systems on one machine, in turn, ``repeat`` times, and returns the JSON-able result."""
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        return _run(config, root, say)


def _run(config: LookupBenchConfig, root: Path, say: Callable[[str], None]) -> dict[str, Any]:
    import contextlib

    import redis

    from node_agent.errors import InvalidArgumentError
    from node_agent.local.stack import LocalStack

    unknown = sorted(set(config.systems) - set(SYSTEMS))
    if unknown:
        raise InvalidArgumentError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if config.repeat < 1:
        raise InvalidArgumentError(f"repeat must be at least 1, got {config.repeat}")
    rng = np.random.default_rng(config.seed + 1)
    table = rng.standard_normal((config.rows, config.dim), dtype=np.float32)
    batches = zipf_batches(config)
    expected = table[batches[0]]
    model_file = _write_model(root, table, config)
    timing = {"duration": config.duration, "warmup": config.warmup, "expected": expected}
    runs: dict[str, list[SystemResult]] = {name: [] for name in SYSTEMS if name in config.systems}
    agent_stats: dict[str, Any] = {}
    with_caller = f", {config.concurrency} callers" if config.concurrency > 1 else ""
    # each system's measuring call, set up once below and run `repeat` times in turn
    measures: dict[str, Callable[[], SystemResult]] = {}
    stats_of: dict[str, Callable[[], Any]] = {}

    with contextlib.ExitStack() as running:
        if {"hps", "hps_same_node", "redis", "redis_mget"} & set(config.systems):
            stack = LocalStack(root / "state")
            say(f"starting a local stack (redis + 1 agent, L1 {config.cache_ratio:.0%} of {config.rows} rows, "
                f"{config.policy}) ...")  # fmt: skip
            t0 = time.perf_counter()
            state = stack.up(model_file, agents=1, device=config.device,
                             same_node="hps_same_node" in config.systems).state  # fmt: skip
            running.callback(stack.down, purge=True)
            say(f"  up in {time.perf_counter() - t0:.1f} s at {state.endpoints[0]}")
            if "hps" in config.systems or "hps_same_node" in config.systems:
                from node_agent.client import Client

                client = running.enter_context(Client(state.endpoints[0], timeout=30.0,
                                                      **stack.client_credentials()))  # fmt: skip
                stats_of["hps"] = stats_of["hps_same_node"] = _stats_of(client)
                if "hps" in config.systems:
                    measures["hps"] = _measurer(_lookup_of(client), batches, config, timing)
                if "hps_same_node" in config.systems:
                    from node_agent.same_node import SameNodeClient

                    near = running.enter_context(SameNodeClient(stack.state_dir / "logs" / "agent-0.sock",
                                                                timeout=30.0))  # fmt: skip
                    measures["hps_same_node"] = _measurer(_lookup_of(near), batches, config, timing)
            if "redis" in config.systems:
                host, port = state.redis_addresses[0].rsplit(":", 1)
                pool = redis.ConnectionPool(host=host, port=int(port), socket_timeout=30,
                                            **stack.redis_access("admin").pool_options())  # fmt: skip
                running.callback(pool.disconnect)
                baseline = RedisHashBaseline(redis.Redis(connection_pool=pool), dim=config.dim,
                                             hashes=config.redis_hashes)  # fmt: skip
                say(f"redis: loading {config.rows} rows into {config.redis_hashes} hashes ...")
                baseline.load(table)
                measures["redis"] = _measurer(baseline.fetch, batches, config, timing)
            if "redis_mget" in config.systems:
                host, port = state.redis_addresses[0].rsplit(":", 1)
                strings_pool = redis.ConnectionPool(host=host, port=int(port), socket_timeout=30,
                                                    **stack.redis_access("admin").pool_options())  # fmt: skip
                running.callback(strings_pool.disconnect)
                strings = RedisStringBaseline(redis.Redis(connection_pool=strings_pool), dim=config.dim)
                say(f"redis_mget: loading {config.rows} rows as string keys ...")
                strings.load(table)
                measures["redis_mget"] = _measurer(strings.fetch, batches, config, timing)

        if {"hps_inproc", "hps_inproc_same_node"} & set(config.systems):
            stack_inproc = LocalStack(root / "state-inproc")
            say("starting an agent whose L2 is its in-process hash map (it loads the table itself) ...")
            t0 = time.perf_counter()
            state_inproc = stack_inproc.up(model_file, agents=1, device=config.device, no_redis=True,
                                           same_node="hps_inproc_same_node" in config.systems).state  # fmt: skip
            running.callback(stack_inproc.down, purge=True)
            say(f"  up in {time.perf_counter() - t0:.1f} s at {state_inproc.endpoints[0]}")
            from node_agent.client import Client

            inproc = running.enter_context(Client(state_inproc.endpoints[0], timeout=30.0,
                                                  **stack_inproc.client_credentials()))  # fmt: skip
            stats_of["hps_inproc"] = stats_of["hps_inproc_same_node"] = _stats_of(inproc)
            if "hps_inproc" in config.systems:
                measures["hps_inproc"] = _measurer(_lookup_of(inproc), batches, config, timing)
            if "hps_inproc_same_node" in config.systems:
                from node_agent.same_node import SameNodeClient

                near_inproc = running.enter_context(SameNodeClient(stack_inproc.state_dir / "logs" / "agent-0.sock",
                                                                   timeout=30.0))  # fmt: skip
                measures["hps_inproc_same_node"] = _measurer(_lookup_of(near_inproc), batches, config, timing)

        for name, twin, folder, no_redis in (("hps_tls", "hps", "state-tls", False),
                                             ("hps_inproc_tls", "hps_inproc", "state-inproc-tls", True)):  # fmt: skip
            if name not in config.systems:
                continue
            from node_agent.client import Client

            stack_tls = LocalStack(root / folder)
            say(f"starting {name}: {twin} with TLS (a throwaway CA) ...")
            t0 = time.perf_counter()
            state_tls = stack_tls.up(model_file, agents=1, device=config.device, no_redis=no_redis, tls=True).state
            running.callback(stack_tls.down, purge=True)
            say(f"  up in {time.perf_counter() - t0:.1f} s at {state_tls.endpoints[0]}")
            secure = running.enter_context(Client(state_tls.endpoints[0], timeout=30.0,
                                                  **stack_tls.client_credentials()))  # fmt: skip
            stats_of[name] = _stats_of(secure)
            measures[name] = _measurer(_lookup_of(secure), batches, config, timing)

        if "numpy" in config.systems:
            measures["numpy"] = lambda: measure(lambda k: table[k], batches, **timing)

        for run in range(config.repeat):
            for name in runs:
                label = f"run {run + 1}/{config.repeat}: " if config.repeat > 1 else ""
                callers = with_caller if name != "numpy" else ""
                say(f"{label}{name} ({SYSTEMS[name]}): {config.duration:g} s{callers} ...")
                runs[name].append(measures[name]())
        for name, fetch_stats in stats_of.items():
            if name in runs:
                agent_stats[name] = fetch_stats()

    results = {name: SystemResult.median(r) for name, r in runs.items()}
    out: dict[str, Any] = {name: results[name].to_dict() for name in SYSTEMS if name in results}
    if config.repeat > 1:
        out["runs"] = {name: [r.to_dict() for r in rs] for name, rs in runs.items()}
    out["systems"] = {name: SYSTEMS[name] for name in SYSTEMS if name in results}
    out["config"] = asdict(config)
    for agent, key in AGENT_RATIOS.items():
        if agent in results:
            out[key], out[key.replace("ratios", "targets")] = _ratios(agent, results, runs)
        out[f"{agent}_agent_stats"] = agent_stats.get(agent)
    out["l1_hit_rate"] = {agent: _l1_hit_rate(stats) for agent, stats in agent_stats.items()}
    tls = tls_cost(results, runs)
    if tls:
        out["tls"] = tls
    out["environment"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "machine": platform.machine()}  # fmt: skip
    return out


def _lookup_of(client: Any) -> Fetch:
    """The benchmark table's lookup through ``client`` (a gRPC or a same-node client)."""
    return lambda keys: client.lookup("bench", "emb", keys)


def _stats_of(client: Any) -> Callable[[], Any]:
    return lambda: _jsonable(client.stats("bench"))


def _measurer(fetch: Fetch, batches: np.ndarray, config: LookupBenchConfig,
              timing: dict[str, Any]) -> Callable[[], SystemResult]:  # fmt: skip
    return lambda: measure(fetch, batches, concurrency=config.concurrency, **timing)


def _l1_hit_rate(stats: Any) -> float | None:
    """The agent's L1 hit rate over the distinct keys it was asked, from its Stats."""
    try:
        return float(stats["lookup"]["tables"]["emb"]["hit_rate"])
    except (KeyError, TypeError, ValueError):
        return None


def _ratios(name: str, results: dict[str, SystemResult],
            runs: dict[str, list[SystemResult]] | None = None) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """The agent ``name``'s keys/s over redis's and numpy's, under the issue's names ``hps/redis`` and
    ``hps/numpy``, and which targets it meets; a ratio whose systems did not run is left out. With
    several runs, a ratio is the median of each run's own ratio (the systems side by side in time, on
    a machine whose load moves between runs), and each run's is listed beside it."""
    ratios: dict[str, Any] = {}
    met: dict[str, bool] = {}
    agent = results.get(name)
    if agent is not None:
        for peer, label, digits in (("redis", "hps/redis", 3), ("numpy", "hps/numpy", 4)):
            if peer not in results:
                continue
            if runs and len(runs.get(name, [])) > 1:
                each = [a.keys_per_s / b.keys_per_s for a, b in zip(runs[name], runs[peer], strict=True)]
                ratios[label] = round(statistics.median(each), digits)
                ratios[f"{label} each run"] = [round(r, digits) for r in each]
            else:
                ratios[label] = round(agent.keys_per_s / results[peer].keys_per_s, digits)
        if "hps/redis" in ratios:
            met["hps_over_redis"] = ratios["hps/redis"] >= TARGETS["hps_over_redis"]
        if "hps/numpy" in ratios:
            met["hps_over_numpy"] = ratios["hps/numpy"] >= TARGETS["hps_over_numpy"]
        met["hps_p99_ms"] = agent.p99_ms <= TARGETS["hps_p99_ms"]
    return ratios, {**TARGETS, "met": met}


def tls_cost(results: dict[str, SystemResult], runs: dict[str, list[SystemResult]]) -> dict[str, Any]:
    """Each TLS system beside its plaintext twin run in the same turns: both keys/s and p99, and
    ``tls/plaintext``, the median of each run's own ratio (the pair side by side in time), each run's
    listed beside it."""
    out: dict[str, Any] = {}
    for secure, plain in TLS_TWINS.items():
        if secure not in results or plain not in results:
            continue
        each = [a.keys_per_s / b.keys_per_s for a, b in zip(runs[secure], runs[plain], strict=True)]
        out[plain] = {
            "plaintext_keys_per_s": round(results[plain].keys_per_s, 1),
            "tls_keys_per_s": round(results[secure].keys_per_s, 1),
            "plaintext_p99_ms": round(results[plain].p99_ms, 4),
            "tls_p99_ms": round(results[secure].p99_ms, 4),
            "tls/plaintext": round(statistics.median(each), 3),
            "tls/plaintext each run": [round(r, 3) for r in each],
        }
    return out


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
        f"  cache: {{memoryPerGPU: {cache_bytes}, policy: {config.policy}}}\n"
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
    repeat = f"  medians of {cfg['repeat']} runs" if cfg.get("repeat", 1) > 1 else ""
    lines = [
        f"rows {cfg['rows']}  dim {cfg['dim']}  batch {cfg['batch']}  alpha {cfg['alpha']}  "
        f"cache {cfg['cache_ratio']:.0%} {cfg.get('policy', 'lru')}  {cfg['duration']:g} s each{callers}{repeat}  "
        f"({result['environment']['cpus']} cpus)",
        f"{'system':<22}{'keys/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'batches':>10}  exact  what",
    ]
    for name, what in SYSTEMS.items():
        if name not in result:
            continue
        r = result[name]
        lines.append(f"{name:<22}{r['keys_per_s']:>12,.0f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                     f"{r['batches']:>10}  {'yes' if r['exact'] else 'NO ':<5}  {what}")  # fmt: skip
    hit_rates = result.get("l1_hit_rate") or {}
    for name, ratios_key in AGENT_RATIOS.items():
        if name not in result or ratios_key not in result:
            continue
        ratios, met = result[ratios_key], result[ratios_key.replace("ratios", "targets")]["met"]
        parts = []
        if "hps/redis" in ratios:
            each = ratios.get("hps/redis each run")
            runs_note = f", runs {'/'.join(f'{r:.2f}' for r in each)}" if each else ""
            parts.append(f"/redis {ratios['hps/redis']:.2f}x{runs_note} (target >= {TARGETS['hps_over_redis']:.0f}x: "
                         f"{'met' if met['hps_over_redis'] else 'not met'})")  # fmt: skip
        if "hps/numpy" in ratios:
            parts.append(f"/numpy {ratios['hps/numpy']:.1%} (target >= {TARGETS['hps_over_numpy']:.0%}: "
                         f"{'met' if met['hps_over_numpy'] else 'not met'})")  # fmt: skip
        parts.append(f"p99 {result[name]['p99_ms']:.2f} ms (target <= {TARGETS['hps_p99_ms']:.0f} ms: "
                     f"{'met' if met['hps_p99_ms'] else 'not met'})")
        if hit_rates.get(name) is not None:
            parts.append(f"L1 hit rate {hit_rates[name]:.3f}")
        lines.append(f"{name}: " + "   ".join(parts))
    for plain, cost in sorted((result.get("tls") or {}).items()):
        each = cost.get("tls/plaintext each run")
        runs_note = f", runs {'/'.join(f'{r:.2f}' for r in each)}" if each and len(each) > 1 else ""
        lines.append(f"TLS on {plain}: {cost['tls_keys_per_s']:,.0f} keys/s against "
                     f"{cost['plaintext_keys_per_s']:,.0f} in plaintext: x{cost['tls/plaintext']:.2f}{runs_note}")  # fmt: skip
    return "\n".join(lines)


# -- the sweep: hit rate and keys/s against cache ratio and Zipf alpha, per policy -----------------

#: (eviction policy, admission) pairs the sweep compares; the first is HPS's own
SWEEP_POLICIES: tuple[tuple[str, str], ...] = (("lru", "always"), ("lru", "tinylfu"), ("lfu", "always"),
                                               ("lfu", "tinylfu"))  # fmt: skip


@dataclass(frozen=True)
class SweepConfig:
    """Points of the sweep: every cache ratio at the base alpha, and every alpha at the base ratio
    (two slices through the base point, not the whole grid, so it finishes in about a minute here)."""

    ratios: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    alphas: tuple[float, ...] = (0.8, 0.9, 1.0, 1.05, 1.1, 1.2)
    policies: tuple[tuple[str, str], ...] = SWEEP_POLICIES
    #: batches run before measuring each point, at least; then batches measured
    warm_batches: int = 300
    batches: int = 100
    #: keys drawn before measuring, per row the cache holds, at least: a cache is in its steady state
    #: only once the keys it should hold have been asked for (under Zipf 1.05 a 50% cache's coldest
    #: row is drawn about once in 5M keys: 300 batches left it a 0.84 hit rate of compulsory misses)
    warm_keys_per_row: int = 40

    def warm_batches_for(self, cache_rows: int, batch: int) -> int:
        return max(self.warm_batches, math.ceil(self.warm_keys_per_row * cache_rows / batch))


def run_lookup_sweep(config: LookupBenchConfig, sweep: SweepConfig, *, workdir: str | Path | None = None,
                     say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Measures the agent's lookup path in this process (L1 + a real ``redis-server`` as L2, no
    transport: the figure is about the cache) at each sweep point and policy, beside plain Redis
    (pipelined HMGET) on the same keys, batch by batch in turn. A point's hit rate is over the distinct
    keys of its measured batches, as the agent counts it; keys/s counts every key asked, at the median
    batch latency."""
    from node_agent.cache import SetAssociativeCache, TableCache
    from node_agent.local.redis_servers import start_redis
    from node_agent.lookup import LookupPath
    from node_agent.spec import TableSpec
    from node_agent.tiers.base import TableLayout
    from node_agent.tiers.redis_tier import RedisTier

    rng = np.random.default_rng(config.seed + 1)
    table = rng.standard_normal((config.rows, config.dim), dtype=np.float32)
    spec = TableSpec("emb", config.rows, config.dim)
    base_ratio, base_alpha = config.cache_ratio, config.alpha
    points = [(ratio, base_alpha) for ratio in sweep.ratios]
    points += [(base_ratio, alpha) for alpha in sweep.alphas if (base_ratio, alpha) not in points]
    rows_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hps-sweep-") as tmp:
        server = start_redis(Path(workdir or tmp) / "redis", password="sweep")
        try:
            import redis

            tier = RedisTier([TableLayout.of(spec)], addresses=[server.address], access=server.access,
                             model="sweep", socket_timeout=30.0)  # fmt: skip
            say(f"loading {config.rows} rows into redis (the agent's layout and the baseline's) ...")
            tier.insert("emb", np.arange(config.rows, dtype=np.int64), table)
            client = redis.Redis(host=server.host, port=server.port, password="sweep", socket_timeout=30)
            baseline = RedisHashBaseline(client, dim=config.dim, hashes=config.redis_hashes)
            baseline.load(table)

            def warm_of(ratio: float) -> int:
                return sweep.warm_batches_for(math.ceil(ratio * config.rows), config.batch)

            for alpha in sorted({a for _, a in points}):
                longest = max(warm_of(r) for r, a in points if a == alpha)
                trace = zipf_batches(replace(config, alpha=alpha, pool_keys=(longest + sweep.batches) * config.batch))
                measured = trace[longest:][: sweep.batches]
                for ratio in sorted(r for r, a in points if a == alpha):
                    # every ratio is measured on the same batches, each warmed by the batches just before
                    warm = trace[longest - warm_of(ratio) : longest]
                    caches, paths = [], []
                    for policy, admission in sweep.policies:
                        cache = SetAssociativeCache(
                            dim=config.dim, capacity_bytes=math.ceil(ratio * config.rows) * config.dim * 4,
                            policy=policy, admission=admission,
                        )  # fmt: skip
                        caches.append(cache)
                        paths.append(LookupPath([spec], l1={"emb": TableCache(cache)}, volatile=tier,
                                                persistent=None, close_tiers=False))  # fmt: skip
                    try:
                        for path, cache in zip(paths, caches, strict=True):
                            for keys in warm:
                                path.lookup("emb", keys)
                            path.wait_for_fills()
                            cache.reset_counters()
                        # batch by batch, every policy and plain Redis in turn: load that comes and goes
                        # on a shared machine falls on all of them alike
                        fetches = [partial(path.lookup, "emb") for path in paths] + [baseline.fetch]
                        keys_per_s = _interleaved_keys_per_s(fetches, measured)
                        exact = [bool(np.array_equal(path.lookup("emb", measured[0]), table[measured[0]]))
                                 for path in paths]  # fmt: skip
                    finally:
                        for path in paths:
                            path.close()
                    for index, ((policy, admission), cache) in enumerate(zip(sweep.policies, caches, strict=True)):
                        rows_out.append({
                            "ratio": ratio, "alpha": alpha, "policy": policy, "admission": admission,
                            "hit_rate": round(cache.hit_rate, 4), "keys_per_s": round(keys_per_s[index], 1),
                            "redis_keys_per_s": round(keys_per_s[-1], 1), "exact": exact[index],
                        })  # fmt: skip
                        say(f"  alpha {alpha:<5} cache {ratio:>4.0%}  {policy}+{admission:<8} hit rate "
                            f"{cache.hit_rate:.3f}  {keys_per_s[index] / 1e6:.2f} M keys/s "
                            f"(redis {keys_per_s[-1] / 1e6:.2f})")  # fmt: skip
            tier.close()
            client.close()
        finally:
            server.stop(hard=True)
    return {
        "points": rows_out,
        "config": {**asdict(config), "sweep": asdict(sweep)},
        "measures": "the agent's lookup path in-process (L1 + L2 redis-server, no transport) vs plain Redis HMGET",
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
    }


def _interleaved_keys_per_s(fetches: Sequence[Fetch], batches: np.ndarray) -> list[float]:
    """Each fetch's keys per second at its median batch latency, the fetches taking each batch in
    turn: on a machine other work shares, the median says what a path does, where a total over a
    short span says what else ran meanwhile."""
    latencies: list[list[float]] = [[] for _ in fetches]
    for keys in batches:
        for fetch, mine in zip(fetches, latencies, strict=True):
            start = time.perf_counter()
            fetch(keys)
            mine.append(time.perf_counter() - start)
    return [float(batches.shape[1] / statistics.median(mine)) for mine in latencies]


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Draws the sweep as one PNG: keys/s and hit rate against cache ratio (at the base alpha) and
    against alpha (at the base ratio), a line per policy, plain Redis dashed. Needs matplotlib (the
    project's ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from node_agent.errors import UnavailableError

        raise UnavailableError("the sweep figure needs matplotlib: pip install -e '.[bench]'") from None
    cfg = result["config"]
    points = result["points"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    axes_of = (("ratio", "alpha", cfg["alpha"], "cache ratio (share of rows in L1)"),
               ("alpha", "ratio", cfg["cache_ratio"], "Zipf alpha"))  # fmt: skip
    for column, (axis_name, fixed_name, fixed_value, label) in enumerate(axes_of):
        slice_ = [p for p in points if p[fixed_name] == fixed_value]
        for policy, admission in sorted({(p["policy"], p["admission"]) for p in slice_}):
            mine = sorted((p for p in slice_ if (p["policy"], p["admission"]) == (policy, admission)),
                          key=lambda p: p[axis_name])  # fmt: skip
            xs = [p[axis_name] for p in mine]
            axes[0][column].plot(xs, [p["keys_per_s"] / 1e6 for p in mine], marker="o", label=f"{policy}+{admission}")
            axes[1][column].plot(xs, [p["hit_rate"] for p in mine], marker="o", label=f"{policy}+{admission}")
        baseline = sorted({(p[axis_name], p["redis_keys_per_s"]) for p in slice_})
        axes[0][column].plot([x for x, _ in baseline], [k / 1e6 for _, k in baseline], "k--", label="plain Redis")
        fixed = f"{fixed_name} {fixed_value:.0%}" if fixed_name == "ratio" else f"alpha {fixed_value}"
        axes[0][column].set_title(f"keys/s vs {axis_name} ({fixed})")
        axes[1][column].set_title(f"L1 hit rate (distinct keys) vs {axis_name} ({fixed})")
        for row in (0, 1):
            axes[row][column].set_xlabel(label)
            axes[row][column].grid(alpha=0.3)
            axes[row][column].legend(fontsize=8)
            if axis_name == "ratio":
                axes[row][column].set_xscale("log")
        axes[0][column].set_ylabel("M keys/s")
        axes[1][column].set_ylabel("hit rate")
    figure.suptitle(f"L1 policies: lookup path in-process, L2 redis-server; {cfg['rows']} rows x dim {cfg['dim']}, "
                    f"batch {cfg['batch']} ({result['environment']['cpus']} cpus, shared machine)")  # fmt: skip
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
