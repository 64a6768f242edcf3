"""Background health of an agent's tiers: each is probed every ``interval_s`` (0.5 s), so an idle agent
reports ``Degraded`` as soon as a tier stops answering, not when a lookup first hits it; and a Redis
that comes back without its data, or with other data, is noticed and repaired, never served silently.

How a Redis that lost its data is told apart from one that did not: every Redis the agents use holds a
small *epoch* key (``hps:{<model>}:epoch``: a random id, the id it replaced, when it was made), written
when the data is loaded. The probe remembers the epoch it saw; when the key is gone, the server came
back empty (restarted without persistence, or its files were lost). Then:

1. every agent drops its L1 (rows it holds may be ones the stores no longer have) and reports
   ``Degraded`` with the reason;
2. the store writer (:mod:`node_agent.store_writer`) clears what is left of the model's rows in that
   Redis (a server restored from an older file would serve older rows) and writes a new epoch naming
   the old one. L2 refills from L3, which the writer kept up to date;
3. the other agents see the new epoch naming the one they knew, drop their L1 again (the writer's
   repair may have raced their fills), read what the writer wrote to a shared RocksDB, and clear.

An epoch replaced by one that does not name the old one (``hps load`` reloaded the tables) makes the
agents drop their L1 and take the new one, without degrading. A Redis that comes back *older* with
its epoch intact is found by the update consumer (its stream ends before what the stores applied) and
repaired the same way (:meth:`TierProbe.request_repair`). Without a persistent tier there is nothing
to repair from: the agent stays ``Degraded`` with the reason until the tables are loaded again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from node_agent.errors import InvalidArgumentError, UnavailableError
from node_agent.redis_access import RedisAccess, access_of

if TYPE_CHECKING:
    from node_agent.lookup import LookupPath
    from node_agent.store_writer import SharedStores
    from node_agent.tiers.base import Tier
    from node_agent.tiers.rocksdb_tier import RocksDBTier

log = logging.getLogger(__name__)

DEFAULT_PROBE_INTERVAL_S = 0.5
#: a loss reported this soon after a repair is taken to be the one repaired (see request_repair)
REPAIR_COVERS_S = 10.0


def epoch_key(model: str) -> str:
    """The key naming the data generation a model's Redis holds (in the model's hash slot)."""
    return f"hps:{{{model}}}:epoch"


def loaded_key(model: str) -> str:
    """The hash of what each table was loaded from (table → source fingerprint), beside the epoch."""
    return f"hps:{{{model}}}:loaded"


@dataclass(frozen=True)
class Epoch:
    """One data generation of a Redis: ``id`` is random; ``previous`` the id it replaced after a repair."""

    id: str
    previous: str = ""
    created_ms: int = 0

    def encode(self) -> str:
        return f"{self.id} {self.previous or '-'} {self.created_ms}"

    @classmethod
    def decode(cls, raw: Any) -> Epoch:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        parts = text.split()
        if not parts:
            raise ValueError(f"empty epoch {text!r}")
        previous = parts[1] if len(parts) > 1 and parts[1] != "-" else ""
        created = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        return cls(parts[0], previous, created)

    @classmethod
    def new(cls, previous: str = "") -> Epoch:
        return cls(secrets.token_hex(8), previous, int(time.time() * 1000))


def read_epoch(client: redis.Redis | redis.RedisCluster, model: str) -> Epoch | None:
    raw = client.get(epoch_key(model))
    if raw is None:
        return None
    try:
        return Epoch.decode(raw)
    except ValueError:
        return None


def write_epoch(client: redis.Redis | redis.RedisCluster, model: str, *, previous: str = "",
                only_if_absent: bool = False) -> Epoch:  # fmt: skip
    """Writes a new epoch (what the loader does after loading, and the writer after a repair) and returns
    the one the server now holds (another agent's, when ``only_if_absent`` lost the race)."""
    epoch = Epoch.new(previous)
    if client.set(epoch_key(model), epoch.encode(), nx=only_if_absent):
        return epoch
    current = read_epoch(client, model)
    return current if current is not None else epoch


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgumentError(f"Redis address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def redis_clients(addresses: Sequence[str], *, access: RedisAccess | None, cluster: bool,
                  timeout: float) -> list[tuple[str, redis.Redis | redis.RedisCluster]]:  # fmt: skip
    """One client per standalone address (each shard holds its own epoch), or one for a Cluster."""
    options: dict[str, Any] = {**access_of(access).client_options(), "socket_timeout": timeout,
                               "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}  # fmt: skip
    if cluster:
        nodes = [ClusterNode(*split_address(a)) for a in addresses]

        def make_cluster() -> redis.RedisCluster:
            return redis.RedisCluster(startup_nodes=nodes, **options)

        return [(",".join(addresses), _LazyCluster(make_cluster))]  # type: ignore[list-item]
    return [(a, redis.Redis(*split_address(a), **options)) for a in addresses]


class _LazyCluster:
    """A RedisCluster client made on first use: its constructor needs a live node, the probe must not."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._client: redis.RedisCluster | None = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            try:
                self._client = self._make()
            except redis.exceptions.RedisClusterException as exc:
                raise redis.ConnectionError(str(exc)) from None
        return getattr(self._client, name)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(redis.RedisError):
                self._client.close()
            self._client = None


@dataclass
class _Target:
    label: str
    client: Any
    up: bool = True
    checked: bool = False
    last_error: str = ""
    failures: int = 0
    epoch: Epoch | None = None
    #: set while this Redis lost its data (or came back older) and the repair has not finished
    reset: str = ""


class TierProbe:
    """Probes the agent's tiers every ``interval_s`` on a thread of its own, and repairs a Redis that
    came back without its data (see the module doc). ``degraded`` and :meth:`stats` are what the agent
    reports; ``on_reset`` (if given) is told the reason whenever a reset is found.

    ``volatile`` is the Redis tier as the lookup path holds it (the shared gate), ``persistent`` a
    RocksDB tier; ``shared`` says whether this agent is the store writer (None: it writes its stores).
    The update consumer keeps that role current; ``poll_role`` makes the probe do it when there is none."""

    def __init__(
        self,
        *,
        model: str,
        lookup: LookupPath,
        redis_addresses: Sequence[str] = (),
        redis_access: RedisAccess | None = None,
        redis_cluster: bool = False,
        volatile: Tier | None = None,
        persistent: RocksDBTier | None = None,
        shared: SharedStores | None = None,
        interval_s: float = DEFAULT_PROBE_INTERVAL_S,
        timeout_s: float = 0.5,
        poll_role: bool = False,
    ) -> None:
        self.model = model
        self._lookup = lookup
        self._volatile = volatile
        self._persistent = persistent
        self._shared = shared
        self._poll_role = poll_role
        self._interval_s = interval_s
        clients = redis_clients(redis_addresses, access=redis_access, cluster=redis_cluster,
                                timeout=timeout_s) if redis_addresses else []  # fmt: skip
        self._targets = [_Target(label, client) for label, client in clients]
        self._rocksdb_error = ""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._requested: str = ""
        self._counters = {"probes": 0, "resets": 0, "repairs": 0, "replaced": 0, "l1_invalidations": 0}
        self._last_probe_ms = 0
        self._last_repair = -REPAIR_COVERS_S

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TierProbe:
        """Probes once now (so the first answer is known before the agent serves), then in the background."""
        self.probe_once()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hps-tier-probe", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
        for target in self._targets:
            with contextlib.suppress(Exception):
                target.client.close()

    def _run(self) -> None:
        """Runs until :meth:`stop`; a failing probe is a finding, never the end of the thread."""
        while not self._stopping.wait(self._interval_s):
            try:
                self.probe_once()
            except Exception:  # a bug here must not end the probing silently
                log.exception("tier probe failed")

    # -- what Describe/Stats read --------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return bool(self.reasons())

    def reasons(self) -> list[str]:
        """Why this agent is degraded, one line per tier (empty when every tier answers)."""
        out = []
        with self._lock:
            for t in self._targets:
                if not t.up:
                    out.append(f"redis {t.label} unreachable: {t.last_error}")
                elif t.reset:
                    out.append(f"redis {t.label}: {t.reset}")
            if self._rocksdb_error:
                out.append(self._rocksdb_error)
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            redis_targets = {
                t.label: {"up": t.up, "last_error": t.last_error, "epoch": t.epoch.id if t.epoch else None,
                          "reset": t.reset}
                for t in self._targets
            }  # fmt: skip
            counters = dict(self._counters)
        return {**counters, "degraded": self.degraded, "reasons": self.reasons(), "redis": redis_targets,
                "rocksdb_error": self._rocksdb_error, "interval_s": self._interval_s,
                "last_probe_ms": self._last_probe_ms}  # fmt: skip

    # -- probing -------------------------------------------------------------------------------

    def request_repair(self, reason: str) -> None:
        """Another part of the agent found that Redis came back older than the stores (the update
        consumer, from the stream); handled on the next probe like a lost epoch. The same loss seen
        again right after a repair (the consumer looks at the stream less often) is that repair's."""
        with self._lock:
            if time.monotonic() - self._last_repair < REPAIR_COVERS_S:
                log.info("%s: already repaired", reason)
                return
            if not self._requested:
                log.error("%s: repairing", reason)
            self._requested = reason

    def probe_once(self) -> None:
        """One round: a repair another part asked for, every Redis (PING and its epoch), the RocksDB
        tier, then the repair if one is due."""
        with self._lock:
            requested, self._requested = self._requested, ""
            self._counters["probes"] += 1
        if requested and time.monotonic() - self._last_repair >= REPAIR_COVERS_S:
            self._invalidate_l1()
            with self._lock:
                self._counters["resets"] += 1
            if self._is_writer():
                # only the writer repairs; the others follow the new epoch it writes (waiting here for
                # one more would wait for good when the writer's repair came first)
                for target in self._targets:
                    if target.up and not target.reset:
                        target.reset = requested
        for target in self._targets:
            self._probe_redis(target)
        if self._persistent is not None:
            try:
                self._persistent.probe()
                if self._shared is not None:
                    # a secondary of the writer's RocksDB reads what it wrote at least this often, also
                    # rows of entries this agent never applies itself (its group started past them)
                    self._shared.catch_up()
                error = ""
            except UnavailableError as exc:
                error = str(exc)
            if error != self._rocksdb_error:
                (log.warning if error else log.info)("rocksdb probe: %s", error or "answering again")
            self._rocksdb_error = error
        self._last_probe_ms = int(time.time() * 1000)
        if any(t.reset and t.up for t in self._targets):
            self._repair()
        # a tier the lookup path found down answers the probe again (and holds its data): taken back
        # now, so the agent stops reporting it degraded without waiting for a lookup to try it
        if self._targets and all(t.up and not t.reset for t in self._targets):
            self._lookup.tier_answers("volatile")
        if self._persistent is not None and not self._rocksdb_error:
            self._lookup.tier_answers("persistent")

    def _probe_redis(self, target: _Target) -> None:
        try:
            target.client.ping()
            current = read_epoch(target.client, self.model)
        except (redis.RedisError, OSError) as exc:
            if target.up:
                log.warning("redis %s unreachable (probe): %s", target.label, exc)
            with self._lock:
                target.up = False
                target.failures += 1
                target.last_error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            return
        if not target.up:
            log.info("redis %s answers again", target.label)
        with self._lock:
            target.up = True
            target.last_error = ""
        known = target.epoch
        if known is None and not target.checked:
            # first contact: what is there is this agent's starting point (a missing epoch is made)
            target.checked = True
            target.epoch = current if current is not None else self._adopt_missing(target)
            return
        target.checked = True
        if current is not None and known is not None and current.id == known.id:
            return
        if current is None:
            if not target.reset:
                target.reset = (f"came back without its data (epoch {known.id if known else '?'} is gone): "
                                "repairing from the persistent tier")  # fmt: skip
                log.error("redis %s %s", target.label, target.reset)
                with self._lock:
                    self._counters["resets"] += 1
                self._invalidate_l1()
            return
        # a new epoch: the writer's repair of the one we knew, or a reload (hps load)
        repaired = known is not None and current.previous == known.id
        if repaired:
            log.info("redis %s repaired by the store writer (epoch %s -> %s)", target.label,
                     known.id if known else "?", current.id)  # fmt: skip
            self._count("repairs")
            self._last_repair = time.monotonic()
        else:
            log.warning("redis %s holds another data generation (epoch %s, this agent knew %s): the tables "
                        "were loaded again; dropping L1", target.label, current.id, known.id if known else "none")  # fmt: skip
            self._count("replaced")
        if self._shared is not None:
            with contextlib.suppress(UnavailableError):
                self._shared.catch_up()
        self._invalidate_l1()
        target.epoch = current
        target.reset = ""

    def _adopt_missing(self, target: _Target) -> Epoch | None:
        try:
            return write_epoch(target.client, self.model, only_if_absent=True)
        except redis.RedisError as exc:
            log.warning("redis %s: cannot record its data epoch: %s", target.label, exc)
            target.checked = False  # try again on the next probe
            return None

    def _is_writer(self) -> bool:
        if self._shared is None:
            return True
        return self._shared.poll() if self._poll_role else self._shared.is_writer

    def _repair(self) -> None:
        """The writer clears the model's rows from the Redis servers that lost their data (an older file
        would serve older rows; L2 refills from L3) and writes a new epoch naming the old one."""
        if not self._is_writer():
            return  # the writer repairs; this agent waits for the new epoch
        if self._persistent is None:
            for target in self._targets:
                if target.reset and "no persistent tier" not in target.reset:
                    target.reset += ("; there is no persistent tier to repair it from: load the tables "
                                     "again (hps load, or hps local restart redis)")  # fmt: skip
            return
        volatile = getattr(self._volatile, "inner", self._volatile)
        try:
            if volatile is not None:
                for table in self._lookup.tables():
                    volatile.evict(table)
            self._invalidate_l1()
            for target in self._targets:
                if target.reset and target.up:
                    previous = target.epoch.id if target.epoch is not None else ""
                    target.epoch = write_epoch(target.client, self.model, previous=previous)
                    log.info("redis %s repaired: its rows of model %s cleared (L2 refills from L3), epoch %s "
                             "-> %s", target.label, self.model, previous or "none", target.epoch.id)  # fmt: skip
                    target.reset = ""
            self._count("repairs")
            self._last_repair = time.monotonic()
        except (redis.RedisError, UnavailableError) as exc:
            log.warning("repairing redis failed, trying again on the next probe: %s", exc)

    def _invalidate_l1(self) -> None:
        self._lookup.invalidate_l1()
        self._count("l1_invalidations")

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1
