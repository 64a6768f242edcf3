"""The node agent process (``hps agent``): builds one model's tiers and lookup path, serves them over
gRPC, consumes the model's online updates, and stops cleanly on SIGTERM.

Without Redis the volatile tier is an in-process hash map (the embedded default); no other process
can fill it, so ``load=True`` loads the tables from their sources before the agent reports ready.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from node_agent.auth import AuthOptions
from node_agent.errors import InvalidArgumentError, UnavailableError
from node_agent.metrics import MetricsServer
from node_agent.plan import Plan
from node_agent.redis_access import RedisAccess
from node_agent.same_node import SameNodeServer
from node_agent.server import RunningServer, StatsSource, serve
from node_agent.spec import ModelSpec, load_model_file
from node_agent.store_writer import RedisLeaseWriter, RocksDBLockWriter, SharedStores, StoreWriter
from node_agent.tiers.base import TableLayout, Tier
from node_agent.tiers.health import TierProbe
from node_agent.tiers.shared import SharedTier
from node_agent.tls import ServerTLS
from node_agent.updates import (
    StreamPosition,
    UpdateConsumer,
    connect_stream_redis,
    coordination_key,
    stable_consumer_identity,
    stream_name,
    stream_position,
)

if TYPE_CHECKING:
    from node_agent.lookup import LookupPath
    from node_agent.tiers.rocksdb_tier import RocksDBTier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    """Everything ``hps agent`` takes on its command line."""

    model_file: Path
    plan_file: Path | None = None
    partition: int = 0
    host: str = "127.0.0.1"
    port: int = 50051
    redis: tuple[str, ...] = ()
    redis_cluster: bool = False
    #: the agent's Redis user, password and TLS (``--redis-user``, ``--redis-password-env``, ``--redis-tls*``)
    redis_access: RedisAccess | None = None
    rocksdb: Path | None = None
    rocksdb_read_only: bool = False
    #: the RocksDB directory is shared with other agents on this machine: the one holding its lock
    #: writes it (and the shared Redis), the others read it as secondaries (see RocksDBTier)
    rocksdb_shared: bool = False
    device: str = "auto"
    ready_file: Path | None = None
    load: bool = False
    #: names this agent's consumer group on the update stream; stable across restarts keeps its
    #: pending updates (default: :func:`~node_agent.updates.stable_consumer_identity`)
    agent_id: str | None = None
    #: how long a start may wait for the update stream's replay before reporting ready
    catch_up_timeout_s: float = 30.0
    #: serve Prometheus metrics on this port (0 picks a free one); None serves none
    metrics_port: int | None = None
    #: how often the tiers are probed in the background (Degraded shows without traffic)
    probe_interval_s: float = 0.5
    max_workers: int = 4
    max_batch_keys: int | None = None
    #: also serve lookups to clients on this node on this Unix socket (:mod:`node_agent.same_node`)
    same_node_socket: Path | None = None
    #: on SIGTERM, answer health checks NOT_SERVING this long while still serving lookups: the pod
    #: fails its readiness probe and leaves the Service's endpoints before it stops answering
    drain_s: float = 0.0
    #: serve gRPC over TLS with these files (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``)
    tls: ServerTLS | None = None
    #: who may call what (``--auth-*``); the default refuses every Update until a credential source is given
    auth: AuthOptions = field(default_factory=AuthOptions)
    #: serve gRPC server reflection (``--reflection``)
    reflection: bool = False


class Agent:
    """One running node agent. :meth:`start` returns once it serves; :meth:`stop` undoes it all."""

    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.model: ModelSpec = load_model_file(options.model_file)
        self.plan: Plan | None = (
            Plan.from_json(Path(options.plan_file).read_text()) if options.plan_file is not None else None
        )
        if options.partition < 0:
            raise InvalidArgumentError(f"--partition must not be negative, got {options.partition}")
        if options.rocksdb_shared and options.rocksdb_read_only:
            raise InvalidArgumentError("--rocksdb-shared and --rocksdb-read-only contradict each other: give one")
        # checked before anything starts: a flag that contradicts another fails the start, not a call
        self.guard = options.auth.guard()
        if not self.guard.authenticators and not self.guard.open_writes:
            log.warning("no credential can be checked (no --auth-token-file, --auth-token-env or "
                        "--auth-tokenreview): every Update RPC will be refused")  # fmt: skip
        self.lookup: LookupPath | None = None
        self.consumer: UpdateConsumer | None = None
        self.server: RunningServer | None = None
        self.metrics: MetricsServer | None = None
        self.same_node: SameNodeServer | None = None
        self.probe: TierProbe | None = None
        self.shared: SharedStores | None = None
        self._tiers: list[Tier] = []
        self._rocksdb: RocksDBTier | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> RunningServer:
        from node_agent.lookup import build_lookup_path

        opts = self.options
        stream = stream_name(self.model) if self.model.updates.enabled and opts.redis else ""
        # Where the update stream stands BEFORE any row is read: a new consumer group starts there, so
        # nothing published while this agent builds its tiers is missed.
        position = self._stream_position(stream) if stream else None
        volatile, persistent = self._build_tiers()
        self.shared = self._shared_stores(volatile, persistent, stream)
        if opts.load:
            self._load(volatile, persistent)
        self.lookup = build_lookup_path(
            self.model, volatile=volatile, persistent=persistent, plan=self.plan,
            partition=opts.partition, device=opts.device,
        )  # fmt: skip
        self.probe = TierProbe(
            model=self.model.name, lookup=self.lookup, redis_addresses=list(opts.redis),
            redis_access=opts.redis_access, redis_cluster=opts.redis_cluster, volatile=volatile,
            persistent=self._rocksdb, shared=self.shared, interval_s=opts.probe_interval_s,
            poll_role=not stream,
        ).start()  # fmt: skip
        extras: dict[str, StatsSource] = {"tiers": self.probe}
        self.server = serve(
            self.lookup,
            model=self.model.name,
            host=opts.host,
            port=opts.port,
            max_batch_keys=opts.max_batch_keys or self.model.agent.max_batch_keys,
            max_workers=opts.max_workers,
            plan=self.plan,
            partition=opts.partition,
            updates_stream=stream,
            extras=extras,
            update_refusal=self._update_refusal(stream),
            tls=opts.tls,
            guard=self.guard,
            reflection=opts.reflection,
        )
        if opts.same_node_socket is not None:
            self.same_node = SameNodeServer(self.server.servicer, opts.same_node_socket).start()
        if stream:
            self._start_consumer(stream, position)
        if opts.metrics_port is not None:
            server = self.server
            self.metrics = MetricsServer(self.server.servicer, partition=opts.partition, host=opts.host,
                                         port=opts.metrics_port, healthy=lambda: server.serving)  # fmt: skip
        log.info(
            "agent for model %s partition %d serving on %s; L1 on %s; L2 %s; L3 %s; updates %s",
            self.model.name, opts.partition, self.server.endpoint, self.server.servicer.device,
            volatile.name if volatile is not None else "none",
            persistent.name if persistent is not None else "none", stream or "off",
        )  # fmt: skip
        if opts.ready_file is not None:
            self._write_ready_file(opts.ready_file)
        return self.server

    def stop(self, grace: float = 1.0) -> None:
        """Stops serving (NOT_SERVING first, RPCs in flight finish), the consumer, then the tiers."""
        if self.metrics is not None:
            self.metrics.stop()
        if self.same_node is not None:
            self.same_node.stop()
        if self.server is not None:
            self.server.stop(grace)
        if self.consumer is not None:
            self.consumer.stop()
        if self.probe is not None:
            self.probe.stop()
        if self.shared is not None:
            self.shared.release()
        if self.lookup is not None:
            self.lookup.close()
        else:
            for tier in self._tiers:
                tier.close()
        if self.options.ready_file is not None:
            Path(self.options.ready_file).unlink(missing_ok=True)

    # -- parts ---------------------------------------------------------------------------------

    def _stream_position(self, stream: str) -> StreamPosition | None:
        opts = self.options
        try:
            return stream_position(list(opts.redis), stream, access=opts.redis_access,
                                   cluster=opts.redis_cluster)  # fmt: skip
        except UnavailableError as exc:
            log.warning("update stream %s unreachable at start (%s): a new group replays its history", stream, exc)
            return None

    def _start_consumer(self, stream: str, position: StreamPosition | None) -> None:
        """Consumes the model's updates in this agent's own group. An agent that loaded its tiers from
        the sources replays the stream's retained history over them (updates are overwrites, applied in
        order); one on shared stores starts where they stand (the applied watermark); otherwise a new
        group starts where the stream stood before the tiers were read. Until the replay is applied,
        gRPC health says NOT_SERVING, so nothing routes to rows about to change."""
        opts = self.options
        assert self.server is not None and self.lookup is not None and self.probe is not None
        own_state = opts.rocksdb if opts.rocksdb is not None and not (opts.rocksdb_read_only or opts.rocksdb_shared) else None
        # Without a state directory the bound port keeps two agents of one partition on one host in
        # separate groups (each must refresh its own L1); pass --agent-id for a name that survives restarts.
        identity = opts.agent_id or stable_consumer_identity(
            self.model.name, opts.partition, state_dir=own_state, instance=opts.port or self.server.port
        )
        start_id: str | StreamPosition = "0" if opts.load or position is None else position
        self.server.set_serving(False)
        self.consumer = UpdateConsumer(
            list(opts.redis), lookup=self.lookup, stream=stream, group=f"agent:{identity}",
            consumer=identity, access=opts.redis_access, cluster=opts.redis_cluster,
            start_id=start_id, reset_group=opts.load, shared=self.shared,
            on_store_regression=self.probe.request_repair, epoch_key=self._epoch_key_beside(stream),
        ).start()  # fmt: skip
        # Stats, Describe and the metrics read it from now on; Update RPCs go through the stream
        self.server.servicer.add_stats_source("updates", self.consumer)
        self.server.servicer.set_updater(self._commit)
        if not self.consumer.wait_caught_up(opts.catch_up_timeout_s):
            log.warning("update stream %s not caught up after %.0f s; serving anyway, degraded until it is",
                        stream, opts.catch_up_timeout_s)  # fmt: skip
        self.server.set_serving(True)

    def _epoch_key_beside(self, stream: str) -> str | None:
        """The model's epoch key, when a script may use it with the stream (a Redis Cluster needs both
        in one hash slot: a custom ``spec.updates.stream`` may lie elsewhere)."""
        from node_agent.tiers.health import epoch_key

        if self.options.redis_cluster and f"{{{self.model.name}}}" not in stream:
            return None
        return epoch_key(self.model.name)

    def _commit(self, table: str, keys: Any, vectors: Any, timeout_s: float) -> str:
        assert self.consumer is not None
        return self.consumer.commit(table, keys, vectors, timeout_s=timeout_s)

    def _update_refusal(self, stream: str) -> str:
        """Why the Update RPC cannot apply updates on this agent ("" when it can): without an update
        stream it writes only its own tiers, which is right only when no other agent shares them."""
        opts = self.options
        if stream:
            return ""
        if not self.model.updates.enabled and opts.redis:
            return f"updates are off for model {self.model.name} (spec.updates.enabled: false)"
        if opts.rocksdb_shared or opts.rocksdb_read_only:
            how = "shares its RocksDB with other agents" if opts.rocksdb_shared else "opened its RocksDB read-only"
            return (f"this agent {how} and there is no update stream to reach them (no Redis): updates need "
                    "Redis (volatileStore.type: redis), or a single agent with its own RocksDB")  # fmt: skip
        return ""

    def _shared_stores(self, volatile: Tier | None, persistent: Tier | None, stream: str) -> SharedStores | None:
        """The gates of the tiers other agents share, and how this agent learns it is their writer."""
        gates = [t for t in (volatile, persistent) if isinstance(t, SharedTier)]
        if not gates:
            return None
        opts = self.options
        writer: StoreWriter
        if self._rocksdb is not None and opts.rocksdb_shared:
            writer = RocksDBLockWriter(self._rocksdb)
        else:
            identity = opts.agent_id or f"{self.model.name}-p{opts.partition}-{os.getpid()}-{id(self)}"
            redis_addresses = list(opts.redis)
            writer = RedisLeaseWriter(
                lambda: connect_stream_redis(redis_addresses, access=opts.redis_access, cluster=opts.redis_cluster),
                key=coordination_key(stream or stream_name(self.model), "writer"), identity=identity,
            )  # fmt: skip
        own_rocksdb = self._rocksdb if self._rocksdb is not None and not opts.rocksdb_read_only else None
        shared = SharedStores(writer, gates, persistent=own_rocksdb)
        shared.poll()
        return shared

    def _build_tiers(self) -> tuple[Tier | None, Tier | None]:
        """L2 and L3 as the lookup path holds them: a shared store wrapped in its write gate."""
        opts = self.options
        layouts = [TableLayout.of(t) for t in self.model.tables]
        volatile: Tier | None
        if opts.redis:
            from node_agent.tiers.redis_tier import RedisTier

            volatile = SharedTier(RedisTier(
                layouts, addresses=list(opts.redis), access=opts.redis_access,
                cluster=opts.redis_cluster, model=self.model.name,
            ))  # fmt: skip
        elif self.model.volatile_store.type == "none" and opts.rocksdb is not None:
            volatile = None
        else:
            from node_agent.tiers.hashmap import HashMapTier

            volatile = HashMapTier(layouts)
        persistent: Tier | None = None
        if opts.rocksdb is not None:
            from node_agent.tiers.rocksdb_tier import RocksDBTier

            try:
                self._rocksdb = RocksDBTier(str(opts.rocksdb), layouts, read_only=opts.rocksdb_read_only,
                                            shared=opts.rocksdb_shared)  # fmt: skip
            except BaseException:
                if volatile is not None:
                    volatile.close()
                raise
            persistent = SharedTier(self._rocksdb) if opts.rocksdb_shared else self._rocksdb
        self._tiers = [t for t in (volatile, persistent) if t is not None]
        return volatile, persistent

    def _load(self, volatile: Tier | None, persistent: Tier | None) -> None:
        """Loads the tables from their sources into the tiers that are this agent's own (the in-process
        hash map, a RocksDB no other agent uses) and into a shared Redis only while it holds no data
        generation yet (nothing loaded it: it cannot hold newer rows)."""
        from node_agent.loader import load_model
        from node_agent.tiers.health import read_epoch, redis_clients, write_epoch

        opts = self.options
        targets: list[Tier] = []
        if volatile is not None and not isinstance(volatile, SharedTier):
            targets.append(volatile)
        if self._rocksdb is not None and not (opts.rocksdb_read_only or opts.rocksdb_shared):
            targets.append(self._rocksdb)
        clients = redis_clients(list(opts.redis), access=opts.redis_access, cluster=opts.redis_cluster,
                                timeout=2.0) if isinstance(volatile, SharedTier) else []  # fmt: skip
        fresh_redis = False
        try:
            if clients and all(read_epoch(c, self.model.name) is None for _, c in clients):
                assert isinstance(volatile, SharedTier)
                targets.append(volatile.inner)
                fresh_redis = True
            elif clients:
                log.info("--load: Redis already holds a data generation of model %s (it may hold newer rows "
                         "than the sources): not loading it", self.model.name)  # fmt: skip
        except Exception as exc:  # Redis down: the agent serves from its other tiers and reports degraded
            log.warning("--load: Redis cannot be asked whether it holds data (%s): not loading it", exc)
        if not targets:
            log.info("--load: every tier of model %s is shared or read-only; they were filled elsewhere",
                     self.model.name)  # fmt: skip
            return
        log.info("loading model %s into %s", self.model.name, ", ".join(t.name for t in targets))
        load_model(self.model, tiers=targets, base_dir=Path(opts.model_file).resolve().parent)
        if self._rocksdb in targets and self._rocksdb is not None:
            # what the stores held before is gone: no update stands applied in them any more
            self._rocksdb.put_meta(f"updates-applied:{stream_name(self.model)}", "")
        if fresh_redis:
            for _, client in clients:
                write_epoch(client, self.model.name)
        for _, client in clients:
            client.close()

    def _write_ready_file(self, path: Path) -> None:
        assert self.server is not None
        ready: dict[str, Any] = {
            "model": self.model.name,
            "host": self.server.host,
            "port": self.server.port,
            "endpoint": self.server.endpoint,
            "partition": self.options.partition,
            "device": self.server.servicer.device,
            "pid": os.getpid(),
            "metricsPort": self.metrics.port if self.metrics is not None else None,
            "sameNodeSocket": str(self.same_node.path) if self.same_node is not None else None,
            "tls": self.server.tls is not None,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(ready, sort_keys=True))
        partial.replace(path)  # whoever polls for the file never reads half of it


def run_agent(options: AgentOptions) -> int:
    """Runs an agent until SIGTERM or SIGINT, then stops it cleanly; returns the exit code."""
    from node_agent.allocator import keep_freed_memory

    keep_freed_memory()  # every lookup allocates and frees answer-sized buffers: keep them (see there)
    agent = Agent(options)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.start()
        while not stopping.wait(1.0):
            pass
        if options.drain_s > 0 and agent.server is not None:
            log.info("draining: NOT_SERVING for %.0f s while lookups are still answered", options.drain_s)
            agent.server.set_serving(False)
            time.sleep(options.drain_s)
    finally:
        agent.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
