"""A set-associative embedding cache (HugeCTR HPS style: slab sets, per-slot recency/frequency
counters) written once against an array namespace ``xp``, so it runs on NumPy or, unchanged, on CuPy.

Geometry: ``capacity_rows = sets x ways``. A key (with its table id) hashes to one set; inside the set
it may take any of the ``ways`` slots. Every operation works on a whole batch: deduplicate, locate
(a ``(batch, ways)`` compare), gather, scatter; there is no per-key Python loop.

Batch semantics, which the tests' pure-Python reference model follows exactly:

* a batch acts as if its distinct keys were handled one at a time in ascending key order;
* ``query``: hits are touched (LRU: become most recent; LFU: frequency + 1, then most recent);
* ``insert``: keys already cached are overwritten and touched first, then the new keys are placed
  in ascending order, each taking its set's victim (an empty slot, else the least recently used /
  least frequently used, ties to the least recent). When more new keys fall in one set than it has
  room for, the result is exactly what one-at-a-time insertion leaves (see ``insert``);
* ``update`` overwrites cached keys only and does not count as an access; ``invalidate`` frees slots.

Every touch gets a distinct, increasing stamp, so eviction order never depends on slot positions.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np

from node_agent.errors import InvalidArgumentError
from node_agent.plan import bucket_of

POLICIES = ("lru", "lfu")

#: bytes of bookkeeping per slot besides the vector: key (int64), stamp (int64), frequency (int32),
#: owning table (int16). The byte budget pays for these too, as it would on a GPU.
SLOT_METADATA_BYTES = 8 + 8 + 4 + 2

#: stamps live in the low bits of the LFU priority ``frequency << STAMP_BITS | stamp``
STAMP_BITS = 44
#: frequencies saturate here so the LFU priority stays inside int64
FREQUENCY_CAP = (1 << (62 - STAMP_BITS)) - 1

# A salt keeps the cache's set index independent of the plan's bucket (both use SplitMix64): without
# it, a partition owning buckets b mod B would only ever fill the sets congruent to b.
_SET_SALT = 0x5DEECE66D2545F49
_TABLE_SALT = 0xD6E8FEB86659FD93
_MASK64 = (1 << 64) - 1


def rows_for_bytes(capacity_bytes: int, *, dim: int, dtype: Any) -> int:
    """How many rows of ``dim`` x ``dtype`` (plus slot bookkeeping) fit in ``capacity_bytes``."""
    slot_bytes = dim * np.dtype(dtype).itemsize + SLOT_METADATA_BYTES
    return max(0, int(capacity_bytes) // slot_bytes)


def bytes_for_rows(rows: int, *, dim: int, dtype: Any) -> int:
    """The byte budget that holds exactly ``rows`` rows (inverse of :func:`rows_for_bytes`)."""
    return int(rows) * (dim * np.dtype(dtype).itemsize + SLOT_METADATA_BYTES)


class SetAssociativeCache:
    """One slab of ``sets x ways`` slots of ``dim``-wide vectors, shared by ``tables`` table ids.

    Table ids disambiguate keys when several tables of the same ``dim``/``dtype`` share one slab; a
    single-table cache just uses the default ``table_id=0``. Arrays passed in may be NumPy or ``xp``
    arrays; arrays returned are ``xp`` arrays on this cache's device. Thread-safe (one lock).
    """

    def __init__(
        self,
        *,
        dim: int,
        dtype: Any = np.float32,
        capacity_bytes: int | None = None,
        capacity_rows: int | None = None,
        associativity: int = 32,
        policy: str = "lru",
        tables: int = 1,
        xp: ModuleType = np,
        device: str = "cpu",
    ) -> None:
        if (capacity_bytes is None) == (capacity_rows is None):
            raise InvalidArgumentError("give exactly one of capacity_bytes and capacity_rows")
        if policy not in POLICIES:
            raise InvalidArgumentError(f"cache policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if dim < 1 or associativity < 1 or not 1 <= tables <= np.iinfo(np.int16).max:
            raise InvalidArgumentError(
                f"bad cache geometry: dim={dim}, ways={associativity}, tables={tables}"
            )
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise InvalidArgumentError(f"cache dtype must be float32 or float16; got {self.dtype}")
        rows = (
            rows_for_bytes(capacity_bytes, dim=dim, dtype=self.dtype)
            if capacity_bytes is not None
            else max(0, int(capacity_rows or 0))
        )
        self.xp = xp
        self.device = device
        self.dim = int(dim)
        self.policy = policy
        self.tables = int(tables)
        self.ways = max(1, min(int(associativity), rows))
        self.sets = rows // self.ways
        self._slots = self.sets * self.ways
        self._stamp_limit = 1 << STAMP_BITS
        self._lock = threading.RLock()
        from node_agent.array_backend import on_device

        with on_device(xp, device):
            self._keys = xp.zeros(self._slots, dtype=xp.int64)
            self._owner = xp.full(self._slots, -1, dtype=xp.int16)  # -1: empty slot
            self._stamp = xp.zeros(self._slots, dtype=xp.int64)
            self._freq = xp.zeros(self._slots, dtype=xp.int32)
            self._values = xp.zeros((self._slots, self.dim), dtype=self.dtype)
            self._way_ids = xp.arange(self.ways, dtype=xp.int64)
        # (sets, ways) views of the same memory: a set's slots are one contiguous row, so locating a
        # batch is one row gather per array (``take(axis=0)``), far cheaper than gathering through a
        # (batch, ways) index array
        self._keys_by_set = self._keys.reshape(self.sets, self.ways)
        self._owner_by_set = self._owner.reshape(self.sets, self.ways)
        self._stamp_by_set = self._stamp.reshape(self.sets, self.ways)
        self._freq_by_set = self._freq.reshape(self.sets, self.ways)
        self._clock = 1
        self._hits = [0] * self.tables
        self._misses = [0] * self.tables
        self._inserts = [0] * self.tables
        self._evictions = [0] * self.tables

    # -- geometry and counters -----------------------------------------------------------------

    @property
    def capacity_rows(self) -> int:
        return self._slots

    @property
    def nbytes(self) -> int:
        return bytes_for_rows(self._slots, dim=self.dim, dtype=self.dtype)

    def hits_of(self, table_id: int = 0) -> int:
        return self._hits[table_id]

    def misses_of(self, table_id: int = 0) -> int:
        return self._misses[table_id]

    def inserts_of(self, table_id: int = 0) -> int:
        return self._inserts[table_id]

    def evictions_of(self, table_id: int = 0) -> int:
        return self._evictions[table_id]

    def size_of(self, table_id: int | None = None) -> int:
        """Rows held (of one table, or of all)."""
        with self._lock:
            if table_id is None:
                return int((self._owner >= 0).sum())
            return int((self._owner == table_id).sum())

    @property
    def hits(self) -> int:
        return sum(self._hits)

    @property
    def misses(self) -> int:
        return sum(self._misses)

    @property
    def inserts(self) -> int:
        return sum(self._inserts)

    @property
    def evictions(self) -> int:
        return sum(self._evictions)

    @property
    def size(self) -> int:
        return self.size_of(None)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def reset_counters(self) -> None:
        for counters in (self._hits, self._misses, self._inserts, self._evictions):
            counters[:] = [0] * self.tables

    # -- operations ----------------------------------------------------------------------------

    def query(self, keys: Any, *, table_id: int = 0, sorted_unique: bool = False) -> tuple[Any, Any]:
        """Cached rows of ``keys``: ``(values (n, dim), hit_mask (n,))``; misses come back as zeros.

        ``sorted_unique=True`` promises the keys are already ``unique()``'s output (ascending, no
        repeats), which skips a second deduplication on the lookup path.
        """
        xp = self.xp
        self._check_table(table_id)
        with self._lock, self._on_device():
            keys = self._as_keys(keys)
            if sorted_unique:
                unique, inverse = keys, None
            else:
                unique, inverse = xp.unique(keys, return_inverse=True)
            values = xp.zeros((unique.shape[0], self.dim), dtype=self.dtype)
            if self._slots == 0 or unique.shape[0] == 0:
                hit = xp.zeros(unique.shape[0], dtype=bool)
            else:
                slot, hit = self._locate(unique, table_id)
                hit_slots = slot[hit]
                values[hit] = self._values[hit_slots]
                self._touch(hit_slots)
            n_hit = int(hit.sum())
            self._hits[table_id] += n_hit
            self._misses[table_id] += int(unique.shape[0]) - n_hit
            if inverse is None:
                return values, hit
            inverse = inverse.reshape(-1)
            return values[inverse], hit[inverse]

    def insert(self, keys: Any, values: Any, *, table_id: int = 0) -> None:
        """Caches ``keys`` → ``values`` (overwriting cached keys), evicting victims by policy.

        A key given twice keeps its last value, as if the batch were written in order.
        """
        xp = self.xp
        self._check_table(table_id)
        with self._lock, self._on_device():
            keys = self._as_keys(keys)
            values = self._as_values(values, keys.shape[0])
            if self._slots == 0 or keys.shape[0] == 0:
                return
            unique, values = self._last_write_wins(keys, values)
            slot, hit = self._locate(unique, table_id)

            # keys already cached: overwrite and touch, before any victim is chosen
            present = slot[hit]
            self._values[present] = values[hit]
            self._touch(present)

            new = ~hit
            new_keys = unique[new]
            n_new = int(new_keys.shape[0])
            if n_new == 0:
                return
            new_values = values[new]
            new_sets = slot[new] // self.ways  # _locate returns the set's first slot for a miss

            # group the new keys by set, ascending key order inside each set (keys are unique, so the
            # composite sort key is unique too and the sort needs no stability guarantee)
            order = xp.argsort(new_sets * n_new + xp.arange(n_new, dtype=xp.int64))
            sets_sorted = new_sets[order]
            starts_mask = xp.ones(n_new, dtype=bool)
            starts_mask[1:] = sets_sorted[1:] != sets_sorted[:-1]
            group = xp.cumsum(starts_mask) - 1
            starts = xp.nonzero(starts_mask)[0]
            group_size = xp.diff(xp.concatenate([starts, xp.asarray([n_new], dtype=starts.dtype)]))
            rank = xp.arange(n_new, dtype=xp.int64) - starts[group]
            touched_sets = sets_sorted[starts]
            priority = self._priority(touched_sets)

            # One-at-a-time insertion leaves only the last `room` new keys of a set: under LRU every
            # slot is room (later new keys evict earlier ones once the old slots are gone); under LFU
            # only empty and frequency-1 slots are, since a new key (frequency 1, newest) ranks below
            # every slot accessed twice — and with no such slot, new keys keep evicting each other
            # out of the one slot the first of them took.
            if self.policy == "lfu":
                room = xp.maximum((priority < (2 << STAMP_BITS)).sum(axis=1), 1)
            else:
                room = xp.full(touched_sets.shape[0], self.ways, dtype=xp.int64)
            surplus = xp.maximum(group_size - room, 0)[group]
            keep = rank >= surplus
            kept_rank = (rank - surplus)[keep]
            kept_group = group[keep]
            kept_order = order[keep]

            if int(kept_rank.max()) == 0:
                victim_way = xp.argmin(priority, axis=1)[kept_group]
            else:
                victim_way = xp.argsort(priority, axis=1)[kept_group, kept_rank]
            victim = touched_sets[kept_group] * self.ways + victim_way

            evicted_owner = self._owner[victim]
            evicted_owner = evicted_owner[evicted_owner >= 0]
            if evicted_owner.shape[0]:
                per_table = xp.bincount(evicted_owner.astype(xp.int64), minlength=self.tables)
                for tid, count in enumerate(per_table.tolist()):
                    self._evictions[tid] += int(count)

            self._maybe_rebase(n_new)
            self._keys[victim] = new_keys[kept_order]
            self._owner[victim] = table_id
            self._values[victim] = new_values[kept_order]
            # stamps follow ascending key order, the order the reference model inserts in
            self._stamp[victim] = self._clock + kept_order
            self._freq[victim] = 1
            self._clock += n_new
            self._inserts[table_id] += int(kept_order.shape[0])

    def update(self, keys: Any, values: Any, *, table_id: int = 0) -> int:
        """Overwrites the rows of ``keys`` that are cached (online updates); returns how many were."""
        self._check_table(table_id)
        with self._lock, self._on_device():
            keys = self._as_keys(keys)
            values = self._as_values(values, keys.shape[0])
            if self._slots == 0 or keys.shape[0] == 0:
                return 0
            unique, values = self._last_write_wins(keys, values)
            slot, hit = self._locate(unique, table_id)
            self._values[slot[hit]] = values[hit]
            return int(hit.sum())

    def invalidate(self, keys: Any, *, table_id: int = 0) -> int:
        """Drops the rows of ``keys`` from the cache; returns how many were cached."""
        xp = self.xp
        self._check_table(table_id)
        with self._lock, self._on_device():
            keys = self._as_keys(keys)
            if self._slots == 0 or keys.shape[0] == 0:
                return 0
            slot, hit = self._locate(xp.unique(keys), table_id)
            self._free(slot[hit])
            return int(hit.sum())

    def clear(self, *, table_id: int | None = None) -> None:
        """Empties the cache (or drops one table's rows); counters are kept."""
        xp = self.xp
        with self._lock, self._on_device():
            if table_id is None:
                self._free(xp.arange(self._slots, dtype=xp.int64))
            else:
                self._check_table(table_id)
                self._free(xp.nonzero(self._owner == table_id)[0])

    def cached_keys(self, *, table_id: int = 0) -> np.ndarray:
        """The keys of ``table_id`` held right now, sorted, on the host (for tests and inspection)."""
        from node_agent.array_backend import to_host

        with self._lock:
            return np.sort(to_host(self._keys[self._owner == table_id]))

    # -- internals -----------------------------------------------------------------------------

    def _on_device(self) -> Any:
        from node_agent.array_backend import on_device

        return on_device(self.xp, self.device)

    def _check_table(self, table_id: int) -> None:
        if not 0 <= table_id < self.tables:
            raise InvalidArgumentError(f"table id {table_id} out of range [0, {self.tables})")

    def _as_keys(self, keys: Any) -> Any:
        keys = self.xp.asarray(keys)
        if keys.ndim != 1:
            raise InvalidArgumentError(f"keys must be one-dimensional; got shape {tuple(keys.shape)}")
        if keys.dtype.kind not in "iu":
            raise InvalidArgumentError(f"keys must be integers; got {keys.dtype}")
        return keys.astype(self.xp.int64, copy=False)

    def _as_values(self, values: Any, n: int) -> Any:
        values = self.xp.asarray(values)
        if values.ndim != 2 or values.shape[0] != n or values.shape[1] != self.dim:
            raise InvalidArgumentError(f"values must have shape ({n}, {self.dim}); got {tuple(values.shape)}")
        return values.astype(self.dtype, copy=False)

    def _last_write_wins(self, keys: Any, values: Any) -> tuple[Any, Any]:
        xp = self.xp
        n = keys.shape[0]
        if n < 2 or bool((keys[1:] > keys[:-1]).all()):
            return keys, values  # already ascending and distinct (the lookup path's fills): no sort
        # unique() reports first occurrences; on the reversed batch those are the last writes
        unique, first_in_reversed = xp.unique(keys[::-1], return_index=True)
        return unique, values[(n - 1) - first_in_reversed]

    def set_of(self, keys: Any, table_id: int = 0) -> Any:
        """The set each key of ``table_id`` maps to (``xp`` int64)."""
        xp = self.xp
        salt = (_SET_SALT ^ (table_id * _TABLE_SALT)) & _MASK64
        return bucket_of(keys.astype(xp.uint64) ^ xp.uint64(salt), self.sets, xp)

    def _locate(self, unique: Any, table_id: int) -> tuple[Any, Any]:
        """For each (distinct) key: its slot and whether it is cached. A miss reports its set's first
        slot, so ``slot // ways`` is the set either way."""
        xp = self.xp
        sets = self.set_of(unique, table_id)
        match = xp.take(self._keys_by_set, sets, axis=0) == unique[:, None]
        match &= xp.take(self._owner_by_set, sets, axis=0) == table_id
        way = xp.argmax(match, axis=1)
        hit = xp.take_along_axis(match, way[:, None], axis=1)[:, 0]
        return sets * self.ways + way, hit

    def _touch(self, slots: Any) -> None:
        """Marks ``slots`` (given in ascending key order) as accessed now."""
        n = int(slots.shape[0])
        if n == 0:
            return
        self._maybe_rebase(n)
        self._stamp[slots] = self._clock + self.xp.arange(n, dtype=self.xp.int64)
        self._freq[slots] = self.xp.minimum(self._freq[slots] + 1, FREQUENCY_CAP)
        self._clock += n

    def _priority(self, sets: Any) -> Any:
        """``(len(sets), ways)`` eviction priority, lowest evicted first; distinct within a set."""
        xp = self.xp
        priority = xp.take(self._stamp_by_set, sets, axis=0)
        if self.policy == "lfu":
            priority = (xp.take(self._freq_by_set, sets, axis=0).astype(xp.int64) << STAMP_BITS) | priority
        # empty slots go first, lowest way first (negative, distinct)
        empty = xp.take(self._owner_by_set, sets, axis=0) < 0
        return xp.where(empty, self._way_ids[None, :] - self.ways, priority)

    def _maybe_rebase(self, upcoming: int) -> None:
        """Keeps stamps below ``STAMP_BITS`` bits by renumbering them 1..n in the same order.

        Only the relative order of stamps matters, so this changes no eviction decision; it runs once
        every ~2**44 touches.
        """
        if self._clock + upcoming < self._stamp_limit:
            return
        xp = self.xp
        held = xp.nonzero(self._owner >= 0)[0]
        order = xp.argsort(self._stamp[held])
        self._stamp[held[order]] = xp.arange(1, held.shape[0] + 1, dtype=xp.int64)
        self._clock = int(held.shape[0]) + 1
        if self._clock + upcoming >= self._stamp_limit:
            raise InvalidArgumentError(f"a batch of {upcoming} keys is too large for the cache clock")

    def _free(self, slots: Any) -> None:
        self._owner[slots] = -1
        self._keys[slots] = 0
        self._stamp[slots] = 0
        self._freq[slots] = 0
