"""``bench/transport_ceiling.py``: its stand-in lookup (the whole table in RAM) served by the agent's
own gRPC service and same-node socket answers exactly through the real clients, and its report's
budget arithmetic is what the docs say it is. The measuring itself is the lookup benchmark's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node_agent.client import Client
from node_agent.errors import InvalidArgumentError
from node_agent.local.lookup_bench import LookupBenchConfig, SystemResult
from node_agent.same_node import SameNodeClient, SameNodeServer
from node_agent.server import serve
from tests.bench_scripts import load_bench_script

bench = load_bench_script("transport_ceiling")


def test_the_in_ram_lookup_answers_exactly_over_grpc_and_the_same_node_socket(tmp_path: Path) -> None:
    table = np.random.default_rng(3).standard_normal((500, 8), dtype=np.float32)
    keys = np.array([7, 3, 7, 499, 0, 3], dtype=np.int64)  # repeats, any order
    running = serve(bench.DenseLookup(table), model=bench.MODEL)
    near = SameNodeServer(running.servicer, tmp_path / "ceiling.sock").start()
    try:
        with Client(running.endpoint, timeout=10.0) as remote:
            np.testing.assert_array_equal(remote.lookup(bench.MODEL, bench.TABLE, keys), table[keys])
            with pytest.raises(InvalidArgumentError, match="read-only"):  # INVALID_ARGUMENT, typed
                remote.update(bench.MODEL, bench.TABLE, [1], np.ones((1, 8), dtype=np.float32))
        with SameNodeClient(tmp_path / "ceiling.sock", timeout=10.0) as local:
            np.testing.assert_array_equal(local.lookup(bench.MODEL, bench.TABLE, keys), table[keys])
    finally:
        near.stop()
        running.stop()


def _result(keys_per_s: float, p99_ms: float = 1.0) -> SystemResult:
    return SystemResult(keys_per_s=keys_per_s, p50_ms=1.0, p99_ms=p99_ms, batches=100, seconds=1.0, exact=True)


def test_the_report_gives_each_ceiling_its_ratio_and_what_a_5x_target_leaves_for_the_lookup() -> None:
    config = LookupBenchConfig(batch=4096)
    runs = {
        # plain Redis at 4096 keys in 8 ms a batch: a 5x target allows 1.6 ms a batch
        "redis": [_result(4096 / 0.008)] * 3,
        "numpy": [_result(4096 / 0.0004)] * 3,
        "grpc_ceiling": [_result(4096 / 0.002, p99_ms=4.0), _result(4096 / 0.0025), _result(4096 / 0.0016)],
        "same_node_ceiling": [_result(4096 / 0.001)] * 3,
    }
    report = bench.summarise(runs, config, distinct=2000.0)
    grpc_ceiling, same_node = report["ceilings"]["grpc_ceiling"], report["ceilings"]["same_node_ceiling"]
    assert grpc_ceiling["ceiling/redis each run"] == [4.0, 3.2, 5.0]
    assert grpc_ceiling["ceiling/redis"] == 4.0  # the median run's own ratio
    assert grpc_ceiling["budget_ms"] == pytest.approx(1.6)
    assert grpc_ceiling["batch_ms"] == pytest.approx(2.0)  # the median keys/s, as a batch's time
    assert grpc_ceiling["left_for_the_lookup_ms"] == pytest.approx(-0.4)  # the transport alone is over
    assert same_node["ceiling/redis"] == 8.0 and same_node["left_for_the_lookup_ms"] == pytest.approx(0.6)
    assert same_node["ceiling/numpy"] == pytest.approx(0.4)
    assert report["exact"] is True
    assert report["config"]["answer_bytes_per_batch"] == 2000 * config.dim * 4
