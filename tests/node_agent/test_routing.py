"""Plan-aware routing against a real two-partition local stack: real redis-server, real RocksDB, two
real agent processes started with ``--plan`` and ``--partition``, real gRPC on loopback. The plan
comes from the real planner; only the version-mismatch and dead-partition cases hand the client a
plan or an endpoint map that differs from what the agents run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hps_operator.core.planner import plan_placement
from hps_operator.core.topology import Topology

from node_agent.client import Client
from node_agent.errors import InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.local.stack import LocalStack
from node_agent.plan import Assignment, Plan, PlanMetrics
from node_agent.routing import RoutedClient, owner_partitions, routing_document
from node_agent.spec import load_model_file

MODEL = "shop"


@dataclass
class Stack:
    state_dir: Path
    plan: Plan
    #: partition → its agent's endpoint
    endpoints: dict[int, str]
    users_keys: np.ndarray
    users: np.ndarray
    items: np.ndarray


def write_model(root: Path) -> Path:
    """``users`` (float32, sparse keys) and ``items`` (float16, key = row, default 0.5), split by rows
    over two partitions."""
    rng = np.random.default_rng(7)
    users_keys = rng.choice(10**9, size=800, replace=False).astype(np.int64)
    (root / "users").mkdir(parents=True)
    np.save(root / "users" / "vectors.npy", rng.standard_normal((800, 8), dtype=np.float32))
    np.save(root / "users" / "keys.npy", users_keys)
    np.save(root / "items.npy", rng.standard_normal((400, 4)).astype(np.float16))
    file = root / "model.yaml"
    file.write_text(f"""\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {{name: {MODEL}}}
spec:
  tables:
  - {{name: users, rows: 800, dim: 8, dtype: float32, source: users}}
  - {{name: items, rows: 400, dim: 4, dtype: float16, source: items.npy, defaultValue: 0.5}}
  partitions: 2
  cache: {{memoryPerGPU: 1Mi}}
  volatileStore: {{type: redis}}
  persistentStore: {{type: rocksdb}}
  placement: {{strategy: row}}
""")
    return file


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One two-partition stack for the module; the last test kills partition 1's agent."""
    root = tmp_path_factory.mktemp("routed")
    model_file = write_model(root)
    model = load_model_file(model_file)
    plan = plan_placement(model, Topology.from_model(model))
    assert plan.partitions == 2
    local = LocalStack(root / "state")
    result = local.up(model_file, plan=plan, device="cpu", ready_timeout=60)
    try:
        endpoints = {p: eps[0] for p, eps in result.state.partitions.items()}
        yield Stack(
            local.state_dir, plan, endpoints,
            np.load(root / "users" / "keys.npy"), np.load(root / "users" / "vectors.npy"), np.load(root / "items.npy"),
        )  # fmt: skip
    finally:
        local.down(purge=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mixed_items_keys() -> np.ndarray:
    """Keys of both partitions, repeats, and keys the table does not have (400, 10**12, -3)."""
    return np.array([0, 399, 17, 17, 5, 400, 10**12, 250, 0, -3, 123, 17], dtype=np.int64)


def assert_exact(client: RoutedClient, s: Stack) -> None:
    got = client.lookup(MODEL, "users", s.users_keys[::-1])
    np.testing.assert_array_equal(got, s.users[::-1])
    keys = mixed_items_keys()
    items = client.lookup(MODEL, "items", keys)
    assert items.dtype == np.float16 and items.shape == (keys.size, 4)
    known = (keys >= 0) & (keys < 400)
    np.testing.assert_array_equal(items[known], s.items[keys[known]])
    np.testing.assert_array_equal(items[~known], np.full((int((~known).sum()), 4), 0.5, dtype=np.float16))


def keys_requested(endpoint: str, table: str) -> int:
    with Client(endpoint, retries=0) as client:
        return int(client.stats(MODEL)["lookup"]["tables"][table]["keys_requested"])


# -- owner arrays (pure) --------------------------------------------------------------------------


def test_owner_partitions_agree_with_the_plan_and_spread_replicated_buckets() -> None:
    row = Plan(1, 64, 2, 2, "row", (
        Assignment("t", 0, 0, (0, 16), 1), Assignment("t", 0, 1, (16, 32), 1),
        Assignment("t", 1, 0, (32, 48), 1), Assignment("t", 1, 1, (48, 64), 1),
    ), PlanMetrics(), "m")  # fmt: skip
    keys = np.arange(-500, 500, dtype=np.int64)
    owners = owner_partitions(row, "t")
    assert owners is not None
    np.testing.assert_array_equal(owners[np.arange(64)], [0] * 32 + [1] * 32)
    assert owner_partitions(row, "absent") is None

    # replicate: every GPU of both partitions holds every bucket; each bucket goes to one partition
    replicate = Plan(1, 64, 2, 2, "replicate", tuple(
        Assignment("t", p, g, (0, 64), 1) for p in range(2) for g in range(2)
    ), PlanMetrics(), "m")  # fmt: skip
    spread = owner_partitions(replicate, "t")
    assert spread is not None and set(spread.tolist()) == {0, 1}
    assert int((spread == 0).sum()) == 32
    assert set(row.partitions_of("t", keys).tolist()) == {0, 1}


# -- lookups through the running stack ------------------------------------------------------------


def test_routed_lookups_are_exact_for_every_key(stack: Stack) -> None:
    with RoutedClient.from_local_state(stack.state_dir) as client:
        assert client.plan.version == stack.plan.version
        assert_exact(client, stack)
        both = client.lookup_many(MODEL, {"items": mixed_items_keys(), "users": stack.users_keys[:50]})
        assert list(both) == ["items", "users"]
        np.testing.assert_array_equal(both["users"], stack.users[:50])
        empty = client.lookup(MODEL, "users", np.array([], dtype=np.int64))
        assert empty.shape == (0, 8) and empty.dtype == np.float32
        assert client.lookup_many(MODEL, {}) == {}  # as Client and SameNodeClient answer
        with pytest.raises(NotFoundError):
            client.lookup(MODEL, "nope", [1, 2])
        with pytest.raises(InvalidArgumentError):
            client.lookup(MODEL, "users", [1.5, 2.0])
        stats = client.routing_stats()
        assert stats["fallbacks"] == 0 and stats["plan_mismatches"] == []
        assert all(p["keys"] > 0 for p in stats["partitions"].values())


def test_each_agent_is_asked_only_for_the_keys_its_partition_owns(stack: Stack) -> None:
    keys = np.concatenate([stack.users_keys, stack.users_keys[:100]])
    owners = stack.plan.partitions_of("users", keys)
    before = {p: keys_requested(e, "users") for p, e in stack.endpoints.items()}
    with RoutedClient(stack.plan, {p: [e] for p, e in stack.endpoints.items()}) as client:
        np.testing.assert_array_equal(client.lookup(MODEL, "users", keys), stack.users[np.r_[0:800, 0:100]])
    for partition, endpoint in stack.endpoints.items():
        asked = keys_requested(endpoint, "users") - before[partition]
        # the client sends each distinct key once
        assert asked == np.unique(keys[owners == partition]).size > 0, f"partition {partition}"


def test_a_partition_with_no_live_agent_is_served_by_another(stack: Stack) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with RoutedClient(stack.plan, {0: [stack.endpoints[0]], 1: [dead]}, timeout=2.0, retries=0) as client:
        assert_exact(client, stack)
        stats = client.routing_stats()
        owned_by_1 = int((stack.plan.partitions_of("users", stack.users_keys) == 1).sum())
        assert stats["fallbacks"] >= 1 and stats["fallback_keys"] >= owned_by_1
        assert stats["partitions"][1]["keys"] == 0
    # a partition missing from the endpoint map altogether is served the same way
    with RoutedClient(stack.plan, {1: [stack.endpoints[1]]}) as client:
        assert_exact(client, stack)
        assert client.routing_stats()["fallbacks"] >= 1


def test_agents_on_another_plan_version_are_warned_about_and_still_answer(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    endpoints = {p: [e] for p, e in stack.endpoints.items()}
    with RoutedClient(stack.plan, endpoints) as same:
        assert same.check_plan(MODEL) == []
    newer = dataclasses.replace(stack.plan, version=stack.plan.version + 1)
    with (
        caplog.at_level(logging.WARNING, logger="node_agent.routing"),
        RoutedClient(newer, endpoints) as client,
    ):
        assert_exact(client, stack)
        warned = [r.getMessage() for r in caplog.records if r.name == "node_agent.routing"]
        assert len(warned) == 2
        assert all(
            f"plan version {newer.version}" in m and f"plan version {stack.plan.version}" in m for m in warned
        )
        assert len(client.routing_stats()["plan_mismatches"]) == 2
    # endpoints listed under the wrong partitions are reported too, and answers stay exact
    swapped = {0: [stack.endpoints[1]], 1: [stack.endpoints[0]]}
    with RoutedClient(stack.plan, swapped) as client:
        assert {(m.partition, m.reported_partition) for m in client.check_plan(MODEL)} == {(0, 1), (1, 0)}
        assert_exact(client, stack)


def test_a_routing_file_builds_the_same_client(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(routing_document(stack.plan, {p: [e] for p, e in stack.endpoints.items()})))
    with RoutedClient.from_routing_file(path) as client:
        assert client.endpoints == {p: [e] for p, e in stack.endpoints.items()}
        assert_exact(client, stack)
    (tmp_path / "bad.json").write_text('{"endpoints": {}}')
    with pytest.raises(InvalidArgumentError):
        RoutedClient.from_routing_file(tmp_path / "bad.json")
    with pytest.raises(InvalidArgumentError):
        RoutedClient(stack.plan, {0: []})


def write_routing(path: Path, plan: Plan, endpoints: dict[int, list[str]]) -> None:
    """As a rebalance does: a new file renamed over the old one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(routing_document(plan, endpoints)))
    partial.replace(path)


def test_reroute_swaps_plan_and_endpoints_while_lookups_run(stack: Stack) -> None:
    right = {p: [e] for p, e in stack.endpoints.items()}
    swapped = {0: [stack.endpoints[1]], 1: [stack.endpoints[0]]}
    newer = dataclasses.replace(stack.plan, version=stack.plan.version + 1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def look(client: RoutedClient) -> None:
        for _ in range(200):  # bounded: the rerouting below ends well before
            if stop.is_set():
                return
            try:
                assert_exact(client, stack)
            except BaseException as exc:  # an assertion too: reported by the main thread
                errors.append(exc)
                return

    with RoutedClient(stack.plan, right) as client:
        workers = [threading.Thread(target=look, args=(client,)) for _ in range(3)]
        for w in workers:
            w.start()
        for i in range(1, 22):  # odd: the newer plan on swapped endpoints; even: as started
            assert client.reroute(newer if i % 2 else stack.plan, swapped if i % 2 else right)
            time.sleep(0.01)
        stop.set()
        for w in workers:
            w.join(timeout=30)
        assert errors == []
        assert client.plan == newer and client.endpoints == swapped
        assert client.reroute(newer, swapped) is False  # nothing changed: nothing rebuilt
        assert client.routing_stats()["reroutes"] == 21
        assert client.check_plan(MODEL) and client.routing_stats()["plan_version"] == newer.version
        assert_exact(client, stack)


def test_a_followed_routing_file_is_reread_when_replaced(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    right = {p: [e] for p, e in stack.endpoints.items()}
    write_routing(path, stack.plan, {0: [stack.endpoints[1]], 1: [stack.endpoints[0]]})
    with (
        RoutedClient.from_routing_file(path, poll_s=0.05) as following,
        RoutedClient.from_routing_file(path, follow=False) as fixed,
    ):
        assert following.endpoints[0] == [stack.endpoints[1]]
        write_routing(path, stack.plan, right)
        time.sleep(0.1)
        assert_exact(following, stack)
        assert_exact(fixed, stack)
        assert following.endpoints == right and following.routing_stats()["reroutes"] == 1
        assert fixed.endpoints != right and fixed.routing_stats()["reroutes"] == 0
        path.unlink()  # a stack going down: the client keeps routing as it did
        time.sleep(0.1)
        assert_exact(following, stack)
        assert following.endpoints == right


def test_a_refused_call_rereads_the_routing_file_at_once(stack: Stack, tmp_path: Path) -> None:
    """Every agent the client routes to is gone (drained) and the poll interval is far away: the
    refusal itself makes it re-read the file, and the call succeeds on the new agents."""
    path = tmp_path / "routing.json"
    write_routing(path, stack.plan, {0: [f"127.0.0.1:{free_port()}"], 1: [f"127.0.0.1:{free_port()}"]})
    with RoutedClient.from_routing_file(path, poll_s=3600, timeout=2.0, retries=0) as client:
        with pytest.raises(UnavailableError):
            client.lookup(MODEL, "users", stack.users_keys[:10])  # the file did not change: nothing to retry
        write_routing(path, stack.plan, {p: [e] for p, e in stack.endpoints.items()})
        assert_exact(client, stack)
        assert client.routing_stats()["reroutes"] == 1


def test_killing_a_partitions_agent_keeps_routed_lookups_exact(stack: Stack) -> None:
    """Runs last in the module: it kills partition 1's only agent."""
    state = json.loads((stack.state_dir / "state.json").read_text())
    (victim,) = [p["pid"] for p in state["processes"] if p["role"] == "agent" and p["partition"] == 1]
    os.kill(victim, signal.SIGKILL)
    with RoutedClient.from_local_state(stack.state_dir, timeout=2.0, retries=0) as client:
        assert_exact(client, stack)
        assert_exact(client, stack)
        stats = client.routing_stats()
        assert stats["fallbacks"] >= 2 and stats["partitions"][1]["requests"] == 0
    report = LocalStack(stack.state_dir).status(timeout=1.0)
    assert report["state"] == "degraded"
    assert [a["answering"] for a in sorted(report["agents"], key=lambda a: a["partition"])] == [True, False]
