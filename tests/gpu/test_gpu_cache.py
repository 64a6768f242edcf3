"""The L1 cache on a real GPU (CuPy) against the NumPy cache, step by step: after every query, insert
(new keys and overwrites), update, invalidate and clear, on one table or a shared slab of several,
with keys at the edges of int64, sorted-unique queries, dim 128 and 65,536-key batches, the two caches
must have answered the same and hold the same state arrays (slot keys, owners, stamps, frequencies,
vectors, sketch). Then what only a GPU can get wrong: a kernel that must compile, streams of other
threads, state read on another device, and the served path (host keys in, rows out). Skipped without
a CUDA device. Inputs are drawn fresh each run; the seed is in every failure message and
``HPS_GPU_TEST_SEED=N`` replays a run."""

from __future__ import annotations

import os
import secrets
import threading
import zlib

import numpy as np
import pytest

from node_agent.array_backend import cuda_device_count, get_xp, kernel_probe, to_host
from node_agent.cache import SetAssociativeCache, build_l1
from node_agent.spec import TableSpec
from tests.node_agent.cache_steps import run_side_by_side, steps

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
if cuda_device_count() == 0:
    pytest.skip("no CUDA device visible", allow_module_level=True)

RUN_SEED = int(os.environ.get("HPS_GPU_TEST_SEED") or secrets.randbits(32))


def seeded(*labels: object) -> np.random.Generator:
    return np.random.default_rng([RUN_SEED, zlib.crc32(repr(labels).encode())])


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("admission", ["always", "tinylfu"])
@pytest.mark.parametrize(
    ("scenario", "tables", "dim", "dtype", "batch", "capacity", "count"),
    [
        ("full-hit", 1, 16, np.float32, 256, 512, 20),
        ("full-miss", 1, 16, np.float32, 300, 512, 20),
        ("zipf", 1, 16, np.float32, 400, 512, 40),
        ("zipf", 3, 16, np.float16, 400, 1024, 40),  # a shared slab: three tables' keys side by side
        ("duplicates", 1, 16, np.float16, 400, 512, 30),
        ("zipf", 1, 128, np.float32, 4096, 1 << 15, 12),  # HPS's usual width
        ("zipf", 1, 128, np.float32, 65536, 1 << 17, 6),  # the batch size
    ],
)  # fmt: skip
def test_cupy_cache_matches_the_numpy_cache_state_by_state(
    policy: str, admission: str, scenario: str, tables: int, dim: int, dtype: type, batch: int, capacity: int,
    count: int,
) -> None:  # fmt: skip
    cp, device = get_xp("cuda")
    common = {"dim": dim, "dtype": dtype, "capacity_rows": capacity, "associativity": 32, "policy": policy,
              "admission": admission, "tables": tables}  # fmt: skip
    on_cpu = SetAssociativeCache(**common, native=False)  # type: ignore[arg-type]
    on_gpu = SetAssociativeCache(**common, xp=cp, device=device)  # type: ignore[arg-type]
    on_cpu._sketch_sample = on_gpu._sketch_sample = 4 * batch  # the sketch ages within the run
    rng = seeded(policy, admission, scenario, tables, dim, batch)
    sequence = steps(rng, count=count, scenario=scenario, tables=tables, dim=dim, dtype=dtype, batch=batch,
                     key_space=4 * capacity, cached=lambda t: on_cpu.cached_keys(table_id=t))  # fmt: skip
    try:
        assert run_side_by_side(on_cpu, on_gpu, sequence, convert=cp.asarray) == count
    except AssertionError as failure:
        raise AssertionError(f"HPS_GPU_TEST_SEED={RUN_SEED}: {failure}") from failure
    values, _ = on_gpu.query(cp.arange(8, dtype=cp.int64))
    assert isinstance(values, cp.ndarray)  # rows stay on the device


def test_a_kernel_compiles_and_runs_on_this_gpu() -> None:
    """What get_xp checks before it picks CuPy: NVRTC finds the CUDA headers here."""
    assert kernel_probe(0) is None
    xp, device = get_xp("auto")
    assert xp is cupy and device == "cuda:0"


def test_threads_on_their_own_streams_never_see_a_torn_or_stale_row() -> None:
    """A fill thread overwrites rows (every element of version v is v) on a non-blocking stream of its
    own while a query thread reads on another: each hit must be one whole version, never older than
    what the reader saw before (the cache orders its work by events against each caller's stream)."""
    cp, device = get_xp("cuda")
    cache = SetAssociativeCache(dim=512, capacity_rows=4096, associativity=32, xp=cp, device=device)
    keys = np.arange(2048, dtype=np.int64)
    cache.insert(keys, np.zeros((keys.size, 512), dtype=np.float32))
    stop = threading.Event()
    failures: list[str] = []

    def writer() -> None:
        with cp.cuda.Stream(non_blocking=True):
            for version in range(1, 200):
                if stop.is_set():
                    return
                rows = cp.full((keys.size, 512), float(version), dtype=cp.float32)
                cache.insert(cp.asarray(keys), rows)

    def reader() -> None:
        seen = 0.0
        with cp.cuda.Stream(non_blocking=True):
            for _ in range(400):
                values, hit = cache.query(cp.asarray(keys))
                host, found = to_host(values), to_host(hit)
                rows = host[found]
                if not (rows == rows[:, :1]).all():
                    failures.append("a row mixed two versions")
                    return
                low = float(rows[:, 0].min()) if rows.size else seen
                if low < seen:
                    failures.append(f"a row went back from version {seen} to {low}")
                    return
                seen = float(rows[:, 0].max()) if rows.size else seen
        stop.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[0]


@pytest.mark.skipif(cuda_device_count() < 2, reason="needs two CUDA devices")
def test_state_is_read_on_the_caches_own_device_whatever_is_current() -> None:
    cp, _ = get_xp("cuda")
    cache = SetAssociativeCache(dim=8, capacity_rows=256, associativity=8, xp=cp, device="cuda:1")
    keys = np.arange(100, dtype=np.int64)
    cache.insert(keys, np.ones((100, 8), dtype=np.float32))
    with cp.cuda.Device(0):
        assert cache.size == 100 and cache.size_of(0) == 100
        assert cache.cached_keys().tolist() == keys.tolist()
        assert cache.state()["keys"].shape == (256,)


def test_the_served_path_answers_host_keys_from_a_gpu_l1() -> None:
    """What an agent does: host keys in, L1 on the GPU, misses from the host hash map, host rows out."""
    pytest.importorskip("redis")  # the tiers package imports every tier
    pytest.importorskip("rocksdict")
    from node_agent.lookup import LookupPath
    from node_agent.tiers.base import TableLayout
    from node_agent.tiers.hashmap import HashMapTier

    spec = TableSpec("emb", 50_000, 128)
    rng = seeded("served")
    table = rng.standard_normal((spec.rows, spec.dim)).astype(np.float32)
    tier = HashMapTier([TableLayout.of(spec)])
    tier.insert("emb", np.arange(spec.rows, dtype=np.int64), table)
    l1 = build_l1([spec], memory_per_gpu=20 << 20, device="cuda")
    path = LookupPath([spec], l1=l1, volatile=tier, persistent=None, hit_rate_threshold=1.0)
    try:
        for _ in range(5):
            keys = (rng.zipf(1.2, 4096) - 1) % spec.rows
            np.testing.assert_array_equal(path.lookup("emb", keys), table[keys])
        stats = path.stats()["tables"]["emb"]
        assert stats["device"] == "cuda:0" and stats["hits"] > 0
    finally:
        path.close()


def test_build_l1_puts_each_plan_gpu_on_a_cuda_device() -> None:
    tables = [TableSpec("a", 1000, 16), TableSpec("b", 1000, 16, dtype="float16")]
    l1 = build_l1(tables, memory_per_gpu=1 << 20, device="auto")
    for cache in l1.values():
        assert cache.device.startswith("cuda:")
    keys = np.arange(100, dtype=np.int64)
    l1["a"].insert(keys, np.ones((100, 16), dtype=np.float32))
    values, hit = l1["a"].query(keys)
    assert to_host(hit).all() and float(to_host(values).sum()) == 1600.0
