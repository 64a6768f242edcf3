"""The set-associative L1 cache: exact rows, float16, duplicate keys, capacity, and eviction checked
against a pure-Python reference model of a set-associative LRU/LFU cache (property-based)."""

from __future__ import annotations

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
from node_agent.errors import InvalidArgumentError
from node_agent.plan import Assignment, Plan, bucket_of
from node_agent.spec import TableSpec

XP, DEVICE = get_xp("auto")  # the same tests run on CuPy where a GPU is visible


def rows_of(keys: np.ndarray, dim: int, version: int = 0, dtype: type = np.float32) -> np.ndarray:
    """A distinct, exactly representable row per (key, version)."""
    base = (np.asarray(keys, dtype=np.int64)[:, None] % 1000) * 8 + np.arange(dim)[None, :] % 8
    return (base + version * 0.5).astype(dtype)


def make_cache(rows: int, *, dim: int = 4, ways: int = 4, policy: str = "lru", dtype: type = np.float32,
               tables: int = 1) -> SetAssociativeCache:  # fmt: skip
    return SetAssociativeCache(dim=dim, dtype=dtype, capacity_rows=rows, associativity=ways, policy=policy,
                               tables=tables, xp=XP, device=DEVICE)  # fmt: skip


def host(pair: tuple[object, object]) -> tuple[np.ndarray, np.ndarray]:
    return to_host(pair[0]), to_host(pair[1])


# ---------------------------------------------------------------------------------------------
# exact behaviour


def test_inserted_rows_come_back_exactly_and_unknown_keys_miss() -> None:
    cache = make_cache(64, dim=8)
    keys = np.array([7, 3, 1_000_000_007, -5, 2**62], dtype=np.int64)
    cache.insert(keys, rows_of(keys, 8))
    values, hit = host(cache.query(np.array([3, 99, -5, 2**62, 7, 1_000_000_007])))
    assert hit.tolist() == [True, False, True, True, True, True]
    expected = rows_of(np.array([3, 0, -5, 2**62, 7, 1_000_000_007]), 8)
    expected[1] = 0.0
    np.testing.assert_array_equal(values, expected)
    assert (cache.hits, cache.misses) == (5, 1)
    assert cache.hit_rate == pytest.approx(5 / 6)


def test_float16_rows_are_stored_as_float16() -> None:
    cache = make_cache(32, dim=3, dtype=np.float16)
    keys = np.arange(10, dtype=np.int64)
    rows = (np.arange(30, dtype=np.float32).reshape(10, 3) / 7).astype(np.float16)
    cache.insert(keys, rows)
    values, hit = host(cache.query(keys[::-1]))
    assert values.dtype == np.float16 and hit.all()
    np.testing.assert_array_equal(values, rows[::-1])


def test_duplicate_keys_in_one_batch() -> None:
    cache = make_cache(32)
    keys = np.array([5, 5, 9, 5, 9], dtype=np.int64)
    rows = rows_of(np.arange(5), 4)
    cache.insert(keys, rows)  # the last write of a key wins
    assert cache.size == 2 and cache.inserts == 2
    values, hit = host(cache.query(np.array([9, 5, 5, 9, 9])))
    assert hit.all()
    np.testing.assert_array_equal(values, rows[[4, 3, 3, 4, 4]])
    assert cache.hits == 2  # counted once per distinct key of the batch


def test_update_overwrites_only_cached_keys_and_invalidate_drops() -> None:
    cache = make_cache(32)
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


def test_capacity_in_bytes_is_respected_under_a_flood_of_keys() -> None:
    budget = 10_000
    cache = SetAssociativeCache(dim=16, capacity_bytes=budget, associativity=8, xp=XP, device=DEVICE)
    assert cache.capacity_rows == (rows_for_bytes(budget, dim=16, dtype=np.float32) // 8) * 8
    assert cache.nbytes <= budget
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


def test_lru_evicts_the_least_recently_used_of_the_set() -> None:
    cache = make_cache(4, ways=4)  # one set: every key competes
    cache.insert(np.array([1, 2, 3, 4]), rows_of(np.array([1, 2, 3, 4]), 4))
    cache.query(np.array([1]))  # 2 is now the least recently used
    cache.insert(np.array([5]), rows_of(np.array([5]), 4))
    assert cache.cached_keys().tolist() == [1, 3, 4, 5]
    assert cache.evictions == 1


def test_lfu_keeps_frequent_keys_and_new_keys_compete_among_themselves() -> None:
    cache = make_cache(4, ways=4, policy="lfu")
    cache.insert(np.array([1, 2, 3, 4]), rows_of(np.array([1, 2, 3, 4]), 4))
    cache.query(np.array([1, 2, 3, 4]))
    cache.query(np.array([1, 2, 4]))  # 3 is the least frequently used
    cache.insert(np.array([10, 11, 12]), rows_of(np.array([10, 11, 12]), 4))
    # 10 evicts 3, then 11 evicts 10 and 12 evicts 11: each new key ranks below every key used twice
    assert cache.cached_keys().tolist() == [1, 2, 4, 12]


def test_invalid_arguments_are_rejected() -> None:
    cache = make_cache(8)
    with pytest.raises(InvalidArgumentError):
        cache.query(np.array([[1, 2]]))
    with pytest.raises(InvalidArgumentError):
        cache.query(np.array([1.5]))
    with pytest.raises(InvalidArgumentError):
        cache.insert(np.array([1, 2]), np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        SetAssociativeCache(dim=4, capacity_rows=8, policy="fifo")


def test_shared_cache_keeps_tables_apart() -> None:
    cache = make_cache(64, tables=2)
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


class ReferenceCache:
    """A set-associative cache done the obvious way: a dict per set, one key at a time, distinct
    keys of a batch in ascending order; the victim is an empty slot, else min (frequency, stamp) for
    LFU or min stamp for LRU."""

    def __init__(self, cache: SetAssociativeCache) -> None:
        self.ways = cache.ways
        self.lfu = cache.policy == "lfu"
        self.set_of = lambda key: int(to_host(cache.set_of(XP.asarray([key], dtype=XP.int64)))[0])
        self.sets: list[dict[int, _Entry]] = [{} for _ in range(cache.sets)]
        self.clock = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def query(self, keys: list[int]) -> tuple[list[bool], list[np.ndarray | None]]:
        for key in sorted(set(keys)):
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
            if len(slots) == self.ways:
                victim = min(slots, key=lambda k: ((slots[k].freq if self.lfu else 0), slots[k].stamp))
                del slots[victim]
            slots[key] = _Entry(1, self._tick(), last[key])

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
OPERATION = st.tuples(st.sampled_from(["query", "insert", "insert", "update", "invalidate"]), KEYS)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    sets=st.integers(min_value=1, max_value=4),
    ways=st.integers(min_value=1, max_value=5),
    policy=st.sampled_from(["lru", "lfu"]),
    stamp_limit=st.sampled_from([1 << 44, 48]),
    operations=st.lists(OPERATION, min_size=1, max_size=30),
)
def test_cache_matches_the_reference_model(sets: int, ways: int, policy: str, stamp_limit: int,
                                           operations: list[tuple[str, list[int]]]) -> None:  # fmt: skip
    cache = make_cache(sets * ways, ways=ways, policy=policy)
    cache._stamp_limit = stamp_limit  # a tiny limit forces stamp renumbering mid-sequence
    reference = ReferenceCache(cache)
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


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_stamp_renumbering_keeps_eviction_order(policy: str) -> None:
    """A long seeded run with a tiny stamp limit: stamps get renumbered every few batches, and the
    cache must still evict exactly as the reference model does."""
    rng = np.random.default_rng(11)
    cache = make_cache(8, ways=4, policy=policy)
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
