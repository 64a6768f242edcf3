"""The lookup benchmark's own machinery (``node_agent.local.lookup_bench``): the measuring loop with
several callers and the report. The systems themselves are exercised end to end in ``e2e/``."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from node_agent.local.lookup_bench import SYSTEMS, LookupBenchConfig, format_table, measure, zipf_batches


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
