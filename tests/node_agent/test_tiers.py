"""The storage tiers against real stores: in-process hash map, RocksDB in tmp_path, and real redis-server
processes (standalone, two client-side shards, a 3-master Redis Cluster)."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from node_agent.errors import InvalidArgumentError, NotFoundError, TableSourceError, UnavailableError
from node_agent.local.redis_servers import RedisCluster, RedisProcess, start_redis
from node_agent.redis_access import RedisAccess
from node_agent.tiers import HashMapTier, RedisTier, RocksDBTier, TableLayout, Tier, open_tiers, redis_tier

PASSWORD = "test-secret"
#: the default user with that password, as the data plane\'s clients take it
ACCESS = RedisAccess(password=PASSWORD)
LAYOUTS = [
    TableLayout("users", 16, np.dtype(np.float32)),
    TableLayout("items", 8, np.dtype(np.float16)),
]
_models = itertools.count()

TierFactory = Callable[[list[TableLayout]], Tier]


@pytest.fixture(scope="module")
def second_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A second standalone server, so client-side sharding spans two real processes."""
    server = start_redis(tmp_path_factory.mktemp("redis-shard-2"), password=PASSWORD)
    yield server
    server.stop(hard=True)


def _model_name() -> str:
    # every tier instance writes under its own model name, so tests sharing a server never collide
    return f"m{next(_models)}"


@pytest.fixture(params=["compiled", "hiredis"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a lookup's HMGET replies are read: parsed in C straight into the rows (when built), or by
    hiredis (the fallback, and every other reply)."""
    if request.param == "compiled" and redis_tier._feed_rows is None:
        pytest.skip("the compiled reply reader was not built (no C compiler)")
    if request.param == "hiredis":
        monkeypatch.setattr(redis_tier, "_feed_rows", None)
    return str(request.param)


@pytest.fixture(params=["hashmap", "rocksdb", "redis", "redis-hiredis", "redis-2-shards", "redis-cluster"])
def make_tier(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TierFactory]:
    opened: list[Tier] = []
    if request.param == "redis-hiredis":  # standalone, its replies parsed by hiredis
        monkeypatch.setattr(redis_tier, "_feed_rows", None)

    def make(layouts: list[TableLayout]) -> Tier:
        tier: Tier
        if request.param == "hashmap":
            tier = HashMapTier(layouts)
        elif request.param == "rocksdb":
            tier = RocksDBTier(tmp_path / "rocksdb", layouts)
        elif request.param in ("redis", "redis-hiredis"):
            tier = RedisTier(
                layouts, addresses=[redis_server.address], access=ACCESS, model=_model_name()
            )
        elif request.param == "redis-2-shards":
            second: RedisProcess = request.getfixturevalue("second_redis")
            tier = RedisTier(layouts, addresses=[redis_server.address, second.address], access=ACCESS,
                             model=_model_name(), partitions=8, chunk_keys=100)  # fmt: skip
        else:
            cluster: RedisCluster = request.getfixturevalue("redis_cluster")
            tier = RedisTier(layouts, addresses=cluster.addresses[:1], access=ACCESS, cluster=True,
                             model=_model_name(), chunk_keys=64)  # fmt: skip
        opened.append(tier)
        return tier

    yield make
    for tier in opened:
        for layout in LAYOUTS:
            if request.param != "rocksdb":
                tier.evict(layout.name)
        tier.close()


def _random_rows(rng: np.random.Generator, n: int, layout: TableLayout) -> np.ndarray:
    return rng.standard_normal((n, layout.dim)).astype(layout.dtype)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: str(layout.dtype))
def test_round_trip_is_exact_and_missing_keys_come_back_as_zero(
    make_tier: TierFactory, layout: TableLayout
) -> None:
    rng = np.random.default_rng(7)
    tier = make_tier(LAYOUTS)
    keys = rng.permutation(np.unique(rng.integers(-(2**40), 2**40, size=1500)))[:1400] * 9973
    keys[:2] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    values = _random_rows(rng, len(keys), layout)
    tier.insert(layout.name, keys, values)

    absent = np.arange(1, 300, dtype=np.int64) * 9973 + 5  # not multiples of 9973: never inserted
    query = np.concatenate([keys, absent])
    order = rng.permutation(len(query))
    got, found = tier.fetch(layout.name, query[order])

    assert got.dtype == layout.dtype and got.shape == (len(query), layout.dim)
    expected_found = np.concatenate([np.ones(len(keys), bool), np.zeros(len(absent), bool)])[order]
    np.testing.assert_array_equal(found, expected_found)
    expected = np.concatenate([values, np.zeros((len(absent), layout.dim), layout.dtype)])[order]
    np.testing.assert_array_equal(got, expected)
    assert tier.count(layout.name) == len(keys)
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["errors"]) == (len(keys), len(absent), 0)


def test_keys_that_are_one_run_of_integers_and_keys_just_outside_it(make_tier: TierFactory) -> None:
    # a table keyed by row index is one run of consecutive keys (the hash map finds those without a search)
    rng = np.random.default_rng(13)
    layout = LAYOUTS[0]
    tier = make_tier(LAYOUTS)
    keys = np.arange(-50, 450, dtype=np.int64)
    values = _random_rows(rng, len(keys), layout)
    tier.insert(layout.name, keys, values)
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    outside = np.array([-51, 450, big, small, small + 1, big - 1], dtype=np.int64)
    got, found = tier.fetch(layout.name, np.concatenate([outside, keys[::-1]]))
    assert not found[: len(outside)].any() and not got[: len(outside)].any()
    assert found[len(outside) :].all()
    np.testing.assert_array_equal(got[len(outside) :], values[::-1])

    tier.evict(layout.name, np.array([0, 1], dtype=np.int64))  # a hole: no longer one run
    got, found = tier.fetch(layout.name, np.array([-1, 0, 1, 2, 449, big], dtype=np.int64))
    np.testing.assert_array_equal(found, [True, False, False, True, True, False])
    np.testing.assert_array_equal(got[[0, 3, 4]], values[[49, 52, 499]])


def test_overwrite_evict_and_whole_table_evict(make_tier: TierFactory) -> None:
    rng = np.random.default_rng(11)
    tier = make_tier(LAYOUTS)
    users, items = LAYOUTS
    keys = np.arange(1000, dtype=np.int64) * 3
    tier.insert("users", keys, _random_rows(rng, 1000, users))
    item_rows = _random_rows(rng, 1000, items)
    tier.insert("items", keys, item_rows)

    newer = _random_rows(rng, 200, users)
    tier.insert("users", keys[100:300], newer)
    got, found = tier.fetch("users", keys[100:300])
    assert found.all()
    np.testing.assert_array_equal(got, newer)
    assert tier.count("users") == 1000

    tier.evict("users", keys[:50])
    got, found = tier.fetch("users", keys[:60])
    assert not found[:50].any() and found[50:].all()
    assert not got[:50].any()
    assert tier.count("users") == 950

    tier.evict("users")
    assert tier.count("users") == 0
    assert not tier.fetch("users", keys)[1].any()
    # the other table is untouched
    got, found = tier.fetch("items", keys)
    assert found.all()
    np.testing.assert_array_equal(got, item_rows)


def test_a_key_given_twice_in_one_insert_keeps_the_last_vector(make_tier: TierFactory) -> None:
    tier = make_tier(LAYOUTS)
    keys = np.array([5, 6, 5], dtype=np.int64)
    values = np.stack([np.full(16, v, np.float32) for v in (1.0, 2.0, 3.0)])
    tier.insert("users", keys, values)
    got, found = tier.fetch("users", np.array([5, 6], dtype=np.int64))
    assert found.all()
    np.testing.assert_array_equal(got[:, 0], [3.0, 2.0])
    assert tier.count("users") == 2


def test_random_operations_match_a_dictionary(make_tier: TierFactory) -> None:
    """A seeded mix of inserts, overwrites and evictions, checked against a plain dict after each step."""
    rng = np.random.default_rng(3)
    tier = make_tier(LAYOUTS)
    layout = LAYOUTS[0]
    reference: dict[int, np.ndarray] = {}
    universe = np.arange(5000, dtype=np.int64) * 7 - 10000
    for _ in range(12):
        if rng.random() < 0.7:
            keys = rng.choice(universe, size=int(rng.integers(1, 800)), replace=False)
            rows = _random_rows(rng, len(keys), layout)
            tier.insert(layout.name, keys, rows)
            reference.update(zip(keys.tolist(), rows, strict=True))
        else:
            keys = rng.choice(universe, size=int(rng.integers(1, 400)), replace=False)
            tier.evict(layout.name, keys)
            for k in keys.tolist():
                reference.pop(k, None)
        got, found = tier.fetch(layout.name, universe)
        expected_found = np.array([k in reference for k in universe.tolist()])
        np.testing.assert_array_equal(found, expected_found)
        for i in np.flatnonzero(found)[:200]:
            np.testing.assert_array_equal(got[i], reference[int(universe[i])])
        assert tier.count(layout.name) == len(reference)


def test_bad_arguments_are_typed_errors(make_tier: TierFactory) -> None:
    tier = make_tier(LAYOUTS)
    with pytest.raises(NotFoundError, match="nope"):
        tier.fetch("nope", np.array([1], dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match=r"shape \(2, 16\)"):
        tier.insert("users", np.array([1, 2], dtype=np.int64), np.zeros((2, 15), np.float32))
    with pytest.raises(InvalidArgumentError, match="integers"):
        tier.fetch("users", np.array([1.5]))
    values, found = tier.fetch("users", np.array([], dtype=np.int64))
    assert values.shape == (0, 16) and found.shape == (0,)


# -- hash map ------------------------------------------------------------------------------------


def test_hashmap_reuses_evicted_slots_and_survives_many_small_updates() -> None:
    rng = np.random.default_rng(5)
    layout = TableLayout("t", 4, np.dtype(np.float32))
    tier = HashMapTier([layout])
    keys = rng.permutation(200_000).astype(np.int64)
    rows = rng.standard_normal((len(keys), 4)).astype(np.float32)
    for start in range(0, len(keys), 50_000):  # several merges of the delta level into main
        tier.insert("t", keys[start : start + 50_000], rows[start : start + 50_000])
    size_before = tier.stats()["bytes"]
    tier.evict("t", keys[:1000])
    fresh = np.arange(10**9, 10**9 + 1000, dtype=np.int64)
    tier.insert("t", fresh, np.ones((1000, 4), np.float32))
    assert tier.stats()["bytes"] == size_before  # the freed slots were reused, nothing grew
    for i in range(100):  # small online updates
        tier.insert("t", keys[2000 + i : 2001 + i], np.full((1, 4), i, np.float32))
    got, found = tier.fetch("t", np.concatenate([keys, fresh]))
    assert found.sum() == len(keys) - 1000 + 1000
    np.testing.assert_array_equal(got[1000:2000], rows[1000:2000])
    np.testing.assert_array_equal(got[2000:2100, 0], np.arange(100, dtype=np.float32))
    assert (got[len(keys) :] == 1).all()


def test_hashmap_rows_written_into_reused_slots_land_where_their_keys_point() -> None:
    layout = TableLayout("t", 2, np.dtype(np.float32))
    tier = HashMapTier([layout])
    tier.insert("t", np.arange(3, dtype=np.int64), np.arange(6, dtype=np.float32).reshape(3, 2))
    for key in (0, 2, 1):  # frees slots 0, 2, 1 in that order
        tier.evict("t", np.array([key], dtype=np.int64))
    new_keys = np.array([100, 101, 102, 103], dtype=np.int64)  # slots 0, 2, 1 reused and 3 fresh
    new_rows = np.arange(100, 108, dtype=np.float32).reshape(4, 2)
    tier.insert("t", new_keys, new_rows)
    got, found = tier.fetch("t", np.array([100, 101, 102, 103, 1], dtype=np.int64))
    assert found.tolist() == [True, True, True, True, False]
    np.testing.assert_array_equal(got[:4], new_rows)


# -- Redis ---------------------------------------------------------------------------------------


def test_redis_rows_spread_over_both_shards_and_all_cluster_nodes(
    redis_server: RedisProcess, second_redis: RedisProcess, redis_cluster: RedisCluster
) -> None:
    layout = LAYOUTS[0]
    keys = np.arange(2000, dtype=np.int64)
    rows = np.ones((2000, 16), np.float32)
    sharded = RedisTier([layout], addresses=[redis_server.address, second_redis.address],
                        access=ACCESS, model=_model_name(), partitions=16)  # fmt: skip
    clustered = RedisTier([layout], addresses=[redis_cluster.addresses[0]], access=ACCESS,
                          cluster=True, model=_model_name(), partitions=16)  # fmt: skip
    try:
        sharded.insert("users", keys, rows)
        clustered.insert("users", keys, rows)
        shard_sizes = [
            s.client().info("keyspace").get("db0", {}).get("keys", 0) for s in (redis_server, second_redis)
        ]
        assert all(n >= 8 for n in shard_sizes)  # 16 partitions, modulo 2: 8 HASHes at least on each
        node_sizes = [n.client().dbsize() for n in redis_cluster.nodes]
        assert all(n > 0 for n in node_sizes) and sum(node_sizes) == 16
    finally:
        for tier in (sharded, clustered):
            tier.evict("users")
            tier.close()


def test_redis_value_of_the_wrong_length_is_missing_and_an_error(redis_server: RedisProcess, reader: str) -> None:
    layout = LAYOUTS[0]
    model = _model_name()
    tier = RedisTier([layout], addresses=[redis_server.address], access=ACCESS, model=model, partitions=1)
    try:
        tier.insert("users", np.array([1, 2], dtype=np.int64), np.ones((2, 16), np.float32))
        # a foreign writer stores 60 bytes where a row is 64
        redis_server.client().hset(f"hps:{{{model}:users:0}}", np.int64(2).tobytes(), b"x" * 60)
        got, found = tier.fetch("users", np.array([1, 2], dtype=np.int64))
        assert found.tolist() == [True, False]
        assert not got[1].any()
        assert tier.stats()["errors"] == 1
    finally:
        tier.evict("users")
        tier.close()


def test_redis_error_reply_mid_read_fails_that_read_only(redis_server: RedisProcess, reader: str) -> None:
    """A read is many pipelined HMGETs: an error reply among them (a partition's key holding another
    type) fails that read with Redis's words, and the next reads are served whole (the connection
    left holding the failed read's other replies is not reused)."""
    layout = LAYOUTS[0]
    model = _model_name()
    tier = RedisTier([layout], addresses=[redis_server.address], access=ACCESS, model=model, partitions=4)
    raw = redis_server.client()
    try:
        keys = np.arange(400, dtype=np.int64)
        rows = np.random.default_rng(5).standard_normal((400, 16)).astype(np.float32)
        tier.insert("users", keys, rows)
        broken = f"hps:{{{model}:users:2}}"
        saved = raw.dump(broken)
        raw.delete(broken)
        raw.set(broken, b"not a hash")
        with pytest.raises(UnavailableError, match="WRONGTYPE"):
            tier.fetch("users", keys)
        raw.delete(broken)
        raw.restore(broken, 0, saved)
        for _ in range(3):  # every pooled connection
            got, found = tier.fetch("users", keys)
            assert found.all()
            np.testing.assert_array_equal(got, rows)
    finally:
        tier.evict("users")
        tier.close()


def test_redis_whole_table_evict_finds_hashes_of_any_partition_count(redis_server: RedisProcess) -> None:
    layout = LAYOUTS[0]
    model = _model_name()
    keys = np.arange(500, dtype=np.int64)
    for partitions in (4, 32):
        writer = RedisTier([layout], addresses=[redis_server.address], access=ACCESS, model=model,
                           partitions=partitions)  # fmt: skip
        writer.insert("users", keys, np.ones((500, 16), np.float32))
        writer.close()
    tier = RedisTier([layout], addresses=[redis_server.address], access=ACCESS, model=model, partitions=4)
    tier.evict("users")
    tier.close()
    assert not redis_server.client().keys(f"hps:{{{model}:*")


def test_redis_killed_mid_run_raises_unavailable_quickly(make_redis: Callable[..., RedisProcess], reader: str) -> None:
    server = make_redis(password=PASSWORD)
    layout = LAYOUTS[0]
    tier = RedisTier([layout], addresses=[server.address], access=ACCESS, socket_timeout=0.5)
    keys = np.arange(100, dtype=np.int64)
    tier.insert("users", keys, np.ones((100, 16), np.float32))
    assert tier.fetch("users", keys)[1].all()
    server.stop(hard=True)
    for operation in (lambda: tier.fetch("users", keys),
                      lambda: tier.insert("users", keys, np.ones((100, 16), np.float32)),
                      lambda: tier.count("users")):  # fmt: skip
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="redis"):
            operation()
        assert time.monotonic() - started < 2.0
    assert tier.stats()["errors"] == 3
    tier.close()


def test_redis_that_stops_answering_times_out_instead_of_hanging(
    make_redis: Callable[..., RedisProcess], reader: str
) -> None:
    server = make_redis(password=PASSWORD)
    tier = RedisTier([LAYOUTS[0]], addresses=[server.address], access=ACCESS, socket_timeout=0.3)
    keys = np.arange(10, dtype=np.int64)
    tier.insert("users", keys, np.ones((10, 16), np.float32))
    os.kill(server.pid, signal.SIGSTOP)  # alive, port open, never replies
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match=r"(?i)timeout"):
            tier.fetch("users", keys)
        assert time.monotonic() - started < 1.5
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # once it answers again, so does the tier (the broken connection was dropped, not reused)
    assert tier.fetch("users", keys)[1].all()
    tier.close()


def test_redis_wrong_password_is_unavailable(redis_server: RedisProcess) -> None:
    tier = RedisTier([LAYOUTS[0]], addresses=[redis_server.address], access=RedisAccess(password="wrong"))
    with pytest.raises(UnavailableError):
        tier.fetch("users", np.arange(3, dtype=np.int64))
    tier.close()


# -- RocksDB -------------------------------------------------------------------------------------


def test_rocksdb_reopen_keeps_rows_and_read_only_serves_but_refuses_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "db"
    items = LAYOUTS[1]
    keys = np.arange(-500, 500, dtype=np.int64)
    rows = _random_rows(rng, len(keys), items)
    writer = RocksDBTier(path, LAYOUTS)
    writer.insert("items", keys, rows)
    writer.close()

    reopened = RocksDBTier(path, LAYOUTS)
    assert reopened.count("items") == 1000 and reopened.count("users") == 0
    reopened.close()

    # two read-only openers at once, as agents sharing a volume
    readers = [RocksDBTier(path, LAYOUTS, read_only=True) for _ in range(2)]
    for reader in readers:
        got, found = reader.fetch("items", keys[::-1])
        assert found.all()
        np.testing.assert_array_equal(got, rows[::-1])
        with pytest.raises(InvalidArgumentError, match="read-only"):
            reader.insert("items", keys[:1], rows[:1])
        with pytest.raises(InvalidArgumentError, match="read-only"):
            reader.evict("items")
    for reader in readers:
        reader.close()


def test_rocksdb_read_only_open_of_a_table_it_never_stored_serves_misses(tmp_path: Path) -> None:
    path = tmp_path / "db"
    RocksDBTier(path, LAYOUTS[:1]).close()
    reader = RocksDBTier(path, LAYOUTS, read_only=True)
    assert not reader.fetch("items", np.arange(5, dtype=np.int64))[1].any()
    assert reader.count("items") == 0
    reader.close()


def test_rocksdb_layout_mismatch_names_the_table(tmp_path: Path) -> None:
    path = tmp_path / "db"
    RocksDBTier(path, LAYOUTS).close()
    wider = [LAYOUTS[0], TableLayout("items", 8, np.dtype(np.float32))]
    with pytest.raises(TableSourceError, match=r"'items'.*dtype=float16.*dtype=float32"):
        RocksDBTier(path, wider)
    with pytest.raises(TableSourceError, match=r"'users'.*dim=16.*dim=32"):
        RocksDBTier(path, [TableLayout("users", 32, np.dtype(np.float32))], read_only=True)
    # the refused opens left the DB usable
    RocksDBTier(path, LAYOUTS).close()


def test_rocksdb_read_only_without_a_database_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="no database"):
        RocksDBTier(tmp_path / "absent", LAYOUTS, read_only=True)


def test_open_tiers_orders_l2_before_l3(tmp_path: Path, redis_server: RedisProcess) -> None:
    tiers = open_tiers(LAYOUTS, model=_model_name(), redis_addresses=[redis_server.address],
                       redis_access=ACCESS, rocksdb_path=tmp_path / "db")  # fmt: skip
    assert [t.name for t in tiers] == ["redis", "rocksdb"]
    for tier in tiers:
        tier.close()
    embedded = open_tiers(LAYOUTS, in_process=True)
    assert [t.name for t in embedded] == ["hashmap"]
