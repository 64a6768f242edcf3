"""The set-associative L1 cache: exact rows, float16, duplicate keys, capacity, eviction and admission
checked against a pure-Python reference model of a set-associative LRU/LFU cache with a TinyLFU sketch
(property-based), and the compiled kernel against the array version, every state array after every
step. Each behaviour test runs on both implementations (the compiled one when it is built)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.array_backend import get_xp, to_host
from node_agent.cache import (
    SetAssociativeCache,
    TableCache,
    build_l1,
    bytes_for_rows,
    rows_for_bytes,
)
from node_agent.cache.set_associative import (
    _GOLDEN,
    _MASK64,
    _MIX1,
    _MIX2,
    _SET_SALT,
    _SKETCH_SALT,
    _TABLE_SALT,
    SKETCH_COUNTER_CAP,
    SKETCH_DEPTH,
    native_kernels_available,
)
from node_agent.errors import InvalidArgumentError, UnavailableError
from node_agent.plan import Assignment, Plan, bucket_of
from node_agent.spec import TableSpec
from tests.node_agent.cache_steps import SCENARIOS, run_side_by_side, steps

XP, DEVICE = get_xp("auto")  # the same tests run on CuPy where a GPU is visible
IMPLEMENTATIONS = ["array"] + (["native"] if XP is np else [])
needs_native = pytest.mark.skipif(
    not native_kernels_available(), reason="the native cache kernel was not built (no C compiler at install)"
)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    """Which implementation a test runs on: the array version, or the compiled kernel."""
    if request.param == "native" and not native_kernels_available():
        pytest.skip("the native cache kernel was not built (no C compiler at install)")
    return str(request.param)


def rows_of(keys: np.ndarray, dim: int, version: int = 0, dtype: type = np.float32) -> np.ndarray:
    """A distinct, exactly representable row per (key, version)."""
    base = (np.asarray(keys, dtype=np.int64)[:, None] % 1000) * 8 + np.arange(dim)[None, :] % 8
    return (base + version * 0.5).astype(dtype)


def make_cache(rows: int, *, dim: int = 4, ways: int = 4, policy: str = "lru", dtype: type = np.float32,
               tables: int = 1, admission: str = "always", impl: str = "array") -> SetAssociativeCache:  # fmt: skip
    """Admission defaults to ``always`` here so a test of eviction order sees every key placed; the
    admission tests ask for ``tinylfu``."""
    return SetAssociativeCache(dim=dim, dtype=dtype, capacity_rows=rows, associativity=ways, policy=policy,
                               tables=tables, admission=admission, xp=XP, device=DEVICE,
                               native=impl == "native")  # fmt: skip


def host(pair: tuple[object, object]) -> tuple[np.ndarray, np.ndarray]:
    return to_host(pair[0]), to_host(pair[1])


# ---------------------------------------------------------------------------------------------
# exact behaviour


def test_inserted_rows_come_back_exactly_and_unknown_keys_miss(impl: str) -> None:
    cache = make_cache(64, dim=8, impl=impl)
    keys = np.array([7, 3, 1_000_000_007, -5, 2**62], dtype=np.int64)
    cache.insert(keys, rows_of(keys, 8))
    values, hit = host(cache.query(np.array([3, 99, -5, 2**62, 7, 1_000_000_007])))
    assert hit.tolist() == [True, False, True, True, True, True]
    expected = rows_of(np.array([3, 0, -5, 2**62, 7, 1_000_000_007]), 8)
    expected[1] = 0.0
    np.testing.assert_array_equal(values, expected)
    assert (cache.hits, cache.misses) == (5, 1)
    assert cache.hit_rate == pytest.approx(5 / 6)


def test_float16_rows_are_stored_as_float16(impl: str) -> None:
    cache = make_cache(32, dim=3, dtype=np.float16, impl=impl)
    keys = np.arange(10, dtype=np.int64)
    rows = (np.arange(30, dtype=np.float32).reshape(10, 3) / 7).astype(np.float16)
    cache.insert(keys, rows)
    values, hit = host(cache.query(keys[::-1]))
    assert values.dtype == np.float16 and hit.all()
    np.testing.assert_array_equal(values, rows[::-1])


def test_duplicate_keys_in_one_batch(impl: str) -> None:
    cache = make_cache(32, impl=impl)
    keys = np.array([5, 5, 9, 5, 9], dtype=np.int64)
    rows = rows_of(np.arange(5), 4)
    cache.insert(keys, rows)  # the last write of a key wins
    assert cache.size == 2 and cache.inserts == 2
    values, hit = host(cache.query(np.array([9, 5, 5, 9, 9])))
    assert hit.all()
    np.testing.assert_array_equal(values, rows[[4, 3, 3, 4, 4]])
    assert cache.hits == 2  # counted once per distinct key of the batch


def test_update_overwrites_only_cached_keys_and_invalidate_drops(impl: str) -> None:
    cache = make_cache(32, impl=impl)
    cache.insert(np.array([1, 2]), rows_of(np.array([1, 2]), 4))
    assert cache.update(np.array([2, 3]), rows_of(np.array([2, 3]), 4, version=1)) == 1
    values, hit = host(cache.query(np.array([1, 2, 3])))
    assert hit.tolist() == [True, True, False]
    np.testing.assert_array_equal(
        values[:2], np.concatenate([rows_of(np.array([1]), 4), rows_of(np.array([2]), 4, 1)])
    )
    assert cache.invalidate(np.array([1, 3])) == 1
    assert host(cache.query(np.array([1, 2])))[1].tolist() == [False, True]
    cache.clear()
    assert cache.size == 0 and not host(cache.query(np.array([2])))[1].any()


@pytest.mark.parametrize("admission", ["tinylfu", "always"])
def test_capacity_in_bytes_is_respected_under_a_flood_of_keys(impl: str, admission: str) -> None:
    budget = 10_000
    cache = SetAssociativeCache(dim=16, capacity_bytes=budget, associativity=8, admission=admission, xp=XP,
                                device=DEVICE, native=impl == "native")  # fmt: skip
    assert cache.capacity_rows == (rows_for_bytes(budget, dim=16, dtype=np.float32, admission=admission) // 8) * 8
    assert cache.nbytes <= budget
    state = cache.state()
    # what the budget pays for is what the cache holds: vectors, slot bookkeeping, the sketch
    held = sum(a.nbytes for name, a in state.items() if name != "clock")
    assert held <= cache.nbytes
    rng = np.random.default_rng(7)
    for _ in range(5):
        keys = rng.integers(0, 10**9, size=500)
        cache.insert(keys, rows_of(keys, 16))
        assert cache.size <= cache.capacity_rows
    assert cache.size == cache.capacity_rows  # 2,500 distinct keys fill every set
    assert cache.evictions == cache.inserts - cache.size
    held = cache.cached_keys()
    values, hit = host(cache.query(held))
    assert hit.all()
    np.testing.assert_array_equal(values, rows_of(held, 16))


def test_zero_capacity_cache_misses_everything() -> None:
    cache = SetAssociativeCache(dim=4, capacity_bytes=10, xp=XP, device=DEVICE)
    cache.insert(np.array([1]), rows_of(np.array([1]), 4))
    assert cache.capacity_rows == 0 and not host(cache.query(np.array([1])))[1].any()


def test_lru_evicts_the_least_recently_used_of_the_set(impl: str) -> None:
    cache = make_cache(4, ways=4, impl=impl)  # one set: every key competes
    cache.insert(np.array([1, 2, 3, 4]), rows_of(np.array([1, 2, 3, 4]), 4))
    cache.query(np.array([1]))  # 2 is now the least recently used
    cache.insert(np.array([5]), rows_of(np.array([5]), 4))
    assert cache.cached_keys().tolist() == [1, 3, 4, 5]
    assert cache.evictions == 1


def test_lfu_keeps_frequent_keys_and_new_keys_compete_among_themselves(impl: str) -> None:
    cache = make_cache(4, ways=4, policy="lfu", impl=impl)
    cache.insert(np.array([1, 2, 3, 4]), rows_of(np.array([1, 2, 3, 4]), 4))
    cache.query(np.array([1, 2, 3, 4]))
    cache.query(np.array([1, 2, 4]))  # 3 is the least frequently used
    cache.insert(np.array([10, 11, 12]), rows_of(np.array([10, 11, 12]), 4))
    # 10 evicts 3, then 11 evicts 10 and 12 evicts 11: each new key ranks below every key used twice
    assert cache.cached_keys().tolist() == [1, 2, 4, 12]


def test_invalid_arguments_are_rejected(impl: str) -> None:
    cache = make_cache(8, impl=impl)
    with pytest.raises(InvalidArgumentError):
        cache.query(np.array([[1, 2]]))
    with pytest.raises(InvalidArgumentError):
        cache.query(np.array([1.5]))
    with pytest.raises(InvalidArgumentError):
        cache.insert(np.array([1, 2]), np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        SetAssociativeCache(dim=4, capacity_rows=8, policy="fifo")
    with pytest.raises(InvalidArgumentError, match="admission must be one of tinylfu, always"):
        SetAssociativeCache(dim=4, capacity_rows=8, admission="lottery")


def test_shared_cache_keeps_tables_apart(impl: str) -> None:
    cache = make_cache(64, tables=2, impl=impl)
    users, items = TableCache(cache, table_id=0, name="users"), TableCache(cache, table_id=1, name="items")
    keys = np.arange(8, dtype=np.int64)
    users.insert(keys, rows_of(keys, 4, version=0))
    items.insert(keys, rows_of(keys, 4, version=3))
    for view, version in ((users, 0), (items, 3)):
        values, hit = host(view.query(keys))
        assert hit.all()
        np.testing.assert_array_equal(values, rows_of(keys, 4, version))
    items.invalidate(keys[:4])
    assert (users.size, items.size, cache.size) == (8, 4, 12)
    assert users.hits == 8 and items.hits == 8


def test_build_l1_splits_the_gpu_budget_and_routes_buckets() -> None:
    big = TableSpec("big", rows=10_000, dim=8)
    small = TableSpec("small", rows=100, dim=8)
    split = TableSpec("split", rows=1_000, dim=4)
    budget = bytes_for_rows(2_000, dim=8, dtype=np.float32)
    plan = Plan(1, 4, 2, 2, "row", (
        Assignment("big", 0, 0, (0, 4), big.total_bytes),
        Assignment("small", 0, 0, (0, 4), small.total_bytes),
        Assignment("split", 0, 0, (0, 2), 0),
        Assignment("split", 0, 1, (2, 3), 0),
        Assignment("split", 1, 1, (3, 4), 0),
    ))  # fmt: skip
    l1 = build_l1([big, small, split], memory_per_gpu=budget, plan=plan, partition=0, associativity=4,
                  device=DEVICE)  # fmt: skip
    assert set(l1) == {"big", "small", "split"}
    # GPU 0's budget is shared in proportion to what each shard would need whole
    assert l1["small"].stats()["capacity_rows"] < l1["big"].stats()["capacity_rows"]
    assert l1["big"].stats()["capacity_rows"] + l1["small"].stats()["capacity_rows"] <= 2_000
    # buckets 2 of "split" live on GPU 1, bucket 3 belongs to partition 1: never cached here
    keys = np.arange(1_000, dtype=np.int64)
    l1["split"].insert(keys, rows_of(keys, 4))
    values, hit = host(l1["split"].query(keys))

    bucket = bucket_of(keys, 4)
    assert not hit[bucket == 3].any()
    assert hit[bucket == 2].mean() > 0.85  # GPU 1 holds only this shard: it fits, with headroom
    assert 0 < hit[bucket < 2].mean() < 0.5  # GPU 0's share is small next to "big"
    np.testing.assert_array_equal(values[hit], rows_of(keys[hit], 4))


def test_build_l1_shared_layout_groups_tables_by_dim_and_dtype() -> None:
    tables = [TableSpec("a", 100, 8), TableSpec("b", 100, 8), TableSpec("c", 100, 8, dtype="float16")]
    l1 = build_l1(tables, memory_per_gpu=10**6, layout="shared", device=DEVICE)
    a, b, c = (l1[n] for n in "abc")
    assert isinstance(a, TableCache) and isinstance(b, TableCache) and isinstance(c, TableCache)
    assert a.cache is b.cache and c.cache is not a.cache


# ---------------------------------------------------------------------------------------------
# property-based: the vectorised cache against a one-key-at-a-time reference model


@dataclass
class _Entry:
    freq: int
    stamp: int
    value: np.ndarray


def _mix(z: int) -> int:
    """SplitMix64's finaliser on Python ints: the reference computes every hash itself."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


class ReferenceCache:
    """A set-associative cache done the obvious way: a dict per set, one key at a time, distinct
    keys of a batch in ascending order; the victim is an empty slot, else min (frequency, stamp) for
    LFU or min stamp for LRU. With admission, a count-min sketch in a dict: a new key that finds its
    set full replaces the victim only if its estimate is larger."""

    def __init__(self, cache: SetAssociativeCache, table_id: int = 0) -> None:
        self.ways = cache.ways
        self.lfu = cache.policy == "lfu"
        self.admission = cache.admission == "tinylfu"
        self.set_count = cache.sets
        self.width = cache.sketch_width
        self.sample = 10 * cache.capacity_rows
        self.salt = (_SET_SALT ^ (table_id * _TABLE_SALT)) & _MASK64
        self.sets: list[dict[int, _Entry]] = [{} for _ in range(cache.sets)]
        self.sketch: dict[int, int] = {}
        self.recorded = 0
        self.clock = 0

    def _hash(self, key: int) -> int:
        return _mix((key & _MASK64) ^ self.salt)

    def set_of(self, key: int) -> int:
        return self._hash(key) % self.set_count

    def _cells(self, key: int) -> list[int]:
        h = _mix(self._hash(key) ^ _SKETCH_SALT)
        block = (h & 0xFFFFFFFF) % (SKETCH_DEPTH * self.width // 64)
        return [block * 64 + r * 16 + ((h >> (32 + 4 * r)) & 15) for r in range(SKETCH_DEPTH)]

    def estimate(self, key: int) -> int:
        return min(self.sketch.get(c, 0) for c in self._cells(key))

    def _record(self, distinct: list[int]) -> None:
        raised = {c: min(self.sketch.get(c, 0) + 1, SKETCH_COUNTER_CAP) for k in distinct for c in self._cells(k)}
        self.sketch.update(raised)
        self.recorded += len(distinct)
        while self.recorded >= self.sample:
            self.sketch = {c: v >> 1 for c, v in self.sketch.items()}
            self.recorded //= 2

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def query(self, keys: list[int]) -> tuple[list[bool], list[np.ndarray | None]]:
        distinct = sorted(set(keys))
        if self.admission and distinct:
            self._record(distinct)
        for key in distinct:
            entry = self.sets[self.set_of(key)].get(key)
            if entry is not None:
                entry.freq += 1
                entry.stamp = self._tick()
        found = [self.sets[self.set_of(k)].get(k) for k in keys]
        return [e is not None for e in found], [None if e is None else e.value for e in found]

    def insert(self, keys: list[int], values: np.ndarray) -> None:
        last = dict(zip(keys, values, strict=True))
        present = sorted(k for k in last if k in self.sets[self.set_of(k)])
        for key in present:
            entry = self.sets[self.set_of(key)][key]
            entry.value, entry.freq, entry.stamp = last[key], entry.freq + 1, self._tick()
        for key in sorted(k for k in last if k not in present):
            slots = self.sets[self.set_of(key)]
            stamp = self._tick()  # every new key takes a stamp, placed or not
            if len(slots) == self.ways:
                victim = min(slots, key=lambda k: ((slots[k].freq if self.lfu else 0), slots[k].stamp))
                if self.admission and not self.estimate(key) > self.estimate(victim):
                    continue
                del slots[victim]
            slots[key] = _Entry(1, stamp, last[key])

    def update(self, keys: list[int], values: np.ndarray) -> None:
        for key, value in dict(zip(keys, values, strict=True)).items():
            entry = self.sets[self.set_of(key)].get(key)
            if entry is not None:
                entry.value = value

    def invalidate(self, keys: list[int]) -> None:
        for key in keys:
            self.sets[self.set_of(key)].pop(key, None)

    def contents(self) -> list[int]:
        return sorted(k for slots in self.sets for k in slots)


KEYS = st.lists(st.integers(min_value=-20, max_value=40), min_size=0, max_size=24)
OPERATION = st.tuples(st.sampled_from(["query", "query", "insert", "insert", "update", "invalidate"]), KEYS)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    sets=st.integers(min_value=1, max_value=4),
    ways=st.integers(min_value=1, max_value=5),
    policy=st.sampled_from(["lru", "lfu"]),
    admission=st.sampled_from(["always", "tinylfu"]),
    stamp_limit=st.sampled_from([1 << 44, 48]),
    operations=st.lists(OPERATION, min_size=1, max_size=30),
)
def test_cache_matches_the_reference_model(impl: str, sets: int, ways: int, policy: str, admission: str,
                                           stamp_limit: int, operations: list[tuple[str, list[int]]]) -> None:  # fmt: skip
    if impl == "native" and not native_kernels_available():
        pytest.skip("the native cache kernel was not built")
    cache = make_cache(sets * ways, ways=ways, policy=policy, admission=admission, impl=impl)
    cache._stamp_limit = stamp_limit  # a tiny limit forces stamp renumbering mid-sequence
    cache._sketch_sample = reference_sample = 20  # and a tiny sample forces the sketch to age
    reference = ReferenceCache(cache)
    reference.sample = reference_sample
    for step, (operation, keys) in enumerate(operations):
        key_array = np.asarray(keys, dtype=np.int64)
        values = rows_of(key_array, 4, version=step)
        if operation == "query":
            got, hit = host(cache.query(key_array))
            want_hit, want_values = reference.query(keys)
            assert hit.tolist() == want_hit, f"step {step}"
            for row, value in zip(got, want_values, strict=True):
                np.testing.assert_array_equal(row, value if value is not None else np.zeros(4, np.float32))
        else:
            getattr(cache, operation)(
                *((key_array, values) if operation in ("insert", "update") else (key_array,))
            )
            getattr(reference, operation)(*((keys, values) if operation in ("insert", "update") else (keys,)))
        assert cache.cached_keys().tolist() == reference.contents(), f"after step {step} ({operation})"
        assert cache.size <= cache.capacity_rows
        if admission == "tinylfu" and keys:
            assert to_host(cache.sketch_estimate(key_array)).tolist() == [reference.estimate(k) for k in keys]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("admission", ["always", "tinylfu"])
def test_stamp_renumbering_keeps_eviction_order(impl: str, policy: str, admission: str) -> None:
    """A long seeded run with a tiny stamp limit: stamps get renumbered every few batches, and the
    cache must still evict exactly as the reference model does."""
    rng = np.random.default_rng(11)
    cache = make_cache(8, ways=4, policy=policy, admission=admission, impl=impl)
    cache._stamp_limit = 40
    reference = ReferenceCache(cache)
    for step in range(300):
        keys = rng.integers(0, 24, size=int(rng.integers(1, 6))).tolist()
        key_array = np.asarray(keys, dtype=np.int64)
        if step % 3:
            cache.insert(key_array, rows_of(key_array, 4, step))
            reference.insert(keys, rows_of(key_array, 4, step))
        else:
            assert host(cache.query(key_array))[1].tolist() == reference.query(keys)[0]
        assert cache.cached_keys().tolist() == reference.contents(), f"step {step}"


# ---------------------------------------------------------------------------------------------
# admission


def test_a_cold_key_does_not_push_out_a_hot_row_until_it_is_asked_for_more(impl: str) -> None:
    cache = make_cache(4, ways=4, admission="tinylfu", impl=impl)  # one set
    hot = np.array([1, 2, 3, 4])
    for _ in range(3):  # asked in three batches: estimate 3 each
        cache.query(hot)
    cache.insert(hot, rows_of(hot, 4))
    cold = np.array([99])
    cache.query(cold)
    cache.insert(cold, rows_of(cold, 4))  # asked once: loses against the LRU victim (asked three times)
    assert cache.cached_keys().tolist() == [1, 2, 3, 4] and cache.evictions == 0
    for _ in range(3):  # now asked four times in all, more than any victim
        assert not host(cache.query(cold))[1].any()
    cache.insert(cold, rows_of(cold, 4))
    assert cache.cached_keys().tolist() == [2, 3, 4, 99] and cache.evictions == 1
    np.testing.assert_array_equal(host(cache.query(cold))[0], rows_of(cold, 4))


def test_the_sketch_ages_so_popularity_that_moves_is_followed(impl: str) -> None:
    cache = make_cache(16, ways=4, admission="tinylfu", impl=impl)  # samples 10 x 16 keys, then halves
    old = np.arange(8)
    for _ in range(12):
        cache.query(old)  # 96 keys recorded: counters capped at... 12
    assert to_host(cache.sketch_estimate(old)).min() >= 12
    new = np.arange(100, 108)
    for _ in range(10):  # past 160 recorded keys, every counter is halved
        cache.query(new)
    assert to_host(cache.sketch_estimate(old)).max() <= 7
    assert to_host(cache.sketch_estimate(new)).min() >= 5


def test_admission_and_lfu_raise_the_hit_rate_on_zipf_traffic(impl: str) -> None:
    """The lookup path's use on a seeded Zipf trace (query each batch's distinct keys, offer the
    misses): admitting only keys hotter than their victim, or evicting the least frequent, means
    fewer misses sent to L2 than HPS's admit-everything LRU."""
    rng = np.random.default_rng(2024)
    rows = 20_000
    key_of_rank = rng.permutation(rows)
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -1.05
    cdf = np.cumsum(weights) / weights.sum()
    trace = [np.unique(key_of_rank[np.minimum(np.searchsorted(cdf, rng.random(1024)), rows - 1)])
             for _ in range(150)]  # fmt: skip
    hit_rates = {}
    for policy in ("lru", "lfu"):
        for admission in ("always", "tinylfu"):
            cache = SetAssociativeCache(dim=4, capacity_rows=2048, associativity=32, policy=policy,
                                        admission=admission, native=impl == "native")  # fmt: skip
            for index, keys in enumerate(trace):
                if index == 50:
                    cache.reset_counters()  # measure once warm
                _, hit = cache.query(keys, sorted_unique=True)
                missed = keys[~hit]
                cache.insert(missed, rows_of(missed, 4))
            hit_rates[f"{policy}+{admission}"] = cache.hit_rate
    assert hit_rates["lru+tinylfu"] > hit_rates["lru+always"] + 0.04, hit_rates
    assert hit_rates["lfu+always"] > hit_rates["lru+always"] + 0.04, hit_rates


def test_native_kernel_requested_where_it_cannot_run_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import node_agent.cache.native as native

    monkeypatch.setattr(native, "Kernel", None)
    with pytest.raises(UnavailableError, match="not built"):
        SetAssociativeCache(dim=4, capacity_rows=8, native=True)
    assert not SetAssociativeCache(dim=4, capacity_rows=8).native  # the array version serves instead


# ---------------------------------------------------------------------------------------------
# the compiled kernel against the array version: every state array after every step


@needs_native
@pytest.mark.skipif(XP is not np, reason="the native kernel runs on NumPy caches")
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("admission", ["always", "tinylfu"])
@pytest.mark.parametrize(
    ("scenario", "tables", "dim", "dtype", "batch", "capacity"),
    [
        ("zipf", 1, 8, np.float32, 200, 256),
        ("zipf", 3, 16, np.float16, 300, 512),  # a shared slab: three tables' keys side by side
        ("full-hit", 1, 4, np.float32, 64, 64),
        ("full-miss", 2, 8, np.float32, 300, 128),
        ("duplicates", 1, 128, np.float32, 500, 1024),
        ("zipf", 1, 128, np.float32, 20_000, 8192),  # large batches at HPS's usual width
    ],
)  # fmt: skip
def test_native_kernel_matches_the_array_version_step_by_step(
    policy: str, admission: str, scenario: str, tables: int, dim: int, dtype: type, batch: int, capacity: int
) -> None:
    assert scenario in SCENARIOS
    rng = np.random.default_rng(zlib.crc32(f"{policy} {admission} {scenario} {tables} {dim} {batch}".encode()))
    common = {"dim": dim, "dtype": dtype, "capacity_rows": capacity, "associativity": 8, "policy": policy,
              "admission": admission, "tables": tables}  # fmt: skip
    array, native = SetAssociativeCache(**common, native=False), SetAssociativeCache(**common, native=True)  # type: ignore[arg-type]
    assert native.native and not array.native
    native._sketch_sample = array._sketch_sample = 4 * batch  # age the sketch within the run
    sequence = steps(rng, count=12 if batch > 1000 else 40, scenario=scenario, tables=tables, dim=dim, dtype=dtype,
                     batch=batch, key_space=4 * capacity, cached=lambda t: array.cached_keys(table_id=t))  # fmt: skip
    assert run_side_by_side(array, native, sequence) > 0
    assert array.hits > 0 or scenario == "full-miss"
