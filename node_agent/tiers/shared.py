"""A store several agents share (Redis, a RocksDB directory on one machine) is written by one of them.

When every agent writes every update into a shared store, their writes interleave: a slow agent can
put an older row back after a faster one wrote the newer, and a third agent that misses its L1 in that
moment caches the older row for good. So each shared tier is wrapped in a :class:`SharedTier`: reads
pass through, writes (updates, the L3 → L2 write-back of the lookup path) reach the store only while
this agent is the store's writer (:mod:`node_agent.store_writer` decides which agent that is). The
other agents refresh only their own L1, and only once the writer has applied the update (see
:mod:`node_agent.updates`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from node_agent.tiers.base import Tier


class SharedTier:
    """``inner`` as the lookup path sees it: reads always, writes only while :attr:`writable`."""

    def __init__(self, inner: Tier) -> None:
        self.inner = inner
        self.name = inner.name
        self._writable = False
        self._lock = threading.Lock()
        self._skipped_writes = 0

    @property
    def writable(self) -> bool:
        return self._writable

    @writable.setter
    def writable(self, value: bool) -> None:
        self._writable = bool(value)

    # -- Tier ----------------------------------------------------------------------------------

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.fetch(table, keys)

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        if self._writable:
            self.inner.insert(table, keys, values)
            return
        with self._lock:
            self._skipped_writes += 1

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        if self._writable:
            self.inner.evict(table, keys)
            return
        with self._lock:
            self._skipped_writes += 1

    def count(self, table: str) -> int:
        return self.inner.count(table)

    def stats(self) -> Mapping[str, int | float | str]:
        with self._lock:
            skipped = self._skipped_writes
        return {**dict(self.inner.stats()), "shared": 1, "writer": int(self._writable),
                "writes_left_to_the_writer": skipped}  # fmt: skip

    def close(self) -> None:
        self.inner.close()
