"""``hps local up/status/down`` with the real CLI in subprocesses: real redis-server processes, the
real loader and real agent processes answering gRPC on loopback ports; tables are small files in
tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from redis.backoff import NoBackoff
from redis.retry import Retry

from node_agent.client import Client
from node_agent.errors import InvalidArgumentError, UnavailableError
from node_agent.redis_access import RedisAccess, RedisTLS

CLI_TIMEOUT_S = 120


def hps(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hps_operator", *map(str, args)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"hps {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def endpoints_of(out: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("endpoint: ")]


def processes_mentioning(path: Path) -> list[int]:
    """Pids whose command line names ``path``: what a stack under that state directory runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class Model:
    file: Path
    users_keys: np.ndarray
    users: np.ndarray
    items: np.ndarray


def write_model(root: Path, *, name: str = "recs", cache: str = "1Mi") -> Model:
    """Two tables: ``users`` (float32, explicit keys.npy) and ``items`` (float16, one .npy file, default 0.5)."""
    rng = np.random.default_rng(11)
    users_keys = rng.choice(10**9, size=600, replace=False).astype(np.int64)
    users = rng.standard_normal((600, 8), dtype=np.float32)
    items = rng.standard_normal((300, 4)).astype(np.float16)
    (root / "tables" / "users").mkdir(parents=True, exist_ok=True)
    np.save(root / "tables" / "users" / "vectors.npy", users)
    np.save(root / "tables" / "users" / "keys.npy", users_keys)
    np.save(root / "tables" / "items.npy", items)
    file = root / "model.yaml"
    file.write_text(f"""\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {{name: {name}}}
spec:
  tables:
  - {{name: users, rows: 600, dim: 8, dtype: float32, source: file://tables/users}}
  - {{name: items, rows: 300, dim: 4, dtype: float16, source: tables/items.npy, defaultValue: 0.5}}
  cache: {{memoryPerGPU: {cache}}}
  volatileStore: {{type: redis}}
  persistentStore: {{type: rocksdb}}
""")
    return Model(file, users_keys, users, items)


def assert_serves_exactly(endpoint: str, model_name: str, model: Model, **client_options: Any) -> None:
    with Client(endpoint, **client_options) as client:
        got = client.lookup(model_name, "users", model.users_keys[::-1])
        np.testing.assert_array_equal(got, model.users[::-1])
        keys = np.array([0, 299, 17, 17, 300, 10**12], dtype=np.int64)  # 300 and 10**12 are not in the table
        got16 = client.lookup(model_name, "items", keys)
        assert got16.dtype == np.float16
        np.testing.assert_array_equal(got16[:4], model.items[[0, 299, 17, 17]])
        np.testing.assert_array_equal(got16[4:], np.full((2, 4), 0.5, dtype=np.float16))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Model, Path, list[str]]]:
    """One stack for the tests that only read it; stopped at the end."""
    root = tmp_path_factory.mktemp("stack")
    model = write_model(root)
    state = root / "state"
    up = hps("local", "up", "-f", model.file, "--state-dir", state)
    yield model, state, endpoints_of(up.stdout)
    hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_up_prints_an_endpoint_that_serves_the_source_files_exactly(running: tuple[Model, Path, list[str]]) -> None:
    model, _, endpoints = running
    assert len(endpoints) == 1
    assert_serves_exactly(endpoints[0], "recs", model)


def test_state_dir_holds_pids_and_a_private_password(running: tuple[Model, Path, list[str]]) -> None:
    _, state_dir, endpoints = running
    state = json.loads((state_dir / "state.json").read_text())
    assert state["endpoints"] == endpoints and state["model"] == "recs"
    assert {p["role"] for p in state["processes"]} == {"redis", "agent"}
    assert (state_dir / "redis.password").stat().st_mode & 0o777 == 0o600


def test_each_process_reaches_redis_as_its_role_and_updates_need_the_stacks_token(
    running: tuple[Model, Path, list[str]], tmp_path: Path
) -> None:
    _, state_dir, endpoints = running
    for secret in ("redis.password", "auth.token", "redis-users.json", "redis-users.acl"):
        assert (state_dir / secret).stat().st_mode & 0o777 == 0o600, secret
    passwords = json.loads((state_dir / "redis-users.json").read_text())
    assert set(passwords) == {"agent", "loader", "producer"}
    acl = (state_dir / "redis-users.acl").read_text()
    assert "user hps-agent " in acl and all(p not in acl for p in passwords.values())  # hashes only
    state = json.loads((state_dir / "state.json").read_text())
    (agent,) = [p for p in state["processes"] if p["role"] == "agent"]
    command = " ".join(agent["command"])
    assert "--redis-user hps-agent" in command and "--auth-token-file" in command
    assert all(p not in command for p in passwords.values())  # a password never on a command line
    admin = redis_of(state_dir)
    users = {c["user"] for c in admin.client_list()}
    assert users == {"hps-agent", "default"}  # the agent's connections, and this one
    key = 10**15  # not a row of the table: the other tests of this stack do not see it
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.full((1, 8), 4.5, np.float32))
    update = ["update", "--endpoint", endpoints[0], "--model", "recs", "--table", "users", "--keys", str(key),
              "--vectors-file", vectors]  # fmt: skip
    refused = hps(*update, check=False)
    assert refused.returncode == 9 and "Update needs a credential" in refused.stderr
    assert "--state-dir DIR (its token is DIR/auth.token" in refused.stderr
    hps(*update, "--state-dir", state_dir)
    with Client(endpoints[0]) as client:  # reads stay open in local mode
        np.testing.assert_array_equal(client.lookup("recs", "users", [key]), np.full((1, 8), 4.5, np.float32))


def test_an_update_a_table_cannot_take_is_refused_before_it_is_published_or_applied(
    running: tuple[Model, Path, list[str]], tmp_path: Path
) -> None:
    """A value beyond float16's range for the float16 table, an unknown table, a wrong dim: refused with
    what is wrong, through the stream (--redis with --state-dir) and through the Update RPC, and no agent
    serves an ``inf`` or anything else for the key afterwards."""
    _, state_dir, endpoints = running
    redis_address = json.loads((state_dir / "state.json").read_text())["redis"]["addresses"][0]
    key = 10**15 + 7  # a key no other test of this stack writes
    for table, rows, code, said in (("items", np.full((1, 4), 1e6, np.float32), 2, "beyond float16's range"),
                                    ("nope", np.ones((1, 4), np.float32), 3, "table 'nope' not found"),
                                    ("users", np.ones((1, 3), np.float32), 2, "vectors have dim 3")):  # fmt: skip
        np.save(tmp_path / "v.npy", rows)
        sent = hps("update", "--state-dir", state_dir, "--redis", redis_address, "--model", "recs", "--table", table,
                   "--keys", str(key), "--vectors-file", tmp_path / "v.npy", check=False)  # fmt: skip
        assert (sent.returncode, said in sent.stderr) == (code, True), sent.stderr
    token = (state_dir / "auth.token").read_text().strip()
    with Client(endpoints[0], token=token) as client:
        with pytest.raises(InvalidArgumentError, match="float16's range"):
            client.update("recs", "items", [key], np.full((1, 4), -7e4, np.float32))
        with pytest.raises(InvalidArgumentError, match="not finite numbers, the first nan at row 0, column 2"):
            client.update("recs", "items", [key], np.array([[0, 1, np.nan, 3]], np.float32))
    with Client(endpoints[0]) as client:
        assert np.array_equal(client.lookup("recs", "items", [key]), np.full((1, 4), 0.5, np.float16))  # the default


def test_up_with_tls_serves_grpc_and_redis_over_tls_only(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    state = tmp_path / "state"
    try:
        up = hps("local", "up", "-f", model.file, "--state-dir", state, "--tls")
        ca = state / "tls" / "ca.crt"
        assert f"tls ca: {ca}" in up.stdout and f"token: {state / 'auth.token'}" in up.stdout
        (endpoint,) = endpoints_of(up.stdout)
        assert_serves_exactly(endpoint, "recs", model, tls=ca)
        with Client(endpoint, retries=0, timeout=2) as plain, pytest.raises(UnavailableError, match="give its CA"):
            plain.lookup("recs", "users", [1])
        looked_up = hps("lookup", "--state-dir", state, "--model", "recs", "--table", "users", "--keys",
                        str(model.users_keys[0]), "-o", "json")  # fmt: skip
        assert json.loads(looked_up.stdout)["vectors"][0] == pytest.approx(model.users[0].tolist())
        # Redis: TLS only, and its users come back with it after a restart (its ACL file)
        address = json.loads((state / "state.json").read_text())["redis"]["addresses"][0]
        host, port = address.rsplit(":", 1)
        plaintext = redis.Redis(host=host, port=int(port), password=(state / "redis.password").read_text().strip(),
                                socket_timeout=2, retry=Retry(NoBackoff(), 0))  # fmt: skip
        with pytest.raises(redis.ConnectionError):
            plaintext.ping()
        hps("local", "restart", "redis", "--state-dir", state)
        producer = RedisAccess(username="hps-producer", tls=RedisTLS(ca_file=ca),
                               password=json.loads((state / "redis-users.json").read_text())["producer"])  # fmt: skip
        assert redis.Redis(host=host, port=int(port), **producer.client_options()).ping()
        key = int(model.users_keys[5])
        np.save(tmp_path / "v.npy", np.full((1, 8), 7.0, np.float32))
        for how in (["--state-dir", state], ["--redis", f"rediss://{address}", "--state-dir", state]):
            hps("update", "--model", "recs", "--table", "users", "--keys", str(key), "--vectors-file",
                tmp_path / "v.npy", *how)  # fmt: skip
        with Client(endpoint, tls=ca) as client:
            np.testing.assert_array_equal(client.lookup("recs", "users", [key]), np.full((1, 8), 7.0, np.float32))
        report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json").stdout)
        assert report["state"] == "up" and report["tls"] is True and report["credentials"]["ca"] == str(ca)
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)
    assert not (state / "tls").exists() and not (state / "auth.token").exists()


def test_status_reports_each_process_alive_and_the_agents_health(running: tuple[Model, Path, list[str]]) -> None:
    _, state_dir, endpoints = running
    proc = hps("local", "status", "--state-dir", state_dir, "-o", "json")
    report = json.loads(proc.stdout)
    assert report["state"] == "up"
    assert report["endpoints"] == endpoints
    assert all(p["alive"] for p in report["processes"])
    (agent,) = report["agents"]
    assert agent["answering"] and agent["degraded"] is False and agent["device"]
    text = hps("local", "status", "--state-dir", state_dir).stdout
    assert f"endpoint: {endpoints[0]}" in text and "alive" in text


def test_up_again_with_the_same_model_keeps_the_running_stack(running: tuple[Model, Path, list[str]]) -> None:
    model, state_dir, endpoints = running
    pids_before = [p["pid"] for p in json.loads((state_dir / "state.json").read_text())["processes"]]
    again = hps("local", "up", "-f", model.file, "--state-dir", state_dir)
    assert "already up" in again.stdout
    assert endpoints_of(again.stdout) == endpoints
    assert [p["pid"] for p in json.loads((state_dir / "state.json").read_text())["processes"]] == pids_before


def test_up_with_a_changed_model_restarts_and_down_stops_everything(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    state = tmp_path / "state"
    first = hps("local", "up", "-f", model.file, "--state-dir", state)
    old_pids = [p["pid"] for p in json.loads((state / "state.json").read_text())["processes"]]
    good = model.file.read_text()

    # a change the new start would refuse fails the up, and the running stack keeps serving:
    # a new table whose file is corrupt, then a stored table given another dim
    (tmp_path / "tables" / "extra.npy").write_bytes(b"not a numpy file")
    model.file.write_text(good.replace("  cache:", "  - {name: extra, rows: 10, dim: 4, source: tables/extra.npy}\n  cache:"))
    corrupt = hps("local", "up", "-f", model.file, "--state-dir", state, check=False)
    assert corrupt.returncode != 0 and "extra.npy" in corrupt.stderr
    model.file.write_text(good.replace("rows: 300, dim: 4", "rows: 300, dim: 6"))
    reshaped = hps("local", "up", "-f", model.file, "--state-dir", state, check=False)
    assert reshaped.returncode != 0 and "spec.tables[1]" in reshaped.stderr
    assert [p["pid"] for p in json.loads((state / "state.json").read_text())["processes"]] == old_pids
    assert all(Path(f"/proc/{pid}").exists() for pid in old_pids)
    assert_serves_exactly(endpoints_of(first.stdout)[0], "recs", model)
    assert hps("local", "status", "--state-dir", state).returncode == 0

    model.file.write_text(good.replace("memoryPerGPU: 1Mi", "memoryPerGPU: 2Mi"))
    second = hps("local", "up", "-f", model.file, "--state-dir", state)
    assert "restarted" in second.stdout
    assert not set(old_pids) & set(processes_mentioning(state))
    assert_serves_exactly(endpoints_of(second.stdout)[0], "recs", model)
    assert endpoints_of(first.stdout)  # both runs printed an endpoint

    down = hps("local", "down", "--state-dir", state)
    assert "stopped 2 process(es)" in down.stdout
    assert processes_mentioning(state) == []
    assert not (state / "state.json").exists()
    assert (state / "rocksdb").exists()  # data kept without --purge
    status = hps("local", "status", "--state-dir", state, check=False)
    assert status.returncode == 3 and "no stack" in status.stdout
    again = hps("local", "down", "--state-dir", state)
    assert "nothing running" in again.stdout
    hps("local", "down", "--state-dir", state, "--purge")
    assert not state.exists()


def test_a_corrupt_table_file_fails_up_naming_it_and_leaves_nothing_running(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    vectors = tmp_path / "tables" / "users" / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-100])  # truncated: the header promises more rows
    state = tmp_path / "state"
    proc = hps("local", "up", "-f", model.file, "--state-dir", state, check=False)
    assert proc.returncode != 0
    assert "vectors.npy" in proc.stderr
    assert processes_mentioning(state) == []
    assert not (state / "state.json").exists()


def test_redis_cluster_of_three_masters(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    state = tmp_path / "state"
    try:
        up = hps("local", "up", "-f", model.file, "--state-dir", state, "--redis-cluster", "3")
        saved = json.loads((state / "state.json").read_text())
        assert saved["redis"]["cluster"] is True and len(saved["redis"]["addresses"]) == 3
        assert_serves_exactly(endpoints_of(up.stdout)[0], "recs", model)
        report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json").stdout)
        assert report["state"] == "up" and sum(p["role"] == "redis" for p in report["processes"]) == 3
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)
    assert processes_mentioning(state) == []


def test_redis_shards_of_the_model_are_separate_servers_each_holding_rows(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    model.file.write_text(model.file.read_text().replace("volatileStore: {type: redis}",
                                                         "volatileStore: {type: redis, redis: {shards: 2}}"))  # fmt: skip
    state = tmp_path / "state"
    try:
        up = hps("local", "up", "-f", model.file, "--state-dir", state)
        saved = json.loads((state / "state.json").read_text())
        assert saved["redis"]["cluster"] is False and len(saved["redis"]["addresses"]) == 2
        assert_serves_exactly(endpoints_of(up.stdout)[0], "recs", model)
        password = (state / "redis.password").read_text().strip()
        for address in saved["redis"]["addresses"]:
            host, port = address.rsplit(":", 1)
            assert redis.Redis(host=host, port=int(port), password=password).dbsize() > 0, address
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)
    assert processes_mentioning(state) == []


def reflected_services(endpoint: str) -> set[str]:
    """What the agent's server reflection lists; raises grpc.RpcError UNIMPLEMENTED when it is off."""
    with grpc.insecure_channel(endpoint) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_reflection_is_off_on_a_stack_unless_asked(running: tuple[Model, Path, list[str]]) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        reflected_services(running[2][0])
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_two_agents_each_serve_every_table_and_reflection_when_asked(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    state = tmp_path / "state"
    try:
        up = hps("local", "up", "-f", model.file, "--state-dir", state, "--agents", "2", "--reflection")
        endpoints = endpoints_of(up.stdout)
        assert len(set(endpoints)) == 2
        for endpoint in endpoints:
            assert_serves_exactly(endpoint, "recs", model)
            assert {"hps.v1.EmbeddingService", "grpc.health.v1.Health"} <= reflected_services(endpoint)
        # the model's own field asks for it as well
        model.file.write_text(model.file.read_text() + "  security: {reflection: true}\n")
        again = hps("local", "up", "-f", model.file, "--state-dir", state, "--agents", "2")
        assert "restarted" in again.stdout
        for endpoint in endpoints_of(again.stdout):
            assert "hps.v1.EmbeddingService" in reflected_services(endpoint)
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_state_dir_defaults_to_the_environment_variable(tmp_path: Path, running: tuple[Model, Path, list[str]]) -> None:
    env = {**os.environ, "HPS_STATE_DIR": str(tmp_path / "from-env")}
    proc = subprocess.run([sys.executable, "-m", "hps_operator", "local", "status"], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, env=env)  # fmt: skip
    assert proc.returncode == 3 and str(tmp_path / "from-env") in proc.stdout
    # hps lookup finds the stack there too, as --state-dir would
    model, state_dir, _ = running
    key = int(model.users_keys[3])
    proc = subprocess.run([sys.executable, "-m", "hps_operator", "lookup", "--model", "recs", "--table", "users",
                           "--keys", str(key), "-o", "json"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          env={**os.environ, "HPS_STATE_DIR": str(state_dir)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.asarray(json.loads(proc.stdout)["vectors"], dtype=np.float32), model.users[[3]])


def test_a_single_partition_stack_routes_everything_to_its_agents(running: tuple[Model, Path, list[str]]) -> None:
    from node_agent.routing import RoutedClient

    model, state_dir, endpoints = running
    with RoutedClient.from_local_state(state_dir) as client:
        assert client.endpoints == {0: endpoints}
        got = client.lookup("recs", "users", model.users_keys[::-1])
        np.testing.assert_array_equal(got, model.users[::-1])
        assert client.check_plan("recs") == []  # agents without a plan report version 0, as the client routes
        assert client.routing_stats()["unowned_keys"] == 0


def test_partitions_run_the_plan_and_a_model_change_replans_from_it(tmp_path: Path) -> None:
    from node_agent.routing import RoutedClient

    model = write_model(tmp_path)
    state = tmp_path / "state"
    try:
        up = hps("local", "up", "-f", model.file, "--state-dir", state, "--partitions", "2")
        assert len(endpoints_of(up.stdout)) == 2
        assert "plan: version 1," in up.stdout and "2 partition(s)" in up.stdout
        saved = json.loads((state / "state.json").read_text())
        assert sorted(saved["partitions"]) == ["0", "1"] and saved["plan"]["version"] == 1
        assert [p["partition"] for p in saved["processes"] if p["role"] == "agent"] == [0, 1]
        for partition, endpoints in saved["partitions"].items():
            assert f"partition {partition}: {endpoints[0]}" in up.stdout
        assert json.loads((state / "plan.json").read_text())["partitions"] == 2

        with RoutedClient.from_local_state(state) as client:
            assert client.check_plan("recs") == []
            np.testing.assert_array_equal(client.lookup("recs", "users", model.users_keys), model.users)
            keys = np.array([0, 299, 17, 17, 300], dtype=np.int64)
            got = client.lookup("recs", "items", keys)
            np.testing.assert_array_equal(got[:4], model.items[[0, 299, 17, 17]])
            np.testing.assert_array_equal(got[4], np.full(4, 0.5, dtype=np.float16))

        report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json").stdout)
        assert report["state"] == "up" and report["plan"]["version"] == 1
        assert sorted((a["partition"], a["describe"]["planVersion"]) for a in report["agents"]) == [(0, 1), (1, 1)]
        text = hps("local", "status", "--state-dir", state).stdout
        assert "plan: version 1" in text and "(partition 1, plan version 1)" in text

        again = hps("local", "up", "-f", model.file, "--state-dir", state, "--partitions", "2")
        assert "already up" in again.stdout and "plan: version 1," in again.stdout

        # a hotter items table changes the balance: the re-plan starts from plan.json and says what moved
        model.file.write_text(model.file.read_text().replace("defaultValue: 0.5}", "defaultValue: 0.5, hotness: 0.9}"))
        replanned = hps("local", "up", "-f", model.file, "--state-dir", state, "--partitions", "2")
        assert "restarted" in replanned.stdout and "plan: version 2," in replanned.stdout
        moved = json.loads((state / "plan.json").read_text())["metrics"]["movedBytes"]
        assert moved > 0 and f"movedBytes {moved}" in replanned.stdout
        assert json.loads((state / "state.json").read_text())["plan"]["movedBytes"] == moved
        with RoutedClient.from_local_state(state) as client:
            assert client.plan.version == 2 and client.check_plan("recs") == []
            np.testing.assert_array_equal(client.lookup("recs", "users", model.users_keys), model.users)
    finally:
        hps("local", "down", "--state-dir", state, check=False)
    assert (state / "plan.json").exists()  # kept for the next up to re-plan from
    hps("local", "down", "--state-dir", state, "--purge")
    assert not state.exists()


def agent_pids(state: Path) -> list[int]:
    return [p["pid"] for p in json.loads((state / "state.json").read_text())["processes"] if p["role"] == "agent"]


def test_up_with_other_partitions_rebalances_the_live_stack_instead_of_restarting(tmp_path: Path) -> None:
    from node_agent.routing import RoutedClient

    model = write_model(tmp_path)
    state = tmp_path / "state"
    try:
        hps("local", "up", "-f", model.file, "--state-dir", state, "--partitions", "2", "--device", "cpu")
        saved = json.loads((state / "state.json").read_text())
        (redis_pid,) = [p["pid"] for p in saved["processes"] if p["role"] == "redis"]
        old_agents = agent_pids(state)

        grown = hps("local", "up", "-f", model.file, "--state-dir", state, "--partitions", "3", "--device", "cpu",
                    "--grace", "0.2")  # fmt: skip
        assert "rebalanced make-before-break from plan version 1 to 2" in grown.stdout
        marker = " rebalance v1 -> v2: "
        phases = [line.split(marker)[1].split(" ")[0] for line in grown.stdout.splitlines() if marker in line]
        assert phases == ["Warming", "Switching", "Draining", "Idle"]
        saved = json.loads((state / "state.json").read_text())
        assert [p["pid"] for p in saved["processes"] if p["role"] == "redis"] == [redis_pid]  # Redis kept running
        assert set(processes_mentioning(state)) - {redis_pid} == set(agent_pids(state))  # the old agents are gone
        assert not set(old_agents) & set(agent_pids(state)) and len(agent_pids(state)) == 3
        assert saved["plan"]["version"] == 2
        assert (saved["rebalance"]["state"], saved["rebalance"]["toVersion"]) == ("Idle", 2)
        assert sorted(json.loads((state / "routing.json").read_text())["endpoints"]) == ["0", "1", "2"]
        assert sorted(p.name for p in state.glob("plan*.json")) == ["plan-v2.json", "plan.json"]

        text = hps("local", "status", "--state-dir", state).stdout
        assert "rebalance: Idle, plan version 2 active" in text and "(partition 2, plan version 2)" in text
        with RoutedClient.from_local_state(state) as client:
            assert client.plan.version == 2 and client.check_plan("recs") == []
            np.testing.assert_array_equal(client.lookup("recs", "users", model.users_keys), model.users)

        again = hps("local", "up", "-f", model.file, "--state-dir", state, "--partitions", "3", "--device", "cpu")
        assert "already up" in again.stdout
        same = hps("local", "rebalance", "--state-dir", state)  # the running plan's numbers: nothing to do
        assert "already balanced (plan version 2)" in same.stdout
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)
    missing = hps("local", "rebalance", "--state-dir", state, check=False)
    assert missing.returncode != 0 and "no running stack" in missing.stderr


def test_a_rebalance_whose_new_agents_do_not_serve_leaves_the_old_ones_serving(tmp_path: Path) -> None:
    from hps_operator.core.planner import plan_placement
    from hps_operator.core.topology import Topology

    from node_agent.errors import UnavailableError
    from node_agent.local.rebalance import rebalance
    from node_agent.local.stack import LocalStack
    from node_agent.routing import RoutedClient
    from node_agent.spec import load_model_file

    model = write_model(tmp_path)
    spec = load_model_file(model.file)
    first = plan_placement(spec, Topology.from_model(spec, partitions=2))
    stack = LocalStack(tmp_path / "state")
    try:
        stack.up(model.file, plan=first, device="cpu", ready_timeout=60)
        old_agents = agent_pids(stack.state_dir)
        routing_before = (stack.state_dir / "routing.json").read_text()
        second = plan_placement(spec, Topology.from_model(spec, partitions=3), first)
        with pytest.raises(UnavailableError, match="did not become SERVING"):
            rebalance(stack, second, ready_timeout=0.01)  # no agent serves within 10 ms

        saved = json.loads((stack.state_dir / "state.json").read_text())
        assert saved["plan"]["version"] == 1 and saved["rebalance"]["failedVersion"] == 2
        assert agent_pids(stack.state_dir) == old_agents
        assert (stack.state_dir / "routing.json").read_text() == routing_before
        assert not (stack.state_dir / "plan-v2.json").exists()
        redis = {p["pid"] for p in saved["processes"] if p["role"] == "redis"}
        assert set(processes_mentioning(stack.state_dir)) - redis == set(old_agents)  # the new ones were stopped
        with RoutedClient.from_local_state(stack.state_dir) as client:
            assert client.plan.version == 1
            np.testing.assert_array_equal(client.lookup("recs", "users", model.users_keys), model.users)
        assert stack.status()["state"] == "up"
    finally:
        stack.down(purge=True)


# -- updates on several agents, and recovering a stack without losing them -------------------------


def redis_of(state: Path) -> redis.Redis:
    saved = json.loads((state / "state.json").read_text())
    host, port = saved["redis"]["addresses"][0].rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), password=(state / "redis.password").read_text().strip())


def pids(state: Path, role: str) -> list[int]:
    return [p["pid"] for p in json.loads((state / "state.json").read_text())["processes"] if p["role"] == role]


def wait_for_row(endpoint: str, key: int, want: np.ndarray, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    with Client(endpoint) as client:
        while not np.array_equal(client.lookup("recs", "users", [key]), want):
            assert time.monotonic() < deadline, f"{endpoint} did not serve the update of {key} within {within_s} s"
            time.sleep(0.02)


def update_rpc(endpoint: str, key: int, value: float, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``hps update`` of one agent, with the token of the stack in ``tmp_path/state`` as a user gives it."""
    vectors = tmp_path / f"v-{key}-{value}.npy"
    np.save(vectors, np.full((1, 8), value, np.float32))
    return hps("update", "--endpoint", endpoint, "--model", "recs", "--table", "users", "--keys", str(key),
               "--vectors-file", vectors, "--state-dir", tmp_path / "state", check=False)  # fmt: skip


def test_two_agents_both_serve_an_update_of_a_row_they_cache_and_the_rpc_says_so(tmp_path: Path) -> None:
    """``--agents 2`` used to open RocksDB read-only for both: every update was written to Redis, then
    rejected at RocksDB, the agents' L1 never refreshed, and the Update RPC answered INVALID_ARGUMENT
    for a write that both agents then served."""
    model = write_model(tmp_path)
    state = tmp_path / "state"
    key = int(model.users_keys[3])
    try:
        endpoints = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state, "--agents", "2").stdout)
        for endpoint in endpoints:  # the row is in both agents' L1
            with Client(endpoint) as client:
                client.lookup("recs", "users", [key])
                client.lookup("recs", "users", [key])
        for i, endpoint in enumerate(endpoints):
            done = update_rpc(endpoint, key, 1.0 + i, tmp_path)
            assert done.returncode == 0, done.stderr
            assert "1 rows of recs/users" in done.stdout
            for other in endpoints:
                wait_for_row(other, key, np.full((1, 8), 1.0 + i, np.float32))
        # a training job publishing to the stream reaches both too, as the producer's Redis user
        np.save(tmp_path / "v.npy", np.full((1, 8), 9.0, np.float32))
        producer = json.loads((state / "redis-users.json").read_text())["producer"]
        published = subprocess.run(
            [sys.executable, "-m", "hps_operator", "update", "--redis", json.loads((state / "state.json").read_text())
             ["redis"]["addresses"][0], "--redis-user", "hps-producer", "--redis-password-env", "PW", "--model",
             "recs", "--table", "users", "--keys", str(key), "--vectors-file", str(tmp_path / "v.npy")],
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env={**os.environ, "PW": producer},
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        for endpoint in endpoints:
            wait_for_row(endpoint, key, np.full((1, 8), 9.0, np.float32))
        report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json").stdout)
        assert report["state"] == "up"
        updates = [a["updates"] for a in report["agents"]]
        assert sum(u["store_writer"] for u in updates) == 1
        assert all(u["rejected_entries"] == 0 and u["applied_entries"] == 3 for u in updates)
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_up_on_a_partly_dead_stack_restarts_only_what_died_and_keeps_the_updates(tmp_path: Path) -> None:
    """``up`` on a stack whose Redis died used to restart everything with Redis empty and the tables
    loaded from their sources again: every online update was lost."""
    model = write_model(tmp_path)
    state = tmp_path / "state"
    key = int(model.users_keys[5])
    try:
        (endpoint,) = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state).stdout)
        assert update_rpc(endpoint, key, 4.0, tmp_path).returncode == 0
        (agent_pid,) = pids(state, "agent")
        (redis_pid,) = pids(state, "redis")
        address = json.loads((state / "state.json").read_text())["redis"]["addresses"][0]
        os.kill(redis_pid, signal.SIGKILL)
        again = hps("local", "up", "-f", model.file, "--state-dir", state)
        assert f"restarted what had stopped (redis {address})" in again.stdout
        assert pids(state, "agent") == [agent_pid] and pids(state, "redis") != [redis_pid]
        assert json.loads((state / "state.json").read_text())["redis"]["addresses"] == [address]
        assert redis_of(state).xlen("hps:{recs}:updates") == 1  # the stream came back from its AOF
        # now the agent dies too: the restarted one serves the update (from Redis and RocksDB)
        os.kill(agent_pid, signal.SIGKILL)
        (endpoint_again,) = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state).stdout)
        assert endpoint_again == endpoint and pids(state, "agent") != [agent_pid]
        wait_for_row(endpoint, key, np.full((1, 8), 4.0, np.float32))
        report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json").stdout)
        assert report["agents"][0]["updates"]["gaps"] == 0
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_down_then_up_keeps_the_tables_and_their_updates(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    state = tmp_path / "state"
    key = int(model.users_keys[7])
    try:
        (endpoint,) = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state).stdout)
        assert update_rpc(endpoint, key, 5.0, tmp_path).returncode == 0
        hps("local", "down", "--state-dir", state)
        up = hps("local", "up", "-f", model.file, "--state-dir", state)
        (endpoint,) = endpoints_of(up.stdout)
        wait_for_row(endpoint, key, np.full((1, 8), 5.0, np.float32))
        assert "keeping tables users, items" in up.stderr  # nothing loaded from the sources
        data = json.loads((state / "data.json").read_text())
        assert set(data["tables"]) == {"users", "items"} and data["loadedAt"]
        assert "the tables and their updates stay" in hps("local", "down", "--state-dir", state).stdout
        up = hps("local", "up", "-f", model.file, "--state-dir", state)
        assert json.loads((state / "data.json").read_text())["loadedAt"] == data["loadedAt"]
        (endpoint,) = endpoints_of(up.stdout)
        with Client(endpoint) as client:  # the rows nobody updated are the sources' still
            np.testing.assert_array_equal(client.lookup("recs", "users", model.users_keys[:3]), model.users[:3])
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_restart_one_agent_or_redis_leaves_the_rest_running(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    state = tmp_path / "state"
    key = int(model.users_keys[9])
    try:
        endpoints = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state, "--agents", "2").stdout)
        before = pids(state, "agent")
        out = hps("local", "restart", "agent", "1", "--state-dir", state).stdout
        assert f"restarted agent {endpoints[1]}" in out
        after = pids(state, "agent")
        assert after[0] == before[0] and after[1] != before[1]
        assert json.loads((state / "state.json").read_text())["endpoints"] == endpoints
        redis_before = pids(state, "redis")
        assert "restarted redis" in hps("local", "restart", "redis", "--state-dir", state).stdout
        assert pids(state, "redis") != redis_before and pids(state, "agent") == after
        assert update_rpc(endpoints[0], key, 6.0, tmp_path).returncode == 0
        for endpoint in endpoints:
            wait_for_row(endpoint, key, np.full((1, 8), 6.0, np.float32))
        wrong = hps("local", "restart", "agent", "5", "--state-dir", state, check=False)
        assert wrong.returncode == 2 and "no agent 5: the stack runs 2 (agent 0 to 1" in wrong.stderr
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def test_a_failed_up_leaves_nothing_that_blocks_the_corrected_retry(tmp_path: Path) -> None:
    """A first ``up`` whose spec did not match the file used to leave the table's shape recorded in
    RocksDB, so the corrected retry failed with "stored with dim=4 ... the model says dim=8"."""
    model = write_model(tmp_path)
    state = tmp_path / "state"
    text = model.file.read_text()
    model.file.write_text(text.replace("rows: 600, dim: 8", "rows: 600, dim: 4"))
    try:
        failed = hps("local", "up", "-f", model.file, "--state-dir", state, check=False)
        assert failed.returncode == 6
        assert "vectors.npy: has dim 8, the spec of 'users' says dim: 4" in failed.stderr
        assert not (state / "rocksdb").exists() and not (state / "data.json").exists()
        model.file.write_text(text)
        (endpoint,) = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state).stdout)
        assert_serves_exactly(endpoint, "recs", model)
        # a table the stores hold keeps its shape: changing it is refused, saying how to start over
        hps("local", "down", "--state-dir", state)
        model.file.write_text(text.replace("rows: 600, dim: 8", "rows: 600, dim: 4"))
        refused = hps("local", "up", "-f", model.file, "--state-dir", state, check=False)
        assert refused.returncode == 2
        assert "table 'users' is stored" in refused.stderr and "hps local down --purge" in refused.stderr
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)


def agent_report(state: Path) -> dict[str, object]:
    report = json.loads(hps("local", "status", "--state-dir", state, "-o", "json", check=False).stdout)
    (agent,) = report["agents"]
    return dict(agent)


def test_an_idle_agent_shows_degraded_and_a_redis_back_without_its_data_is_repaired(tmp_path: Path) -> None:
    """Degraded used to show only once a lookup hit the dead Redis; a Redis that came back empty was
    not noticed at all (consumer groups recreated from 0-0, no log line, never Degraded)."""
    model = write_model(tmp_path)
    state = tmp_path / "state"
    key = int(model.users_keys[11])
    try:
        (endpoint,) = endpoints_of(hps("local", "up", "-f", model.file, "--state-dir", state).stdout)
        assert update_rpc(endpoint, key, 3.0, tmp_path).returncode == 0
        (redis_pid,) = pids(state, "redis")
        os.kill(redis_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0  # no lookup from here on: status asks Describe and Stats only
        while not agent_report(state).get("degraded"):
            assert time.monotonic() < deadline, "the idle agent never reported Degraded"
            time.sleep(0.2)
        assert any("unreachable" in r for r in agent_report(state)["reasons"])  # type: ignore[attr-defined]
        for aof in (state / "redis").rglob("appendonlydir"):
            shutil.rmtree(aof)  # Redis comes back without its data
        hps("local", "restart", "redis", "--state-dir", state)
        deadline = time.monotonic() + 10.0
        while True:
            agent = agent_report(state)
            stats = agent["stats"]
            if not agent["degraded"] and stats["tiers"]["repairs"] >= 1:  # type: ignore[index]
                break
            assert time.monotonic() < deadline, f"not repaired: {agent.get('reasons')}"
            time.sleep(0.2)
        logs = "".join(p.read_text() for p in (state / "logs").glob("agent-*.log"))
        assert "came back without its data" in logs
        wait_for_row(endpoint, key, np.full((1, 8), 3.0, np.float32))  # the update is kept (RocksDB)
        assert update_rpc(endpoint, key, 4.0, tmp_path).returncode == 0
        wait_for_row(endpoint, key, np.full((1, 8), 4.0, np.float32))
    finally:
        hps("local", "down", "--state-dir", state, "--purge", check=False)
