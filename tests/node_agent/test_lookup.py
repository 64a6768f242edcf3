"""The lookup path: exact rows through L1 → L2 → L3 → default, float16, several tables per batch,
sync vs background L1 fills around the hit-rate threshold, tiers that fail (a real redis-server
killed, and an in-process tier switched off), and online updates visible to the next lookup."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from node_agent.cache import TableCache
from node_agent.cache.set_associative import SetAssociativeCache, bytes_for_rows
from node_agent.errors import InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.local.redis_servers import RedisProcess
from node_agent.lookup import LookupPath, build_lookup_path
from node_agent.plan import Assignment, Plan, bucket_of
from node_agent.spec import ModelSpec, TableSpec, parse_model
from node_agent.tiers.base import TableLayout
from node_agent.tiers.hashmap import HashMapTier
from node_agent.tiers.redis_tier import RedisTier

USERS = TableSpec("users", rows=1000, dim=8, default_value=-1.0)
ITEMS = TableSpec("items", rows=500, dim=4, dtype="float16", default_value=0.25)
TABLES = (USERS, ITEMS)


def truth(table: TableSpec, keys: np.ndarray, version: int = 0) -> np.ndarray:
    """The row the model holds for each key: distinct and exactly representable in float16."""
    keys = np.asarray(keys, dtype=np.int64)
    return ((keys[:, None] % 997) + np.arange(table.dim)[None, :] / 8 + version * 1000).astype(table.dtype)


def loaded_hashmap(tables: tuple[TableSpec, ...] = TABLES, keys: slice = slice(None)) -> HashMapTier:
    tier = HashMapTier([TableLayout.of(t) for t in tables])
    for table in tables:
        all_keys = np.arange(table.rows, dtype=np.int64)[keys]
        tier.insert(table.name, all_keys, truth(table, all_keys))
    return tier


class SwitchableTier:
    """Test double around a real :class:`HashMapTier` that raises UnavailableError while ``down``
    (the in-process stand-in for a network partition: the data survives, the tier cannot be asked).
    Counts the calls that reached it."""

    def __init__(self, inner: HashMapTier, name: str = "switchable") -> None:
        self.inner = inner
        self.name = name
        self.down = False
        self.calls = 0

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise UnavailableError(f"{self.name} is switched off")

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._gate()
        return self.inner.fetch(table, keys)

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self._gate()
        self.inner.insert(table, keys, values)

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        self._gate()
        self.inner.evict(table, keys)

    def count(self, table: str) -> int:
        return self.inner.count(table)

    def stats(self) -> Mapping[str, int | float | str]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def l1_for(tables: tuple[TableSpec, ...] = TABLES, rows: int = 64, ways: int = 8) -> dict[str, TableCache]:
    return {
        t.name: TableCache(
            SetAssociativeCache(dim=t.dim, dtype=t.dtype, capacity_rows=rows, associativity=ways)
        )
        for t in tables
    }


@pytest.fixture
def make_path() -> Iterator[Callable[..., LookupPath]]:
    made: list[LookupPath] = []

    def make(**kwargs: Any) -> LookupPath:
        kwargs.setdefault("l1", l1_for())
        kwargs.setdefault("volatile", HashMapTier([TableLayout.of(t) for t in TABLES]))
        kwargs.setdefault("persistent", loaded_hashmap())
        path = LookupPath(TABLES, **kwargs)
        made.append(path)
        return path

    yield make
    for path in made:
        path.close()


# ---------------------------------------------------------------------------------------------


def test_every_key_gets_its_exact_row_and_unknown_keys_get_the_default(
    make_path: Callable[..., LookupPath],
) -> None:
    path = make_path()
    rng = np.random.default_rng(3)
    for _ in range(4):  # cold, then warmer: L3, L2 (written back) and L1 all answer by the end
        keys = np.concatenate([rng.integers(0, USERS.rows, 200), [5000, -7, 5000]])
        rows = path.lookup("users", keys)
        assert rows.shape == (203, 8) and rows.dtype == np.float32
        np.testing.assert_array_equal(rows[:200], truth(USERS, keys[:200]))
        np.testing.assert_array_equal(rows[200:], np.full((3, 8), -1.0, dtype=np.float32))
    stats = path.stats()
    assert stats["tables"]["users"]["hits"] > 0
    assert stats["tables"]["users"]["defaults"] == 8  # distinct keys per call: 5000 and -7, four times
    assert stats["tiers"]["volatile"]["hits"] > 0  # L3 rows were written back to L2
    assert not path.degraded and stats["device"] == "cpu"


def test_sorted_distinct_unsorted_and_repeated_keys_get_the_same_rows_which_the_caller_owns(
    make_path: Callable[..., LookupPath],
) -> None:
    path = make_path()
    keys = np.array([3, 8, 20, 400, 5000], dtype=np.int64)  # ascending and distinct, 5000 unknown
    expected = np.concatenate([truth(USERS, keys[:4]), np.full((1, 8), -1.0, np.float32)])
    for _ in range(3):  # cold (tiers), then warm (every row from L1)
        rows = path.lookup("users", keys)
        np.testing.assert_array_equal(rows, expected)
        rows[:] = 7.0  # the answer is the caller's: scribbling on it changes nothing cached
    shuffled = np.array([400, 3, 3, 5000, 20, 8, 400], dtype=np.int64)
    np.testing.assert_array_equal(path.lookup("users", shuffled), expected[[3, 0, 0, 4, 2, 1, 3]])
    assert path.stats()["tables"]["users"]["keys_requested"] == 3 * 5 + 7


def test_float16_table_and_multi_table_batches(make_path: Callable[..., LookupPath]) -> None:
    path = make_path()
    batch = {"users": np.array([3, 3, 999]), "items": np.array([499, 0, 10**12, 7])}
    out = path.lookup_many(batch)
    assert out["items"].dtype == np.float16 and out["items"].shape == (4, 4)
    np.testing.assert_array_equal(out["items"][[0, 1, 3]], truth(ITEMS, np.array([499, 0, 7])))
    np.testing.assert_array_equal(out["items"][2], np.full(4, 0.25, dtype=np.float16))
    np.testing.assert_array_equal(out["users"], truth(USERS, batch["users"]))
    assert path.lookup("items", np.array([], dtype=np.int64)).shape == (0, 4)


def test_a_path_without_tiers_serves_its_cache_and_defaults(make_path: Callable[..., LookupPath]) -> None:
    l1 = l1_for()
    l1["users"].insert(np.array([4]), truth(USERS, np.array([4])))
    path = make_path(l1=l1, volatile=None, persistent=None)
    rows = path.lookup("users", np.array([4, 5]))
    np.testing.assert_array_equal(rows, np.concatenate([truth(USERS, np.array([4])), np.full((1, 8), -1.0)]))
    with pytest.raises(UnavailableError, match="none configured"):
        path.update("users", np.array([4]), truth(USERS, np.array([4]), 1))


def test_unknown_table_and_bad_keys_are_typed_errors(make_path: Callable[..., LookupPath]) -> None:
    path = make_path()
    with pytest.raises(NotFoundError, match="nope"):
        path.lookup("nope", np.array([1]))
    with pytest.raises(NotFoundError):
        path.lookup_many({"users": np.array([1]), "nope": np.array([1])})
    with pytest.raises(InvalidArgumentError):
        path.lookup("users", np.array([[1, 2]]))
    with pytest.raises(InvalidArgumentError):
        path.lookup("users", np.array([1.5]))
    assert path.stats()["tables"]["users"]["keys_requested"] == 0  # the failed batch did nothing


def test_fills_are_synchronous_below_the_threshold(make_path: Callable[..., LookupPath]) -> None:
    path = make_path(hit_rate_threshold=1.0)
    keys = np.arange(20, dtype=np.int64)
    path.lookup("users", keys)
    assert path.stats()["fills"]["sync"] == 1
    # the fill happened inside the call: the very next lookup is all L1 hits, L3 is not asked
    persistent_hits = path.stats()["tiers"]["persistent"]["hits"]
    np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys))
    assert path.stats()["tiers"]["persistent"]["hits"] == persistent_hits
    assert path.stats()["tables"]["users"]["hits"] == 20


def test_fills_go_to_the_background_above_the_threshold(make_path: Callable[..., LookupPath]) -> None:
    path = make_path(hit_rate_threshold=0.0)
    keys = np.arange(20, dtype=np.int64)
    np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys))
    assert path.wait_for_fills(5.0)
    stats = path.stats()
    assert stats["fills"] == {"sync": 0, "background": 1, "stale": 0}
    assert stats["tables"]["users"]["size"] == 20


class GatedCache(TableCache):
    """A real cache whose inserts wait for ``gate``: lets a test hold the fill worker busy."""

    def __init__(self, cache: SetAssociativeCache, gate: threading.Event) -> None:
        super().__init__(cache)
        self.gate = gate
        self.entered = threading.Event()

    def insert(self, keys: Any, values: Any) -> None:
        self.entered.set()
        self.gate.wait(5.0)
        super().insert(keys, values)


def test_background_fills_beyond_the_queue_are_dropped_and_counted(
    make_path: Callable[..., LookupPath],
) -> None:
    gate = threading.Event()
    users_cache = GatedCache(SetAssociativeCache(dim=8, capacity_rows=256, associativity=8), gate)
    path = make_path(l1={"users": users_cache}, hit_rate_threshold=0.0, fill_queue_size=1)
    for start in range(0, 50, 10):  # the worker holds one fill, the queue one more; three are dropped
        keys = np.arange(start, start + 10, dtype=np.int64)
        np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys))
        if start == 0:
            assert users_cache.entered.wait(5.0)  # the worker holds the first fill
    gate.set()
    assert path.wait_for_fills(5.0)
    stats = path.stats()
    assert stats["dropped_fills"] == 3 and stats["fills"]["background"] == 2
    assert stats["tables"]["users"]["size"] == 20


def test_update_is_visible_to_the_next_lookup_everywhere(make_path: Callable[..., LookupPath]) -> None:
    volatile = HashMapTier([TableLayout.of(t) for t in TABLES])
    persistent = loaded_hashmap()
    path = make_path(volatile=volatile, persistent=persistent, hit_rate_threshold=1.0)
    keys = np.arange(30, dtype=np.int64)
    path.lookup("users", keys)  # now in L1 and (written back) in L2
    changed = np.array([2, 2, 29, 4000])  # a repeated key (last write wins) and a brand-new key
    rows = np.concatenate([truth(USERS, changed[:1], 1) - 5, truth(USERS, changed[1:], 1)])
    path.update("users", changed, rows)
    want = truth(USERS, np.array([2, 29, 4000]), 1)
    np.testing.assert_array_equal(path.lookup("users", np.array([2, 29, 4000])), want)
    for tier in (volatile, persistent):
        values, found = tier.fetch("users", np.array([2, 29, 4000]))
        assert found.all()
        np.testing.assert_array_equal(values, want)
    np.testing.assert_array_equal(path.lookup("users", np.array([3])), truth(USERS, np.array([3])))


def test_a_late_background_fill_never_brings_back_an_old_row(make_path: Callable[..., LookupPath]) -> None:
    gate = threading.Event()
    items_cache = GatedCache(
        SetAssociativeCache(dim=4, dtype=np.float16, capacity_rows=64, associativity=8), gate
    )
    users_cache = TableCache(SetAssociativeCache(dim=8, capacity_rows=256, associativity=8))
    path = make_path(l1={"users": users_cache, "items": items_cache}, hit_rate_threshold=0.0)
    path.lookup("items", np.array([1]))  # keeps the fill worker busy at the gate
    assert items_cache.entered.wait(5.0)
    keys = np.array([1, 2, 3])
    path.lookup("users", keys)  # its fill (old rows) waits in the queue ...
    path.update("users", keys, truth(USERS, keys, 1))  # ... while the update lands
    gate.set()
    assert path.wait_for_fills(5.0)
    assert path.stats()["fills"]["stale"] == 1
    np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys, 1))


def test_killed_redis_degrades_the_path_but_every_row_stays_exact(
    make_redis: Callable[..., RedisProcess],
) -> None:
    server = make_redis(password="test-secret")
    redis_tier = RedisTier([TableLayout.of(t) for t in TABLES], addresses=[server.address],
                           access=server.access, socket_timeout=0.5, model="lookup-test")  # fmt: skip
    now = [0.0]
    path = LookupPath(TABLES, l1=l1_for(rows=16, ways=4), volatile=redis_tier, persistent=loaded_hashmap(),
                      hit_rate_threshold=1.0, clock=lambda: now[0])  # fmt: skip
    try:
        rng = np.random.default_rng(5)
        keys = rng.integers(0, USERS.rows, 300)
        np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys))
        assert redis_tier.count("users") > 0  # L3 rows were written back to Redis
        server.stop(hard=True)
        for _ in range(3):
            keys = rng.integers(0, USERS.rows, 300)
            np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys))
        stats = path.stats()
        assert path.degraded and not stats["tiers"]["volatile"]["up"]
        assert stats["tiers"]["volatile"]["path_errors"] == 1  # not re-tried within the probe interval
        np.testing.assert_array_equal(path.lookup("users", np.array([-3])), np.full((1, 8), -1.0, np.float32))
        restarted = make_redis(password="test-secret", port=server.port)
        now[0] += 1.5
        keys = rng.integers(0, USERS.rows, 300)
        np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys))
        assert not path.degraded and restarted.alive()
    finally:
        path.close()


def test_lookups_skip_a_dead_tier_and_reprobe_it_about_once_a_second(
    make_path: Callable[..., LookupPath],
) -> None:
    now = [100.0]
    volatile = SwitchableTier(loaded_hashmap(), name="l2")
    path = make_path(l1=None, volatile=volatile, persistent=loaded_hashmap(), clock=lambda: now[0])
    volatile.down = True
    for _ in range(10):
        np.testing.assert_array_equal(path.lookup("users", np.array([1, 2])), truth(USERS, np.array([1, 2])))
    assert volatile.calls == 1 and path.degraded
    now[0] += 1.01
    volatile.down = False
    path.lookup("users", np.array([1]))
    assert volatile.calls == 2 and not path.degraded


def test_no_default_is_invented_while_the_authoritative_tier_is_down(
    make_path: Callable[..., LookupPath],
) -> None:
    persistent = SwitchableTier(loaded_hashmap(), name="l3")
    path = make_path(persistent=persistent, hit_rate_threshold=1.0)
    path.lookup("users", np.array([1, 2]))  # cached in L1 now
    persistent.down = True
    np.testing.assert_array_equal(path.lookup("users", np.array([2, 1])), truth(USERS, np.array([2, 1])))
    with pytest.raises(UnavailableError, match="users"):
        path.lookup("users", np.array([1, 77]))  # 77 is in neither L1 nor L2: its row is unknown now
    assert path.degraded


def test_an_update_a_tier_missed_is_replayed_before_that_tier_serves_again(
    make_path: Callable[..., LookupPath],
) -> None:
    now = [0.0]
    volatile = SwitchableTier(loaded_hashmap(), name="l2")
    path = make_path(l1=None, volatile=volatile, persistent=loaded_hashmap(), clock=lambda: now[0])
    keys = np.array([10, 11])
    volatile.down = True
    path.update("users", keys, truth(USERS, keys, 2))  # L3 took it: acknowledged
    assert path.degraded and path.stats()["pending_writes"] == {"volatile/users": 2}
    np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys, 2))
    volatile.down = False  # it comes back still holding the old rows
    now[0] += 2.0
    np.testing.assert_array_equal(path.lookup("users", keys), truth(USERS, keys, 2))
    values, _ = volatile.inner.fetch("users", keys)
    np.testing.assert_array_equal(values, truth(USERS, keys, 2))
    assert not path.degraded and path.stats()["pending_writes"] == {}


def test_an_update_no_tier_takes_raises(make_path: Callable[..., LookupPath]) -> None:
    volatile, persistent = SwitchableTier(loaded_hashmap()), SwitchableTier(loaded_hashmap())
    path = make_path(volatile=volatile, persistent=persistent, hit_rate_threshold=1.0)
    path.lookup("users", np.array([5]))
    volatile.down = persistent.down = True
    with pytest.raises(UnavailableError, match="reached no tier"):
        path.update("users", np.array([5]), truth(USERS, np.array([5]), 1))
    # nothing was acknowledged, so nothing changed: L1 still serves the row the tiers hold
    np.testing.assert_array_equal(path.lookup("users", np.array([5])), truth(USERS, np.array([5])))
    with pytest.raises(InvalidArgumentError):
        path.update("users", np.array([5]), np.zeros((1, 3), dtype=np.float32))


MODEL = """
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: shop}
spec:
  tables:
  - {name: users, rows: 1000, dim: 8, defaultValue: -1.0}
  - {name: items, rows: 500, dim: 4, dtype: float16, defaultValue: 0.25}
  gpusPerPod: 2
  cache: {memoryPerGPU: 16Ki, policy: lfu, hitRateThreshold: 1.0, associativity: 8}
"""


def model() -> ModelSpec:
    import yaml

    return parse_model(yaml.safe_load(MODEL))


def test_build_lookup_path_sizes_l1_from_the_model_and_plan() -> None:
    spec = model()
    plan = Plan(1, 8, 2, 2, "row", (
        Assignment("users", 0, 0, (0, 4), 0),
        Assignment("users", 0, 1, (4, 6), 0),
        Assignment("users", 1, 0, (6, 8), 0),
        Assignment("items", 1, 1, (0, 8), 0),
    ))  # fmt: skip
    path = build_lookup_path(
        spec, volatile=None, persistent=loaded_hashmap(), plan=plan, partition=0, device="cpu"
    )
    try:
        keys = np.arange(-50, 1000, dtype=np.int64)
        for _ in range(2):
            users = path.lookup("users", keys)
            np.testing.assert_array_equal(users[50:], truth(USERS, keys[50:]))
            np.testing.assert_array_equal(users[:50], np.full((50, 8), -1.0, np.float32))
            # items are cached by partition 1 only; partition 0 still answers them exactly
            np.testing.assert_array_equal(path.lookup("items", np.arange(500)), truth(ITEMS, np.arange(500)))
        stats = path.stats()
        assert stats["tables"]["items"]["capacity_rows"] == 0
        users_stats = stats["tables"]["users"]
        assert users_stats["capacity_rows"] > 0 and users_stats["size"] <= users_stats["capacity_rows"]
        assert [s["buckets"] for s in users_stats["shards"]] == [[0, 4], [4, 6]]
        # each of the partition's two GPUs got its own 16Ki (vectors, slot bookkeeping and sketch together)
        assert 16 * 1024 < bytes_for_rows(users_stats["capacity_rows"], dim=8, dtype=np.float32) <= 2 * 16 * 1024
        owned = bucket_of(keys[50:], 8) < 6
        assert users_stats["hits"] > 0 and owned.sum() < 1000
    finally:
        path.close()


@pytest.mark.parametrize(("admission", "hot_rows_survive"), [("tinylfu", True), ("always", False)])
def test_a_burst_of_one_off_keys_leaves_the_hot_rows_in_l1_only_with_admission(
    admission: str, hot_rows_survive: bool
) -> None:
    """HPS admits every miss, so a scan of keys asked once pushes out rows asked for again and again;
    with TinyLFU admission the hot rows stay and are still answered without asking L2."""
    table = TableSpec("users", rows=10_000, dim=8, default_value=-1.0)
    cache = SetAssociativeCache(dim=8, capacity_rows=2048, associativity=8, admission=admission)
    volatile = SwitchableTier(loaded_hashmap((table,)), name="l2")
    path = LookupPath([table], l1={"users": TableCache(cache)}, volatile=volatile, persistent=None,
                      hit_rate_threshold=1.0)  # fmt: skip
    try:
        hot = np.arange(0, 400, 2, dtype=np.int64)
        for _ in range(5):
            np.testing.assert_array_equal(path.lookup("users", hot), truth(table, hot))
        assert set(hot.tolist()) <= set(cache.cached_keys().tolist())
        for start in range(1000, 4000, 1000):  # three batches of keys never asked again
            cold = np.arange(start, start + 1000, dtype=np.int64)
            np.testing.assert_array_equal(path.lookup("users", cold), truth(table, cold))
        calls = volatile.calls
        np.testing.assert_array_equal(path.lookup("users", hot), truth(table, hot))
        assert (volatile.calls == calls) is hot_rows_survive
    finally:
        path.close()
