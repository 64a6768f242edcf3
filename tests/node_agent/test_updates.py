"""Online updates over a real Redis Stream: published → applied → acknowledged → visible within a
bound; a publish Redis does not take raises; a failed apply stays pending and is applied after a
restart; a malformed entry does not block the ones after it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node_agent.errors import UnavailableError
from node_agent.local.redis_servers import RedisCluster, RedisProcess, free_port
from node_agent.lookup import LookupPath, build_lookup_path
from node_agent.redis_access import RedisAccess
from node_agent.spec import load_model_file
from node_agent.tiers.hashmap import HashMapTier
from node_agent.tiers.redis_tier import RedisTier
from node_agent.updates import (
    UpdateConsumer,
    UpdatePublisher,
    stable_consumer_identity,
    stream_name,
    stream_position,
)
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model

PASSWORD = "test-secret"
#: the default user with that password, as the data plane\'s clients take it
ACCESS = RedisAccess(password=PASSWORD)
VISIBLE_WITHIN_S = 2.0
UPDATES_MEASURED = 60


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[LookupPath, dict[str, TableData]]]:
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    tier = HashMapTier(layouts(model))
    fill(tier, data)
    lookup = build_lookup_path(model, volatile=tier, persistent=None, device="cpu")
    yield lookup, data
    lookup.close()


@pytest.fixture
def stream(redis_server: RedisProcess, request: pytest.FixtureRequest) -> Iterator[str]:
    """A stream name of this test's own on the shared server, deleted afterwards."""
    name = f"hps:{{test-{request.node.name}}}:updates"
    yield name
    redis_server.client().delete(name)


def wait_until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held (polling every millisecond); fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.001)
    raise AssertionError(f"not true within {timeout} s")


def consumer_for(redis_server: RedisProcess, lookup: LookupPath, stream: str, **kwargs: Any) -> UpdateConsumer:
    options: dict[str, Any] = {"group": "agent:a", "block_ms": 50, "retry_delay_s": 0.05, **kwargs}
    return UpdateConsumer([redis_server.address], lookup=lookup, stream=stream, access=ACCESS, **options)


def test_stream_name_defaults_to_the_models_hash_tag(tmp_path: Path) -> None:
    path, _ = write_model(tmp_path)
    assert stream_name(load_model_file(path)) == "hps:{demo}:updates"
    assert stream_name("dlrm") == "hps:{dlrm}:updates"


def test_published_update_is_visible_within_the_bound(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    lookup, data = demo
    consumer = consumer_for(redis_server, lookup, stream).start()
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    try:
        wait_until(lambda: redis_server.client().exists(stream) == 1, 5)  # the group exists
        lags = []
        rng = np.random.default_rng(3)
        for i in range(UPDATES_MEASURED):
            keys = np.array([1 + 3 * i, 10_000 + i], dtype=np.int64)  # a loaded key and a new one
            vectors = rng.standard_normal((2, 8)).astype(np.float32)
            entry = publisher.publish("user", keys, vectors)
            assert "-" in entry
            lags.append(wait_until(lambda k=keys, v=vectors: np.array_equal(lookup.lookup("user", k), v),
                                   VISIBLE_WITHIN_S))  # fmt: skip
        lags.sort()
        print(f"update lag publish->visible: median {statistics.median(lags) * 1e3:.2f} ms, "
              f"p99 {lags[int(len(lags) * 0.99)] * 1e3:.2f} ms, max {lags[-1] * 1e3:.2f} ms over {len(lags)}")  # fmt: skip
        # Visible comes first (the lookup path takes the rows), then the consumer counts and acks.
        wait_until(lambda: consumer.stats()["applied_entries"] == UPDATES_MEASURED, VISIBLE_WITHIN_S)
        stats = consumer.stats()
        assert stats["applied_entries"] == UPDATES_MEASURED and stats["applied_keys"] == 2 * UPDATES_MEASURED
        wait_until(lambda: redis_server.client().xpending(stream, "agent:a")["pending"] == 0, VISIBLE_WITHIN_S)
        untouched = data["user"].keys[UPDATES_MEASURED:]  # rows no update touched
        np.testing.assert_array_equal(lookup.lookup("user", untouched), data["user"].expected(untouched))
    finally:
        consumer.stop()
        publisher.close()


def test_later_update_of_the_same_key_wins(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    lookup, _ = demo
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    consumer = consumer_for(redis_server, lookup, stream, start_id="0")
    for value in (1.0, 2.0, 3.0):  # published before the consumer runs: it reads all three in one batch
        publisher.publish("item", [7], np.full((1, 4), value, np.float16))
    consumer.start()
    try:
        wait_until(lambda: consumer.stats()["applied_entries"] == 3, VISIBLE_WITHIN_S)
        np.testing.assert_array_equal(lookup.lookup("item", [7]), np.full((1, 4), 3.0, np.float16))
    finally:
        consumer.stop()
        publisher.close()


def test_publish_to_an_unreachable_redis_raises_instead_of_dropping(make_redis: Callable[..., RedisProcess]) -> None:
    nobody = UpdatePublisher([f"127.0.0.1:{free_port()}"], model="demo", timeout=0.5)
    with pytest.raises(UnavailableError, match="update not published"):
        nobody.publish("user", [1], np.zeros((1, 8), np.float32))
    server = make_redis()
    publisher = UpdatePublisher([server.address], model="demo", timeout=0.5)
    publisher.publish("user", [1], np.zeros((1, 8), np.float32))
    server.stop(hard=True)
    start = time.monotonic()
    with pytest.raises(UnavailableError, match=r"hps:\{demo\}:updates"):
        publisher.publish("user", [2], np.zeros((1, 8), np.float32))
    assert time.monotonic() - start < 3


def test_failed_apply_stays_pending_and_is_claimed_after_a_restart(
    redis_server: RedisProcess, stream: str, make_redis: Callable[..., RedisProcess], tmp_path: Path
) -> None:
    """The first agent's only durable tier (its own Redis) is dead, so it cannot apply the update and
    must not acknowledge it; the agent restarted under another consumer name claims and applies it."""
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    dead = make_redis()
    broken_tier = RedisTier(layouts(model), addresses=[dead.address], model="demo", socket_timeout=0.2)
    dead.stop(hard=True)
    broken = build_lookup_path(model, volatile=broken_tier, persistent=None, device="cpu")
    first = consumer_for(redis_server, broken, stream, consumer="run-1")
    first.start()
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    try:
        wait_until(lambda: redis_server.client().exists(stream) == 1, 5)
        publisher.publish("user", [4, 5], np.full((2, 8), 9.0, np.float32))
        wait_until(lambda: first.stats()["retries"] >= 2, 5)
        assert first.stats()["applied_entries"] == 0
    finally:
        first.stop()
    assert redis_server.client().xpending(stream, "agent:a")["pending"] == 1

    tier = HashMapTier(layouts(model))
    fill(tier, data)
    healthy = build_lookup_path(model, volatile=tier, persistent=None, device="cpu")
    second = consumer_for(redis_server, healthy, stream, consumer="run-2", claim_idle_ms=0)
    second.start()
    try:
        wait_until(lambda: second.stats()["applied_entries"] == 1, VISIBLE_WITHIN_S)
        assert second.stats()["claimed_entries"] == 1
        np.testing.assert_array_equal(healthy.lookup("user", [5, 4]), np.full((2, 8), 9.0, np.float32))
        # acknowledged once applied (an instant later): nothing stays pending
        wait_until(lambda: redis_server.client().xpending(stream, "agent:a")["pending"] == 0, VISIBLE_WITHIN_S)
    finally:
        second.stop()
        publisher.close()
        broken.close()
        healthy.close()


def test_malformed_entry_is_rejected_and_does_not_block_later_ones(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    lookup, _ = demo
    consumer = consumer_for(redis_server, lookup, stream, start_id="0")
    raw = redis_server.client()
    raw.xadd(stream, {"table": "user", "dtype": "float32", "dim": "8", "keys": b"\x01" * 5, "vectors": b""})
    raw.xadd(stream, {"table": "user", "dtype": "float32", "dim": "3", "keys": np.int64(1).tobytes(),
                      "vectors": np.zeros(3, "<f4").tobytes()})  # fmt: skip
    raw.xadd(stream, {"table": "gone", "dtype": "float32", "dim": "8", "keys": b"", "vectors": b""})
    UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream).publish(
        "user", [1], np.full((1, 8), 4.0, np.float32)
    )
    consumer.start()
    try:
        wait_until(lambda: consumer.stats()["applied_entries"] == 1, VISIBLE_WITHIN_S)
        stats = consumer.stats()
        assert stats["rejected_entries"] == 2 and stats["skipped_entries"] == 1
        np.testing.assert_array_equal(lookup.lookup("user", [1]), np.full((1, 8), 4.0, np.float32))
        # the rejected and skipped entries are acknowledged too (with the applied one, an instant later)
        wait_until(lambda: raw.xpending(stream, "agent:a")["pending"] == 0, VISIBLE_WITHIN_S)
    finally:
        consumer.stop()


def test_each_agent_group_sees_every_update_on_a_redis_cluster(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """Two agents (two groups) on one stream: both refresh, as each has its own cache."""
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    lookups = []
    for _ in range(2):
        tier = HashMapTier(layouts(model))
        fill(tier, data)
        lookups.append(build_lookup_path(model, volatile=tier, persistent=None, device="cpu"))
    name = f"hps:{{cluster-{time.monotonic_ns()}}}:updates"
    consumers = [
        UpdateConsumer(redis_cluster.addresses, lookup=lk, stream=name, group=f"agent:{i}", access=ACCESS,
                       cluster=True, block_ms=50, start_id="0").start()
        for i, lk in enumerate(lookups)
    ]  # fmt: skip
    publisher = UpdatePublisher(redis_cluster.addresses, password=PASSWORD, cluster=True, stream=name)
    try:
        publisher.publish("user", [10, 13], np.full((2, 8), 7.0, np.float32))
        for lk in lookups:
            wait_until(lambda lk=lk: bool(np.all(lk.lookup("user", [10, 13]) == 7.0)), VISIBLE_WITHIN_S)
    finally:
        for c in consumers:
            c.stop()
        publisher.close()
        for lk in lookups:
            lk.close()
        redis_cluster.client().delete(name)


def test_consumer_reports_degraded_while_the_stream_redis_is_down(
    make_redis: Callable[..., RedisProcess], demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    lookup, _ = demo
    server = make_redis()
    consumer = UpdateConsumer([server.address], lookup=lookup, stream="hps:{demo}:updates", group="agent:a",
                              block_ms=50, retry_delay_s=0.05).start()  # fmt: skip
    try:
        wait_until(lambda: server.client().exists("hps:{demo}:updates") == 1, 5)
        assert consumer.degraded is False
        server.stop(hard=True)
        wait_until(lambda: consumer.degraded, 5)
        assert consumer.stats()["redis_errors"] >= 1
        np.testing.assert_array_equal(lookup.lookup("user", [1]), demo[1]["user"].expected([1]))
    finally:
        consumer.stop()


def test_update_published_while_the_table_loads_is_applied_from_the_snapshot_position(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    """The agent reads the stream's position before loading; an update published during the load
    (before its group exists) is applied, one published before the snapshot is not re-applied."""
    lookup, data = demo
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    publisher.publish("user", [1], np.full((1, 8), 5.0, np.float32))  # in the snapshot already
    position = stream_position([redis_server.address], stream, access=ACCESS)
    publisher.publish("user", [4], np.full((1, 8), 6.0, np.float32))  # during the load
    consumer = consumer_for(redis_server, lookup, stream, start_id=position).start()
    try:
        wait_until(lambda: np.array_equal(lookup.lookup("user", [4]), np.full((1, 8), 6.0, np.float32)),
                   VISIBLE_WITHIN_S)  # fmt: skip
        assert consumer.wait_caught_up(VISIBLE_WITHIN_S)
        assert consumer.stats()["applied_entries"] == 1
        np.testing.assert_array_equal(lookup.lookup("user", [1]), data["user"].expected([1]))
        assert consumer.degraded is False
    finally:
        consumer.stop()
        publisher.close()


def test_consumer_without_a_start_point_replays_what_was_published_before_it_existed(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    lookup, _ = demo
    with UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream) as publisher:
        publisher.publish("user", [7], np.full((1, 8), 2.0, np.float32))
    consumer = UpdateConsumer([redis_server.address], lookup=lookup, stream=stream, group="agent:new",
                              access=ACCESS, block_ms=50).start()  # fmt: skip
    try:
        assert consumer.wait_caught_up(VISIBLE_WITHIN_S)
        np.testing.assert_array_equal(lookup.lookup("user", [7]), np.full((1, 8), 2.0, np.float32))
    finally:
        consumer.stop()


def test_stable_identity_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    first = stable_consumer_identity("dlrm", 2, state_dir=tmp_path / "a")
    assert first.startswith("dlrm-p2-") and first == stable_consumer_identity("dlrm", 2, state_dir=tmp_path / "a")
    assert first != stable_consumer_identity("dlrm", 2, state_dir=tmp_path / "b")
    assert stable_consumer_identity("dlrm", 3, state_dir=tmp_path / "a") == first.replace("-p2-", "-p3-")
    by_host = stable_consumer_identity("dlrm", 0, instance=1)
    assert by_host == stable_consumer_identity("dlrm", 0, instance=1) != stable_consumer_identity("dlrm", 0, instance=2)


def test_restarted_agent_resumes_its_group_and_applies_what_it_missed_while_down(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]], tmp_path: Path
) -> None:
    lookup, _ = demo
    identity = stable_consumer_identity("demo", 0, state_dir=tmp_path / "state")
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    first = consumer_for(redis_server, lookup, stream, group=f"agent:{identity}", consumer=identity).start()
    try:
        assert first.wait_caught_up(VISIBLE_WITHIN_S)
        publisher.publish("user", [1], np.full((1, 8), 1.0, np.float32))
        wait_until(lambda: first.stats()["applied_entries"] == 1, VISIBLE_WITHIN_S)
    finally:
        first.stop()
    publisher.publish("user", [4], np.full((1, 8), 2.0, np.float32))  # while the agent is down
    again = stable_consumer_identity("demo", 0, state_dir=tmp_path / "state")
    second = consumer_for(redis_server, lookup, stream, group=f"agent:{again}", consumer=again).start()
    try:
        assert second.wait_caught_up(VISIBLE_WITHIN_S)
        np.testing.assert_array_equal(lookup.lookup("user", [4]), np.full((1, 8), 2.0, np.float32))
        assert second.stats()["applied_entries"] == 1  # resumed: the first update is not replayed
        assert [g["name"] for g in redis_server.client().xinfo_groups(stream)] == [f"agent:{identity}".encode()]
    finally:
        second.stop()
        publisher.close()


def test_redis_restarted_from_its_append_only_file_is_no_gap_for_a_running_or_a_new_consumer(
    make_redis: Callable[..., RedisProcess], demo: tuple[LookupPath, dict[str, TableData]], tmp_path: Path
) -> None:
    """Redis 7.0 logs a group read to its append-only file without the group's entries-read: after a
    restart the group counts fewer entries read than it did, which looked like entries lost."""
    from node_agent.local.redis_servers import start_redis
    from node_agent.spec import RedisPersistenceSpec

    lookup, _ = demo
    server = start_redis(tmp_path / "aof", password=PASSWORD, persistence=RedisPersistenceSpec())
    stream = stream_name("demo")
    try:
        publisher = UpdatePublisher([server.address], password=PASSWORD, stream=stream)
        consumer = consumer_for(server, lookup, stream, gap_check_interval_s=0.1).start()
        for k in range(5):
            publisher.publish("user", [1], np.full((1, 8), float(k), np.float32))
        wait_until(lambda: consumer.stats()["applied_entries"] == 5, VISIBLE_WITHIN_S)
        time.sleep(0.3)  # a gap check at the end of the stream: the consumer's own count of reads
        server.stop(hard=True)
        server = start_redis(tmp_path / "aof", port=server.port, password=PASSWORD, persistence=RedisPersistenceSpec())
        publisher.close()
        publisher = UpdatePublisher([server.address], password=PASSWORD, stream=stream)
        publisher.publish("user", [1], np.full((1, 8), 9.0, np.float32))
        wait_until(lambda: consumer.stats()["applied_entries"] == 6, 10.0)
        time.sleep(0.5)
        assert consumer.stats()["gaps"] == 0 and not consumer.degraded
        consumer.stop()
        server.stop(hard=True)  # and once more, now for a consumer that starts after the restart
        server = start_redis(tmp_path / "aof", port=server.port, password=PASSWORD, persistence=RedisPersistenceSpec())
        again = consumer_for(server, lookup, stream, gap_check_interval_s=0.1).start()
        assert again.wait_caught_up(VISIBLE_WITHIN_S)
        time.sleep(0.5)
        assert again.stats()["gaps"] == 0 and not again.degraded
        again.stop()
        publisher.close()
    finally:
        server.stop(hard=True)


def test_entries_trimmed_before_the_agent_read_them_are_a_reported_gap_and_l1_is_cleared(
    redis_server: RedisProcess, stream: str, tmp_path: Path
) -> None:
    """L2 is shared (another agent applied the trimmed update to it); this agent's L1 still holds the
    old row. Without the gap check it would serve that stale row forever."""
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    shared_l2 = HashMapTier(layouts(model))
    fill(shared_l2, data)
    lookup = build_lookup_path(model, volatile=shared_l2, persistent=None, device="cpu", close_tiers=False)
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    consumer = consumer_for(redis_server, lookup, stream)
    try:
        consumer.start()
        assert consumer.wait_caught_up(VISIBLE_WITHIN_S)
        publisher.publish("user", [1], np.full((1, 8), 1.0, np.float32))
        wait_until(lambda: consumer.stats()["applied_entries"] == 1, VISIBLE_WITHIN_S)
        consumer.stop()
        old = lookup.lookup("user", [4])  # now in L1
        np.testing.assert_array_equal(old, data["user"].expected([4]))
        for i in range(3):  # published while the agent is down; other agents apply them to L2
            publisher.publish("user", [4], np.full((1, 8), 10.0 + i, np.float32))
        shared_l2.insert("user", np.array([4]), np.full((1, 8), 12.0, np.float32))
        publisher.publish("item", [2], np.full((1, 4), 3.0, np.float16))
        redis_server.client().xtrim(stream, maxlen=1, approximate=False)  # keep only the last entry
        np.testing.assert_array_equal(lookup.lookup("user", [4]), old)  # stale, from L1

        restarted = consumer_for(redis_server, lookup, stream)
        restarted.start()
        try:
            wait_until(lambda: restarted.degraded, VISIBLE_WITHIN_S)
            assert restarted.wait_caught_up(VISIBLE_WITHIN_S)
            stats = restarted.stats()
            assert stats["gaps"] == 1 and stats["missed_entries"] == 3 and stats["l1_invalidations"] == 1
            assert "trimmed" in stats["gap"]
            np.testing.assert_array_equal(lookup.lookup("user", [4]), np.full((1, 8), 12.0, np.float32))
            np.testing.assert_array_equal(lookup.lookup("item", [2]), np.full((1, 4), 3.0, np.float16))
        finally:
            restarted.stop()
        once_more = consumer_for(redis_server, lookup, stream).start()  # the hole is reported once
        try:
            assert once_more.wait_caught_up(VISIBLE_WITHIN_S)
            assert once_more.stats()["gaps"] == 0 and not once_more.degraded
        finally:
            once_more.stop()
    finally:
        consumer.stop()
        publisher.close()
        lookup.close()


def test_pending_entry_trimmed_before_it_was_applied_is_a_reported_gap(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    lookup, _ = demo
    raw = redis_server.client()
    publisher = UpdatePublisher([redis_server.address], password=PASSWORD, stream=stream)
    publisher.publish("user", [1], np.full((1, 8), 1.0, np.float32))
    raw.xgroup_create(stream, "agent:a", id="0")
    raw.xreadgroup("agent:a", "crashed-run", {stream: ">"})  # delivered, never acknowledged
    publisher.publish("user", [4], np.full((1, 8), 2.0, np.float32))
    raw.xtrim(stream, maxlen=1, approximate=False)
    consumer = consumer_for(redis_server, lookup, stream, consumer="next-run", claim_idle_ms=0).start()
    try:
        wait_until(lambda: consumer.degraded, VISIBLE_WITHIN_S)
        assert consumer.wait_caught_up(VISIBLE_WITHIN_S)
        assert consumer.stats()["missed_entries"] == 1
        np.testing.assert_array_equal(lookup.lookup("user", [4]), np.full((1, 8), 2.0, np.float32))
        assert raw.xpending(stream, "agent:a")["pending"] == 0
    finally:
        consumer.stop()
        publisher.close()


def test_groups_of_agents_gone_for_longer_than_the_idle_limit_are_deleted_on_start(
    redis_server: RedisProcess, stream: str, demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    """Both old groups hold an entry they did not take; only the one whose consumer got nothing for
    longer than the limit is a dead agent's. Groups not named like an agent's are not ours to judge."""
    lookup, _ = demo
    raw = redis_server.client()
    raw.xadd(stream, {"table": "user"})
    for group in ("agent:gone", "agent:alive", "analytics"):
        raw.xgroup_create(stream, group, id="0")
        raw.xreadgroup(group, "c", {stream: ">"})
    time.sleep(0.3)
    raw.xadd(stream, {"table": "user"})
    raw.xreadgroup("agent:alive", "c", {stream: ">"})  # got an entry just now
    consumer = consumer_for(redis_server, lookup, stream, stale_group_idle_s=0.2).start()
    try:
        assert consumer.wait_caught_up(VISIBLE_WITHIN_S)
        names = sorted(g["name"].decode() for g in raw.xinfo_groups(stream))
        assert names == ["agent:a", "agent:alive", "analytics"]
        assert consumer.stats()["stale_groups_deleted"] == 1
    finally:
        consumer.stop()


def test_publish_can_require_replication(make_redis: Callable[..., RedisProcess]) -> None:
    master = make_redis(password=PASSWORD)
    publisher = UpdatePublisher([master.address], password=PASSWORD, model="demo")
    with pytest.raises(UnavailableError, match="reached 0 of 1 replicas"):
        publisher.publish("user", [1], np.zeros((1, 8), np.float32), wait_replicas=1, wait_timeout_ms=50)
    master.client().config_set("repl-diskless-sync-delay", 0)  # the default waits 5 s for more replicas
    replica = make_redis(password=PASSWORD)
    replica.client().replicaof(master.host, master.port)
    admin = master.client()
    wait_until(lambda: admin.info("replication").get("slave0", {}).get("state") == "online", 10)
    entry = publisher.publish("user", [2], np.zeros((1, 8), np.float32), wait_replicas=1, wait_timeout_ms=2000)
    assert replica.client().xrange("hps:{demo}:updates", min=entry, max=entry)
    publisher.close()


def _move_slot(cluster: RedisCluster, key: str) -> None:
    """Moves ``key``'s hash slot (and the keys in it) to another master, as resharding does."""
    clients = [n.client() for n in cluster.nodes]
    ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
    slot = clients[0].execute_command("CLUSTER", "KEYSLOT", key)
    owner_id = next(master[2].decode() for lo, hi, master, *_ in clients[0].execute_command("CLUSTER", "SLOTS")
                    if lo <= slot <= hi)  # fmt: skip
    owner = ids.index(owner_id)
    target = (owner + 1) % len(clients)
    src, dst = clients[owner], clients[target]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    for k in src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        node = cluster.nodes[target]
        src.execute_command("MIGRATE", node.host, node.port, "", 0, 5000, "AUTH", PASSWORD, "KEYS", k)
    for c in clients:
        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])


def test_publish_follows_a_slot_moved_between_two_publishes(redis_cluster: RedisCluster) -> None:
    """The publisher's slot map is stale after resharding: Redis answers MOVED, the publisher
    refreshes its map and sends once more; both entries end up in the stream, once each."""
    name = f"hps:{{moved-{time.monotonic_ns()}}}:updates"
    publisher = UpdatePublisher(redis_cluster.addresses, password=PASSWORD, cluster=True, stream=name)
    try:
        publisher.publish("user", [1], np.zeros((1, 8), np.float32))
        _move_slot(redis_cluster, name)
        publisher.publish("user", [2], np.ones((1, 8), np.float32))
        assert publisher.retries == 1
        entries = redis_cluster.client().xrange(name)
        assert [wire_keys(fields) for _, fields in entries] == [[1], [2]]
    finally:
        publisher.close()
        redis_cluster.client().delete(name)


def wire_keys(fields: dict[bytes, bytes]) -> list[int]:
    return np.frombuffer(fields[b"keys"], "<i8").tolist()


def test_a_tier_that_comes_back_is_written_again_while_updates_keep_coming(
    make_redis: Callable[..., RedisProcess], tmp_path: Path
) -> None:
    """An update that found a tier down and not yet due for a re-probe pushed the probe back: with more
    than one update per probe interval the tier was never tried again and stayed down for good, its
    missed writes piling up."""
    from node_agent.local.redis_servers import start_redis

    path, data = write_model(tmp_path)
    model = load_model_file(path)
    server = make_redis(password=PASSWORD)
    l2 = RedisTier(layouts(model), addresses=[server.address], access=ACCESS, model="demo")
    l3 = HashMapTier(layouts(model))
    fill(l3, data)
    lookup = build_lookup_path(model, volatile=l2, persistent=l3, device="cpu", probe_interval_s=0.2)
    try:
        server.stop(hard=True)
        value = 0.0
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:  # updates every 10 ms while Redis is down
            value += 1
            lookup.update("user", np.array([1]), np.full((1, 8), value, np.float32))
            time.sleep(0.01)
        assert lookup.degraded
        back = start_redis(tmp_path / "again", port=server.port, password=PASSWORD)
        try:
            deadline = time.monotonic() + 3.0
            while lookup.degraded:
                assert time.monotonic() < deadline, f"Redis never written again: {lookup.stats()['pending_writes']}"
                value += 1
                lookup.update("user", np.array([1]), np.full((1, 8), value, np.float32))
                time.sleep(0.01)
            got, found = RedisTier(layouts(model), addresses=[back.address], access=ACCESS,
                                   model="demo").fetch("user", np.array([1]))  # fmt: skip
            assert found.all() and got[0, 0] == value
        finally:
            back.stop(hard=True)
    finally:
        lookup.close()


def test_an_update_rpc_whose_redis_lost_its_data_meanwhile_says_its_outcome_is_unknown(
    make_redis: Callable[..., RedisProcess], demo: tuple[LookupPath, dict[str, TableData]]
) -> None:
    """A store writer may have claimed and applied the entry before Redis lost it, the claim with it:
    a withdraw on the Redis that came back would wrongly answer "applied nowhere"."""
    import threading

    from node_agent.tiers.health import epoch_key, write_epoch

    lookup, _ = demo
    server = make_redis(password=PASSWORD)
    write_epoch(server.client(), "demo")
    stream = stream_name("demo")
    # not started: nothing applies the entry, so the RPC waits until its deadline, then withdraws
    consumer = consumer_for(server, lookup, stream, epoch_key=epoch_key("demo"))
    wiped = threading.Event()

    def lose_the_data() -> None:
        wait_until(lambda: server.client().xlen(stream) == 1, 5.0)
        server.stop(hard=True)
        make_redis(port=server.port, password=PASSWORD)  # back on its address, empty
        wiped.set()

    wiper = threading.Thread(target=lose_the_data)
    wiper.start()
    try:
        with pytest.raises(UnavailableError, match="update outcome unknown") as err:
            consumer.commit("user", [1], np.full((1, 8), 5.0, np.float32), timeout_s=2.0)
        assert wiped.is_set() and "withdrawn" not in str(err.value)
    finally:
        wiper.join(10)
        consumer.stop()
    # on the same Redis, with no writer, the same RPC is withdrawn: applied nowhere, ever
    consumer = consumer_for(server, lookup, stream, epoch_key=epoch_key("demo"))
    try:
        with pytest.raises(UnavailableError, match="withdrawn and is applied nowhere"):
            consumer.commit("user", [1], np.full((1, 8), 6.0, np.float32), timeout_s=0.5)
    finally:
        consumer.stop()
