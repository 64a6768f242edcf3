"""Runs the whole HPS stack on one machine (``hps local up/status/down``): real ``redis-server``
processes, the tables loaded into Redis and RocksDB under a state directory, and agent processes
serving gRPC, all detached so they outlive the command that started them.

The state directory holds everything the stack owns::

    state.json        pids (with their start times), ports, endpoints per partition, model, Redis
                      addresses, the plan's summary
    plan.json         the placement plan the agents run, when the stack has one (several partitions
                      or GPUs); kept by ``down`` so the next ``up`` re-plans from it, moving little
    redis.password    the generated Redis AUTH password (mode 0600)
    redis/            redis-server working directories and logs
    rocksdb/          the persistent tier
    logs/             agent-<i>.log and agent-<i>.ready

``up`` on a stack that is already up with the same model file (same bytes) and the same options
leaves it running and reports it; with a changed model or options it stops the old stack (keeping
the data) and starts a new one. A stack that is partly dead is restarted the same way.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node_agent.errors import HpsError, InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.plan import Plan, whole_table_plan
from node_agent.spec import ModelSpec, load_model_file

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
PLAN_FILE = "plan.json"
PASSWORD_FILE = "redis.password"
#: environment variable the agents read the Redis password from (never on a command line)
PASSWORD_ENV = "HPS_REDIS_PASSWORD"
STATE_FORMAT = "hps.dev/local-stack/v1"

_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 30


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

    @classmethod
    def of(cls, role: str, pid: int, *, address: str = "", log: str = "",
           partition: int | None = None) -> ProcessRecord:  # fmt: skip
        return cls(role, pid, _start_ticks(pid), address, log, partition)

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

    def agents(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "agent"]

    def redis(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == "redis"]

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        return {
            "format": STATE_FORMAT,
            "model": raw["model"],
            "modelFile": raw["model_file"],
            "fingerprint": raw["fingerprint"],
            "phase": raw["phase"],
            "endpoints": raw["endpoints"],
            "partitions": {str(p): eps for p, eps in sorted(self.partitions.items())},
            "plan": raw["plan"],
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

    def read_plan(self) -> Plan | None:
        """The plan the stack last ran (``plan.json``), or ``None`` when it had none."""
        try:
            return Plan.from_json(self.plan_file.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"{self.plan_file} is not a placement plan: {exc}") from None

    def routing(self) -> tuple[Plan, dict[int, list[str]]]:
        """What a client routes by: the running stack's plan and each partition's endpoints. A stack
        without a plan is one partition holding every table whole (plan version 0, as its agents
        report)."""
        current = self.read_state()
        if current is None or current.phase != "up":
            raise NotFoundError(f"no running stack in {self.state_dir}")
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

    def _write_state(self, state: StackState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_file)  # atomic: a concurrent status never reads half a file

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialises up/down on one state directory (two ``up`` at once would race for it)."""
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
    ) -> UpResult:
        """Starts Redis, loads the tables, starts ``agents`` agents per partition of ``plan`` (one
        partition without a plan) and waits until each answers gRPC health SERVING. On any failure
        everything this call started is stopped and the error raised (a table file that cannot be
        loaded is named in it; an agent that does not come up has the tail of its log in it)."""
        if agents < 1:
            raise InvalidArgumentError(f"--agents must be at least 1, got {agents}")
        if redis_cluster and redis_cluster < 3:
            raise InvalidArgumentError(f"--redis-cluster needs at least 3 masters, got {redis_cluster}")
        if redis_cluster and no_redis:
            raise InvalidArgumentError("--redis-cluster and --no-redis contradict each other")
        path = Path(model_file).resolve()
        model = load_model_file(path)
        if plan is not None:
            _check_plan_fits(plan, model)
        use_redis = not no_redis and model.volatile_store.type == "redis"
        plan_digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:16] if plan is not None else None
        fingerprint = _fingerprint(path, agents=agents, redis_cluster=redis_cluster, port=port,
                                   use_redis=use_redis, device=device, plan=plan_digest)  # fmt: skip
        with self._locked():
            restarted = False
            current = self.read_state()
            if current is not None:
                everything_alive = current.phase == "up" and all(p.alive() for p in current.processes)
                if everything_alive and current.fingerprint == fingerprint:
                    return UpResult(current, already_up=True, restarted=False, plan=plan)
                why = "the model or options changed" if everything_alive else "part of it is not running"
                log.info("stopping the running stack in %s: %s", self.state_dir, why)
                self._stop(current)
                restarted = True
            state = StackState(model.name, str(path), fingerprint, [], [], bool(redis_cluster),
                               plan=_plan_summary(plan) if plan is not None else None)  # fmt: skip
            try:
                self._start(state, model, path, agents=agents, plan=plan, redis_cluster=redis_cluster,
                            port=port, use_redis=use_redis, device=device, ready_timeout=ready_timeout)  # fmt: skip
            except BaseException:
                self._stop(state)
                self.state_file.unlink(missing_ok=True)
                raise
            return UpResult(state, already_up=False, restarted=restarted, plan=plan)

    def _start(self, state: StackState, model: ModelSpec, model_file: Path, *, agents: int,
               plan: Plan | None, redis_cluster: int, port: int, use_redis: bool, device: str,
               ready_timeout: float) -> None:  # fmt: skip
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
                servers = [start_redis(redis_dir, password=password, detach=True)]
            for s in servers:
                state.processes.append(ProcessRecord.of("redis", s.pid, address=s.address,
                                                        log=str(s.workdir / f"redis-{s.port}.log")))  # fmt: skip
            state.redis_addresses = [s.address for s in servers]
            self._write_state(state)  # from here a crash of this process leaves something `down` can stop
            log.info("redis: %s%s", ",".join(state.redis_addresses), " (cluster)" if redis_cluster else "")

        use_rocksdb = model.persistent_store.type == "rocksdb"
        if use_redis or use_rocksdb:
            self._load(model, model_file, redis=state.redis_addresses, password=password,
                       cluster=bool(redis_cluster), rocksdb=use_rocksdb)  # fmt: skip

        if plan is not None:
            partial = self.plan_file.with_name(PLAN_FILE + ".partial")
            partial.write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
            partial.replace(self.plan_file)  # an agent starting now never reads half a plan
        else:
            # no plan.json is left behind that no agent runs (the next planned up starts afresh)
            self.plan_file.unlink(missing_ok=True)
        partitions = plan.partitions if plan is not None else 1
        total = partitions * agents
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        launched: list[tuple[ProcessRecord, subprocess.Popen[bytes], Path]] = []
        for i in range(total):
            partition = i // agents
            ready = logs / f"agent-{i}.ready"
            ready.unlink(missing_ok=True)
            agent_log = logs / f"agent-{i}.log"
            cmd = [sys.executable, "-m", "hps_operator", "agent", "-f", str(model_file),
                   "--host", "127.0.0.1", "--port", str(port + i if port else 0),
                   "--device", device, "--ready-file", str(ready)]  # fmt: skip
            if plan is not None:
                cmd += ["--plan", str(self.plan_file), "--partition", str(partition)]
            if use_redis:
                cmd += ["--redis", ",".join(state.redis_addresses), "--redis-password-env", PASSWORD_ENV]
                if redis_cluster:
                    cmd.append("--redis-cluster")
            if use_rocksdb:
                cmd += ["--rocksdb", str(self.rocksdb_dir)]
                if total > 1:
                    # RocksDB admits one writer: several agents share the loaded tables read-only
                    cmd.append("--rocksdb-read-only")
            if not use_redis and not use_rocksdb:
                cmd.append("--load")  # only the agent itself can fill its in-process hash map
            env = dict(os.environ)
            if password:
                env[PASSWORD_ENV] = password
            with open(agent_log, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # fmt: skip
            record = ProcessRecord.of("agent", proc.pid, log=str(agent_log), partition=partition)
            state.processes.append(record)
            self._write_state(state)
            launched.append((record, proc, ready))

        deadline = time.monotonic() + ready_timeout
        for i, (record, proc, ready) in enumerate(launched):
            record.address = _wait_serving(i, proc, ready, Path(record.log), deadline=deadline)
            state.endpoints.append(record.address)
            state.partitions.setdefault(record.partition or 0, []).append(record.address)
        state.phase = "up"
        self._write_state(state)

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
        reports degraded while agents still answer), ``down`` or ``absent``."""
        current = self.read_state()
        if current is None:
            return {"state": "absent", "stateDir": str(self.state_dir), "endpoints": [], "processes": []}
        processes = [{"role": p.role, "pid": p.pid, "address": p.address, "alive": p.alive(), "log": p.log,
                      "partition": p.partition} for p in current.processes]  # fmt: skip
        partitions = current.partitions or {0: list(current.endpoints)}
        partition_of = {e: p for p, eps in partitions.items() for e in eps}
        agents = [
            {**_agent_summary(current.model, e, timeout=timeout), "partition": partition_of.get(e, 0)}
            for e in current.endpoints
        ]
        answering = [a for a in agents if a.get("answering")]
        if not answering:
            overall = "down"
        elif (len(answering) < len(agents) or not all(p["alive"] for p in processes)
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
        with self._locked():
            current = self.read_state()
            stopped = self._stop(current) if current is not None else []
            self.state_file.unlink(missing_ok=True)
            logs = self.state_dir / "logs"
            for ready in logs.glob("agent-*.ready"):
                ready.unlink(missing_ok=True)
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


def _fingerprint(model_file: Path, **options: object) -> str:
    digest = hashlib.sha256(model_file.read_bytes())
    digest.update(str(model_file).encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _plan_summary(plan: Plan) -> dict[str, Any]:
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


def _check_plan_fits(plan: Plan, model: ModelSpec) -> None:
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


def _wait_serving(index: int, proc: subprocess.Popen[bytes], ready: Path, agent_log: Path, *,
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
                f"agent {index} exited with code {code} before serving; last lines of {agent_log}:\n"
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
        f"agent {index} did not become SERVING in time ({last}); last lines of {agent_log}:\n{log_tail(agent_log)}"
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
