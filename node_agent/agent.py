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
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from node_agent.errors import InvalidArgumentError
from node_agent.plan import Plan
from node_agent.server import RunningServer, StatsSource, serve
from node_agent.spec import ModelSpec, load_model_file
from node_agent.tiers.base import TableLayout, Tier
from node_agent.updates import UpdateConsumer, stream_name

if TYPE_CHECKING:
    from node_agent.lookup import LookupPath

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
    redis_password: str | None = None
    rocksdb: Path | None = None
    rocksdb_read_only: bool = False
    device: str = "auto"
    ready_file: Path | None = None
    load: bool = False
    #: names this agent's consumer group on the update stream; stable across restarts keeps its
    #: pending updates (default: ``<hostname>-p<partition>-<port>``)
    agent_id: str | None = None
    max_workers: int = 4
    max_batch_keys: int | None = None


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
        self.lookup: LookupPath | None = None
        self.consumer: UpdateConsumer | None = None
        self.server: RunningServer | None = None
        self._tiers: list[Tier] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> RunningServer:
        from node_agent.lookup import build_lookup_path

        opts = self.options
        volatile, persistent = self._build_tiers()
        if opts.load:
            self._load([t for t in (volatile, persistent) if t is not None])
        self.lookup = build_lookup_path(
            self.model, volatile=volatile, persistent=persistent, plan=self.plan,
            partition=opts.partition, device=opts.device,
        )  # fmt: skip
        extras: dict[str, StatsSource] = {}
        stream = ""
        if self.model.updates.enabled and opts.redis:
            stream = stream_name(self.model)
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
        )
        if stream:
            identity = opts.agent_id or f"{socket.gethostname()}-p{opts.partition}-{self.server.port}"
            self.consumer = UpdateConsumer(
                list(opts.redis), lookup=self.lookup, stream=stream, group=f"agent:{identity}",
                consumer=identity, password=opts.redis_password, cluster=opts.redis_cluster,
            ).start()  # fmt: skip
            # the servicer reads `extras` live, so the consumer's counters and health join Stats now
            extras["updates"] = self.consumer
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
        if self.server is not None:
            self.server.stop(grace)
        if self.consumer is not None:
            self.consumer.stop()
        if self.lookup is not None:
            self.lookup.close()
        else:
            for tier in self._tiers:
                tier.close()
        if self.options.ready_file is not None:
            Path(self.options.ready_file).unlink(missing_ok=True)

    # -- parts ---------------------------------------------------------------------------------

    def _build_tiers(self) -> tuple[Tier | None, Tier | None]:
        opts = self.options
        layouts = [TableLayout.of(t) for t in self.model.tables]
        volatile: Tier | None
        if opts.redis:
            from node_agent.tiers.redis_tier import RedisTier

            volatile = RedisTier(
                layouts, addresses=list(opts.redis), password=opts.redis_password,
                cluster=opts.redis_cluster, model=self.model.name,
            )  # fmt: skip
        elif self.model.volatile_store.type == "none" and opts.rocksdb is not None:
            volatile = None
        else:
            from node_agent.tiers.hashmap import HashMapTier

            volatile = HashMapTier(layouts)
        persistent: Tier | None = None
        if opts.rocksdb is not None:
            from node_agent.tiers.rocksdb_tier import RocksDBTier

            persistent = RocksDBTier(str(opts.rocksdb), layouts, read_only=opts.rocksdb_read_only)
        self._tiers = [t for t in (volatile, persistent) if t is not None]
        return volatile, persistent

    def _load(self, tiers: Sequence[Tier]) -> None:
        from node_agent.loader import load_model

        # a read-only RocksDB was filled by `hps load` elsewhere; only the other tiers take rows here
        writable = [t for t in tiers if not (t.name == "rocksdb" and self.options.rocksdb_read_only)]
        log.info("loading model %s into %s", self.model.name, ", ".join(t.name for t in writable))
        load_model(self.model, tiers=writable, base_dir=Path(self.options.model_file).resolve().parent)

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
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(ready, sort_keys=True))
        partial.replace(path)  # whoever polls for the file never reads half of it


def run_agent(options: AgentOptions) -> int:
    """Runs an agent until SIGTERM or SIGINT, then stops it cleanly; returns the exit code."""
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
    finally:
        agent.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
