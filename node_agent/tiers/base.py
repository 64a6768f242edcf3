"""The one interface every storage tier behind the L1 cache implements (HPS's database backend).

The lookup path composes tiers without knowing which it holds: L2 volatile (Redis, in-process hash
map) and L3 persistent (RocksDB). Adding a tier touches one file. All arrays are NumPy on the host:
keys are ``int64``, values are ``(n, dim)`` in the table's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from node_agent.spec import TableSpec


@dataclass(frozen=True)
class TableLayout:
    """What a tier needs to know of a table to store and return its rows."""

    name: str
    dim: int
    dtype: np.dtype

    @classmethod
    def of(cls, table: TableSpec) -> TableLayout:
        return cls(table.name, table.dim, np.dtype(table.dtype))

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize


@runtime_checkable
class Tier(Protocol):
    """A key → vector store for several tables.

    ``fetch`` never raises for missing keys (they come back in the mask); it raises
    :class:`~node_agent.errors.UnavailableError` when the store cannot be reached, so the lookup
    path can go on to the next tier and report itself degraded.
    """

    #: short name for stats and logs: ``redis``, ``hashmap``, ``rocksdb``
    name: str

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys`` (unique int64): ``(values (n, dim), found (n,) bool)``; rows not found are 0."""
        ...

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Writes (overwrites) the rows of ``keys``."""
        ...

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        """Removes the rows of ``keys``; with ``keys=None`` the whole table."""
        ...

    def count(self, table: str) -> int:
        """Rows of ``table`` held (may be approximate on distributed stores)."""
        ...

    def stats(self) -> Mapping[str, int | float | str]:
        """Counters for Describe/Stats: at least ``hits``, ``misses``, ``errors``."""
        ...

    def close(self) -> None: ...
