"""Which agent writes the stores several agents share: exactly one at a time, and another takes over
within about a second when it is gone.

Two ways to decide, one per kind of sharing:

- :class:`RocksDBLockWriter`: agents on one machine share a RocksDB directory (``hps local``). RocksDB
  itself admits one writing process, so the writer is whoever holds its lock; the kernel drops the
  lock of a process that died, and a waiting agent opens the DB read-write in its place. The same
  agent writes the shared Redis too, so the two stores never have different writers.
- :class:`RedisLeaseWriter`: agents that share only Redis (each pod has its own RocksDB volume, or
  there is no persistent tier). A lease key in Redis (``SET NX PX``) names the writer; it renews it
  every ``ttl / 3`` and stops writing as soon as it cannot be sure it still holds it.

:class:`SharedStores` ties a writer to the :class:`~node_agent.tiers.shared.SharedTier` gates of one
agent's lookup path: the gates are open exactly while :meth:`SharedStores.poll` says this agent writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import redis

from node_agent.errors import UnavailableError
from node_agent.tiers.rocksdb_tier import RocksDBTier
from node_agent.tiers.shared import SharedTier

log = logging.getLogger(__name__)

#: how long a lease lives without renewal: the writer of a dead agent is replaced after at most this
DEFAULT_LEASE_TTL_MS = 3000


class StoreWriter(Protocol):
    """Decides whether this agent writes the shared stores now."""

    def holds(self) -> bool:
        """True while this agent is the writer (acquiring or renewing as needed; cheap to call often)."""
        ...

    def release(self) -> None:
        """Gives the role up (on a clean stop), so another agent takes over at once."""
        ...

    def describe(self) -> str: ...


class RocksDBLockWriter:
    """The writer is the agent that holds the shared RocksDB's write lock (see the module doc)."""

    def __init__(self, tier: RocksDBTier, *, retry_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.tier = tier
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._next_try = 0.0

    def holds(self) -> bool:
        if self.tier.is_writer:
            return True
        now = self._clock()
        if now < self._next_try:
            return False
        self._next_try = now + self._retry_interval_s
        return self.tier.try_promote()

    def release(self) -> None:
        """The lock goes with the DB when the tier closes."""

    def describe(self) -> str:
        return f"the write lock of rocksdb at {self.tier.path}"


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeaseWriter:
    """The writer is the agent whose identity the lease key ``key`` holds (see the module doc).

    ``connect`` returns the client of the Redis holding the key (the stream's). The holder renews every
    ``ttl_ms / 3``; it considers itself the writer only until ``ttl_ms / 2`` after its last successful
    renewal, so it stops writing well before another agent can acquire the lease."""

    def __init__(self, connect: Callable[[], redis.Redis | redis.RedisCluster], *, key: str, identity: str,
                 ttl_ms: int = DEFAULT_LEASE_TTL_MS, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.key = key
        self.identity = identity
        self._connect = connect
        self._ttl_ms = ttl_ms
        self._clock = clock
        self._held_until = 0.0
        self._next_try = 0.0
        self._client: redis.Redis | redis.RedisCluster | None = None

    def holds(self) -> bool:
        now = self._clock()
        if now >= self._next_try:
            self._next_try = now + self._ttl_ms / 3000
            try:
                if self._client is None:
                    self._client = self._connect()
                held = bool(self._client.eval(_RENEW, 1, self.key, self.identity, self._ttl_ms))
            except (redis.RedisError, UnavailableError) as exc:
                log.debug("lease %s not renewed: %s", self.key, exc)
                self._client = None
            else:
                if held and self._held_until <= now:
                    log.info("this agent (%s) now writes the shared stores (lease %s)", self.identity, self.key)
                self._held_until = now + self._ttl_ms / 2000 if held else 0.0
        return now < self._held_until

    def release(self) -> None:
        if self._client is None or self._held_until <= self._clock():
            return
        with contextlib.suppress(redis.RedisError):  # else it expires by itself
            self._client.eval(_RELEASE, 1, self.key, self.identity)
        self._held_until = 0.0

    def describe(self) -> str:
        return f"the lease {self.key}"


class SharedStores:
    """The tiers this agent shares with others, and who writes them.

    ``persistent`` is the shared (or this agent's own) RocksDB, if any: a secondary catches up with it
    before it refreshes its L1, and the writer records there the last update it applied, so a writer
    that starts later knows where the stores stand even if Redis came back older."""

    def __init__(self, writer: StoreWriter, gates: Sequence[SharedTier], *,
                 persistent: RocksDBTier | None = None) -> None:  # fmt: skip
        self.writer = writer
        self.gates = list(gates)
        self.persistent = persistent
        self._lock = threading.Lock()
        self._is_writer = False

    def poll(self) -> bool:
        """Whether this agent writes the shared stores now; opens or closes the gates to match."""
        with self._lock:
            held = self.writer.holds()
            if held != self._is_writer:
                for gate in self.gates:
                    gate.writable = held
                if not held:
                    log.warning("this agent no longer writes the shared stores (%s)", self.writer.describe())
                self._is_writer = held
            return held

    @property
    def is_writer(self) -> bool:
        return self._is_writer

    @contextlib.contextmanager
    def writes_held_back(self) -> Iterator[None]:
        """Closes the gates for a moment: the writer replaying entries the stores already hold refreshes
        its own tiers and L1 with them, but must not write older rows over newer ones in shared stores."""
        with self._lock:
            for gate in self.gates:
                gate.writable = False
        try:
            yield
        finally:
            with self._lock:
                for gate in self.gates:
                    gate.writable = self._is_writer

    def catch_up(self) -> None:
        """Reads what the writer wrote into a shared RocksDB (nothing to do for the writer)."""
        if self.persistent is not None and not self._is_writer:
            self.persistent.catch_up()

    def release(self) -> None:
        with self._lock:
            for gate in self.gates:
                gate.writable = False
            self._is_writer = False
            self.writer.release()
