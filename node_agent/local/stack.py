"""Runs the whole HPS stack on one machine (``hps local up/rebalance/status/down``): real
``redis-server`` processes, the tables loaded into Redis and RocksDB under a state directory, and agent
processes serving gRPC, all detached so they outlive the command that started them.

The state directory holds everything the stack owns::

    state.json        pids (with their start times), ports, endpoints per partition, model, Redis
                      addresses, the plan's summary, the options agents are started with, and where
                      a rebalance stands
    routing.json      what clients route by: the active plan and each partition's endpoints, in one
                      file replaced atomically (:meth:`RoutedClient.from_local_state` follows it)
    plan.json         the active placement plan, when the stack has one; kept by ``down`` so the next
                      ``up`` re-plans from it, moving little
    plan-v<N>.json    the plan version N the agents of that generation were started with
    redis.password    the generated Redis AUTH password (mode 0600)
    redis/            redis-server working directories and logs
    rocksdb/          the persistent tier
    logs/             agent-<i>.log and agent-<i>.ready (i counts every agent the stack started)

``up`` on a stack that is already up with the same model file (same bytes) and the same options
leaves it running and reports it. When only the plan or the agents per partition changed, it
rebalances the live stack make-before-break (:mod:`node_agent.local.rebalance`); with a changed model
or other options it stops the old stack (keeping the data) and starts a new one. A stack that is
partly dead is restarted the same way.

With a plan, ``up`` starts ``agents`` agents for each of the plan's partitions, each caching only the
buckets its partition owns; :class:`node_agent.routing.RoutedClient` routes lookups by the same plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_agent.errors import HpsError, InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.plan import Plan, whole_table_plan
from node_agent.spec import ModelSpec, load_model_file

if TYPE_CHECKING:
    from node_agent.local.rebalance import PhaseChange, RebalanceResult

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
PLAN_FILE = "plan.json"
ROUTING_FILE = "routing.json"
PASSWORD_FILE = "redis.password"
#: environment variable the agents read the Redis password from (never on a command line)
PASSWORD_ENV = "HPS_REDIS_PASSWORD"
STATE_FORMAT = "hps.dev/local-stack/v1"

_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 30


def plan_file_name(version: int) -> str:
    """The file the agents of plan ``version`` are started with (``plan.json`` is rewritten by a
    rebalance while the previous generation still runs; their own file stays put)."""
    return f"plan-v{version}.json"


def default_state_dir() -> Path:
    """``$HPS_STATE_DIR`` when set, else ``./.hps-local``."""
    return Path(os.environ.get("HPS_STATE_DIR") or ".hps-local")


# ---------------------------------------------------------------------------------------------
# processes we started, recognised again later by pid *and* start time (pids are reused)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or
    ``None`` where ``/proc`` cannot tell (process gone, or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing paren
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


@dataclass
class ProcessRecord:
    """One process of the stack: what it is, its pid, and its start time to tell it from a later
    process that happens to reuse the pid."""

    role: str  # "redis" or "agent"
    pid: int
    started: int | None
    address: str = ""
    log: str = ""
    #: the plan partition an agent serves (``None`` for Redis)
    partition: int | None = None
    #: the plan version an agent was started with (0: no plan; ``None`` for Redis)
    plan_version: int | None = None
    #: an agent that opened RocksDB read-write (RocksDB admits one writer at a time)
    writer: bool = False

    @classmethod
    def of(cls, role: str, pid: int, *, address: str = "", log: str = "", partition: int | None = None,
           plan_version: int | None = None, writer: bool = False) -> ProcessRecord:  # fmt: skip
        return cls(role, pid, _start_ticks(pid), address, log, partition, plan_version, writer)

    def alive(self) -> bool:
        """Running and still the process we started (a zombie is dead; it is reaped if ours)."""
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # someone else's process reusing the pid
        if _is_zombie(self.pid):
            return False
        ticks = _start_ticks(self.pid)
        return self.started is None or ticks is None or ticks == self.started

    def stop(self, *, timeout: float = _STOP_TIMEOUT_S) -> bool:
        """SIGTERM, a bounded wait, then SIGKILL. Returns whether it was running."""
        if not self.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            log.warning("%s pid %d ignored SIGTERM for %.0f s; killing it", self.role, self.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5.0
            while self.alive() and time.monotonic() < kill_deadline:
                time.sleep(0.02)
        return True


@dataclass
class StackState:
    """What ``state.json`` holds: enough for ``status`` and ``down`` from another process."""

    model: str
    model_file: str
    fingerprint: str
    endpoints: list[str]
    redis_addresses: list[str]
    redis_cluster: bool
    processes: list[ProcessRecord] = field(default_factory=list)
    phase: str = "starting"  # "starting" while up is running, then "up"
    #: partition → its agents' endpoints (one partition, 0, when the stack runs no plan)
    partitions: dict[int, list[str]] = field(default_factory=dict)
    #: the plan's summary (version, strategy, partitions, GPUs, metrics), ``None`` without a plan
    plan: dict[str, Any] | None = None
    #: what agents are started with, so a rebalance starts the next generation the same way:
    #: ``agents`` (per partition), ``port``, ``device``, ``useRedis``, ``redisCluster``, ``useRocksdb``
    options: dict[str, Any] = field(default_factory=dict)
    #: fingerprint of what a rebalance cannot change (model file bytes, Redis, port, device)
    base_fingerprint: str = ""
    #: where a rebalance stands (``state``, ``phase``, ``fromVersion``, ``toVersion``, ``since``,
    #: ``movedBytes``), as the operator's ``status.rebalance``; ``None`` before the first one
    rebalance: dict[str, Any] | None = None
    #: agents started over the stack's life: names each new agent's log and ready file uniquely
    agents_launched: int = 0

    def agents(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "agent"]

    def redis(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "redis"]

    def plan_version(self) -> int:
        """The version of the plan clients route by (0: no plan, every table whole everywhere)."""
        return int(self.plan["version"]) if self.plan else 0

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        return {
            "format": STATE_FORMAT,
            "model": raw["model"],
            "modelFile": raw["model_file"],
            "fingerprint": raw["fingerprint"],
            "baseFingerprint": raw["base_fingerprint"],
            "phase": raw["phase"],
            "endpoints": raw["endpoints"],
            "partitions": {str(p): eps for p, eps in sorted(self.partitions.items())},
            "plan": raw["plan"],
            "options": raw["options"],
            "rebalance": raw["rebalance"],
            "agentsLaunched": raw["agents_launched"],
            "redis": {"addresses": raw["redis_addresses"], "cluster": raw["redis_cluster"],
                      "passwordFile": PASSWORD_FILE if raw["redis_addresses"] else None},
            "processes": raw["processes"],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StackState:
        redis = raw.get("redis") or {}
        return cls(
            model=str(raw["model"]),
            model_file=str(raw["modelFile"]),
            fingerprint=str(raw["fingerprint"]),
            endpoints=[str(e) for e in raw.get("endpoints", [])],
            redis_addresses=[str(a) for a in redis.get("addresses", [])],
            redis_cluster=bool(redis.get("cluster", False)),
            processes=[ProcessRecord(**p) for p in raw.get("processes", [])],
            phase=str(raw.get("phase", "up")),
            partitions={int(p): [str(e) for e in eps] for p, eps in (raw.get("partitions") or {}).items()},
            plan=raw.get("plan"),
            options=dict(raw.get("options") or {}),
            base_fingerprint=str(raw.get("baseFingerprint") or ""),
            rebalance=raw.get("rebalance"),
            agents_launched=int(raw.get("agentsLaunched") or 0),
        )


@dataclass(frozen=True)
class UpResult:
    state: StackState
    #: ``True`` when the stack was already up with this model and nothing was started
    already_up: bool
    #: ``True`` when a running stack was stopped first (changed model or options, or partly dead)
    restarted: bool
    #: the plan the agents run (``None``: one partition, every table whole on each agent)
    plan: Plan | None = None
    #: set when a live stack was rebalanced make-before-break instead of restarted
    rebalance: RebalanceResult | None = None


# ---------------------------------------------------------------------------------------------


class LocalStack:
    """The stack whose state lives in ``state_dir``; ``up``, ``status`` and ``down`` may each run in a
    different process (the state file is the only link between them)."""

    def __init__(self, state_dir: str | Path | None = None) -> None:
        # absolute: redis-server changes into its --dir before it opens a relative --logfile
        self.state_dir = (Path(state_dir) if state_dir is not None else default_state_dir()).absolute()

    # -- paths -----------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def password_file(self) -> Path:
        return self.state_dir / PASSWORD_FILE

    @property
    def rocksdb_dir(self) -> Path:
        return self.state_dir / "rocksdb"

    @property
    def plan_file(self) -> Path:
        return self.state_dir / PLAN_FILE

    @property
    def routing_file(self) -> Path:
        return self.state_dir / ROUTING_FILE

    def read_plan(self) -> Plan | None:
        """The plan the stack last ran (``plan.json``), or ``None`` when it had none."""
        try:
            return Plan.from_json(self.plan_file.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"{self.plan_file} is not a placement plan: {exc}") from None

    def routing(self) -> tuple[Plan, dict[int, list[str]]]:
        """What a client routes by: the running stack's plan and each partition's endpoints, from
        ``routing.json`` (one file, so a rebalance switching it never shows a client a new plan with
        old endpoints). A stack without a plan is one partition holding every table whole (plan
        version 0, as its agents report)."""
        current = self.read_state()
        if current is None or current.phase != "up":
            raise NotFoundError(f"no running stack in {self.state_dir}")
        from node_agent.routing import read_routing_file

        with contextlib.suppress(FileNotFoundError):
            return read_routing_file(self.routing_file)
        # a stack started before routing.json existed: state.json and plan.json say the same
        partitions = current.partitions or {0: list(current.endpoints)}
        if current.plan is not None:
            plan = self.read_plan()
            if plan is None or plan.version != current.plan.get("version"):
                raise InvalidArgumentError(
                    f"{self.plan_file} is not the plan the stack in {self.state_dir} runs"
                )
            return plan, partitions
        model = load_model_file(current.model_file)
        whole = whole_table_plan([(t.name, t.total_bytes) for t in model.tables], model=model.name, version=0)
        return whole, partitions

    def read_state(self) -> StackState | None:
        try:
            return StackState.from_dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"{self.state_file} is not a state file of hps local: {exc}") from None

    def redis_password(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_routing(self, plan: Plan | None, partitions: Mapping[int, Sequence[str]], *,
                      model: ModelSpec) -> None:  # fmt: skip
        """Replaces ``routing.json`` atomically: a client re-reading it sees the old routing or the new
        one, never half of either."""
        from node_agent.routing import routing_document

        if plan is None:
            plan = whole_table_plan([(t.name, t.total_bytes) for t in model.tables], model=model.name, version=0)
        document = routing_document(plan, partitions)
        _replace_file(self.routing_file, json.dumps(document, indent=2, sort_keys=True) + "\n")

    def write_plan(self, plan: Plan) -> Path:
        """Writes ``plan-v<N>.json`` for the agents of that version (atomically: an agent starting
        never reads half a plan) and returns its path."""
        path = self.state_dir / plan_file_name(plan.version)
        _replace_file(path, json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def activate_plan(self, plan: Plan | None) -> None:
        """Makes ``plan`` the one the next ``up`` re-plans from (``plan.json``); without a plan there
        is none to keep."""
        if plan is None:
            self.plan_file.unlink(missing_ok=True)
        else:
            _replace_file(self.plan_file, json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")

    def write_state(self, state: StackState) -> None:
        # atomic: a concurrent status never reads half a file
        _replace_file(self.state_file, json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises up/rebalance/down on one state directory (two ``up`` at once would race for it)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- up --------------------------------------------------------------------------------------

    def up(
        self,
        model_file: str | Path,
        *,
        agents: int = 1,
        plan: Plan | None = None,
        redis_cluster: int = 0,
        port: int = 0,
        no_redis: bool = False,
        device: str = "auto",
        ready_timeout: float = 120.0,
        grace_s: float | None = None,
        on_phase: Callable[[PhaseChange], None] | None = None,
        same_node: bool = False,
    ) -> UpResult:
        """Starts Redis, loads the tables, starts ``agents`` agents per partition of ``plan`` (one
        partition without a plan) and waits until each answers gRPC health SERVING. On any failure
        everything this call started is stopped and the error raised (a table file that cannot be
        loaded is named in it; an agent that does not come up has the tail of its log in it).

        On a live stack of the same model file and options where only the plan or ``agents`` changed,
        it rebalances instead (:func:`node_agent.local.rebalance.rebalance_locked`: ``grace_s`` and
        ``on_phase`` go to it) and the stack never stops serving."""
        if agents < 1:
            raise InvalidArgumentError(f"--agents must be at least 1, got {agents}")
        if redis_cluster and redis_cluster < 3:
            raise InvalidArgumentError(f"--redis-cluster needs at least 3 masters, got {redis_cluster}")
        if redis_cluster and no_redis:
            raise InvalidArgumentError("--redis-cluster and --no-redis contradict each other")
        path = Path(model_file).resolve()
        model = load_model_file(path)
        if plan is not None:
            check_plan_fits(plan, model)
        use_redis = not no_redis and model.volatile_store.type == "redis"
        if use_redis and not redis_cluster and model.volatile_store.redis.cluster:
            redis_cluster = max(3, model.volatile_store.redis.shards)  # the model asks for a Redis Cluster
        fingerprint, base_fingerprint = fingerprints(path, agents=agents, redis_cluster=redis_cluster, port=port,
                                                     use_redis=use_redis, device=device, plan=plan,
                                                     same_node=same_node)  # fmt: skip
        with self.locked():
            restarted = False
            current = self.read_state()
            if current is not None:
                everything_alive = current.phase == "up" and all(p.alive() for p in current.processes)
                if everything_alive and current.fingerprint == fingerprint:
                    return UpResult(current, already_up=True, restarted=False, plan=plan)
                if everything_alive and current.options and current.base_fingerprint == base_fingerprint:
                    from node_agent.local.rebalance import DEFAULT_GRACE_S, rebalance_locked

                    result = rebalance_locked(
                        self, current, plan, agents=agents, ready_timeout=ready_timeout, on_phase=on_phase,
                        grace_s=DEFAULT_GRACE_S if grace_s is None else grace_s,
                    )  # fmt: skip
                    return UpResult(result.state, already_up=False, restarted=False, plan=plan, rebalance=result)
                why = "the model or options changed" if everything_alive else "part of it is not running"
                log.info("stopping the running stack in %s: %s", self.state_dir, why)
                self._stop(current)
                restarted = True
            options = {"agents": agents, "port": port, "device": device, "useRedis": use_redis,
                       "redisCluster": redis_cluster,
                       "useRocksdb": model.persistent_store.type == "rocksdb", "sameNode": same_node}  # fmt: skip
            state = StackState(model.name, str(path), fingerprint, [], [], bool(redis_cluster),
                               plan=plan_summary(plan) if plan is not None else None, options=options,
                               base_fingerprint=base_fingerprint)  # fmt: skip
            try:
                self._start(state, model, path, agents=agents, plan=plan, redis_cluster=redis_cluster,
                            use_redis=use_redis, ready_timeout=ready_timeout)  # fmt: skip
            except BaseException:
                self._stop(state)
                self.state_file.unlink(missing_ok=True)
                raise
            return UpResult(state, already_up=False, restarted=restarted, plan=plan)

    def _start(self, state: StackState, model: ModelSpec, model_file: Path, *, agents: int,
               plan: Plan | None, redis_cluster: int, use_redis: bool, ready_timeout: float) -> None:  # fmt: skip
        from node_agent.local.redis_servers import start_cluster, start_redis

        password: str | None = None
        if use_redis:
            password = secrets.token_urlsafe(24)
            _write_private(self.password_file, password + "\n")
            redis_dir = self.state_dir / "redis"
            if redis_cluster:
                cluster = start_cluster(redis_dir, masters=redis_cluster, password=password, detach=True)
                servers = cluster.nodes
            else:
                # spec.volatileStore.redis.shards standalone servers, sharded by the client (RedisTier):
                # one redis-server is single-threaded, so loading and misses scale with shards
                shards = model.volatile_store.redis.shards
                servers = [start_redis(redis_dir if shards == 1 else redis_dir / f"shard-{i}", password=password,
                                       detach=True) for i in range(shards)]  # fmt: skip
            for s in servers:
                state.processes.append(ProcessRecord.of("redis", s.pid, address=s.address,
                                                        log=str(s.workdir / f"redis-{s.port}.log")))  # fmt: skip
            state.redis_addresses = [s.address for s in servers]
            self.write_state(state)  # from here a crash of this process leaves something `down` can stop
            log.info("redis: %s%s", ",".join(state.redis_addresses), " (cluster)" if redis_cluster else "")

        use_rocksdb = model.persistent_store.type == "rocksdb"
        if use_redis or use_rocksdb:
            self._load(model, model_file, redis=state.redis_addresses, password=password,
                       cluster=bool(redis_cluster), rocksdb=use_rocksdb)  # fmt: skip

        self.activate_plan(plan)
        agents_started = self.launch_agents(state, plan, agents=agents, read_only=False,
                                            ready_timeout=ready_timeout)  # fmt: skip
        state.endpoints = [a.address for a in agents_started]
        state.partitions = partition_map(agents_started)
        self.write_routing(plan, state.partitions, model=model)
        state.phase = "up"
        self.write_state(state)

    def launch_agents(self, state: StackState, plan: Plan | None, *, agents: int, read_only: bool,
                      ready_timeout: float, busy_ports: Sequence[int] = ()) -> list[ProcessRecord]:  # fmt: skip
        """Starts ``agents`` agents for each partition of ``plan`` (one without a plan) with the stack's
        options, each recorded in ``state`` (and ``state.json``) as soon as it runs, and waits until
        every one answers gRPC health SERVING; returns them with their addresses, partition by partition.
        ``read_only`` forces RocksDB read-only even for a lone agent (another agent holds the write
        lock); ``busy_ports`` are skipped when the stack was started on fixed ports."""
        options = state.options
        model_file = Path(state.model_file)
        use_redis = bool(options.get("useRedis"))
        use_rocksdb = bool(options.get("useRocksdb"))
        port = int(options.get("port") or 0)
        device = str(options.get("device") or "auto")
        password = self.redis_password() if use_redis else None
        partitions = plan.partitions if plan is not None else 1
        plan_file = self.write_plan(plan) if plan is not None else None
        total = partitions * agents
        # RocksDB admits one writer: several agents (or one beside a writer) share it read-only
        rocksdb_read_only = read_only or total > 1
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ports = _fixed_ports(port, total, busy=busy_ports) if port else [0] * total
        launched: list[tuple[ProcessRecord, subprocess.Popen[bytes], Path]] = []
        for i in range(total):
            index = state.agents_launched
            state.agents_launched += 1
            partition = i // agents
            ready = logs / f"agent-{index}.ready"
            ready.unlink(missing_ok=True)
            agent_log = logs / f"agent-{index}.log"
            cmd = [sys.executable, "-m", "hps_operator", "agent", "-f", str(model_file),
                   "--host", "127.0.0.1", "--port", str(ports[i]),
                   "--device", device, "--ready-file", str(ready)]  # fmt: skip
            if plan_file is not None:
                cmd += ["--plan", str(plan_file), "--partition", str(partition)]
            if use_redis:
                cmd += ["--redis", ",".join(state.redis_addresses), "--redis-password-env", PASSWORD_ENV]
                if state.redis_cluster:
                    cmd.append("--redis-cluster")
            if use_rocksdb:
                cmd += ["--rocksdb", str(self.rocksdb_dir)]
                if rocksdb_read_only:
                    cmd.append("--rocksdb-read-only")
            if options.get("sameNode"):  # same-node clients find it at logs/agent-<i>.sock
                cmd += ["--same-node-socket", str(logs / f"agent-{index}.sock")]
            if not use_redis and not use_rocksdb:
                cmd.append("--load")  # only the agent itself can fill its in-process hash map
            env = dict(os.environ)
            if password:
                env[PASSWORD_ENV] = password
            with open(agent_log, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # fmt: skip
            record = ProcessRecord.of("agent", proc.pid, log=str(agent_log), partition=partition,
                                      plan_version=plan.version if plan is not None else 0,
                                      writer=use_rocksdb and not rocksdb_read_only)  # fmt: skip
            state.processes.append(record)
            self.write_state(state)
            launched.append((record, proc, ready))

        deadline = time.monotonic() + ready_timeout
        for record, proc, ready in launched:
            record.address = _wait_serving(Path(record.log).stem, proc, ready, Path(record.log), deadline=deadline)
        self.write_state(state)
        return [record for record, _, _ in launched]

    def _load(self, model: ModelSpec, model_file: Path, *, redis: Sequence[str], password: str | None,
              cluster: bool, rocksdb: bool) -> None:  # fmt: skip
        """``hps load`` semantics, in this process: every table into Redis and RocksDB."""
        from node_agent.loader import load_model
        from node_agent.tiers.base import TableLayout, Tier

        layouts = [TableLayout.of(t) for t in model.tables]
        tiers: list[Tier] = []
        try:
            if redis:
                from node_agent.tiers.redis_tier import RedisTier

                tiers.append(RedisTier(layouts, addresses=list(redis), password=password, cluster=cluster,
                                       model=model.name))  # fmt: skip
            if rocksdb:
                from node_agent.tiers.rocksdb_tier import RocksDBTier

                tiers.append(RocksDBTier(self.rocksdb_dir, layouts))
            started = time.monotonic()
            reports = load_model(model, tiers=tiers, base_dir=model_file.parent)
            rows = sum(int(getattr(r, "rows", 0)) for r in reports)
            log.info("loaded %d tables (%d rows) into %s in %.1f s", len(model.tables), rows,
                     " and ".join(t.name for t in tiers), time.monotonic() - started)  # fmt: skip
        finally:
            for tier in tiers:
                tier.close()

    # -- status ----------------------------------------------------------------------------------

    def status(self, *, timeout: float = 3.0) -> dict[str, Any]:
        """Each process alive or not, the endpoints, and what each agent says of itself (device,
        degraded, hit rates). ``state`` is ``up``, ``degraded`` (something is dead or an agent
        reports degraded while agents still answer), ``down`` or ``absent``. ``planVersion`` is the
        version clients route by; ``rebalance`` where the last or running rebalance stands. While a
        rebalance runs, ``agents`` lists both generations, ``routed`` telling which clients use."""
        current = self.read_state()
        if current is None:
            return {"state": "absent", "stateDir": str(self.state_dir), "endpoints": [], "processes": []}
        processes = [{"role": p.role, "pid": p.pid, "address": p.address, "alive": p.alive(), "log": p.log,
                      "partition": p.partition, "planVersion": p.plan_version}
                     for p in current.processes]  # fmt: skip
        partitions = current.partitions or {0: list(current.endpoints)}
        partition_of = {e: p for p, eps in partitions.items() for e in eps}
        # agents still warming (or draining) answer too: list them, marked as not routed to
        others = [a for a in current.agents() if a.address and a.address not in partition_of]
        agents = [
            {**_agent_summary(current.model, e, timeout=timeout), "partition": partition_of.get(e, 0),
             "routed": True}
            for e in current.endpoints
        ] + [
            {**_agent_summary(current.model, a.address, timeout=timeout), "partition": a.partition or 0,
             "routed": False}
            for a in others
        ]  # fmt: skip
        answering = [a for a in agents if a.get("answering") and a["routed"]]
        if not answering:
            overall = "down"
        elif (len(answering) < len(current.endpoints) or not all(p["alive"] for p in processes)
              or any(a.get("degraded") for a in answering)):  # fmt: skip
            overall = "degraded"
        else:
            overall = "up"
        return {
            "state": overall,
            "stateDir": str(self.state_dir),
            "model": current.model,
            "modelFile": current.model_file,
            "phase": current.phase,
            "endpoints": current.endpoints,
            "partitions": {str(p): eps for p, eps in sorted(partitions.items())},
            "plan": current.plan,
            "planVersion": current.plan_version(),
            "rebalance": current.rebalance,
            "redis": {"addresses": current.redis_addresses, "cluster": current.redis_cluster},
            "processes": processes,
            "agents": agents,
        }

    # -- down ------------------------------------------------------------------------------------

    def down(self, *, purge: bool = False) -> list[ProcessRecord]:
        """Stops the agents, then Redis (SIGTERM, bounded wait, SIGKILL) and forgets their pids; the
        data (and ``plan.json``) stays unless ``purge``. Returns the processes that were running. Safe to
        run twice."""
        if not self.state_dir.is_dir():
            return []
        with self.locked():
            current = self.read_state()
            stopped = self._stop(current) if current is not None else []
            self.state_file.unlink(missing_ok=True)
            logs = self.state_dir / "logs"
            for ready in logs.glob("agent-*.ready"):
                ready.unlink(missing_ok=True)
            # no agent runs these any more; plan.json stays for the next up to re-plan from
            self.routing_file.unlink(missing_ok=True)
            for generation in self.state_dir.glob("plan-v*.json"):
                generation.unlink(missing_ok=True)
            if purge:
                for owned in ("redis", "rocksdb", "logs"):
                    shutil.rmtree(self.state_dir / owned, ignore_errors=True)
                self.password_file.unlink(missing_ok=True)
                self.plan_file.unlink(missing_ok=True)
        if purge:
            (self.state_dir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.state_dir.rmdir()  # only when nothing of the user's is left in it
        return stopped

    @staticmethod
    def _stop(state: StackState) -> list[ProcessRecord]:
        # agents first: they hold Redis connections and would log errors while it goes away
        stopped = [p for p in state.agents() if p.stop()]
        stopped += [p for p in state.redis() if p.stop()]
        return stopped


# ---------------------------------------------------------------------------------------------


def partition_map(agents: Sequence[ProcessRecord]) -> dict[int, list[str]]:
    """Partition → its agents' endpoints, in the order the agents were started."""
    out: dict[int, list[str]] = {}
    for agent in agents:
        out.setdefault(agent.partition or 0, []).append(agent.address)
    return dict(sorted(out.items()))


def _fixed_ports(first: int, count: int, *, busy: Sequence[int]) -> list[int]:
    """``count`` ports from ``first`` up, skipping ``busy`` ones (a rebalance's old agents still hold
    theirs while the new ones start)."""
    taken = set(busy)
    ports: list[int] = []
    candidate = first
    while len(ports) < count:
        if candidate not in taken:
            ports.append(candidate)
        candidate += 1
    return ports


def _replace_file(path: Path, text: str) -> None:
    """Writes ``text`` beside ``path`` and renames it over ``path``: readers see the old file or the new
    one, never half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def fingerprints(model_file: Path, *, agents: int, redis_cluster: int, port: int, use_redis: bool, device: str,
                 plan: Plan | None, same_node: bool = False) -> tuple[str, str]:  # fmt: skip
    """What ``up`` compares with the running stack: the fingerprint of everything (same: already up),
    and of what only a restart can change (same: a rebalance will do)."""
    extra = {"same_node": True} if same_node else {}  # absent when off: older stacks keep their fingerprint
    base = _fingerprint(model_file, redis_cluster=redis_cluster, port=port, use_redis=use_redis, device=device,
                        **extra)  # fmt: skip
    plan_digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:16] if plan is not None else None
    full = _fingerprint(model_file, agents=agents, redis_cluster=redis_cluster, port=port,
                        use_redis=use_redis, device=device, plan=plan_digest, **extra)  # fmt: skip
    return full, base


def _fingerprint(model_file: Path, **options: object) -> str:
    digest = hashlib.sha256(model_file.read_bytes())
    digest.update(str(model_file).encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What ``state.json`` and ``status`` say of the plan (the whole plan is in ``plan.json``)."""
    return {
        "file": PLAN_FILE,
        "version": plan.version,
        "strategy": plan.strategy,
        "partitions": plan.partitions,
        "gpusPerPod": plan.gpus_per_pod,
        "bucketCount": plan.bucket_count,
        **plan.metrics.to_dict(),
    }


def check_plan_fits(plan: Plan, model: ModelSpec) -> None:
    """A plan made for another model would route keys by tables the agents do not serve."""
    if plan.model and plan.model != model.name:
        raise InvalidArgumentError(f"the plan is for model {plan.model!r}, the model file is {model.name!r}")
    unknown = sorted(set(plan.tables()) - {t.name for t in model.tables})
    if unknown:
        raise InvalidArgumentError(f"the plan places tables the model does not have: {', '.join(unknown)}")
    if plan.partitions < 1:
        raise InvalidArgumentError(f"the plan has {plan.partitions} partitions")


def _write_private(path: Path, text: str) -> None:
    """Writes a secret readable by its owner only (created 0600, never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def log_tail(path: str | Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _wait_serving(name: str, proc: subprocess.Popen[bytes], ready: Path, agent_log: Path, *,
                  deadline: float) -> str:  # fmt: skip
    """Waits for the agent's ready file, then for gRPC health SERVING on the port it names; returns
    the endpoint. Fails early when the agent exits, and at ``deadline`` otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    endpoint = ""
    last = "no ready file yet"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise UnavailableError(
                f"{name} exited with code {code} before serving; last lines of {agent_log}:\n"
                f"{log_tail(agent_log)}"
            )
        if not endpoint and ready.exists():
            with contextlib.suppress(ValueError, KeyError):
                info = json.loads(ready.read_text())
                endpoint = f"{info.get('host') or '127.0.0.1'}:{int(info['port'])}"
        if endpoint:
            try:
                with grpc.insecure_channel(endpoint) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return endpoint
                last = f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as exc:
                last = f"health check: {exc.code().name}"
        time.sleep(0.1)
    raise UnavailableError(
        f"{name} did not become SERVING in time ({last}); last lines of {agent_log}:\n{log_tail(agent_log)}"
    )


def _agent_summary(model: str, endpoint: str, *, timeout: float) -> dict[str, Any]:
    """What one agent says of itself through Describe and Stats; ``answering: False`` with the
    reason when it does not answer."""
    from node_agent.client import Client

    summary: dict[str, Any] = {"endpoint": endpoint}
    try:
        with Client(endpoint, timeout=timeout, retries=0) as client:
            described = _as_dict(client.describe(model))
            stats = _as_dict(client.stats(model))
    except HpsError as exc:
        return {**summary, "answering": False, "error": str(exc)}
    summary["answering"] = True
    summary["device"] = described.get("device") or stats.get("device") or (stats.get("lookup") or {}).get("device")
    summary["degraded"] = bool(described.get("degraded") or stats.get("degraded"))
    lookup = stats.get("lookup")
    tables = (lookup if isinstance(lookup, Mapping) else stats).get("tables")
    if isinstance(tables, Mapping):
        summary["hitRates"] = {
            name: t.get("hit_rate") for name, t in tables.items() if isinstance(t, Mapping) and "hit_rate" in t
        }
    summary["describe"] = described
    summary["stats"] = stats
    return summary


def _as_dict(value: Any) -> dict[str, Any]:
    """Describe/Stats come back as mappings or as protobuf messages; either becomes a plain dict."""
    if isinstance(value, Mapping):
        return dict(value)
    if callable(getattr(value, "to_dict", None)):
        return dict(value.to_dict())
    if hasattr(value, "DESCRIPTOR"):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(value, preserving_proto_field_name=True)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return {"value": value}
