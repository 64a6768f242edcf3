"""Faults injected into the embedded default under traffic, as a user would meet them: an agent killed
(SIGKILL), Redis killed and restarted, Redis restarted *empty* (its append-only file lost), and
``hps local down`` / ``up``, each on a stack of one agent and of two, with lookups and Update RPCs in
flight the whole time. The real CLI starts and repairs the stack (subprocesses); traffic runs in this
process over loopback gRPC.

Every lookup is checked: a key nobody updates must come back as its source row; an updated key as
its source row or one of the versions written to it, never an older version than one acknowledged
more than ``LAG_BOUND_S`` before the lookup was sent, and never a version whose Update RPC answered
that it was applied nowhere. After each scenario, with traffic stopped, every agent must serve the
newest acknowledged version of every updated key: an update acknowledged and not served is lost.

Wrong vectors and lost updates must be 0. The table (lookups, failed, wrong, updates acknowledged,
visible, lost, how long recovery took, how many lookups failed meanwhile, how long updates could not
be applied) is printed at the end of the run and written to ``fault-table.txt`` in the run's
temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e2e.conftest import format_table
from node_agent.client import Client
from node_agent.errors import HpsError
from node_agent.local.redis_servers import free_port

pytestmark = pytest.mark.slow

MODEL = "faults"
ROWS, DIM = 2000, 16
#: keys the update traffic writes; a version v of key k is the row full(k * 1000 + v), exact in float32
UPDATED = np.arange(0, ROWS, 41, dtype=np.int64)
#: an acknowledged update is served everywhere within milliseconds (docs/updates.md); a lookup may
#: still see the version before it for this long after the acknowledgement (a writer taking over, a
#: Redis being repaired) without counting as wrong
LAG_BOUND_S = 2.0
CLI_TIMEOUT_S = 120
TITLE = "fault scenarios (hps local, traffic during each fault)"


def hps(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hps_operator", *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"hps {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def two_free_ports() -> int:
    for _ in range(50):
        port = free_port(max_port=60000)
        if free_port_is(port + 1):
            return port
    raise AssertionError("no two consecutive free ports")


def free_port_is(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Stack:
    """A running ``hps local`` stack on fixed ports (its endpoints survive down/up)."""

    root: Path
    agents: int
    port: int
    base: np.ndarray = field(repr=False)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def model_file(self) -> Path:
        return self.root / "model.yaml"

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.port + i}" for i in range(self.agents)]

    @property
    def token_file(self) -> Path:
        """The token ``hps local up`` made: a client sends it with every Update RPC."""
        return self.state / "auth.token"

    def up(self) -> None:
        hps("local", "up", "-f", self.model_file, "--state-dir", self.state, "--agents", str(self.agents),
            "--port", str(self.port), "--device", "cpu")  # fmt: skip

    def processes(self, role: str) -> list[dict[str, Any]]:
        return [p for p in json.loads((self.state / "state.json").read_text())["processes"] if p["role"] == role]

    def healthy(self) -> bool:
        """Every agent answers and none reports Degraded (what ``hps local status`` calls up)."""
        for endpoint in self.endpoints:
            try:
                with Client(endpoint, timeout=0.5, retries=0) as client:
                    if client.describe(MODEL).degraded:
                        return False
            except HpsError:
                return False
        return True

    def writer(self) -> int:
        for i, endpoint in enumerate(self.endpoints):
            with Client(endpoint, timeout=2, retries=0) as client:
                if client.stats(MODEL)["updates"]["store_writer"]:
                    return i
        raise AssertionError("no agent writes the shared stores")


def make_stack(root: Path, agents: int) -> Stack:
    rng = np.random.default_rng(21)
    base = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    np.save(root / "users.npy", base)
    (root / "model.yaml").write_text(f"""\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {{name: {MODEL}}}
spec:
  tables:
  - {{name: users, rows: {ROWS}, dim: {DIM}, source: users.npy}}
  cache: {{memoryPerGPU: 64Ki}}
""")  # L1 holds about half the rows: lookups read Redis and RocksDB too
    stack = Stack(root, agents, two_free_ports(), base)
    stack.up()
    return stack


class Traffic:
    """Lookups and Update RPCs from two threads until :meth:`stop`; every answer is checked (see the
    module doc). Versions written per key keep counting across scenarios of one stack."""

    def __init__(self, stack: Stack, seed: int) -> None:
        self.stack = stack
        self.rng = np.random.default_rng(seed)
        self.updated = set(UPDATED.tolist())
        self.version: dict[int, int] = defaultdict(int)
        self.acked: dict[int, list[tuple[float, int]]] = defaultdict(list)  # key -> (ack time, version)
        self.not_applied: dict[int, set[int]] = defaultdict(set)
        self.unknown: dict[int, set[int]] = defaultdict(set)
        self.lock = threading.Lock()
        self.counts: dict[str, int] = defaultdict(int)
        self.failed_at: list[float] = []
        self.acked_at: list[tuple[float, float]] = []  # (sent, acknowledged)
        self.update_failed_at: list[float] = []
        self.examples: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._lookups, daemon=True),
                         threading.Thread(target=self._updates, daemon=True)]  # fmt: skip
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    # -- the two loops -------------------------------------------------------------------------

    def _lookups(self) -> None:
        with Client(self.stack.endpoints, timeout=1.0, retries=len(self.stack.endpoints)) as client:
            while not self._stop.is_set():
                keys = np.concatenate([self.rng.integers(0, ROWS, 24), self.rng.choice(UPDATED, 8)])
                sent = time.monotonic()
                try:
                    rows = client.lookup(MODEL, "users", keys)
                except HpsError:
                    with self.lock:
                        self.counts["failed"] += 1
                        self.failed_at.append(sent)
                    self._stop.wait(0.02)
                    continue
                wrong = self._check(keys, rows, sent)
                with self.lock:
                    self.counts["lookups"] += 1
                    self.counts["wrong"] += wrong
                self._stop.wait(0.003)

    def _updates(self) -> None:
        clients = [Client(e, timeout=3.0, retries=0, token_file=self.stack.token_file) for e in self.stack.endpoints]
        turn = 0
        try:
            while not self._stop.is_set():
                key = int(UPDATED[turn % len(UPDATED)])
                client = clients[turn % len(clients)]
                turn += 1
                with self.lock:
                    self.version[key] += 1
                    version = self.version[key]
                sent = time.monotonic()
                try:
                    client.update(MODEL, "users", [key], np.full((1, DIM), key * 1000 + version, np.float32))
                except HpsError as exc:
                    text = str(exc)
                    # the Update RPC's answers (docs/updates.md): "not applied" is final, "outcome unknown"
                    # may still be applied; a connection never made never reached an agent
                    definite = "outcome unknown" not in text and (
                        "update not applied" in text or "failed to connect" in text)
                    with self.lock:
                        (self.not_applied if definite else self.unknown)[key].add(version)
                        self.counts["update errors"] += 1
                        self.update_failed_at.append(sent)
                    self._stop.wait(0.05)
                    continue
                now = time.monotonic()
                with self.lock:
                    self.acked[key].append((now, version))
                    self.acked_at.append((sent, now))
                    self.counts["acked"] += 1
                self._stop.wait(0.015)
        finally:
            for c in clients:
                c.close()

    # -- checking ------------------------------------------------------------------------------

    def _version_of(self, key: int, row: np.ndarray) -> int | None:
        """0 for the source row, v for an update's row, None for anything else (a wrong vector)."""
        if np.array_equal(row, self.stack.base[key]):
            return 0
        value = float(row[0])
        if (row == row[0]).all() and value.is_integer() and int(value) // 1000 == key:
            return int(value) % 1000
        return None

    def _check(self, keys: np.ndarray, rows: np.ndarray, sent: float) -> int:
        wrong = 0
        for key, row in zip(keys.tolist(), rows, strict=True):
            version = self._version_of(key, row)
            if key not in self.updated:
                bad = version != 0
            else:
                with self.lock:
                    settled = max((v for t, v in self.acked[key] if t <= sent - LAG_BOUND_S), default=0)
                    never = version in self.not_applied[key]
                bad = version is None or never or version < settled
            if bad:
                wrong += 1
                if len(self.examples) < 5:
                    self.examples.append(f"key {key}: got version {version} at {sent:.3f}")
        return wrong

    def final_check(self, within_s: float = 8.0) -> tuple[int, int]:
        """Once traffic stopped: (acknowledged updates, of which not served by every agent). An agent
        serves a key's newest acknowledged version, or a newer one whose outcome the RPC could not
        tell; waits up to ``within_s`` for the agents to agree."""
        deadline = time.monotonic() + within_s
        while True:
            lost = 0
            with self.lock:
                newest = {k: max((v for _, v in self.acked[k]), default=0) for k in self.updated}
                maybe = {k: set(self.unknown[k]) for k in self.updated}
                acked = {k: [v for _, v in self.acked[k]] for k in self.updated}
            served: list[dict[int, int | None]] = []
            for endpoint in self.stack.endpoints:
                with Client(endpoint, timeout=2, retries=0) as client:
                    rows = client.lookup(MODEL, "users", UPDATED)
                served.append({int(k): self._version_of(int(k), r) for k, r in zip(UPDATED, rows, strict=True)})
            for key in self.updated:
                for view in served:
                    got = view[key]
                    ok = got == newest[key] or (got is not None and got > newest[key] and got in maybe[key])
                    if not ok:
                        lost += sum(1 for v in acked[key] if got is None or v > got)
            if lost == 0 or time.monotonic() > deadline:
                return sum(len(v) for v in acked.values()), lost
            time.sleep(0.1)


def run_scenario(stack: Stack, traffic: Traffic, name: str, fault: Callable[[], None],
                 recover: Callable[[], None], report: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Traffic before the fault, the fault, the recovery, traffic after it; one row of the table."""
    before = dict(traffic.counts)
    acked_before = sum(len(v) for v in traffic.acked.values())
    traffic.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    fault()
    recover()
    deadline = time.monotonic() + 30
    while not stack.healthy():
        if time.monotonic() > deadline:
            traffic.stop()
            status = subprocess.run([sys.executable, "-m", "hps_operator", "local", "status", "--state-dir",
                                     str(stack.state)], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
            raise AssertionError(f"{name}: the stack did not recover within 30 s:\n{status.stdout}")
        time.sleep(0.05)
    recovered = time.monotonic() - t0
    time.sleep(1.0)
    traffic.stop()
    acked_total, lost = traffic.final_check()
    counts = {k: traffic.counts.get(k, 0) - before.get(k, 0) for k in ("lookups", "failed", "wrong", "update errors")}
    acked = acked_total - acked_before
    # how long updates could not be applied: from the first update that failed after the fault to the
    # first one sent after that which was acknowledged
    first_failure = min((t for t in traffic.update_failed_at if t >= t0), default=None)
    resumed = None if first_failure is None else min(
        (done for sent, done in traffic.acked_at if sent > first_failure), default=None)
    row = {
        "scenario": name,
        "agents": stack.agents,
        "lookups": counts["lookups"],
        "failed": counts["failed"],
        "wrong": counts["wrong"],
        "updates acked": acked,
        "visible": acked - lost,
        "lost": lost,
        "update errors": counts["update errors"],
        "recovered in s": f"{recovered:.2f}",
        "failed during recovery": sum(1 for t in traffic.failed_at if t0 <= t <= t0 + recovered),
        "update outage s": f"{resumed - first_failure:.2f}" if resumed is not None and first_failure is not None
                            else ("0" if first_failure is None else "-"),
    }
    report.append(row)
    return row


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def scenarios(stack: Stack) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(name, fault, recovery) in the order they run on one stack."""

    def kill_agent() -> None:
        victim = stack.writer() if stack.agents > 1 else 0
        kill(stack.processes("agent")[victim]["pid"])
        time.sleep(0.5)  # traffic meets the dead agent before anything restarts it

    def kill_redis() -> None:
        for p in stack.processes("redis"):
            kill(p["pid"])
        time.sleep(0.5)

    def empty_redis() -> None:
        kill_redis()
        for aof in (stack.state / "redis").rglob("appendonlydir"):
            shutil.rmtree(aof)  # its files are lost: it comes back with nothing

    def restart_redis() -> None:
        hps("local", "restart", "redis", "--state-dir", stack.state)

    def down() -> None:
        hps("local", "down", "--state-dir", stack.state)

    what = "the writer agent" if stack.agents > 1 else "the agent"
    return [
        (f"{what} SIGKILL, hps local up", kill_agent, stack.up),
        ("redis SIGKILL, restart redis", kill_redis, restart_redis),
        ("redis restarted empty", empty_redis, restart_redis),
        ("hps local down, up", down, stack.up),
    ]


@pytest.fixture(scope="module")
def fault_rows(scenario_report: dict[str, list[dict[str, Any]]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
    rows = scenario_report.setdefault(TITLE, [])
    yield rows
    if rows:
        out = tmp_path_factory.getbasetemp() / "fault-table.txt"
        out.write_text("\n".join(format_table(rows)) + "\n")
        (out.with_suffix(".json")).write_text(json.dumps(rows, indent=2) + "\n")


@pytest.mark.parametrize("agents", [1, 2])
def test_no_wrong_vector_and_no_lost_update_through_each_fault(
    tmp_path: Path, fault_rows: list[dict[str, Any]], agents: int
) -> None:
    stack = make_stack(tmp_path, agents)
    traffic = Traffic(stack, seed=agents)
    try:
        for name, fault, recover in scenarios(stack):
            row = run_scenario(stack, traffic, name, fault, recover, fault_rows)
            assert row["wrong"] == 0, f"{name}: {row} {traffic.examples}"
            assert row["lost"] == 0, f"{name}: {row}"
            assert row["lookups"] > 0 and row["updates acked"] > 0, row
            if agents > 1 and "agent" in name:
                assert row["failed"] == 0, f"{name}: the other agent serves every lookup: {row}"
    finally:
        traffic.stop()
        subprocess.run([sys.executable, "-m", "hps_operator", "local", "down", "--state-dir", str(stack.state),
                        "--purge"], capture_output=True, timeout=CLI_TIMEOUT_S)  # fmt: skip
