"""Redis over TLS and ACL users per role, against real ``redis-server`` processes: the tier, the update
stream and a Redis Cluster's bootstrap over TLS (a plaintext client and one trusting another CA are
refused); and each role (agent, loader, producer; ``node_agent.redis_acl``) doing its job as its own
user while Redis refuses it what it must not do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from hps_operator.cli import main as hps
from redis.backoff import NoBackoff
from redis.retry import Retry

from node_agent.agent import Agent, AgentOptions
from node_agent.auth import AuthOptions
from node_agent.client import Client
from node_agent.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
)
from node_agent.local.certificates import LocalCertificates, ensure_local_certificates
from node_agent.local.redis_servers import RedisProcess, RedisServerTLS, start_cluster, start_redis
from node_agent.redis_access import RedisAccess, RedisTLS, parse_redis_addresses
from node_agent.redis_acl import USERS, acl_file, role_rules
from node_agent.spec import load_model_file
from node_agent.tiers.base import TableLayout
from node_agent.tiers.redis_tier import RedisTier
from node_agent.updates import UpdatePublisher, stream_name
from tests.node_agent.test_grpc import TableData, write_model

ADMIN = "admin-secret"
PASSWORDS = {"agent": "agent-secret", "loader": "loader-secret", "producer": "producer-secret"}
TOKEN = "test-update-token"
LAYOUT = TableLayout("user", 8, np.dtype(np.float32))
#: a refusal is a finding here, not something to retry
NO_RETRY = Retry(NoBackoff(), 0)

MODEL_YAML = """\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: demo}
spec:
  tables:
  - {name: user, rows: 64, dim: 8, dtype: float32, defaultValue: -1.0, source: user}
  cache: {memoryPerGPU: 1Mi}
  volatileStore: {type: redis}
  persistentStore: {type: none}
"""


@pytest.fixture
def certs(tmp_path: Path) -> LocalCertificates:
    return ensure_local_certificates(tmp_path / "tls")


def server_tls(certs: LocalCertificates) -> RedisServerTLS:
    return RedisServerTLS(cert_file=certs.cert_file, key_file=certs.key_file, ca_file=certs.ca_file)


def test_the_tier_and_the_stream_over_tls_and_a_plaintext_client_refused(
    tmp_path: Path, certs: LocalCertificates
) -> None:
    server = start_redis(tmp_path / "redis", password=ADMIN, tls=server_tls(certs))
    try:
        access = RedisAccess(password=ADMIN, tls=RedisTLS(ca_file=certs.ca_file))
        tier = RedisTier([LAYOUT], addresses=[server.address], access=access, model="demo")
        rows = np.arange(24, dtype=np.float32).reshape(3, 8)
        tier.insert("user", np.array([1, 2, 3]), rows)
        got, found = tier.fetch("user", np.array([3, 1, 9]))
        assert found.tolist() == [True, True, False]
        np.testing.assert_array_equal(got[:2], rows[[2, 0]])
        tier.close()
        with UpdatePublisher([server.address], access=access, model="demo") as publisher:
            entry = publisher.publish("user", [1], rows[:1])
        assert server.client().xrange(stream_name("demo"))[0][0].decode() == entry
        plain = redis.Redis(host=server.host, port=server.port, password=ADMIN, socket_timeout=2, retry=NO_RETRY)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        server.stop(hard=True)


def test_a_client_trusting_another_ca_cannot_reach_redis(tmp_path: Path, certs: LocalCertificates) -> None:
    server = start_redis(tmp_path / "redis", password=ADMIN, tls=server_tls(certs))
    other = ensure_local_certificates(tmp_path / "other-ca")
    try:
        wrong = RedisAccess(password=ADMIN, tls=RedisTLS(ca_file=other.ca_file))
        tier = RedisTier([LAYOUT], addresses=[server.address], access=wrong, model="demo", socket_timeout=2)
        with pytest.raises(UnavailableError, match="certificate verify failed"):
            tier.fetch("user", np.array([1]))
        tier.close()
    finally:
        server.stop(hard=True)


def test_a_redis_cluster_bootstraps_and_serves_over_tls(tmp_path: Path, certs: LocalCertificates) -> None:
    cluster = start_cluster(tmp_path / "cluster", masters=3, password=ADMIN, tls=server_tls(certs))
    try:
        info = cluster.nodes[0].client().execute_command("CLUSTER", "INFO")
        assert b"cluster_state:ok" in info and b"cluster_known_nodes:3" in info  # the bus met over TLS
        access = cluster.access
        tier = RedisTier([LAYOUT], addresses=cluster.addresses[:1], access=access, cluster=True, model="demo")
        keys = np.arange(500, dtype=np.int64) * 7
        rows = np.random.default_rng(3).standard_normal((500, 8)).astype(np.float32)
        tier.insert("user", keys, rows)
        got, found = tier.fetch("user", keys[::-1])
        assert found.all()
        np.testing.assert_array_equal(got, rows[::-1])
        tier.close()
        with UpdatePublisher(cluster.addresses, access=access, cluster=True, model="demo") as publisher:
            assert publisher.publish("user", [7], rows[:1])
    finally:
        cluster.stop(hard=True)


# -- ACL users per role ------------------------------------------------------------------------


@dataclass
class Roles:
    server: RedisProcess
    data: dict[str, TableData]
    model_file: Path

    def access(self, role: str) -> RedisAccess:
        return RedisAccess(username=USERS[role], password=PASSWORDS[role])

    def client(self, role: str) -> redis.Redis:
        return self.server.client(self.access(role))


@pytest.fixture
def roles(tmp_path: Path) -> Iterator[Roles]:
    path, data = write_model(tmp_path, MODEL_YAML)
    model = load_model_file(path)
    acl = tmp_path / "users.acl"
    acl.write_text(
        acl_file(model="demo", stream=stream_name(model), passwords=PASSWORDS, admin_password=ADMIN)
    )
    server = start_redis(tmp_path / "redis", password=ADMIN, acl_file=acl)
    yield Roles(server, data, path)
    server.stop(hard=True)


def test_the_loader_loads_as_its_user_and_may_not_read_rows_or_touch_the_stream(
    roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPS_TEST_LOADER_PASSWORD", PASSWORDS["loader"])
    code = hps(["load", "-f", str(roles.model_file), "--redis", roles.server.address, "--redis-user", "hps-loader",
                "--redis-password-env", "HPS_TEST_LOADER_PASSWORD", "--no-progress"])  # fmt: skip
    assert code == 0
    assert roles.server.client().hlen("hps:{demo:user:0}") > 0  # the rows are there
    loader = roles.client("loader")
    with pytest.raises(redis.exceptions.NoPermissionError):
        loader.hmget("hps:{demo:user:0}", [b"\x01" + bytes(7)])
    with pytest.raises(redis.exceptions.NoPermissionError):
        loader.xadd(stream_name("demo"), {"v": "1"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        loader.flushall()


def test_the_agent_serves_and_applies_updates_as_its_user_and_may_not_flush_or_delete_a_table(
    roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPS_TEST_LOADER_PASSWORD", PASSWORDS["loader"])
    assert hps(["load", "-f", str(roles.model_file), "--redis", roles.server.address, "--redis-user",
                "hps-loader", "--redis-password-env", "HPS_TEST_LOADER_PASSWORD", "--no-progress"]) == 0  # fmt: skip
    agent = Agent(AgentOptions(model_file=roles.model_file, port=0, redis=(roles.server.address,),
                               redis_access=roles.access("agent"), device="cpu", agent_id="a0",
                               auth=AuthOptions(token=TOKEN)))  # fmt: skip
    agent.start()
    try:
        assert agent.server is not None
        with Client(agent.server.endpoint, token=TOKEN) as client:
            keys = [1, 4, 190]
            np.testing.assert_array_equal(
                client.lookup("demo", "user", keys), roles.data["user"].expected(keys)
            )
            assert (
                client.update("demo", "user", [4], np.full((1, 8), 2.0, np.float32)) == 1
            )  # XADD, claim, HSET
            with UpdatePublisher(
                [roles.server.address], access=roles.access("producer"), model="demo"
            ) as producer:
                producer.publish("user", [7], np.full((1, 8), 5.0, np.float32))
            published = np.full((1, 8), 5.0, np.float32)
            deadline = time.monotonic() + 5.0  # the consumer applies it within milliseconds; generous here
            while not np.array_equal(client.lookup("demo", "user", [7]), published):
                assert time.monotonic() < deadline, "the producer's update was not served within 5 s"
                time.sleep(0.01)
            assert not client.describe("demo").degraded
    finally:
        agent.stop()
    as_agent = roles.client("agent")
    for refused in (as_agent.flushall, lambda: as_agent.delete("hps:{demo:user:0}"),
                    lambda: as_agent.config_set("appendonly", "no"), lambda: as_agent.keys("*"),
                    lambda: as_agent.hmget("hps:{another-model:user:0}", ["x"]),
                    lambda: as_agent.set("hps:{another-model}:epoch", "x")):  # fmt: skip
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    assert as_agent.hlen("hps:{demo:user:0}") > 0


def test_a_producer_appends_to_its_models_stream_and_nothing_else(roles: Roles) -> None:
    with UpdatePublisher([roles.server.address], access=roles.access("producer"), model="demo") as producer:
        assert producer.publish("user", [1], np.ones((1, 8), np.float32))
    with UpdatePublisher(
        [roles.server.address], access=roles.access("producer"), model="another-model"
    ) as other, pytest.raises(
        PermissionDeniedError, match=r"user hps-producer may not publish to hps:\{another-model\}"
    ):
        other.publish("user", [1], np.ones((1, 8), np.float32))
    as_producer = roles.client("producer")
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_producer.hmget("hps:{demo:user:0}", ["x"])  # it cannot read rows
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_producer.hset("hps:{demo:user:0}", "x", "y")  # nor write them around the stream
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong = RedisAccess(username="hps-producer", password="wrong").client_options()
        redis.Redis(host=roles.server.host, port=roles.server.port, retry=NO_RETRY, **wrong).ping()


def test_role_rules_name_only_the_models_keys_and_the_file_holds_no_password() -> None:
    agent = role_rules("agent", model="demo", stream=stream_name("demo"))
    assert "~hps:{demo:*" in agent and "~hps:{demo}:updates" in agent and "~hps:{demo}:updates:*" in agent
    assert "(+del ~hps:{demo}:updates:writer)" in agent  # DEL only on the lease
    for role in ("agent", "loader", "producer"):
        rules = role_rules(role, model="demo", stream=stream_name("demo"))
        assert "-@all" in rules and "~*" not in rules
        assert not {"+@all", "+flushall", "+flushdb", "+config", "+keys", "+acl", "+del", "+debug"} & set(
            rules
        )
    assert role_rules("producer", model="demo", stream=stream_name("demo"))[-1] == "~hps:{demo}:updates"
    # a custom stream name holding glob characters matches itself only
    assert "~updates\\*of\\?demo" in role_rules("producer", model="demo", stream="updates*of?demo")
    text = acl_file(model="demo", stream=stream_name("demo"), passwords=PASSWORDS, admin_password=ADMIN)
    assert all(p not in text for p in (*PASSWORDS.values(), ADMIN))
    assert text.count("\nuser ") == 3 and text.startswith("user default ")


def test_redis_addresses_take_a_tls_scheme_and_refuse_credentials_in_them() -> None:
    assert parse_redis_addresses("rediss://a:1,b:2") == (["a:1", "b:2"], True)
    assert parse_redis_addresses("redis://a:1") == (["a:1"], False)
    assert parse_redis_addresses("a:1") == (["a:1"], None)
    with pytest.raises(InvalidArgumentError, match="carries credentials: give the user with --redis-user"):
        parse_redis_addresses("rediss://user:pw@a:1")
    with pytest.raises(InvalidArgumentError, match="mix redis:// and rediss://"):
        parse_redis_addresses("redis://a:1,rediss://b:2")


def test_an_agent_whose_redis_user_may_not_publish_answers_failed_precondition_not_unauthenticated(
    tmp_path: Path,
) -> None:
    """The caller's token is fine: Redis refusing the agent's own user is the agent's set-up, and the
    Update RPC must say so (and apply nothing), not blame the caller's credential."""
    path, data = write_model(tmp_path, MODEL_YAML)
    rules = [r for r in role_rules("agent", model="demo", stream=stream_name("demo")) if r != "+xadd"]
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default on >{ADMIN} ~* &* +@all\nuser hps-agent on >{PASSWORDS['agent']} {' '.join(rules)}\n")
    server = start_redis(tmp_path / "redis", password=ADMIN, acl_file=acl)
    agent = Agent(AgentOptions(model_file=path, port=0, redis=(server.address,), load=True, device="cpu",
                               redis_access=RedisAccess(username="hps-agent", password=PASSWORDS["agent"]),
                               agent_id="a0", auth=AuthOptions(token=TOKEN)))  # fmt: skip
    agent.start()
    try:
        assert agent.server is not None
        with Client(agent.server.endpoint, token=TOKEN, retries=0) as client:
            with pytest.raises(FailedPreconditionError, match="this agent cannot publish to the update stream"):
                client.update("demo", "user", [4], np.full((1, 8), 2.0, np.float32))
            np.testing.assert_array_equal(client.lookup("demo", "user", [4]), data["user"].expected([4]))
        assert server.client().xlen(stream_name("demo")) == 0
    finally:
        agent.stop()
        server.stop(hard=True)
