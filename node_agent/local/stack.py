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
    data.json         what the stores hold: the tables loaded (and their shapes), how Redis is laid
                      out (servers, ports); kept by ``down``, so the next ``up`` loads nothing it holds
    redis.password    the generated password of Redis's ``default`` user, which ``hps local`` itself uses
                      (mode 0600)
    redis-users.json  a generated password for each role's Redis ACL user (agent, loader, producer), and
    redis-users.acl   the ACL file every redis-server starts with (passwords as SHA-256 only; both 0600)
    auth.token        the token every Update RPC must carry (``authorization: Bearer``; mode 0600)
    tls/              with ``--tls``: a throwaway CA and the certificate the agents and Redis serve
    redis/            redis-server working directories, their append-only files and logs
    rocksdb/          the persistent tier
    logs/             agent-<i>.log and agent-<i>.ready (i counts every agent the stack started)

``up`` on a stack that is already up with the same model file (same bytes) and the same options
leaves it running and reports it. When only the plan or the agents per partition changed, it
rebalances the live stack make-before-break (:mod:`node_agent.local.rebalance`). When part of it died,
it restarts only what is dead: each Redis on its own port and directory (it replays its append-only
file), each agent with its own identity (it resumes its consumer group). With a changed model or
other options it stops the old stack and starts a new one on the same data.

Data is never loaded over data: tables the stores already hold (with the updates applied since) are
kept across ``down``/``up`` and restarts; only tables new to the model are loaded from their sources.
A Redis that comes back without its data refills from RocksDB (the agents repair it); only when there
is no RocksDB are the tables loaded into it again, said in a warning. ``down --purge`` forgets it all.

With a plan, ``up`` starts ``agents`` agents for each of the plan's partitions, each caching only the
buckets its partition owns; :class:`node_agent.routing.RoutedClient` routes lookups by the same plan.

Secure by default, as a cluster is: every Update RPC must carry the stack's token (clients built from
the state directory send it: :meth:`LocalStack.client_credentials`), and each process reaches Redis as
its role's ACL user (agents, the loader, producers). ``--tls`` also puts gRPC and Redis behind TLS with
a throwaway CA whose certificate clients are given (``tls/ca.crt``); off by default, as everything
listens on loopback.
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
    from node_agent.local.certificates import LocalCertificates
    from node_agent.local.rebalance import PhaseChange, RebalanceResult
    from node_agent.local.redis_servers import RedisServerTLS
    from node_agent.redis_access import RedisAccess

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
DATA_FILE = "data.json"
DATA_FORMAT = "hps.dev/local-data/v1"
PLAN_FILE = "plan.json"
ROUTING_FILE = "routing.json"
PASSWORD_FILE = "redis.password"
#: environment variable the agents read the Redis password from (never on a command line)
PASSWORD_ENV = "HPS_REDIS_PASSWORD"
#: each role's Redis password, and the ACL file made of them
REDIS_USERS_FILE = "redis-users.json"
REDIS_ACL_FILE = "redis-users.acl"
#: the token Update RPCs carry, and the folder of the throwaway CA
TOKEN_FILE = "auth.token"
TLS_DIR = "tls"
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
    #: an agent's stable identity (its consumer group on the update stream)
    agent_id: str = ""
    #: how the process was started, so a restart starts it the same way (port and all)
    command: list[str] = field(default_factory=list)
    #: a Redis server's working directory (its append-only file), and whether it is a Cluster node
    workdir: str = ""
    cluster_node: bool = False

    @classmethod
    def of(cls, role: str, pid: int, *, address: str = "", log: str = "", partition: int | None = None,
           plan_version: int | None = None, writer: bool = False, agent_id: str = "",
           command: Sequence[str] = (), workdir: str = "", cluster_node: bool = False) -> ProcessRecord:  # fmt: skip
        return cls(role, pid, _start_ticks(pid), address, log, partition, plan_version, writer, agent_id,
                   list(command), workdir, cluster_node)  # fmt: skip

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1]) if ":" in self.address else 0

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


@dataclass
class StoredData:
    """What ``data.json`` says the stores hold: the tables loaded from their sources (updated online
    since), and how Redis is laid out (``standalone:N`` servers or ``cluster:N``) on which ports, so a
    later ``up`` reuses its append-only files and loads nothing the stores already hold."""

    model: str
    #: table name -> {"dim", "dtype", "rows"} as loaded
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    redis_layout: str = ""
    redis_ports: list[int] = field(default_factory=list)
    loaded_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": DATA_FORMAT, "model": self.model, "tables": self.tables,
                "redis": {"layout": self.redis_layout, "ports": self.redis_ports}, "loadedAt": self.loaded_at}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StoredData:
        redis = raw.get("redis") or {}
        return cls(model=str(raw.get("model") or ""), tables=dict(raw.get("tables") or {}),
                   redis_layout=str(redis.get("layout") or ""),
                   redis_ports=[int(p) for p in redis.get("ports") or []], loaded_at=str(raw.get("loadedAt") or ""))  # fmt: skip


def _table_shape(table: Any) -> dict[str, Any]:
    return {"dim": table.dim, "dtype": table.dtype, "rows": table.rows}


def redis_layout(*, use_redis: bool, redis_cluster: int, shards: int) -> str:
    """How a stack's Redis is laid out; data kept under another layout is not where clients look."""
    if not use_redis:
        return ""
    return f"cluster:{redis_cluster}" if redis_cluster else f"standalone:{shards}"


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
    #: the processes restarted when only part of the stack had died (the rest kept running)
    revived: tuple[ProcessRecord, ...] = ()


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
    def token_file(self) -> Path:
        return self.state_dir / TOKEN_FILE

    @property
    def redis_users_file(self) -> Path:
        return self.state_dir / REDIS_USERS_FILE

    @property
    def redis_acl_file(self) -> Path:
        return self.state_dir / REDIS_ACL_FILE

    @property
    def certificates(self) -> LocalCertificates:
        """The throwaway CA's files (they exist once a stack ran with ``--tls``)."""
        from node_agent.local.certificates import LocalCertificates

        return LocalCertificates(self.state_dir / TLS_DIR)

    @property
    def rocksdb_dir(self) -> Path:
        return self.state_dir / "rocksdb"

    @property
    def plan_file(self) -> Path:
        return self.state_dir / PLAN_FILE

    @property
    def data_file(self) -> Path:
        return self.state_dir / DATA_FILE

    def read_data(self) -> StoredData | None:
        """What the stores hold (``data.json``), or None when nothing was loaded yet."""
        try:
            raw = json.loads(self.data_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s): the stores are treated as empty", self.data_file, exc)
            return None
        return StoredData.from_dict(raw)

    def write_data(self, data: StoredData) -> None:
        _replace_file(self.data_file, json.dumps(data.to_dict(), indent=2, sort_keys=True) + "\n")

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

    # -- credentials ------------------------------------------------------------------------------

    def runs_tls(self) -> bool:
        """Whether the stack serves TLS: as it was started, or (stopped) whether it ever made its CA."""
        current = self.read_state()
        if current is not None:
            return bool(current.options.get("tls"))
        return self.certificates.exist()

    def client_credentials(self) -> dict[str, Any]:
        """What a :class:`~node_agent.client.Client` of this stack is given: its token file and, when it
        serves TLS, its CA (``tls``). An error saying so when the stack never made a token."""
        if not self.token_file.exists():
            raise NotFoundError(f"no token in {self.state_dir}: start the stack with hps local up --state-dir "
                                f"{self.state_dir}")  # fmt: skip
        return {"token_file": self.token_file, "tls": self.certificates.ca_file if self.runs_tls() else None}

    def redis_access(self, role: str) -> RedisAccess:
        """How ``role`` (``agent``, ``loader``, ``producer``; ``admin`` for ``hps local`` itself) reaches
        this stack's Redis: its ACL user and password, and TLS when the stack serves it."""
        from node_agent.redis_access import RedisAccess, RedisTLS

        tls = RedisTLS(ca_file=self.certificates.ca_file) if self.runs_tls() else None
        if role == "admin":
            return RedisAccess(password=self.redis_password(), tls=tls)
        from node_agent.redis_acl import USERS

        if role not in USERS:
            raise InvalidArgumentError(f"no Redis role {role!r}; roles: admin, {', '.join(USERS)}")
        password = self._redis_passwords().get(role)
        if password is None:
            raise NotFoundError(f"no password for Redis role {role} in {self.redis_users_file}: start the stack "
                                f"with hps local up --state-dir {self.state_dir}")  # fmt: skip
        return RedisAccess(username=USERS[role], password=password, tls=tls)

    def _redis_passwords(self) -> dict[str, str]:
        try:
            raw = json.loads(self.redis_users_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise InvalidArgumentError(f"{self.redis_users_file} is not JSON ({exc}): delete it and run hps local "
                                       "up again (new passwords are made)") from None  # fmt: skip
        return {str(k): str(v) for k, v in dict(raw).items()}

    def _ensure_credentials(self, model: ModelSpec, *, use_redis: bool, tls: bool) -> None:
        """Makes what the stack's processes authenticate with, keeping what exists (a client holding
        the token keeps working across down/up): the Update token, each Redis role's password and the
        ACL file of them, and with ``tls`` the CA and the servers' certificate."""
        if not self.token_file.exists():
            _write_private(self.token_file, secrets.token_urlsafe(32) + "\n")
        if tls:
            from node_agent.local.certificates import ensure_local_certificates

            ensure_local_certificates(self.certificates.directory)
        if not use_redis:
            return
        from node_agent.redis_acl import ROLES, acl_file
        from node_agent.updates import stream_name

        admin = self.redis_password()
        if admin is None:
            admin = secrets.token_urlsafe(24)
            _write_private(self.password_file, admin + "\n")
        passwords = self._redis_passwords()
        if set(passwords) != set(ROLES):
            passwords = {role: passwords.get(role) or secrets.token_urlsafe(24) for role in ROLES}
            _write_private(self.redis_users_file, json.dumps(passwords, indent=2, sort_keys=True) + "\n")
        # written every time: the model's stream name (its keys) may have changed
        _write_private(self.redis_acl_file, acl_file(model=model.name, stream=stream_name(model),
                                                     passwords=passwords, admin_password=admin))  # fmt: skip

    def _credential_files(self, state: StackState) -> dict[str, str | None]:
        """Where a client of the stack finds what it needs (``status`` shows it)."""
        return {
            "token": str(self.token_file) if self.token_file.exists() else None,
            "ca": str(self.certificates.ca_file) if state.options.get("tls") else None,
            "redisUsers": str(self.redis_users_file) if state.redis_addresses else None,
        }

    def _server_tls(self, tls: bool) -> RedisServerTLS | None:
        from node_agent.local.redis_servers import RedisServerTLS

        if not tls:
            return None
        certs = self.certificates
        return RedisServerTLS(cert_file=certs.cert_file, key_file=certs.key_file, ca_file=certs.ca_file)

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
        tls: bool = False,
        reflection: bool = False,
    ) -> UpResult:
        """Starts Redis, loads the tables, starts ``agents`` agents per partition of ``plan`` (one
        partition without a plan) and waits until each answers gRPC health SERVING. On any failure
        everything this call started is stopped and the error raised (a table file that cannot be
        loaded is named in it; an agent that does not come up has the tail of its log in it).

        On a live stack of the same model file and options where only the plan or ``agents`` changed,
        it rebalances instead (:func:`node_agent.local.rebalance.rebalance_locked`: ``grace_s`` and
        ``on_phase`` go to it) and the stack never stops serving.

        ``tls``: the agents serve gRPC and Redis serves its clients over TLS, with certificates of a
        throwaway CA made in ``tls/`` (clients trust ``tls/ca.crt``). ``reflection``: the agents serve gRPC
        server reflection (so they do when the model's ``spec.security.reflection`` asks)."""
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
        reflection = reflection or model.security.reflection
        if use_redis and not redis_cluster and model.volatile_store.redis.cluster:
            redis_cluster = max(3, model.volatile_store.redis.shards)  # the model asks for a Redis Cluster
        fingerprint, base_fingerprint = fingerprints(path, agents=agents, redis_cluster=redis_cluster, port=port,
                                                     use_redis=use_redis, device=device, plan=plan,
                                                     same_node=same_node, tls=tls, reflection=reflection)  # fmt: skip
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
                if current.phase == "up" and current.fingerprint == fingerprint:
                    # the same stack, part of it dead: restart only that, on the same data and addresses
                    revived = self._revive(current, model, ready_timeout=ready_timeout)
                    return UpResult(current, already_up=False, restarted=False, plan=plan, revived=tuple(revived))
                why = "the model or options changed" if everything_alive else "an earlier up did not finish"
                if everything_alive:
                    # what the new start would refuse is refused while the running stack still serves
                    self._check_new_start(model, path)
                log.info("stopping the running stack in %s (its data stays): %s", self.state_dir, why)
                self._stop(current)
                restarted = True
            options = {"agents": agents, "port": port, "device": device, "useRedis": use_redis,
                       "redisCluster": redis_cluster,
                       "useRocksdb": model.persistent_store.type == "rocksdb", "sameNode": same_node,
                       "tls": tls, "reflection": reflection}  # fmt: skip
            state = StackState(model.name, str(path), fingerprint, [], [], bool(redis_cluster),
                               plan=plan_summary(plan) if plan is not None else None, options=options,
                               base_fingerprint=base_fingerprint)  # fmt: skip
            had_data = self.data_file.exists()
            self._ensure_credentials(model, use_redis=use_redis, tls=tls)
            try:
                self._start(state, model, path, agents=agents, plan=plan, redis_cluster=redis_cluster,
                            use_redis=use_redis, ready_timeout=ready_timeout)  # fmt: skip
            except BaseException:
                self._stop(state)
                self.state_file.unlink(missing_ok=True)
                if not had_data and not self.data_file.exists():
                    # nothing was recorded as loaded: leave no half-loaded store to trip the next up
                    self._discard_unrecorded_data()
                raise
            return UpResult(state, already_up=False, restarted=restarted, plan=plan)

    def _start(self, state: StackState, model: ModelSpec, model_file: Path, *, agents: int,
               plan: Plan | None, redis_cluster: int, use_redis: bool, ready_timeout: float) -> None:  # fmt: skip
        use_rocksdb = model.persistent_store.type == "rocksdb"
        stored, new_tables = self._stored_and_new(model)
        if stored is None:
            self._discard_unrecorded_data()  # an earlier up that never finished loading
        layout = redis_layout(use_redis=use_redis, redis_cluster=redis_cluster, shards=model.volatile_store.redis.shards)
        redis_tables: list[str] = []
        tls = bool(state.options.get("tls"))
        if use_redis:
            kept = stored is not None and stored.redis_layout == layout
            if not kept and (self.state_dir / "redis").exists():
                log.info("the Redis layout changed (%s -> %s): starting Redis afresh; its rows come back from %s",
                         stored.redis_layout if stored else "none", layout,
                         "RocksDB" if use_rocksdb else "the sources")  # fmt: skip
                shutil.rmtree(self.state_dir / "redis", ignore_errors=True)
            self._start_redis_servers(state, model, redis_cluster, tls=tls,
                                      ports=stored.redis_ports if kept and stored is not None else [])  # fmt: skip
            redis_tables = list(new_tables)
            if not self._redis_holds_data(state, model.name) and not use_rocksdb:
                if stored is not None and stored.tables:
                    log.warning("Redis came back without its data and model %s has no persistent tier: loading "
                                "its tables from their sources again; online updates applied since %s are lost",
                                model.name, stored.loaded_at or "the last load")  # fmt: skip
                redis_tables = [t.name for t in model.tables if t.source]
        rocksdb_tables = list(new_tables) if use_rocksdb else []
        if redis_tables or rocksdb_tables:
            self._load(model, model_file, redis_tables=redis_tables, rocksdb_tables=rocksdb_tables,
                       redis=state.redis_addresses, cluster=bool(redis_cluster))  # fmt: skip
        if use_redis:
            self._mark_redis_loaded(state, model.name)
        self.write_data(StoredData(
            model.name, {t.name: _table_shape(t) for t in model.tables}, redis_layout=layout,
            redis_ports=[p.port for p in state.redis()],
            loaded_at=(stored.loaded_at if stored is not None and not new_tables else _now_text()),
        ))  # fmt: skip

        self.activate_plan(plan)
        agents_started = self.launch_agents(state, plan, agents=agents, read_only=False,
                                            ready_timeout=ready_timeout)  # fmt: skip
        state.endpoints = [a.address for a in agents_started]
        state.partitions = partition_map(agents_started)
        self.write_routing(plan, state.partitions, model=model)
        state.phase = "up"
        self.write_state(state)

    def _stored_and_new(self, model: ModelSpec) -> tuple[StoredData | None, list[str]]:
        """What the state directory holds and which of ``model``'s tables are to be loaded into it;
        raises when it holds another model's tables, or a table with another shape."""
        stored = self.read_data()
        if stored is not None and stored.model != model.name:
            raise InvalidArgumentError(
                f"{self.state_dir} holds the tables of model {stored.model!r}, not {model.name!r}: give another "
                f"--state-dir, or delete them with hps local down --purge --state-dir {self.state_dir}"
            )
        return stored, self._tables_to_load(model, stored)

    def _check_new_start(self, model: ModelSpec, model_file: Path) -> None:
        """Before a changed model replaces a running stack: the stored data must take it, and every
        table it adds must open and match its spec (the loader's own check, which reads no rows), so
        a bad file fails the up and the running stack keeps serving."""
        from node_agent.loader import open_source

        for name in self._stored_and_new(model)[1]:
            open_source(model.table(name), base_dir=model_file.parent)

    def _tables_to_load(self, model: ModelSpec, stored: StoredData | None) -> list[str]:
        """The tables with a source the stores do not hold yet; a table held with another shape cannot
        be loaded over (its rows and updates would be cut at the wrong width): that is an error saying
        how to start over."""
        held = stored.tables if stored is not None else {}
        for i, table in enumerate(model.tables):
            before = held.get(table.name)
            if before is None:
                continue
            if (before.get("dim"), before.get("dtype")) != (table.dim, table.dtype):
                raise InvalidArgumentError(
                    f"spec.tables[{i}]: table {table.name!r} is stored in {self.state_dir} with dim "
                    f"{before.get('dim')} and dtype {before.get('dtype')}, the model now says dim {table.dim} "
                    f"and dtype {table.dtype}: a stored table keeps its shape. Start over from the sources with "
                    f"hps local down --purge --state-dir {self.state_dir} (online updates are lost), or give the "
                    "table a new name"
                )
            if before.get("rows") != table.rows:
                log.warning("table %r keeps the %s rows it was loaded with (and the updates since), not the %d "
                            "the model now says: to load it from its source again, hps local down --purge",
                            table.name, before.get("rows"), table.rows)  # fmt: skip
        kept = [t.name for t in model.tables if t.name in held]
        if kept:
            log.info("keeping tables %s as the stores hold them (loaded %s, with the updates since)",
                     ", ".join(kept), stored.loaded_at if stored is not None else "")  # fmt: skip
        return [t.name for t in model.tables if t.source and t.name not in held]

    def _discard_unrecorded_data(self) -> None:
        for owned in ("redis", "rocksdb"):
            folder = self.state_dir / owned
            if folder.exists():
                log.info("removing %s: no load into it was ever completed", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def _start_redis_servers(self, state: StackState, model: ModelSpec, redis_cluster: int, *, tls: bool,
                             ports: Sequence[int]) -> None:  # fmt: skip
        """Starts the stack's Redis servers, on ``ports`` when given (their append-only files and, for a
        Cluster, their nodes.conf name them) else on free ones; each is recorded as soon as it runs. Each
        reads its users from the stack's ACL file, and serves TLS only with ``tls``."""
        from node_agent.local.redis_servers import start_cluster, start_redis

        redis_dir = self.state_dir / "redis"
        persistence = model.volatile_store.redis.persistence
        password = self.redis_password()
        secure: dict[str, Any] = {"tls": self._server_tls(tls), "acl_file": self.redis_acl_file}
        if redis_cluster and ports and len(ports) == redis_cluster and (redis_dir / "node-0").exists():
            servers = []
            try:
                for i, node_port in enumerate(ports):
                    servers.append(start_redis(redis_dir / f"node-{i}", port=node_port, password=password, cluster=True,
                                               detach=True, persistence=persistence, **secure))  # fmt: skip
            except UnavailableError as exc:
                for server in servers:
                    server.stop()
                raise UnavailableError(
                    f"the Redis Cluster of the stack in {self.state_dir} cannot come back on ports "
                    f"{', '.join(map(str, ports))} ({exc}); free them, or start it afresh with hps local down "
                    f"--purge --state-dir {self.state_dir}"
                ) from None
            _wait_cluster_ok(servers)
        elif redis_cluster:
            servers = start_cluster(redis_dir, masters=redis_cluster, password=password, detach=True,
                                    persistence=persistence, **secure).nodes  # fmt: skip
        else:
            # spec.volatileStore.redis.shards standalone servers, sharded by the client (RedisTier):
            # one redis-server is single-threaded, so loading and misses scale with shards
            shards = model.volatile_store.redis.shards
            servers = []
            for i in range(shards):
                workdir = redis_dir if shards == 1 else redis_dir / f"shard-{i}"
                shard_port = ports[i] if i < len(ports) else None
                try:
                    servers.append(start_redis(workdir, port=shard_port, password=password, detach=True,
                                               persistence=persistence, **secure))  # fmt: skip
                except UnavailableError:
                    if shard_port is None:
                        raise
                    # its old port is taken: any other will do (the data is in its directory)
                    servers.append(start_redis(workdir, password=password, detach=True, persistence=persistence,
                                               **secure))  # fmt: skip
        for server in servers:
            state.processes.append(ProcessRecord.of(
                "redis", server.pid, address=server.address, log=str(server.workdir / f"redis-{server.port}.log"),
                workdir=str(server.workdir), cluster_node=bool(redis_cluster),
            ))  # fmt: skip
        state.redis_addresses = [s.address for s in servers]
        self.write_state(state)  # from here a crash of this process leaves something `down` can stop
        log.info("redis: %s%s", ",".join(state.redis_addresses), " (cluster)" if redis_cluster else "")

    def _redis_clients(self, state: StackState) -> list[tuple[str, Any]]:
        """Clients of the stack's Redis as the loader, which reads and writes the data epoch."""
        from node_agent.tiers.health import redis_clients

        return redis_clients(state.redis_addresses, access=self.redis_access("loader"), cluster=state.redis_cluster,
                             timeout=5.0)  # fmt: skip

    def _redis_holds_data(self, state: StackState, model: str) -> bool:
        """Every Redis server holds a data generation of the model (its epoch key): it kept its data."""
        from node_agent.tiers.health import read_epoch

        clients = self._redis_clients(state)
        try:
            return all(read_epoch(client, model) is not None for _, client in clients)
        finally:
            for _, client in clients:
                client.close()

    def _mark_redis_loaded(self, state: StackState, model: str) -> None:
        """Gives each Redis server without one a data generation (an epoch key), as ``hps load`` does:
        the agents tell by it a server that comes back without its data."""
        from node_agent.tiers.health import write_epoch

        clients = self._redis_clients(state)
        try:
            for _, client in clients:
                write_epoch(client, model, only_if_absent=True)
        finally:
            for _, client in clients:
                client.close()

    # -- restarting part of a stack --------------------------------------------------------------

    def restart(self, what: str, index: int | None = None, *, ready_timeout: float = 120.0) -> list[ProcessRecord]:
        """``hps local restart agent N`` / ``redis [N]``: stops that process (SIGTERM, then SIGKILL after a
        bounded wait) and starts it again as it was started: the same port and data directory for Redis
        (it replays its append-only file), the same identity and port for an agent (it resumes its
        consumer group). The rest of the stack keeps running. Returns what was restarted."""
        with self.locked():
            current = self.read_state()
            if current is None or current.phase != "up":
                raise NotFoundError(f"no running stack in {self.state_dir}: start one with hps local up")
            model = load_model_file(current.model_file)
            if what == "agent":
                agents = current.agents()
                if index is None:
                    raise InvalidArgumentError(f"which agent? hps local restart agent N, N from 0 to {len(agents) - 1} "
                                               "(as hps local status lists them)")  # fmt: skip
                chosen = [_pick(agents, index, "agent")]
                for agent in chosen:
                    agent.stop()
                self._restart_agents(current, chosen, ready_timeout=ready_timeout)
            elif what == "redis":
                servers = current.redis()
                if not servers:
                    raise InvalidArgumentError(f"the stack in {self.state_dir} runs no Redis (it was started with "
                                               "--no-redis, or its model has no Redis tier)")  # fmt: skip
                chosen = servers if index is None else [_pick(servers, index, "redis")]
                for server in chosen:
                    server.stop()
                self._restart_redis(current, chosen, model)
            else:
                raise InvalidArgumentError(f"restart what? 'agent N' or 'redis', got {what!r}")
            self.write_state(current)
            return chosen

    def _revive(self, state: StackState, model: ModelSpec, *, ready_timeout: float) -> list[ProcessRecord]:
        """Restarts the dead processes of a running stack, Redis first (the agents reconnect to the same
        addresses), and leaves the live ones alone."""
        dead_redis = [p for p in state.redis() if not p.alive()]
        if dead_redis:
            log.info("restarting %d dead Redis server(s) of the stack in %s", len(dead_redis), self.state_dir)
            self._restart_redis(state, dead_redis, model)
        dead_agents = [a for a in state.agents() if not a.alive()]
        if dead_agents:
            log.info("restarting %d dead agent(s) of the stack in %s", len(dead_agents), self.state_dir)
            self._restart_agents(state, dead_agents, ready_timeout=ready_timeout)
        self.write_state(state)
        return dead_redis + dead_agents

    def _restart_redis(self, state: StackState, servers: Sequence[ProcessRecord], model: ModelSpec) -> None:
        """Starts ``servers`` again on their ports and directories. One that comes back without its data
        is refilled by the agents from RocksDB; without RocksDB the tables are loaded into it again."""
        from node_agent.local.redis_servers import start_redis

        password = self.redis_password()
        persistence = model.volatile_store.redis.persistence
        tls = self._server_tls(bool(state.options.get("tls")))
        for record in servers:
            try:
                server = start_redis(record.workdir or self.state_dir / "redis", port=record.port, password=password,
                                     cluster=record.cluster_node, detach=True, persistence=persistence, tls=tls,
                                     acl_file=self.redis_acl_file)  # fmt: skip
            except UnavailableError as exc:
                raise UnavailableError(f"Redis {record.address} of the stack in {self.state_dir} did not come back "
                                       f"on its port: {exc}") from None  # fmt: skip
            record.pid, record.started = server.pid, _start_ticks(server.pid)
            self.write_state(state)
        if any(r.cluster_node for r in servers):
            from node_agent.local.redis_servers import RedisProcess

            _wait_cluster_ok([RedisProcess(r.address.rsplit(":", 1)[0], r.port, Path(r.workdir), password, r.pid,
                                           tls=tls.client() if tls is not None else None)
                              for r in state.redis()])  # fmt: skip
        if model.persistent_store.type != "rocksdb" and not self._redis_holds_data(state, model.name):
            log.warning("Redis came back without its data and model %s has no persistent tier: loading its tables "
                        "from their sources again; online updates applied since the last load are lost", model.name)  # fmt: skip
            self._load(model, Path(state.model_file), redis_tables=[t.name for t in model.tables if t.source],
                       rocksdb_tables=[], redis=state.redis_addresses, cluster=state.redis_cluster)  # fmt: skip
            self._mark_redis_loaded(state, model.name)

    def _restart_agents(self, state: StackState, agents: Sequence[ProcessRecord], *, ready_timeout: float) -> None:
        """Starts ``agents`` again with the command they were started with, on the port they had."""
        env = self._agent_environment(bool(state.options.get("useRedis")))
        launched = []
        for record in agents:
            if not record.command or "--auth-token-file" not in record.command:
                raise InvalidArgumentError(f"agent {record.address} was started by an older hps local (it did not "
                                           "record how, or its agents took no credential): restart the whole stack "
                                           "with hps local down and up")  # fmt: skip
            command = _with_option(record.command, "--port", str(record.port))
            ready = Path(_option(command, "--ready-file"))
            ready.unlink(missing_ok=True)
            with open(record.log, "ab") as out:
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # fmt: skip
            record.pid, record.started, record.command = proc.pid, _start_ticks(proc.pid), command
            self.write_state(state)
            launched.append((record, proc, ready))
        deadline = time.monotonic() + ready_timeout
        for record, proc, ready in launched:
            record.address = _wait_serving(Path(record.log).stem, proc, ready, Path(record.log), deadline=deadline,
                                           ca_file=self._ca_of(state))  # fmt: skip

    def _agent_environment(self, use_redis: bool) -> dict[str, str]:
        """The agents' environment: the agent role's Redis password, never on a command line."""
        env = dict(os.environ)
        env.pop(PASSWORD_ENV, None)
        if use_redis:
            password = self.redis_access("agent").password
            if password:
                env[PASSWORD_ENV] = password
        return env

    def _ca_of(self, state: StackState) -> Path | None:
        return self.certificates.ca_file if state.options.get("tls") else None

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
        tls = bool(options.get("tls"))
        env = self._agent_environment(use_redis)
        partitions = plan.partitions if plan is not None else 1
        plan_file = self.write_plan(plan) if plan is not None else None
        total = partitions * agents
        # RocksDB admits one writer: agents that may ever run beside another share it (the one holding its
        # lock writes it and Redis, the others read it and take over when it stops); a lone agent without
        # Redis keeps it to itself, so its Update RPCs can write it directly
        rocksdb_shared = use_redis or read_only or total > 1
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
            agent_id = f"{state.model}-a{index}"
            cmd = [sys.executable, "-m", "hps_operator", "agent", "-f", str(model_file),
                   "--host", "127.0.0.1", "--port", str(ports[i]), "--agent-id", agent_id,
                   "--device", device, "--ready-file", str(ready),
                   "--auth-token-file", str(self.token_file)]  # fmt: skip
            if tls:
                certs = self.certificates
                cmd += ["--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file)]
            if plan_file is not None:
                cmd += ["--plan", str(plan_file), "--partition", str(partition)]
            if use_redis:
                from node_agent.redis_acl import USERS

                cmd += ["--redis", ",".join(state.redis_addresses), "--redis-user", USERS["agent"],
                        "--redis-password-env", PASSWORD_ENV]  # fmt: skip
                if state.redis_cluster:
                    cmd.append("--redis-cluster")
                if tls:
                    cmd += ["--redis-tls-ca", str(self.certificates.ca_file)]
            if use_rocksdb:
                cmd += ["--rocksdb", str(self.rocksdb_dir)]
                if rocksdb_shared:
                    cmd.append("--rocksdb-shared")
            if options.get("reflection"):
                cmd.append("--reflection")
            if options.get("sameNode"):  # same-node clients find it at logs/agent-<i>.sock
                cmd += ["--same-node-socket", str(logs / f"agent-{index}.sock")]
            if not use_redis and not use_rocksdb:
                cmd.append("--load")  # only the agent itself can fill its in-process hash map
            with open(agent_log, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)  # fmt: skip
            record = ProcessRecord.of("agent", proc.pid, log=str(agent_log), partition=partition,
                                      plan_version=plan.version if plan is not None else 0,
                                      writer=use_rocksdb and not rocksdb_shared, agent_id=agent_id,
                                      command=cmd)  # fmt: skip
            state.processes.append(record)
            self.write_state(state)
            launched.append((record, proc, ready))

        deadline = time.monotonic() + ready_timeout
        for record, proc, ready in launched:
            record.address = _wait_serving(Path(record.log).stem, proc, ready, Path(record.log), deadline=deadline,
                                           ca_file=self.certificates.ca_file if tls else None)  # fmt: skip
        self.write_state(state)
        return [record for record, _, _ in launched]

    def _load(self, model: ModelSpec, model_file: Path, *, redis_tables: Sequence[str], rocksdb_tables: Sequence[str],
              redis: Sequence[str], cluster: bool) -> None:  # fmt: skip
        """``hps load`` semantics, in this process, as the loader's Redis user: ``redis_tables`` into
        Redis, ``rocksdb_tables`` into RocksDB. Every source is opened and checked against the model
        before a store is opened, so a bad file (or a spec that does not match it) leaves the stores
        untouched."""
        from node_agent.loader import load_model, open_source
        from node_agent.tiers.base import TableLayout, Tier

        names = list(dict.fromkeys([*redis_tables, *rocksdb_tables]))
        for name in names:
            open_source(model.table(name), base_dir=model_file.parent)
        layouts = [TableLayout.of(t) for t in model.tables]
        redis_tier: Tier | None = None
        rocksdb_tier: Tier | None = None
        try:
            if redis_tables:
                from node_agent.tiers.redis_tier import RedisTier

                redis_tier = RedisTier(layouts, addresses=list(redis), access=self.redis_access("loader"),
                                       cluster=cluster, model=model.name)  # fmt: skip
            if rocksdb_tables:
                from node_agent.tiers.rocksdb_tier import RocksDBTier

                rocksdb_tier = RocksDBTier(self.rocksdb_dir, layouts)
            started = time.monotonic()
            both = [n for n in names if n in redis_tables and n in rocksdb_tables]
            for tables, tiers in ((both, [redis_tier, rocksdb_tier]),
                                  ([n for n in redis_tables if n not in both], [redis_tier]),
                                  ([n for n in rocksdb_tables if n not in both], [rocksdb_tier])):  # fmt: skip
                if tables:
                    load_model(model, tiers=[t for t in tiers if t is not None], base_dir=model_file.parent,
                               tables=tables)  # fmt: skip
            log.info("loaded tables %s into %s in %.1f s", ", ".join(names),
                     " and ".join(t.name for t in (redis_tier, rocksdb_tier) if t is not None),
                     time.monotonic() - started)  # fmt: skip
        finally:
            for tier in (redis_tier, rocksdb_tier):
                if tier is not None:
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
        credentials = self.client_credentials() if self.token_file.exists() else {}
        agents = [
            {**_agent_summary(current.model, e, timeout=timeout, credentials=credentials),
             "partition": partition_of.get(e, 0), "routed": True}
            for e in current.endpoints
        ] + [
            {**_agent_summary(current.model, a.address, timeout=timeout, credentials=credentials),
             "partition": a.partition or 0, "routed": False}
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
            "tls": bool(current.options.get("tls")),
            "credentials": self._credential_files(current),
            "processes": processes,
            "agents": agents,
        }

    # -- down ------------------------------------------------------------------------------------

    def down(self, *, purge: bool = False) -> list[ProcessRecord]:
        """Stops the agents, then Redis (SIGTERM, bounded wait, SIGKILL) and forgets their pids; the
        data (the tables with their updates, ``data.json``, ``plan.json``) stays unless ``purge``, so the
        next ``up`` serves it as it was. Returns the processes that were running. Safe to run twice."""
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
                for secret in (self.password_file, self.token_file, self.redis_users_file, self.redis_acl_file):
                    secret.unlink(missing_ok=True)
                shutil.rmtree(self.certificates.directory, ignore_errors=True)
                self.plan_file.unlink(missing_ok=True)
                self.data_file.unlink(missing_ok=True)
        if purge:
            (self.state_dir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.state_dir.rmdir()  # only when nothing of the user's is left in it
        return stopped

    @staticmethod
    def _stop(state: StackState) -> list[ProcessRecord]:
        # agents first: they hold Redis connections and would log errors while it goes away
        return stop_processes(state.agents()) + stop_processes(state.redis())


# ---------------------------------------------------------------------------------------------


def stop_processes(records: Sequence[ProcessRecord], *, timeout: float = _STOP_TIMEOUT_S) -> list[ProcessRecord]:
    """SIGTERM to every one at once, then :meth:`ProcessRecord.stop` on each (a bounded wait, SIGKILL
    for one that ignored it): agents shut down side by side, not one after the other. Returns those
    that were running."""
    running = [r for r in records if r.alive()]
    for record in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
    for record in running:
        record.stop(timeout=timeout)
    return running


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


def _pick(records: Sequence[ProcessRecord], index: int, role: str) -> ProcessRecord:
    if not 0 <= index < len(records):
        raise InvalidArgumentError(f"no {role} {index}: the stack runs {len(records)} ({role} 0 to {len(records) - 1}, "
                                   "as hps local status lists them)")  # fmt: skip
    return records[index]


def _option(command: Sequence[str], flag: str) -> str:
    return command[list(command).index(flag) + 1]


def _with_option(command: Sequence[str], flag: str, value: str) -> list[str]:
    out = list(command)
    out[out.index(flag) + 1] = value
    return out


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _wait_cluster_ok(servers: Sequence[Any], timeout: float = 30.0) -> None:
    """Restarted Cluster nodes rejoin from their nodes.conf; wait until every one says cluster_state:ok."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all("cluster_state:ok" in str(s.client().execute_command("CLUSTER", "INFO")) for s in servers):
                return
        except Exception:  # a node still loading its files
            pass
        time.sleep(0.1)
    raise UnavailableError(f"the Redis Cluster did not reach cluster_state:ok within {timeout:.0f} s")


def fingerprints(model_file: Path, *, agents: int, redis_cluster: int, port: int, use_redis: bool, device: str,
                 plan: Plan | None, same_node: bool = False, tls: bool = False,
                 reflection: bool = False) -> tuple[str, str]:  # fmt: skip
    """What ``up`` compares with the running stack: the fingerprint of everything (same: already up),
    and of what only a restart can change (same: a rebalance will do)."""
    # absent when off: older stacks keep their fingerprint. `credentials` is always there: a stack started
    # before its agents checked a token, and its processes used their own Redis users, is restarted by
    # the next up rather than left taking updates from anyone
    extra: dict[str, object] = {name: True for name, on in (("same_node", same_node), ("tls", tls),
                                                            ("reflection", reflection)) if on}  # fmt: skip
    extra["credentials"] = 1
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
                  deadline: float, ca_file: Path | None = None) -> str:  # fmt: skip
    """Waits for the agent's ready file, then for gRPC health SERVING on the port it names (over TLS,
    checked against ``ca_file``, when given); returns the endpoint. Fails early when the agent exits,
    and at ``deadline`` otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from node_agent.tls import ClientTLS

    credentials = ClientTLS(ca_file=ca_file).channel_credentials() if ca_file is not None else None

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
                channel = (grpc.secure_channel(endpoint, credentials) if credentials is not None
                           else grpc.insecure_channel(endpoint))  # fmt: skip
                with channel:
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


def _agent_summary(model: str, endpoint: str, *, timeout: float, credentials: Mapping[str, Any]) -> dict[str, Any]:
    """What one agent says of itself through Describe and Stats; ``answering: False`` with the
    reason when it does not answer."""
    from node_agent.client import Client

    summary: dict[str, Any] = {"endpoint": endpoint}
    try:
        with Client(endpoint, timeout=timeout, retries=0, **credentials) as client:
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
    summary["reasons"] = list(stats.get("degraded_reasons") or described.get("degraded_reasons") or [])
    updates = stats.get("updates")
    if isinstance(updates, Mapping):
        summary["updates"] = {k: updates.get(k) for k in (
            "store_writer", "last_applied_id", "applied_watermark", "applied_entries", "rejected_entries",
            "withdrawn_entries", "gaps", "missed_entries", "entries_behind", "lag_ms_p50", "lag_ms_p99", "reason")}  # fmt: skip
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
