"""L2 volatile tier held in this process: the embedded default when no Redis is configured.

Per table, rows live in one growable ``(capacity, dim)`` matrix and keys are found through sorted
index arrays searched with ``np.searchsorted``: no per-key Python work. The index has two levels, as
in a log-structured merge: a large ``main`` level and a small ``delta`` that new keys are merged into;
``delta`` folds into ``main`` once it passes an eighth of it, so a small online update costs the size
of ``delta``, not of the table, and a bulk load costs O(n log n) overall. Evicted rows' slots are
reused by later inserts. One lock per tier makes it safe to share between the lookup path, the
loader and the update consumer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import numpy as np

from node_agent.errors import NotFoundError
from node_agent.tiers.arguments import as_keys, as_values
from node_agent.tiers.base import TableLayout

#: ``delta`` stays unmerged up to this many keys even when ``main`` is small
_MIN_DELTA = 1 << 16


class _SortedLevel:
    """Sorted keys and, beside them, the matrix row each key's vector sits in."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)
        self.rows = np.empty(0, dtype=np.int64)
        #: ``(first, last)`` key when the keys are one run of consecutive integers
        self._run: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def _reindexed(self) -> None:
        # Sorted distinct keys spanning exactly len(keys) values are one run lo, lo+1, ...: a key's
        # position is then key - lo, with no search. Tables keyed by row index (a source without
        # keys.npy) load as one such run.
        n = len(self.keys)
        first, last = (int(self.keys[0]), int(self.keys[-1])) if n else (0, -1)
        self._run = (first, last) if n and last - first == n - 1 else None

    def positions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(hit mask, position)`` of each key in this level (position is meaningful where hit)."""
        n = len(self.keys)
        if not n:
            return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=np.int64)
        if self._run is not None:
            first, last = self._run
            hit = (keys >= first) & (keys <= last)
            # the subtraction cannot overflow where it is used: there, first <= key <= last
            return hit, np.where(hit, keys - first, 0)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, n - 1)
        return self.keys[pos] == keys, pos

    def merge(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Adds ``keys`` (absent from this level) with their rows, keeping the level sorted."""
        merged_keys = np.concatenate([self.keys, keys])
        # both runs are sorted, and a stable sort finds and merges runs in linear time
        order = np.argsort(merged_keys, kind="stable")
        self.keys = merged_keys[order]
        self.rows = np.concatenate([self.rows, rows])[order]
        self._reindexed()

    def remove(self, positions: np.ndarray) -> None:
        self.keys = np.delete(self.keys, positions)
        self.rows = np.delete(self.rows, positions)
        self._reindexed()


class _TableRows:
    """One table's rows: the value matrix, the two index levels and the free slots."""

    def __init__(self, layout: TableLayout) -> None:
        self.layout = layout
        self.clear()

    def clear(self) -> None:
        self.matrix = np.empty((0, self.layout.dim), dtype=self.layout.dtype)
        self.used = 0
        self.free = np.empty(0, dtype=np.int64)
        self.main = _SortedLevel()
        self.delta = _SortedLevel()

    def __len__(self) -> int:
        return len(self.main) + len(self.delta)

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Matrix row of each key, ``-1`` where the table does not hold it."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        for level in (self.main, self.delta):
            hit, pos = level.positions(keys)
            rows[hit] = level.rows[pos[hit]]
        return rows

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            # sort, and a key given twice keeps its last vector, as if written one after the other
            unique_keys, first_of_reversed = np.unique(keys[::-1], return_index=True)
            last = len(keys) - 1 - first_of_reversed
            keys, values = unique_keys, values[last]
        rows = self.locate(keys)
        present = rows >= 0
        if present.any():
            self.matrix[rows[present]] = values[present]
            keys, values = keys[~present], values[~present]
        if not len(keys):
            return
        slots = self._allocate(len(keys))
        if len(slots) == 1 or (np.diff(slots) == 1).all():  # consecutive rows: a slice, not a scatter
            self.matrix[slots[0] : slots[-1] + 1] = values
        else:
            self.matrix[slots] = values
        self.delta.merge(keys, slots)
        if len(self.delta) > max(_MIN_DELTA, len(self.main) // 8):
            self.main.merge(self.delta.keys, self.delta.rows)
            self.delta = _SortedLevel()

    def delete(self, keys: np.ndarray) -> None:
        freed = []
        for level in (self.main, self.delta):
            hit, pos = level.positions(keys)
            if hit.any():
                freed.append(level.rows[pos[hit]])
                level.remove(np.unique(pos[hit]))
        if freed:
            self.free = np.concatenate([self.free, *freed])

    def _allocate(self, count: int) -> np.ndarray:
        """``count`` free matrix rows: reused slots first, then fresh ones (growing the matrix)."""
        reused = self.free[len(self.free) - min(count, len(self.free)) :]
        self.free = self.free[: len(self.free) - len(reused)]
        fresh = count - len(reused)
        if self.used + fresh > len(self.matrix):
            capacity = max(self.used + fresh, 2 * len(self.matrix), 1024)
            grown = np.empty((capacity, self.layout.dim), dtype=self.layout.dtype)
            grown[: self.used] = self.matrix[: self.used]
            self.matrix = grown
        slots = np.concatenate([reused, np.arange(self.used, self.used + fresh, dtype=np.int64)])
        self.used += fresh
        return slots

    @property
    def nbytes(self) -> int:
        return int(
            self.matrix.nbytes + sum(lv.keys.nbytes + lv.rows.nbytes for lv in (self.main, self.delta))
        )


class HashMapTier:
    """Rows of several tables in this process's memory; see the module docstring."""

    name = "hashmap"

    def __init__(self, layouts: Iterable[TableLayout]) -> None:
        self._tables = {layout.name: _TableRows(layout) for layout in layouts}
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows_of = self._table(table)
        keys = as_keys(keys)
        with self._lock:
            rows = rows_of.locate(keys)
            found = rows >= 0
            values = np.zeros((len(keys), rows_of.layout.dim), dtype=rows_of.layout.dtype)
            values[found] = rows_of.matrix[rows[found]]
            hits = int(found.sum())
            self._hits += hits
            self._misses += len(keys) - hits
        return values, found

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        rows_of = self._table(table)
        keys = as_keys(keys)
        values = as_values(rows_of.layout, values, len(keys))
        if not len(keys):
            return
        with self._lock:
            rows_of.write(keys, values)

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        rows_of = self._table(table)
        with self._lock:
            if keys is None:
                rows_of.clear()
            else:
                rows_of.delete(np.unique(as_keys(keys)))

    def count(self, table: str) -> int:
        rows_of = self._table(table)
        with self._lock:
            return len(rows_of)

    def stats(self) -> Mapping[str, int | float | str]:
        with self._lock:
            return {
                "tier": self.name,
                "hits": self._hits,
                "misses": self._misses,
                "errors": 0,
                "bytes": sum(t.nbytes for t in self._tables.values()),
            }

    def close(self) -> None:
        with self._lock:
            for rows_of in self._tables.values():
                rows_of.clear()

    def _table(self, table: str) -> _TableRows:
        try:
            return self._tables[table]
        except KeyError:
            raise NotFoundError(f"table {table!r} is not held by the hashmap tier") from None
