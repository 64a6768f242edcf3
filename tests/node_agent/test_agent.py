"""The node agent (``hps agent``) as users run it: a real process serving gRPC until SIGTERM, the
``hps lookup`` / ``hps update`` commands against it, and an agent whose Redis dies while it serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hps_operator.cli import main as hps
from prometheus_client.parser import text_string_to_metric_families

from node_agent.agent import Agent, AgentOptions
from node_agent.client import Client
from node_agent.errors import NotFoundError
from node_agent.local.redis_servers import RedisProcess
from node_agent.redis_access import RedisAccess
from node_agent.spec import load_model_file
from node_agent.tiers.redis_tier import RedisTier
from node_agent.tiers.rocksdb_tier import RocksDBTier
from node_agent.updates import UpdatePublisher
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model

PASSWORD = "test-secret"
#: the default user with that password, as the data plane\'s clients take it
ACCESS = RedisAccess(password=PASSWORD)
#: the token the agents take for Update RPCs (what hps local up generates)
TOKEN = "test-update-token"


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            ready: dict[str, object] = json.loads(path.read_text())
            return ready
        if process.poll() is not None:
            raise AssertionError(f"agent exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        time.sleep(0.05)
    raise AssertionError(f"no ready file within {timeout} s")


@pytest.fixture
def rocksdb_model(tmp_path: Path) -> tuple[Path, Path, dict[str, TableData]]:
    """The demo model with its rows already in a RocksDB directory (what ``hps load`` leaves)."""
    path, data = write_model(tmp_path)
    db = tmp_path / "rocksdb"
    tier = RocksDBTier(db, layouts(load_model_file(path)))
    fill(tier, data)
    tier.close()
    return path, db, data


@pytest.fixture
def agent_process(tmp_path: Path, rocksdb_model: tuple[Path, Path, dict[str, TableData]]) -> Iterator[
        tuple[subprocess.Popen[bytes], dict[str, object], Path]]:  # fmt: skip
    path, db, _ = rocksdb_model
    ready_file = tmp_path / "ready.json"
    (tmp_path / "token").write_text(TOKEN + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "hps_operator", "agent", "-f", str(path), "--port", "0", "--rocksdb", str(db),
         "--device", "cpu", "--ready-file", str(ready_file), "--auth-token-file", str(tmp_path / "token")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        ready = wait_for_file(ready_file, process)
        yield process, ready, ready_file
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_agent_process_serves_and_stops_cleanly_on_sigterm(
    agent_process: tuple[subprocess.Popen[bytes], dict[str, object], Path],
    rocksdb_model: tuple[Path, Path, dict[str, TableData]],
) -> None:
    process, ready, ready_file = agent_process
    _, _, data = rocksdb_model
    assert ready["model"] == "demo" and ready["device"] == "cpu" and isinstance(ready["port"], int)
    with Client(str(ready["endpoint"])) as client:
        keys = [1, 4, 5, 94]
        np.testing.assert_array_equal(client.lookup("demo", "user", keys), data["user"].expected(keys))
        assert client.describe("demo").updates_stream == ""  # no Redis: no update stream
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert not ready_file.exists()
    assert b"serving on" in process.stderr.read()  # type: ignore[union-attr]


def test_a_draining_agent_leaves_routing_before_it_stops_answering(
    tmp_path: Path, rocksdb_model: tuple[Path, Path, dict[str, TableData]]
) -> None:
    """Scale-down: on SIGTERM with --drain-seconds the agent's health check says NOT_SERVING (its pod
    fails readiness and leaves the Service) while lookups still succeed, and it stops afterwards."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    path, db, data = rocksdb_model
    ready_file = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "hps_operator", "agent", "-f", str(path), "--port", "0", "--rocksdb", str(db),
         "--device", "cpu", "--ready-file", str(ready_file), "--drain-seconds", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = wait_for_file(ready_file, process)
        endpoint = str(ready["endpoint"])
        with grpc.insecure_channel(endpoint) as channel, Client(endpoint) as client:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status != serving:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            keys = [1, 4, 5]
            np.testing.assert_array_equal(client.lookup("demo", "user", keys), data["user"].expected(keys))
            assert process.poll() is None  # still answering while draining
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_lookup_and_update_commands(
    agent_process: tuple[subprocess.Popen[bytes], dict[str, object], Path],
    rocksdb_model: tuple[Path, Path, dict[str, TableData]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, ready, _ = agent_process
    _, _, data = rocksdb_model
    endpoint = str(ready["endpoint"])
    assert hps(["lookup", "--endpoint", endpoint, "--model", "demo", "--table", "item", "--keys", "1,4,2", "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "demo" and out["table"] == "item" and out["keys"] == [1, 4, 2]
    np.testing.assert_array_equal(np.array(out["vectors"], np.float16), data["item"].expected([1, 4, 2]))

    assert hps(["lookup", "--endpoint", endpoint, "--model", "demo", "--table", "user", "--keys", "7"]) == 0
    table = capsys.readouterr().out
    assert "KEY" in table and "(1 keys, dim 8, float32)" in table

    vectors = tmp_path / "v.npy"
    np.save(vectors, np.full((2, 8), 1.5, np.float32))
    update = ["update", "--endpoint", endpoint, "--model", "demo", "--table", "user", "--keys", "1,777",
              "--vectors-file", str(vectors)]  # fmt: skip
    assert hps(update) == 9  # no token: refused, saying where a token comes from
    refused = capsys.readouterr().err
    assert "Update needs a credential" in refused and "--token-file" in refused and "auth.token" in refused
    assert hps([*update, "--token-file", str(tmp_path / "token")]) == 0
    assert "2 rows" in capsys.readouterr().out
    with Client(endpoint) as client:
        np.testing.assert_array_equal(client.lookup("demo", "user", [777, 1]), np.full((2, 8), 1.5, np.float32))

    assert hps(["lookup", "--endpoint", endpoint, "--model", "demo", "--table", "nope", "--keys", "1"]) == 3
    assert "table 'nope' not found" in capsys.readouterr().err
    assert hps(["lookup", "--endpoint", endpoint, "--model", "demo", "--table", "user", "--keys", "1,x"]) == 2
    capsys.readouterr()
    # an empty entry is a mistake to name, not a key to drop
    assert hps(["lookup", "--endpoint", endpoint, "--model", "demo", "--table", "user", "--keys", "1,,2"]) == 2
    assert "entry 2 of 3 is empty" in capsys.readouterr().err


@pytest.fixture
def redis_agent(
    tmp_path: Path, make_redis: Callable[..., RedisProcess], rocksdb_model: tuple[Path, Path, dict[str, TableData]]
) -> Iterator[tuple[Agent, RedisProcess, dict[str, TableData]]]:
    """An in-process agent on its own Redis (L2, and the update stream) and RocksDB (L3)."""
    path, db, data = rocksdb_model
    server = make_redis(password=PASSWORD)
    tier = RedisTier(layouts(load_model_file(path)), addresses=[server.address], access=ACCESS, model="demo")
    fill(tier, data)
    tier.close()
    agent = Agent(AgentOptions(model_file=path, port=0, redis=(server.address,), redis_access=ACCESS,
                               rocksdb=db, device="cpu", agent_id="test-agent"))  # fmt: skip
    agent.start()
    yield agent, server, data
    agent.stop(grace=0)


def test_agent_applies_published_updates_and_survives_redis_dying(
    redis_agent: tuple[Agent, RedisProcess, dict[str, TableData]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent, server, data = redis_agent
    assert agent.server is not None
    endpoint = agent.server.endpoint
    user = data["user"]
    with Client(endpoint, timeout=5) as client:
        info = client.describe("demo")
        assert info.updates_stream == "hps:{demo}:updates" and not info.degraded
        warm = [1, 4, 7]
        np.testing.assert_array_equal(client.lookup("demo", "user", warm), user.expected(warm))

        vectors = tmp_path / "v.npy"
        np.save(vectors, np.full((1, 8), 6.0, np.float32))
        monkeypatch.setenv("TEST_REDIS_PASSWORD", PASSWORD)
        assert hps(["update", "--redis", server.address, "--redis-password-env", "TEST_REDIS_PASSWORD",
                    "--model", "demo", "--table", "user", "--keys", "10", "--vectors-file", str(vectors)]) == 0  # fmt: skip
        assert "to hps:{demo}:updates" in capsys.readouterr().out
        deadline = time.monotonic() + 2.0
        while not np.array_equal(client.lookup("demo", "user", [10]), np.full((1, 8), 6.0, np.float32)):
            assert time.monotonic() < deadline, "published update not visible within 2 s"
            time.sleep(0.005)

        server.stop(hard=True)
        cold = [13, 16, 94, 2]  # never looked up: served from RocksDB (94 and 2: defaults)
        np.testing.assert_array_equal(client.lookup("demo", "user", cold), user.expected(cold))
        np.testing.assert_array_equal(client.lookup("demo", "user", warm), user.expected(warm))
        np.testing.assert_array_equal(client.lookup("demo", "user", [10]), np.full((1, 8), 6.0, np.float32))
        assert client.describe("demo").degraded is True
        stats = client.stats("demo")
        assert stats["degraded"] is True and stats["lookup"]["degraded"] is True
    with grpc.insecure_channel(endpoint) as channel:  # degraded still answers lookups: still SERVING
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_agent_load_fills_the_in_process_hash_map(tmp_path: Path) -> None:
    path, data = write_model(tmp_path)
    agent = Agent(AgentOptions(model_file=path, port=0, load=True, device="cpu", ready_file=tmp_path / "r.json"))
    agent.start()
    try:
        assert json.loads((tmp_path / "r.json").read_text())["port"] == agent.server.port  # type: ignore[union-attr]
        with Client(agent.server.endpoint) as client:  # type: ignore[union-attr]
            got = client.lookup_many("demo", {"user": data["user"].keys, "item": [1, 2, 4]})
        np.testing.assert_array_equal(got["user"], data["user"].vectors)
        np.testing.assert_array_equal(got["item"], data["item"].expected([1, 2, 4]))
    finally:
        agent.stop(grace=0)
    assert not (tmp_path / "r.json").exists()


def test_missing_password_variable_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = write_model(tmp_path)
    os.environ.pop("HPS_TEST_UNSET", None)
    code = hps(["agent", "-f", str(path), "--redis", "127.0.0.1:1", "--redis-password-env", "HPS_TEST_UNSET"])
    assert code == 2
    assert "HPS_TEST_UNSET is not set" in capsys.readouterr().err


def wait_for_vector(client: Client, table: str, key: int, want: np.ndarray, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not np.array_equal(client.lookup("demo", table, [key]), want):
        assert time.monotonic() < deadline, f"key {key} of {table} never showed {want.tolist()}"
        time.sleep(0.01)


def test_restarted_agent_applies_updates_published_while_it_was_down(
    make_redis: Callable[..., RedisProcess], rocksdb_model: tuple[Path, Path, dict[str, TableData]]
) -> None:
    """No --agent-id: the identity kept in the agent's writable RocksDB directory brings the restarted
    agent back to its own consumer group, so what was published while it was down is not lost."""
    path, db, _ = rocksdb_model
    server = make_redis(password=PASSWORD)
    options = AgentOptions(model_file=path, port=0, redis=(server.address,), redis_access=ACCESS,
                           rocksdb=db, device="cpu")  # fmt: skip
    first = Agent(options)
    first.start()
    first.stop(grace=0)
    publisher = UpdatePublisher([server.address], password=PASSWORD, model="demo")
    publisher.publish("user", [10], np.full((1, 8), 4.5, np.float32))
    publisher.close()
    again = Agent(options)
    again.start()
    try:
        assert again.server is not None
        with Client(again.server.endpoint) as client:
            wait_for_vector(client, "user", 10, np.full((1, 8), 4.5, np.float32))
    finally:
        again.stop(grace=0)


def test_agent_loading_its_sources_replays_updates_published_before_it_started(
    tmp_path: Path, make_redis: Callable[..., RedisProcess]
) -> None:
    """Loading writes the source rows over Redis; the stream's retained updates are then replayed on
    top, and the agent reports ready only once they are applied."""
    path, data = write_model(tmp_path)
    server = make_redis(password=PASSWORD)
    publisher = UpdatePublisher([server.address], password=PASSWORD, model="demo")
    publisher.publish("user", [1], np.full((1, 8), 9.0, np.float32))
    publisher.close()
    agent = Agent(AgentOptions(model_file=path, port=0, redis=(server.address,), redis_access=ACCESS,
                               load=True, device="cpu", agent_id="loader-agent"))  # fmt: skip
    agent.start()
    try:
        assert agent.server is not None and agent.consumer is not None
        assert agent.consumer.stats()["applied_entries"] == 1  # applied before start() returned
        with Client(agent.server.endpoint) as client:
            np.testing.assert_array_equal(client.lookup("demo", "user", [1]), np.full((1, 8), 9.0, np.float32))
            np.testing.assert_array_equal(client.lookup("demo", "user", [4]), data["user"].expected([4]))
    finally:
        agent.stop(grace=0)


def test_load_with_only_read_only_tiers_starts_and_serves(
    tmp_path: Path, rocksdb_model: tuple[Path, Path, dict[str, TableData]]
) -> None:
    path, db, data = rocksdb_model
    path.write_text(path.read_text().replace("volatileStore: {type: hashmap}", "volatileStore: {type: none}"))
    agent = Agent(AgentOptions(model_file=path, port=0, rocksdb=db, rocksdb_read_only=True, load=True,
                               device="cpu"))  # fmt: skip
    agent.start()
    try:
        with Client(agent.server.endpoint) as client:  # type: ignore[union-attr]
            np.testing.assert_array_equal(client.lookup("demo", "user", [1, 4, 2]), data["user"].expected([1, 4, 2]))
    finally:
        agent.stop(grace=0)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the agent's /metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_agent_serves_prometheus_metrics_that_follow_its_lookups(tmp_path: Path) -> None:
    path, data = write_model(tmp_path)
    agent = Agent(AgentOptions(model_file=path, port=0, load=True, device="cpu", metrics_port=0,
                               ready_file=tmp_path / "r.json"))  # fmt: skip
    agent.start()
    try:
        assert agent.metrics is not None and agent.server is not None
        assert json.loads((tmp_path / "r.json").read_text())["metricsPort"] == agent.metrics.port
        base = (("model", "demo"), ("partition", "0"))
        before = scrape(agent.metrics.port)
        assert before[("hps_lookup_requests_total", base)] == 0
        with Client(agent.server.endpoint) as client:
            for _ in range(3):
                client.lookup("demo", "user", data["user"].keys[:10])
            with pytest.raises(NotFoundError):
                client.lookup("demo", "nope", [1])
        after = scrape(agent.metrics.port)
        assert after[("hps_lookup_requests_total", base)] == 3
        assert after[("hps_lookup_keys_total", base)] == 30
        assert after[("hps_rpc_errors_total", tuple(sorted((*base, ("code", "not_found")))))] == 1
        user = tuple(sorted((*base, ("table", "user"))))
        assert after[("hps_l1_hits_total", user)] == 20 and after[("hps_l1_misses_total", user)] == 10
        assert after[("hps_l1_rows", user)] == 10
        assert after[("hps_agent_degraded", base)] == 0
        # /healthz says what the gRPC health service says, for probes that cannot speak TLS
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/healthz", timeout=5) as reply:
            assert reply.status == 200
        agent.server.set_serving(False)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/healthz", timeout=5)
        assert refused.value.code == 503
    finally:
        agent.stop(grace=0)
