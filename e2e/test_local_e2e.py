"""The README's flow end to end with the real ``hps`` CLI in subprocesses: generate the demo tables,
``hps local up``, ``hps lookup``, a tiny ``hps bench lookup``, ``hps local status`` and ``down``; Redis
killed under a running stack (lookups stay exact from L1/RocksDB, status says degraded); and a
partitioned stack whose agents die one by one under a plan-routed client that stays exact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node_agent.spec import load_model_file, resolve_source

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def hps(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hps_operator", *map(str, args)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"hps {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def demo_model(root: Path) -> Path:
    """A copy of ``examples/demo.yaml`` (sources relative to the copy) in ``root``, or a small model of the
    same shape when the example is not there."""
    example = ROOT / "examples" / "demo.yaml"
    target = root / "demo.yaml"
    if example.exists():
        shutil.copy(example, target)
    else:
        target.write_text("""\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: demo}
spec:
  tables:
  - {name: users, rows: 5000, dim: 32, dtype: float32, source: file://data/demo/users}
  - {name: items, rows: 2000, dim: 16, dtype: float16, source: file://data/demo/items}
  cache: {memoryPerGPU: 1Mi}
  volatileStore: {type: redis}
  persistentStore: {type: rocksdb}
""")
    return target


def lookup_json(endpoint: str, model: str, table: str, keys: list[int]) -> np.ndarray:
    out = hps("lookup", "--endpoint", endpoint, "--model", model, "--table", table,
              "--keys", ",".join(map(str, keys)), "-o", "json").stdout  # fmt: skip
    reply = json.loads(out)
    assert reply["keys"] == keys
    return np.asarray(reply["vectors"])


def source_rows(model_file: Path, table: str, keys: list[int]) -> np.ndarray:
    spec = load_model_file(model_file).table(table)
    assert spec.source is not None
    path = resolve_source(spec.source, base=model_file.parent)
    vectors = np.load(path if path.suffix == ".npy" else path / "vectors.npy")
    return vectors[keys].astype(np.float64)


def generate_demo_data(tmp_path: Path) -> Path:
    model_file = demo_model(tmp_path)
    gen = subprocess.run([sys.executable, str(ROOT / "examples" / "make_demo_data.py"), "-f", str(model_file)],
                         capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=True)  # fmt: skip
    assert "wrote" in gen.stdout
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "make_demo_data.py"), "-f", str(model_file)],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=True)  # fmt: skip
    assert "wrote" not in again.stdout  # seeded data already present is left alone
    return model_file


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """The demo model's tables generated, the stack up; yields (model file, state dir, endpoint)."""
    model_file = generate_demo_data(tmp_path)
    state = tmp_path / "state"
    up = hps("local", "up", "-f", model_file, "--state-dir", state)
    endpoint = next(line.split(": ", 1)[1] for line in up.stdout.splitlines() if line.startswith("endpoint: "))
    try:
        yield model_file, state, endpoint
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_demo_flow_lookup_bench_status_down(demo: tuple[Path, Path, str]) -> None:
    model_file, state, endpoint = demo
    model = load_model_file(model_file)
    for table in model.tables:
        keys = [0, 1, table.rows - 1, 2, 1]
        np.testing.assert_array_equal(lookup_json(endpoint, model.name, table.name, keys),
                                      source_rows(model_file, table.name, keys))  # fmt: skip

    bench = json.loads(hps("bench", "lookup", "--rows", "5000", "--dim", "16", "--batch", "256",
                           "--duration", "0.5", "--warmup", "0.2", "-o", "json").stdout)  # fmt: skip
    for system in ("hps", "hps_tls", "hps_inproc_tls", "redis", "numpy"):
        assert bench[system]["exact"] is True
        assert bench[system]["keys_per_s"] > 0 and bench[system]["p99_ms"] >= bench[system]["p50_ms"]
    assert set(bench["ratios"]) == {"hps/redis", "hps/numpy"}
    # what TLS costs, the same keys through the same agent configuration with and without it
    assert set(bench["tls"]) == {"hps", "hps_inproc"} and bench["tls"]["hps"]["tls/plaintext"] > 0

    report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json").stdout)
    assert report["state"] == "up" and report["endpoints"] == [endpoint]
    hps("local", "down", "--state-dir", state)
    assert hps("local", "status", "--state-dir", state, check=False).returncode == 3


def test_redis_killed_under_a_running_stack_lookups_stay_exact_and_status_says_degraded(
    demo: tuple[Path, Path, str],
) -> None:
    model_file, state, endpoint = demo
    model = load_model_file(model_file)
    table = model.tables[0]
    warm = [0, 1, 2, 3]
    np.testing.assert_array_equal(lookup_json(endpoint, model.name, table.name, warm),
                                  source_rows(model_file, table.name, warm))  # fmt: skip

    saved = json.loads((state / "state.json").read_text())
    for p in saved["processes"]:
        if p["role"] == "redis":
            os.kill(p["pid"], signal.SIGKILL)

    # rows cached in L1 and rows only RocksDB still holds must both come back exact
    cold = [table.rows - 1, table.rows - 2, 5, 0]
    np.testing.assert_array_equal(lookup_json(endpoint, model.name, table.name, cold),
                                  source_rows(model_file, table.name, cold))  # fmt: skip

    deadline = time.monotonic() + 15
    while True:
        status = hps("local", "status", "--state-dir", state, "-o", "json", check=False)
        report = json.loads(status.stdout)
        if (report["state"] == "degraded" and report["agents"][0].get("degraded")) or time.monotonic() > deadline:
            break
        lookup_json(endpoint, model.name, table.name, cold)
        time.sleep(0.5)
    assert status.returncode == 1
    assert report["state"] == "degraded"
    assert report["agents"][0]["degraded"] is True
    assert not any(p["alive"] for p in report["processes"] if p["role"] == "redis")
    assert "degraded" in hps("local", "status", "--state-dir", state, check=False).stdout.lower()


def test_partitioned_stack_routes_by_plan_and_survives_its_agents_dying(tmp_path: Path) -> None:
    """Two partitions of two agents each; the routed client stays exact while partition 0 loses one
    agent (failover inside the partition) and then the other (its keys go to partition 1)."""
    from node_agent.routing import RoutedClient

    model_file = generate_demo_data(tmp_path)
    model = load_model_file(model_file)
    state = tmp_path / "state"
    rng = np.random.default_rng(5)
    batches = {t.name: rng.integers(0, t.rows, size=512) for t in model.tables}

    def assert_exact(client: RoutedClient) -> None:
        got = client.lookup_many(model.name, batches)
        for table, keys in batches.items():
            np.testing.assert_array_equal(got[table].astype(np.float64), source_rows(model_file, table, keys.tolist()))

    try:
        up = hps("local", "up", "-f", model_file, "--state-dir", state, "--partitions", "2",
                 "--agents-per-partition", "2")  # fmt: skip
        assert "plan: version 1," in up.stdout
        saved = json.loads((state / "state.json").read_text())
        assert {p: len(eps) for p, eps in saved["partitions"].items()} == {"0": 2, "1": 2}
        agents = [p for p in saved["processes"] if p["role"] == "agent"]
        with RoutedClient.from_local_state(state, timeout=3.0, retries=1) as client:
            assert client.check_plan(model.name) == []
            assert_exact(client)
            for victim in [p for p in agents if p["partition"] == 0]:
                os.kill(victim["pid"], signal.SIGKILL)
                assert_exact(client)
            stats = client.routing_stats()
            assert stats["fallbacks"] >= 1 and stats["partitions"][1]["keys"] > 0
        report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json", check=False).stdout)
        assert report["state"] == "degraded"
        assert sorted(a["partition"] for a in report["agents"] if a["answering"]) == [1, 1]
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)
