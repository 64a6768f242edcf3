"""Agents that share their stores (one Redis, one RocksDB directory, as ``hps local up --agents 2`` runs
them), in process, with real redis-servers, a real RocksDB directory and real gRPC on loopback: one
agent writes the shared stores, an update through either agent is served by both (cached rows too),
the Update RPC's answer is the truth, a Redis that dies or comes back empty is noticed without traffic
and repaired, and Describe/Stats say where the update consumer stands."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from node_agent.agent import Agent, AgentOptions
from node_agent.auth import AuthOptions
from node_agent.client import Client
from node_agent.errors import UnavailableError
from node_agent.local.redis_servers import RedisProcess
from node_agent.proto.hps.v1 import hps_pb2, hps_pb2_grpc
from node_agent.redis_access import RedisAccess
from node_agent.spec import load_model_file
from node_agent.tiers.health import write_epoch
from node_agent.tiers.redis_tier import RedisTier
from node_agent.tiers.rocksdb_tier import RocksDBTier
from node_agent.updates import UpdatePublisher, coordination_key, stream_name
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model

PASSWORD = "test-secret"
#: the default user with that password, as the data plane\'s clients take it
ACCESS = RedisAccess(password=PASSWORD)
#: the token the agents take for Update RPCs (what hps local up generates)
TOKEN = "test-update-token"
#: how long a published update may take to show on an agent that did not answer the RPC (it is
#: measured in milliseconds: see docs/updates.md); generous for a loaded 2-core machine
VISIBLE_WITHIN_S = 3.0

SHARED_YAML = """\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: demo}
spec:
  tables:
  - {name: user, rows: 64, dim: 8, dtype: float32, defaultValue: -1.0, source: user}
  - {name: item, rows: 32, dim: 4, dtype: float16, defaultValue: 0.5, source: item}
  cache: {memoryPerGPU: 1Mi}
  volatileStore: {type: redis}
  persistentStore: {type: rocksdb}
"""


def wait_until(check: Callable[[], bool], within_s: float, what: str) -> float:
    """Seconds until ``check()`` held, polling every 10 ms; fails the test after ``within_s``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within_s, f"{what} not within {within_s} s"
        time.sleep(0.01)
    return time.monotonic() - start


def rows(value: float, n: int = 1, dim: int = 8) -> np.ndarray:
    return np.full((n, dim), value, np.float32)


@dataclass
class Stack:
    path: Path
    db: Path
    data: dict[str, TableData]
    redis: RedisProcess
    agents: list[Agent]

    def endpoint(self, i: int) -> str:
        server = self.agents[i].server
        assert server is not None
        return server.endpoint

    def writer(self) -> int:
        writers = [i for i, a in enumerate(self.agents) if a.consumer is not None and a.consumer.is_writer]
        assert len(writers) == 1, f"exactly one agent writes the shared stores, got {writers}"
        return writers[0]


def start_agent(stack_path: Path, db: Path, server: RedisProcess, name: str, **options: object) -> Agent:
    agent = Agent(AgentOptions(model_file=stack_path, port=0, redis=(server.address,), redis_access=ACCESS,
                               rocksdb=db, rocksdb_shared=True, device="cpu", agent_id=name,
                               probe_interval_s=0.2, auth=AuthOptions(token=TOKEN),
                               **options))  # type: ignore[arg-type]  # fmt: skip
    agent.start()
    return agent


@pytest.fixture
def shared(tmp_path: Path, make_redis: Callable[..., RedisProcess]) -> Iterator[Stack]:
    """Two agents on one Redis and one RocksDB directory, the tables loaded as ``hps local up`` does."""
    path, data = write_model(tmp_path, SHARED_YAML)
    model = load_model_file(path)
    db = tmp_path / "rocksdb"
    tier = RocksDBTier(db, layouts(model))
    fill(tier, data)
    tier.close()
    server = make_redis(password=PASSWORD)
    l2 = RedisTier(layouts(model), addresses=[server.address], access=ACCESS, model=model.name)
    fill(l2, data)
    l2.close()
    write_epoch(server.client(), model.name)
    agents = [start_agent(path, db, server, f"a{i}") for i in range(2)]
    stack = Stack(path, db, data, server, agents)
    yield stack
    for agent in stack.agents:
        agent.stop(grace=0)


def test_an_update_through_either_agent_is_served_by_both_even_rows_they_cache(shared: Stack) -> None:
    writer = shared.writer()
    other = 1 - writer
    user = shared.data["user"]
    cached = [1, 4, 7]
    clients = [Client(shared.endpoint(i), retries=0, token=TOKEN) for i in range(2)]
    try:
        for client in clients:  # both agents cache these rows in their L1
            np.testing.assert_array_equal(client.lookup("demo", "user", cached), user.expected(cached))
            np.testing.assert_array_equal(client.lookup("demo", "user", cached), user.expected(cached))
        # the Update RPC of the agent that does not write the stores: OK, and served by it at once
        assert clients[other].update("demo", "user", [4], rows(2.5)) == 1
        np.testing.assert_array_equal(clients[other].lookup("demo", "user", [4]), rows(2.5))
        wait_until(lambda: np.array_equal(clients[writer].lookup("demo", "user", [4]), rows(2.5)),
                   VISIBLE_WITHIN_S, "the update on the writer")  # fmt: skip
        # and through the writer, to a row only the other agent caches
        assert clients[writer].update("demo", "user", [7], rows(3.5)) == 1
        wait_until(lambda: np.array_equal(clients[other].lookup("demo", "user", [7]), rows(3.5)),
                   VISIBLE_WITHIN_S, "the update on the other agent")  # fmt: skip
        # a training job publishing to the stream reaches both as well
        with UpdatePublisher([shared.redis.address], password=PASSWORD, model="demo") as publisher:
            publisher.publish("user", [1], rows(4.5))
        for client in clients:
            wait_until(lambda c=client: np.array_equal(c.lookup("demo", "user", [1]), rows(4.5)),  # type: ignore[misc]
                       VISIBLE_WITHIN_S, "the published update")  # fmt: skip
        for i, client in enumerate(clients):
            # an entry is counted just after its rows are served: wait for the count, not only the rows
            wait_until(lambda c=client: c.stats("demo")["updates"]["applied_entries"] == 3,  # type: ignore[misc]
                       VISIBLE_WITHIN_S, "the three entries counted")  # fmt: skip
            updates = client.stats("demo")["updates"]
            assert updates["rejected_entries"] == 0 and updates["gaps"] == 0
            assert updates["store_writer"] is (i == writer)
            assert updates["applied_entries"] == 3
    finally:
        for client in clients:
            client.close()
    # the shared stores hold each update once, written by the one writer: RocksDB (what a restart reads)
    for agent in shared.agents:
        agent.stop(grace=0)
    model = load_model_file(shared.path)
    stored = RocksDBTier(shared.db, layouts(model), read_only=True)
    try:
        got, found = stored.fetch("user", np.array([1, 4, 7]))
        assert found.all()
        np.testing.assert_array_equal(got, np.concatenate([rows(4.5), rows(2.5), rows(3.5)]))
    finally:
        stored.close()
    shared.agents = []


def test_when_the_writer_stops_the_other_agent_takes_over_and_updates_keep_applying(shared: Stack) -> None:
    writer = shared.writer()
    other = 1 - writer
    shared.agents[writer].stop(grace=0)
    with Client(shared.endpoint(other), retries=0, token=TOKEN) as client:
        assert client.update("demo", "user", [10], rows(6.0)) == 1  # within the client's 5 s deadline
        np.testing.assert_array_equal(client.lookup("demo", "user", [10]), rows(6.0))
        assert client.stats("demo")["updates"]["store_writer"] is True
    # the stopped agent comes back reading the stores and serves what was applied while it was gone
    shared.agents[writer] = start_agent(shared.path, shared.db, shared.redis, f"a{writer}")
    with Client(shared.endpoint(writer), retries=0, token=TOKEN) as client:
        np.testing.assert_array_equal(client.lookup("demo", "user", [10]), rows(6.0))
        assert client.stats("demo")["updates"]["store_writer"] is False


def test_an_update_rpc_no_writer_can_apply_is_withdrawn_and_applied_nowhere(
    tmp_path: Path, make_redis: Callable[..., RedisProcess]
) -> None:
    """The stores' writer is named by a lease in Redis (agents with no shared RocksDB); a lease held
    by an agent that no longer runs stands in for a writer that cannot apply anything."""
    path, data = write_model(tmp_path, SHARED_YAML.replace("persistentStore: {type: rocksdb}",
                                                           "persistentStore: {type: none}"))  # fmt: skip
    server = make_redis(password=PASSWORD)
    lease = coordination_key(stream_name("demo"), "writer")
    server.client().set(lease, "an-agent-that-is-gone", px=60_000)
    agent = Agent(AgentOptions(model_file=path, port=0, redis=(server.address,), redis_access=ACCESS,
                               load=True, device="cpu", agent_id="a0", probe_interval_s=0.2,
                               auth=AuthOptions(token=TOKEN)))  # fmt: skip
    agent.start()
    try:
        assert agent.server is not None
        with Client(agent.server.endpoint, retries=0, token=TOKEN, timeout=1.5) as client:
            with pytest.raises(UnavailableError, match="withdrawn and is applied nowhere"):
                client.update("demo", "user", [4], rows(9.0))
            server.client().delete(lease)  # the writer's lease expires: this agent takes over
            wait_until(lambda: client.stats("demo")["updates"]["store_writer"], 5.0, "the takeover")
            # the withdrawn update stays unapplied, on this agent and in the store
            np.testing.assert_array_equal(client.lookup("demo", "user", [4]), data["user"].expected([4]))
            stats = client.stats("demo")["updates"]
            assert stats["withdrawn_entries"] == 1 and stats["applied_entries"] == 0
            # and the next update goes through
            assert client.update("demo", "user", [4], rows(9.5)) == 1
            np.testing.assert_array_equal(client.lookup("demo", "user", [4]), rows(9.5))
    finally:
        agent.stop(grace=0)


def test_an_idle_agent_reports_degraded_within_a_second_of_its_redis_dying(shared: Stack) -> None:
    with Client(shared.endpoint(0), retries=0, token=TOKEN) as client:
        assert not client.describe("demo").degraded
        shared.redis.stop(hard=True)
        # no lookup, no update: only the background probe (every 0.2 s here) can notice
        wait_until(lambda: client.describe("demo").degraded, 3.0, "Degraded")
        reasons = client.describe("demo").degraded_reasons
        assert any("unreachable" in r and shared.redis.address in r for r in reasons), reasons


def test_a_redis_a_lookup_found_down_stops_degrading_the_agent_once_it_answers_again(
    shared: Stack, make_redis: Callable[..., RedisProcess]
) -> None:
    """The lookup path sets a tier down when a read fails; the background probe, seeing Redis answer
    again, takes it back, so an idle agent stops reporting Degraded without waiting for a lookup."""
    with Client(shared.endpoint(0), retries=0, token=TOKEN) as client:
        port = shared.redis.port
        shared.redis.stop(hard=True)
        keys = [11, 12, 13]  # never asked before: not in L1, so the lookup reads past Redis to RocksDB
        np.testing.assert_array_equal(client.lookup("demo", "user", keys), shared.data["user"].expected(keys))
        assert client.stats("demo")["lookup"]["tiers"]["volatile"]["up"] is False
        make_redis(port=port, password=PASSWORD)
        # no lookup from here on: only the probe can see it back
        wait_until(lambda: not client.describe("demo").degraded, 5.0, "Degraded cleared")
        assert client.stats("demo")["lookup"]["tiers"]["volatile"]["up"] is True


def test_a_redis_that_comes_back_empty_is_reported_repaired_and_loses_no_update(
    shared: Stack, make_redis: Callable[..., RedisProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent")
    clients = [Client(shared.endpoint(i), retries=0, token=TOKEN) for i in range(2)]
    try:
        assert clients[0].update("demo", "user", [4], rows(7.0)) == 1
        for client in clients:
            client.lookup("demo", "user", [4, 7])
        port = shared.redis.port
        shared.redis.stop(hard=True)
        # same address, no data: as if its files were lost. (Not checked with DBSIZE here: the agents probe
        # every 0.2 s and may already have written to it; the log line below says they found it empty)
        make_redis(port=port, password=PASSWORD)
        # both agents notice, drop their L1, and the writer repairs Redis (a new epoch naming the old)
        for client in clients:
            wait_until(lambda c=client: c.stats("demo")["tiers"]["repairs"] >= 1, 5.0, "the repair")  # type: ignore[misc]
            wait_until(lambda c=client: not c.describe("demo").degraded, 5.0, "Degraded cleared")  # type: ignore[misc]
        assert "came back without its data" in caplog.text
        # the update is not lost: the agents serve it from RocksDB, which the writer kept
        for client in clients:
            np.testing.assert_array_equal(client.lookup("demo", "user", [4]), rows(7.0))
            np.testing.assert_array_equal(client.lookup("demo", "user", [7]), shared.data["user"].expected([7]))
        # and updates flow again, through the stream the consumers recreated
        assert clients[1].update("demo", "user", [7], rows(8.0)) == 1
        for client in clients:
            wait_until(lambda c=client: np.array_equal(c.lookup("demo", "user", [7]), rows(8.0)),  # type: ignore[misc]
                       VISIBLE_WITHIN_S, "the update after the repair")  # fmt: skip
    finally:
        for client in clients:
            client.close()


def test_describe_and_stats_carry_the_update_consumer(shared: Stack) -> None:
    with Client(shared.endpoint(0), retries=0, token=TOKEN) as client:
        entry = client.stats("demo")["updates"]
        assert entry["stream"] == "hps:{demo}:updates" and entry["group"] == "agent:a0"
        client.update("demo", "item", [1], np.full((1, 4), 0.25, np.float16))
        info = client.describe("demo")
        assert info.updates is not None
        assert info.updates["last_applied_id"] and info.updates["applied_entries"] == 1
        assert info.updates["lag_ms_last"] >= 0
        stats = client.stats("demo")
        assert stats["updates"]["last_applied_id"] == info.updates["last_applied_id"]
        assert stats["degraded_reasons"] == [] and stats["tiers"]["probes"] >= 1
    with grpc.insecure_channel(shared.endpoint(0)) as channel:  # the proto's own fields, for any client
        reply = hps_pb2_grpc.EmbeddingServiceStub(channel).Describe(hps_pb2.DescribeRequest(model="demo"), timeout=5)
        assert reply.HasField("updates") and reply.updates.group == "agent:a0"
        assert reply.updates.applied_watermark == reply.updates.last_applied_id


def test_redis_rows_and_stream_survive_a_restart_with_persistence(tmp_path: Path) -> None:
    """``volatileStore.redis.persistence`` (AOF, everysec by default): what Redis acknowledged before a
    SIGKILL is there after the restart (Redis writes its log before it answers)."""
    from node_agent.local.redis_servers import start_redis
    from node_agent.spec import RedisPersistenceSpec

    server = start_redis(tmp_path / "r", password=PASSWORD, persistence=RedisPersistenceSpec())
    try:
        with UpdatePublisher([server.address], password=PASSWORD, model="demo") as publisher:
            ids = [publisher.publish("user", [k], rows(float(k))) for k in range(50)]
        server.stop(hard=True)
        server = start_redis(tmp_path / "r", port=server.port, password=PASSWORD, persistence=RedisPersistenceSpec())
        entries = server.client().xrange(stream_name("demo"))
        assert [e[0].decode() for e in entries] == ids
    finally:
        server.stop(hard=True)
    with pytest.raises(redis.ConnectionError):
        server.client().ping()
