"""The lookup benchmark's own machinery (``node_agent.local.lookup_bench``): the measuring loop with
several callers, the plain-Redis baselines against a real redis-server, ratios over several runs, and
the report, and the policy sweep. The systems themselves are exercised end to end in ``e2e/``."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from node_agent.local.lookup_bench import (
    SYSTEMS,
    LookupBenchConfig,
    RedisHashBaseline,
    RedisStringBaseline,
    SweepConfig,
    SystemResult,
    _ratios,
    format_table,
    measure,
    run_lookup_sweep,
    tls_cost,
    zipf_batches,
)
from node_agent.local.redis_servers import RedisProcess


def test_several_callers_each_take_their_own_batches_and_every_call_is_counted() -> None:
    config = LookupBenchConfig(rows=1000, dim=4, batch=64, pool_keys=64 * 16)
    batches = zipf_batches(config)
    table = np.arange(config.rows * config.dim, dtype=np.float32).reshape(config.rows, config.dim)
    callers: set[str] = set()
    asked: list[int] = []

    def fetch(keys: np.ndarray) -> np.ndarray:
        callers.add(threading.current_thread().name)
        asked.append(int(keys[0]))
        return table[keys]

    result = measure(fetch, batches, duration=0.3, warmup=0.0, expected=table[batches[0]], concurrency=3)
    assert result.exact and result.batches > 0 and result.p99_ms >= result.p50_ms > 0
    assert {"bench-0", "bench-1", "bench-2"} <= callers
    # keys/s counts whole batches over the measured span
    assert result.keys_per_s * result.seconds == pytest.approx(result.batches * config.batch)


def test_a_wrong_answer_is_reported_as_not_exact() -> None:
    batches = np.arange(12, dtype=np.int64).reshape(3, 4)
    result = measure(lambda k: k * 2, batches, duration=0.05, warmup=0.0, expected=batches[0])
    assert result.exact is False


def test_the_report_names_both_agent_configurations_and_what_each_is() -> None:
    config = LookupBenchConfig(rows=10, dim=2, batch=4, duration=1.0)
    row = {"keys_per_s": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0, "batches": 10, "seconds": 1.0, "exact": True}
    result = {
        **{name: dict(row) for name in SYSTEMS},
        "config": {**config.__dict__, "systems": list(config.systems)},
        "ratios": {"hps/redis": 1.0, "hps/numpy": 1.0},
        "targets": {"met": {"hps_over_redis": False, "hps_over_numpy": True, "hps_p99_ms": True}},
        "ratios_inproc": {"hps/redis": 1.0, "hps/numpy": 1.0},
        "targets_inproc": {"met": {"hps_over_redis": False, "hps_over_numpy": True, "hps_p99_ms": True}},
        "environment": {"cpus": 2},
    }
    text = format_table(result)
    for name, what in SYSTEMS.items():
        assert any(line.startswith(name + " ") and line.endswith(what) for line in text.splitlines())
    assert "hps_inproc: /redis 1.00x" in text and "L2 Redis" in text and "in-process hash map" in text


def test_both_plain_redis_layouts_answer_exactly(redis_server: RedisProcess) -> None:
    client = redis_server.client()
    table = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    keys = np.array([5, 299, 5, 0, 17], dtype=np.int64)
    try:
        for baseline in (RedisHashBaseline(client, dim=4, hashes=7, prefix="test:lookup-bench:h"),
                         RedisStringBaseline(client, dim=4, prefix=b"test:lookup-bench:s:")):  # fmt: skip
            baseline.load(table, chunk=64)
            np.testing.assert_array_equal(baseline.fetch(keys), table[keys])
    finally:
        for name in client.scan_iter(match="test:lookup-bench:*"):
            client.delete(name)


def test_ratios_over_several_runs_are_the_median_of_each_runs_own() -> None:
    def run(keys_per_s: float) -> SystemResult:
        return SystemResult(keys_per_s, 1.0, 2.0, 10, 1.0, True)

    runs = {"hps": [run(100), run(300), run(200)], "redis": [run(50), run(300), run(40)], "numpy": [run(1000)] * 3}
    results = {name: SystemResult.median(r) for name, r in runs.items()}
    ratios, targets = _ratios("hps", results, runs)
    # each run's own ratio: 2.0, 1.0, 5.0 -> median 2.0 (the medians' ratio would say 200/50 = 4.0)
    assert ratios["hps/redis"] == 2.0 and ratios["hps/redis each run"] == [2.0, 1.0, 5.0]
    assert ratios["hps/numpy"] == 0.2 and targets["met"] == {"hps_over_redis": False, "hps_over_numpy": False,
                                                            "hps_p99_ms": True}  # fmt: skip


def test_the_cost_of_tls_is_each_runs_ratio_to_its_plaintext_twin_and_is_reported() -> None:
    def run(keys_per_s: float, p99: float = 2.0) -> SystemResult:
        return SystemResult(keys_per_s=keys_per_s, p50_ms=1.0, p99_ms=p99, batches=10, seconds=1.0, exact=True)

    runs = {"hps": [run(1000.0), run(500.0), run(800.0)], "hps_tls": [run(900.0), run(500.0), run(400.0, 4.0)],
            "hps_inproc": [run(2000.0)] * 3}  # fmt: skip
    results = {name: SystemResult.median(r) for name, r in runs.items()}
    cost = tls_cost(results, runs)
    assert set(cost) == {"hps"}  # hps_inproc_tls did not run: no ratio for it
    assert cost["hps"]["tls/plaintext each run"] == [0.9, 1.0, 0.5]
    assert cost["hps"]["tls/plaintext"] == 0.9  # the median of each run's own ratio
    assert cost["hps"]["plaintext_keys_per_s"] == 800.0 and cost["hps"]["tls_keys_per_s"] == 500.0
    config = LookupBenchConfig(rows=10, dim=2, batch=4, duration=1.0, repeat=3)
    text = format_table({**{n: r.to_dict() for n, r in results.items()}, "tls": cost, "environment": {"cpus": 2},
                         "config": {**config.__dict__, "systems": list(config.systems)}})  # fmt: skip
    assert "TLS on hps: 500 keys/s against 800 in plaintext: x0.90, runs 0.90/1.00/0.50" in text


def test_the_sweep_warms_a_larger_cache_longer_and_answers_exactly(tmp_path: Path) -> None:
    """A small sweep on a real redis-server: every point exact, and a 50% cache warmed on enough keys
    to hold its rows: a few batches leave it missing keys it has simply not been asked for yet."""
    assert SweepConfig(warm_batches=4).warm_batches_for(5, 64) == 4  # the minimum holds for a small cache
    assert SweepConfig(warm_batches=4, warm_keys_per_row=20).warm_batches_for(1000, 64) == 313
    config = LookupBenchConfig(rows=4000, dim=8, batch=256, alpha=1.05, cache_ratio=0.05, seed=3)
    hit_rates = {}
    for keys_per_row in (0, 20):
        sweep = SweepConfig(ratios=(0.05, 0.5), alphas=(1.05,), policies=(("lru", "always"), ("lfu", "tinylfu")),
                            warm_batches=4, batches=20, warm_keys_per_row=keys_per_row)  # fmt: skip
        points = run_lookup_sweep(config, sweep, workdir=tmp_path / str(keys_per_row), say=lambda _: None)["points"]
        assert len(points) == 4 and all(p["exact"] for p in points)
        assert all(p["keys_per_s"] > 0 and p["redis_keys_per_s"] > 0 for p in points)
        hit_rates[keys_per_row] = {(p["policy"], p["ratio"]): p["hit_rate"] for p in points}
    for policy in ("lru", "lfu"):
        assert hit_rates[20][policy, 0.5] > hit_rates[20][policy, 0.05]
        assert hit_rates[20][policy, 0.5] > hit_rates[0][policy, 0.5] + 0.05
