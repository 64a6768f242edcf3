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
from node_agent.spec import load_model_file
from node_agent.tiers.hashmap import HashMapTier
from node_agent.tiers.redis_tier import RedisTier
from node_agent.updates import UpdateConsumer, UpdatePublisher, stream_name
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model

PASSWORD = "test-secret"
VISIBLE_WITHIN_S = 2.0


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
    return UpdateConsumer([redis_server.address], lookup=lookup, stream=stream, password=PASSWORD, **options)


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
        for i in range(20):
            keys = np.array([1 + 3 * i, 10_000 + i], dtype=np.int64)  # a loaded key and a new one
            vectors = rng.standard_normal((2, 8)).astype(np.float32)
            entry = publisher.publish("user", keys, vectors)
            assert "-" in entry
            lags.append(wait_until(lambda k=keys, v=vectors: np.array_equal(lookup.lookup("user", k), v),
                                   VISIBLE_WITHIN_S))  # fmt: skip
        print(f"update lag publish->visible: median {statistics.median(lags) * 1e3:.2f} ms, "
              f"max {max(lags) * 1e3:.2f} ms over {len(lags)}")  # fmt: skip
        # Visible comes first (the lookup path takes the rows), then the consumer counts and acks.
        wait_until(lambda: consumer.stats()["applied_entries"] == 20, VISIBLE_WITHIN_S)
        stats = consumer.stats()
        assert stats["applied_entries"] == 20 and stats["applied_keys"] == 40
        wait_until(lambda: redis_server.client().xpending(stream, "agent:a")["pending"] == 0, VISIBLE_WITHIN_S)
        untouched = data["user"].keys[30:33]
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
        assert redis_server.client().xpending(stream, "agent:a")["pending"] == 0
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
        assert raw.xpending(stream, "agent:a")["pending"] == 0
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
        UpdateConsumer(redis_cluster.addresses, lookup=lk, stream=name, group=f"agent:{i}", password=PASSWORD,
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
