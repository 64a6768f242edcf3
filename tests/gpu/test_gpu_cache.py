"""The L1 cache on CuPy returns exactly what the NumPy cache returns, and evicts the same keys, on
random batches drawn fresh each run (full-hit, full-miss, mixed, float16, duplicates); skipped without a
CUDA device. The seed is in every failure message; ``HPS_GPU_TEST_SEED=N`` replays a run."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest

from node_agent.array_backend import cuda_device_count, get_xp, to_host
from node_agent.cache import SetAssociativeCache, build_l1
from node_agent.spec import TableSpec

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
if cuda_device_count() == 0:
    pytest.skip("no CUDA device visible", allow_module_level=True)


def pair(
    dtype: type, policy: str, rows: int = 512, ways: int = 8, dim: int = 16
) -> tuple[SetAssociativeCache, ...]:
    cp, device = get_xp("cuda")
    common = {"dim": dim, "dtype": dtype, "capacity_rows": rows, "associativity": ways, "policy": policy}
    return (
        SetAssociativeCache(**common, xp=np, device="cpu"),  # type: ignore[arg-type]
        SetAssociativeCache(**common, xp=cp, device=device),  # type: ignore[arg-type]
    )


def batches(scenario: str, rng: np.random.Generator, step: int) -> np.ndarray:
    if scenario == "full-hit":
        return rng.integers(0, 64, 256)  # 64 distinct keys always fit in 512 slots
    if scenario == "full-miss":
        return np.arange(step * 300, step * 300 + 300)  # never seen before
    if scenario == "duplicates":
        return rng.choice(rng.integers(0, 2000, 40), 400)  # few distinct keys, many repeats
    return rng.zipf(1.2, 400) + rng.integers(0, 2, 400) * 10**6  # "mixed": Zipf head + a cold tail


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize(
    ("scenario", "dtype"),
    [("full-hit", np.float32), ("full-miss", np.float32), ("mixed", np.float32), ("mixed", np.float16),
     ("duplicates", np.float16)],
)  # fmt: skip
def test_cupy_cache_matches_numpy_cache(scenario: str, dtype: type, policy: str) -> None:
    seed = int(os.environ.get("HPS_GPU_TEST_SEED") or secrets.randbits(32))
    rng = np.random.default_rng(seed)
    on_cpu, on_gpu = pair(dtype, policy)
    try:
        compare_runs(on_cpu, on_gpu, scenario, dtype, rng)
    except AssertionError as failure:
        raise AssertionError(f"HPS_GPU_TEST_SEED={seed}: {failure}") from failure


def compare_runs(on_cpu: SetAssociativeCache, on_gpu: SetAssociativeCache, scenario: str, dtype: type,
                 rng: np.random.Generator) -> None:  # fmt: skip
    for step in range(12):
        keys = batches(scenario, rng, step).astype(np.int64)
        values: np.ndarray = (rng.standard_normal((keys.shape[0], 16)) * 10).astype(dtype)
        cpu_values, cpu_hit = on_cpu.query(keys)
        gpu_values, gpu_hit = on_gpu.query(cupy.asarray(keys))
        assert isinstance(gpu_values, cupy.ndarray)  # rows stay on the device
        np.testing.assert_array_equal(to_host(gpu_hit), cpu_hit)
        np.testing.assert_array_equal(to_host(gpu_values), cpu_values)
        missed = keys[~cpu_hit]
        on_cpu.insert(missed, values[~cpu_hit])
        on_gpu.insert(cupy.asarray(missed), cupy.asarray(values[~cpu_hit]))
        if step % 4 == 3:
            on_cpu.update(keys[:50], values[:50])
            on_gpu.update(cupy.asarray(keys[:50]), cupy.asarray(values[:50]))
            on_cpu.invalidate(keys[50:60])
            on_gpu.invalidate(cupy.asarray(keys[50:60]))
        np.testing.assert_array_equal(on_gpu.cached_keys(), on_cpu.cached_keys())
    for counter in ("hits", "misses", "inserts", "evictions", "size"):
        assert getattr(on_gpu, counter) == getattr(on_cpu, counter), counter
    if scenario == "full-hit":
        assert on_gpu.hits > 0 and on_gpu.evictions == 0
    if scenario == "full-miss":
        assert on_gpu.hits == 0


def test_build_l1_puts_each_plan_gpu_on_a_cuda_device() -> None:
    tables = [TableSpec("a", 1000, 16), TableSpec("b", 1000, 16, dtype="float16")]
    l1 = build_l1(tables, memory_per_gpu=1 << 20, device="auto")
    for cache in l1.values():
        assert cache.device.startswith("cuda:")
    keys = np.arange(100, dtype=np.int64)
    l1["a"].insert(keys, np.ones((100, 16), dtype=np.float32))
    values, hit = l1["a"].query(keys)
    assert to_host(hit).all() and float(to_host(values).sum()) == 1600.0
