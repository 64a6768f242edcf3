"""Make-before-break rebalancing of a live local stack under load: a two-partition stack (real
redis-server, RocksDB and agent processes started by the real ``hps`` CLI) is rebalanced to three
partitions and then to one with ``hps local rebalance`` while a thread keeps looking up through
``RoutedClient.from_local_state`` and checks every vector against the source arrays. No lookup may
fail, no vector may be wrong, and the old agents must be gone at the end of each rebalance."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node_agent.errors import HpsError
from node_agent.routing import RoutedClient

pytestmark = pytest.mark.slow

MODEL = "shop"
CLI_TIMEOUT_S = 120
#: bounds on the background load, whatever happens to the rebalances
LOAD_LIMIT_S = 90.0
LOAD_LIMIT_BATCHES = 20_000
USERS_ROWS, ITEMS_ROWS = 3000, 1500


def hps(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hps_operator", *map(str, args)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"hps {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Source:
    """The arrays the tables are loaded from: what every answer must equal."""

    file: Path
    users_keys: np.ndarray
    users: np.ndarray
    items: np.ndarray


def write_model(root: Path) -> Source:
    """``users`` (float32, sparse keys, default 0.0) and ``items`` (float16, key = row, default 0.5),
    split by rows over two partitions."""
    rng = np.random.default_rng(23)
    users_keys = rng.choice(10**9, size=USERS_ROWS, replace=False).astype(np.int64)
    users = rng.standard_normal((USERS_ROWS, 16), dtype=np.float32)
    items = rng.standard_normal((ITEMS_ROWS, 8)).astype(np.float16)
    (root / "users").mkdir(parents=True)
    np.save(root / "users" / "vectors.npy", users)
    np.save(root / "users" / "keys.npy", users_keys)
    np.save(root / "items.npy", items)
    file = root / "model.yaml"
    file.write_text(f"""\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {{name: {MODEL}}}
spec:
  tables:
  - {{name: users, rows: {USERS_ROWS}, dim: 16, dtype: float32, source: users}}
  - {{name: items, rows: {ITEMS_ROWS}, dim: 8, dtype: float16, source: items.npy, defaultValue: 0.5}}
  partitions: 2
  cache: {{memoryPerGPU: 1Mi}}
  volatileStore: {{type: redis}}
  persistentStore: {{type: rocksdb}}
  placement: {{strategy: row}}
""")
    return Source(file, users_keys, users, items)


@dataclass
class LookupLoad:
    """Batches of both tables (known and unknown keys, repeats) through a client that follows the
    stack's routing, each answer checked whole against :class:`Source`."""

    state_dir: Path
    source: Source
    lookups: int = 0
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    versions_seen: list[int] = field(default_factory=list)
    routing_stats: dict[str, Any] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = np.random.default_rng(5)
        deadline = time.monotonic() + LOAD_LIMIT_S
        missing_users = np.arange(10**9, 10**9 + 8, dtype=np.int64)  # the sparse keys are all below 10**9
        with RoutedClient.from_local_state(self.state_dir, timeout=5.0) as client:
            self.started.set()
            while not self.stop.is_set() and time.monotonic() < deadline and self.lookups < LOAD_LIMIT_BATCHES:
                rows = rng.integers(0, USERS_ROWS, size=64)
                users_keys = np.concatenate([self.source.users_keys[rows], missing_users[: rng.integers(0, 8)]])
                items_keys = rng.integers(-4, ITEMS_ROWS + 4, size=48)  # a few outside the table
                try:
                    got = client.lookup_many(MODEL, {"users": users_keys, "items": items_keys})
                except HpsError as exc:
                    self.failures.append(f"lookup {self.lookups}: {exc}")
                    continue
                self.check(got, rows, users_keys, items_keys)
                self.lookups += 1
                if not self.versions_seen or self.versions_seen[-1] != client.plan.version:
                    self.versions_seen.append(client.plan.version)
            self.routing_stats = client.routing_stats()

    def check(self, got: dict[str, np.ndarray], rows: np.ndarray, users_keys: np.ndarray,
              items_keys: np.ndarray) -> None:  # fmt: skip
        users = np.zeros((users_keys.size, 16), dtype=np.float32)
        users[: rows.size] = self.source.users[rows]
        known = (items_keys >= 0) & (items_keys < ITEMS_ROWS)
        items = np.full((items_keys.size, 8), 0.5, dtype=np.float16)
        items[known] = self.source.items[items_keys[known]]
        if got["users"].dtype != np.float32 or not np.array_equal(got["users"], users):
            self.wrong.append(f"lookup {self.lookups}: users")
        if got["items"].dtype != np.float16 or not np.array_equal(got["items"], items):
            self.wrong.append(f"lookup {self.lookups}: items")


def alive(pid: int) -> bool:
    """Running and not a zombie (a stopped agent may wait for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def agent_pids(state_dir: Path) -> set[int]:
    processes = json.loads((state_dir / "state.json").read_text())["processes"]
    return {p["pid"] for p in processes if p["role"] == "agent"}


def in_progress(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``rebalance`` sections of the status reports that saw one running."""
    return [r["rebalance"] for r in reports if (r.get("rebalance") or {}).get("state") == "Rebalancing"]


def rebalance_watching_status(state_dir: Path, load: LookupLoad, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """Runs ``hps local rebalance`` and, while it runs, ``hps local status -o json`` until it has
    reported the rebalance in progress; returns the rebalance's stdout and the reports seen."""
    before = load.lookups
    hps_cli = [sys.executable, "-m", "hps_operator", "local"]
    proc = subprocess.Popen([*hps_cli, "rebalance", "--state-dir", str(state_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if not in_progress(reports):
            status = subprocess.run([*hps_cli, "status", "--state-dir", str(state_dir), "-o", "json"],
                                    capture_output=True, text=True, timeout=30)  # fmt: skip
            reports.append(json.loads(status.stdout))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, f"rebalance {args} -> {proc.returncode}\n{out}\n{err}"
    assert load.lookups - before >= 10, "the load must keep running through the whole rebalance"
    return out, reports


def assert_rebalanced(state_dir: Path, out: str, reports: list[dict[str, Any]], *, old_pids: set[int],
                      to_version: int, partitions: int) -> None:  # fmt: skip
    # each phase printed with its time and the versions, in order
    phases = re.findall(rf"^\S+Z rebalance v{to_version - 1} -> v{to_version}: (\w+)", out, flags=re.M)
    assert phases == ["Warming", "Switching", "Draining", "Idle"], out
    moved = int(re.search(r"movedBytes (\d+)", out).group(1))  # type: ignore[union-attr]
    saved = json.loads((state_dir / "state.json").read_text())
    assert moved > 0 and saved["plan"]["movedBytes"] == moved
    assert saved["rebalance"]["state"] == "Idle" and saved["rebalance"]["toVersion"] == to_version
    # status showed the rebalance while it ran
    running = in_progress(reports)
    assert running and (running[0]["fromVersion"], running[0]["toVersion"]) == (to_version - 1, to_version)

    routing = json.loads((state_dir / "routing.json").read_text())
    assert routing["plan"]["version"] == to_version and len(routing["endpoints"]) == partitions
    with RoutedClient.from_local_state(state_dir, follow=False) as client:
        described = client.describe_partitions(MODEL)
    assert {p: (info.partition, info.plan_version) for p, info in described.items()} == {
        p: (p, to_version) for p in range(partitions)
    }
    assert not any(alive(pid) for pid in old_pids), "the old generation's agents must be stopped"
    assert not old_pids & agent_pids(state_dir)
    assert len(agent_pids(state_dir)) == partitions and all(alive(pid) for pid in agent_pids(state_dir))


def test_rebalancing_under_load_loses_no_lookup_and_returns_no_wrong_vector(tmp_path: Path) -> None:
    source = write_model(tmp_path)
    state = tmp_path / "state"
    load = LookupLoad(state, source)
    worker = threading.Thread(target=load.run, name="lookup-load", daemon=True)
    try:
        up = hps("local", "up", "-f", source.file, "--state-dir", state, "--device", "cpu")
        assert "plan: version 1, strategy row, 2 partition(s)" in up.stdout
        worker.start()
        assert load.started.wait(30)

        first_pids = agent_pids(state)
        out, reports = rebalance_watching_status(state, load, "--partitions", "3")
        assert_rebalanced(state, out, reports, old_pids=first_pids, to_version=2, partitions=3)

        second_pids = agent_pids(state)
        out, reports = rebalance_watching_status(state, load, "--partitions", "1")
        assert_rebalanced(state, out, reports, old_pids=second_pids, to_version=3, partitions=1)

        # a few more batches on the final routing, then stop the load
        settled = load.lookups
        deadline = time.monotonic() + 10
        while load.lookups < settled + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        load.stop.set()
        worker.join(timeout=30)
        subprocess.run([sys.executable, "-m", "hps_operator", "local", "down", "--state-dir", str(state), "--purge"],
                       capture_output=True, timeout=CLI_TIMEOUT_S)  # fmt: skip

    assert not worker.is_alive()
    assert load.failures == [], load.failures[:5]
    assert load.wrong == [], load.wrong[:5]
    assert load.lookups >= 50
    # the client followed routing.json through both switches, without being told
    assert load.versions_seen == [1, 2, 3]
    assert load.routing_stats["plan_version"] == 3 and load.routing_stats["reroutes"] == 2
