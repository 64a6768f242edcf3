"""A set-associative embedding cache (HugeCTR HPS style: slab sets, per-slot recency/frequency
counters) written once against an array namespace ``xp``, so it runs on NumPy or, unchanged, on CuPy;
on NumPy its two hot loops (query, insert) run compiled when the native kernel is built.

Geometry: ``capacity_rows = sets x ways``. A key (with its table id) hashes to one set; inside the set
it may take any of the ``ways`` slots. Every operation works on a whole batch: deduplicate, locate
(a ``(batch, ways)`` compare), gather, scatter; there is no per-key Python loop.

Batch semantics, which the tests' pure-Python reference model and the compiled kernel follow exactly:

* a batch acts as if its distinct keys were handled one at a time in ascending key order;
* ``query``: hits are touched (LRU: become most recent; LFU: frequency + 1, then most recent); with
  admission, every distinct key asked is counted in the frequency sketch (see below);
* ``insert``: keys already cached are overwritten and touched first, then the new keys are placed
  in ascending order, each into its set's victim: an empty slot, else the least recently used /
  least frequently used (ties to the least recent). The j-th new key of a batch is stamped
  ``clock + j`` whether or not it is placed, so eviction order never depends on slot positions;
* ``update`` overwrites cached keys only and does not count as an access; ``invalidate`` frees slots.

Admission (``admission="tinylfu"``, the default). HPS admits every missed key, so on Zipf traffic a
cold key pushes out a hotter row and LRU thrashes. Here a new key that finds its set full is placed
only when it was asked for in more recent batches than the victim it would evict (TinyLFU, Einziger
et al.), as estimated by a count-min sketch: ``SKETCH_DEPTH`` rows of ``uint8`` counters, a power of
two wide (at least the slot count), capped at ``SKETCH_COUNTER_CAP``. As in Caffeine, a key's four
counters share one 64-byte block (a block holds 16 counters of each row), so counting or estimating a
key touches one cache line. A batch raises each of its keys' counters by one (a counter shared by
several keys of one batch also rises by one: the sketch counts batches a key was asked in, and the
one-write-per-batch rule needs no atomics on a GPU). After ``SKETCH_SAMPLE_FACTOR x slots`` recorded
keys every counter is halved, so popularity that moves is followed. ``admission="always"`` is HPS's
behaviour.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np

from node_agent.array_backend import new_stream, on_device, to_host
from node_agent.errors import InvalidArgumentError, UnavailableError

POLICIES = ("lru", "lfu")
ADMISSIONS = ("tinylfu", "always")

#: bytes of bookkeeping per slot besides the vector: key (int64), stamp (int64), frequency (int32),
#: owning table (int16). The byte budget pays for these too, as it would on a GPU.
SLOT_METADATA_BYTES = 8 + 8 + 4 + 2
#: the admission sketch's share of a slot at most: 4 rows of 1-byte counters, fewer than 2 per slot
SKETCH_BYTES_PER_SLOT = 8

SKETCH_DEPTH = 4
SKETCH_COUNTER_CAP = 15
SKETCH_SAMPLE_FACTOR = 10

#: stamps live in the low bits of the LFU priority ``frequency << STAMP_BITS | stamp``
STAMP_BITS = 44
#: frequencies saturate here so the LFU priority stays inside int64
FREQUENCY_CAP = (1 << (62 - STAMP_BITS)) - 1

# A salt keeps the cache's set index independent of the plan's bucket (both use SplitMix64): without
# it, a partition owning buckets b mod B would only ever fill the sets congruent to b.
_SET_SALT = 0x5DEECE66D2545F49
_TABLE_SALT = 0xD6E8FEB86659FD93
_SKETCH_SALT = 0x2545F4914F6CDD1D
_MASK64 = (1 << 64) - 1
# SplitMix64's finaliser, as node_agent.plan.bucket_of (and the native kernel) computes it
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def slot_bytes(*, dim: int, dtype: Any, admission: str = "tinylfu") -> int:
    """What one slot costs of the byte budget: its vector, its bookkeeping and its share of the sketch."""
    sketch = SKETCH_BYTES_PER_SLOT if admission == "tinylfu" else 0
    return dim * np.dtype(dtype).itemsize + SLOT_METADATA_BYTES + sketch


def rows_for_bytes(capacity_bytes: int, *, dim: int, dtype: Any, admission: str = "tinylfu") -> int:
    """How many rows of ``dim`` x ``dtype`` (plus slot bookkeeping) fit in ``capacity_bytes``."""
    return max(0, int(capacity_bytes) // slot_bytes(dim=dim, dtype=dtype, admission=admission))


def bytes_for_rows(rows: int, *, dim: int, dtype: Any, admission: str = "tinylfu") -> int:
    """The byte budget that holds exactly ``rows`` rows (inverse of :func:`rows_for_bytes`)."""
    return int(rows) * slot_bytes(dim=dim, dtype=dtype, admission=admission)


def _mix64(z: Any, xp: ModuleType) -> Any:
    """SplitMix64's finaliser of a ``uint64`` array, computed in place (fewer temporaries and, on a
    GPU, fewer launches than the expression form)."""
    z += xp.uint64(_GOLDEN)
    z ^= z >> xp.uint64(30)
    z *= xp.uint64(_MIX1)
    z ^= z >> xp.uint64(27)
    z *= xp.uint64(_MIX2)
    z ^= z >> xp.uint64(31)
    return z


def native_kernels_available() -> bool:
    """True when the compiled query/insert loops were built with the package."""
    from node_agent.cache.native import Kernel

    return Kernel is not None


class SetAssociativeCache:
    """One slab of ``sets x ways`` slots of ``dim``-wide vectors, shared by ``tables`` table ids.

    Table ids disambiguate keys when several tables of the same ``dim``/``dtype`` share one slab; a
    single-table cache just uses the default ``table_id=0``. Arrays passed in may be NumPy or ``xp``
    arrays; arrays returned are ``xp`` arrays on this cache's device. Thread-safe (one lock).

    ``native``: on NumPy, run query and insert in the compiled kernel (``None``: when it is built;
    ``True``: it must be). The state arrays are the same either way, and so are the answers.

    On CuPy every operation runs on the cache's own stream, ordered after the work the calling thread
    had queued on its current stream, and the caller's stream waits for the cache's work before it goes
    on: threads on per-thread default streams (the fill worker, gRPC workers) never race each other.
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
        admission: str = "tinylfu",
        tables: int = 1,
        xp: ModuleType = np,
        device: str = "cpu",
        native: bool | None = None,
    ) -> None:
        if (capacity_bytes is None) == (capacity_rows is None):
            raise InvalidArgumentError("give exactly one of capacity_bytes and capacity_rows")
        if policy not in POLICIES:
            raise InvalidArgumentError(f"cache policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if admission not in ADMISSIONS:
            raise InvalidArgumentError(
                f"cache admission must be one of {', '.join(ADMISSIONS)}; got {admission!r}"
            )
        if dim < 1 or associativity < 1 or not 1 <= tables <= np.iinfo(np.int16).max:
            raise InvalidArgumentError(
                f"bad cache geometry: dim={dim}, ways={associativity}, tables={tables}"
            )
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise InvalidArgumentError(f"cache dtype must be float32 or float16; got {self.dtype}")
        rows = (
            rows_for_bytes(capacity_bytes, dim=dim, dtype=self.dtype, admission=admission)
            if capacity_bytes is not None
            else max(0, int(capacity_rows or 0))
        )
        self.xp = xp
        self.device = device
        self.dim = int(dim)
        self.policy = policy
        self.admission = admission
        self.tables = int(tables)
        self.ways = max(1, min(int(associativity), rows))
        self.sets = rows // self.ways
        self._slots = self.sets * self.ways
        self._stamp_limit = 1 << STAMP_BITS
        self._lock = threading.RLock()
        self._stream = new_stream(xp, device)
        # the sketch is a power of two wide so a counter's column is a mask, not a division
        self.sketch_width = 1 << max(4, (self._slots - 1).bit_length())
        self._sketch_sample = SKETCH_SAMPLE_FACTOR * max(1, self._slots)
        self._sketch_recorded = 0
        with self._on_device():
            self._keys = xp.zeros(self._slots, dtype=xp.int64)
            self._owner = xp.full(self._slots, -1, dtype=xp.int16)  # -1: empty slot
            self._stamp = xp.zeros(self._slots, dtype=xp.int64)
            self._freq = xp.zeros(self._slots, dtype=xp.int32)
            self._values = xp.zeros((self._slots, self.dim), dtype=self.dtype)
            self._way_ids = xp.arange(self.ways, dtype=xp.int64)
            self._sketch: Any = (
                xp.zeros((SKETCH_DEPTH, self.sketch_width), dtype=xp.uint8) if admission == "tinylfu" else None
            )
            # a key's counter of row r: byte 16 r + (4 bits of its hash) of its block
            self._sketch_shifts = xp.arange(32, 32 + 4 * SKETCH_DEPTH, 4, dtype=xp.uint64)[:, None]
            self._sketch_offsets = xp.arange(SKETCH_DEPTH, dtype=xp.int64)[:, None] * 16
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
        self._kernel = self._native_kernel(native)

    def _native_kernel(self, native: bool | None) -> Any:
        if native is False or self._slots == 0:
            return None
        from node_agent.cache.native import Kernel

        if self.xp is not np:
            if native:
                raise InvalidArgumentError("the native cache kernel runs on NumPy caches only")
            return None
        if Kernel is None:
            if native:
                raise UnavailableError(
                    "the native cache kernel is not built: reinstall the package where a C compiler is "
                    "available (pip install .), or pass native=None to use the array version"
                )
            return None
        return Kernel(
            keys=self._keys, owner=self._owner, stamp=self._stamp, freq=self._freq,
            values=self._values.reshape(self._slots, -1).view(np.uint8),
            sketch=self._sketch, sets=self.sets, ways=self.ways,
            row_bytes=self.dim * self.dtype.itemsize, tables=self.tables,
            lfu=self.policy == "lfu", stamp_bits=STAMP_BITS, freq_cap=FREQUENCY_CAP,
            sketch_cap=SKETCH_COUNTER_CAP, sketch_width=self.sketch_width,
            set_salt=_SET_SALT, table_salt=_TABLE_SALT, sketch_salt=_SKETCH_SALT,
        )  # fmt: skip

    # -- geometry and counters -----------------------------------------------------------------

    @property
    def capacity_rows(self) -> int:
        return self._slots

    @property
    def native(self) -> bool:
        """Whether query and insert run in the compiled kernel."""
        return self._kernel is not None

    @property
    def nbytes(self) -> int:
        return bytes_for_rows(self._slots, dim=self.dim, dtype=self.dtype, admission=self.admission)

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
        with self._lock, self._on_device():
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

    def state(self) -> dict[str, np.ndarray]:
        """Copies of every state array on the host, and the clock (for tests and inspection)."""
        with self._lock, self._on_device():
            out = {
                name: to_host(getattr(self, f"_{name}")).copy()
                for name in ("keys", "owner", "stamp", "freq", "values")
            }
            if self._sketch is not None:
                out["sketch"] = to_host(self._sketch).copy()
            out["clock"] = np.array([self._clock, self._sketch_recorded], dtype=np.int64)
            return out

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
            n = int(unique.shape[0])
            if self._slots == 0 or n == 0:
                values = xp.zeros((n, self.dim), dtype=self.dtype)
                hit = xp.zeros(n, dtype=bool)
                n_hit = 0
            elif self._kernel is not None:
                values = np.empty((n, self.dim), dtype=self.dtype)
                hit = np.empty(n, dtype=bool)
                self._maybe_rebase(n)
                n_hit, self._clock = self._kernel.query(
                    np.ascontiguousarray(unique), table_id, values.view(np.uint8), hit.view(np.uint8), self._clock
                )
                self._recorded(n)
            else:
                self._maybe_rebase(n)
                z = self._hash(unique, table_id)
                if self._sketch is not None:
                    self._record(z)
                sets = self._set_index(z)
                rows, slots = self._find(unique, sets, table_id)
                values = xp.zeros((n, self.dim), dtype=self.dtype)
                values[rows] = self._values[slots]
                hit = xp.zeros(n, dtype=bool)
                hit[rows] = True
                self._touch(slots)
                self._recorded(n)
                n_hit = int(rows.shape[0])
            self._hits[table_id] += n_hit
            self._misses[table_id] += n - n_hit
            if inverse is None:
                return values, hit
            inverse = inverse.reshape(-1)
            return values[inverse], hit[inverse]

    def insert(self, keys: Any, values: Any, *, table_id: int = 0) -> None:
        """Offers ``keys`` → ``values`` to the cache: cached keys are overwritten; new keys are placed
        by policy and admission (see the module docstring).

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
            self._maybe_rebase(int(unique.shape[0]))
            if self._kernel is not None:
                evicted = np.zeros(self.tables, dtype=np.int64)
                inserted, self._clock = self._kernel.insert(
                    np.ascontiguousarray(unique), np.ascontiguousarray(values).view(np.uint8),
                    table_id, self._clock, self._sketch is None, evicted,
                )  # fmt: skip
                self._count_evictions(evicted)
                self._inserts[table_id] += int(inserted)
                return
            z = self._hash(unique, table_id)
            sets = self._set_index(z)
            rows, slots = self._find(unique, sets, table_id)

            # keys already cached: overwrite and touch, before any victim is chosen
            self._values[slots] = values[rows]
            self._touch(slots)

            new = xp.ones(unique.shape[0], dtype=bool)
            new[rows] = False
            fresh = xp.nonzero(new)[0]
            if fresh.shape[0] == 0:
                return
            if self._sketch is None:
                self._place_all(unique[fresh], values[fresh], sets[fresh], table_id)
            else:
                self._place_admitted(unique[fresh], values[fresh], sets[fresh], z[fresh], table_id)

    def update(self, keys: Any, values: Any, *, table_id: int = 0) -> int:
        """Overwrites the rows of ``keys`` that are cached (online updates); returns how many were."""
        self._check_table(table_id)
        with self._lock, self._on_device():
            keys = self._as_keys(keys)
            values = self._as_values(values, keys.shape[0])
            if self._slots == 0 or keys.shape[0] == 0:
                return 0
            unique, values = self._last_write_wins(keys, values)
            rows, slots = self._find(unique, self._set_index(self._hash(unique, table_id)), table_id)
            self._values[slots] = values[rows]
            return int(rows.shape[0])

    def invalidate(self, keys: Any, *, table_id: int = 0) -> int:
        """Drops the rows of ``keys`` from the cache; returns how many were cached."""
        xp = self.xp
        self._check_table(table_id)
        with self._lock, self._on_device():
            keys = self._as_keys(keys)
            if self._slots == 0 or keys.shape[0] == 0:
                return 0
            unique = xp.unique(keys)
            _, slots = self._find(unique, self._set_index(self._hash(unique, table_id)), table_id)
            self._free(slots)
            return int(slots.shape[0])

    def clear(self, *, table_id: int | None = None) -> None:
        """Empties the cache (or drops one table's rows); counters and the admission sketch (what is
        known of the keys' popularity) are kept."""
        xp = self.xp
        with self._lock, self._on_device():
            if table_id is None:
                self._free(xp.arange(self._slots, dtype=xp.int64))
            else:
                self._check_table(table_id)
                self._free(xp.nonzero(self._owner == table_id)[0])

    def cached_keys(self, *, table_id: int = 0) -> np.ndarray:
        """The keys of ``table_id`` held right now, sorted, on the host (for tests and inspection)."""
        with self._lock, self._on_device():
            return np.sort(to_host(self._keys[self._owner == table_id]))

    def set_of(self, keys: Any, table_id: int = 0) -> Any:
        """The set each key of ``table_id`` maps to (``xp`` int64)."""
        with self._on_device():
            return self._set_index(self._hash(self._as_keys(keys), table_id))

    def sketch_estimate(self, keys: Any, table_id: int = 0) -> Any:
        """How many recent batches asked for each key, as the admission sketch estimates (``xp``)."""
        if self._sketch is None:
            raise InvalidArgumentError("this cache admits every key: it keeps no sketch")
        with self._lock, self._on_device():
            return self._estimate(self._hash(self._as_keys(keys), table_id))

    # -- internals -----------------------------------------------------------------------------

    def _on_device(self) -> Any:
        return on_device(self.xp, self.device, stream=self._stream)

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

    def _hash(self, keys: Any, table_id: Any) -> Any:
        """The one hash of each key that both its set and its sketch counters derive from (``uint64``);
        ``table_id`` is an int or an array of them (a victim's owner)."""
        xp = self.xp
        if isinstance(table_id, int):
            salt: Any = xp.uint64((_SET_SALT ^ (table_id * _TABLE_SALT)) & _MASK64)
        else:
            salt = xp.uint64(_SET_SALT) ^ (table_id.astype(xp.uint64) * xp.uint64(_TABLE_SALT))
        return _mix64(keys.astype(xp.uint64) ^ salt, xp)

    def _set_index(self, z: Any) -> Any:
        return (z % self.xp.uint64(self.sets)).astype(self.xp.int64)

    def _find(self, unique: Any, sets: Any, table_id: int) -> tuple[Any, Any]:
        """The cached ones among distinct ``unique`` keys: ``(rows, slots)``, index arrays in ascending
        key order (``rows`` into ``unique``, ``slots`` into the slab)."""
        xp = self.xp
        # one (n, ways) compare; index arrays from it, so only hits are gathered and checked further
        rows, ways = xp.nonzero(xp.take(self._keys_by_set, sets, axis=0) == unique[:, None])
        slots = sets[rows] * self.ways + ways
        # an empty slot holds key 0, and a shared slab other tables' keys: the owner must match too
        mine = self._owner[slots] == table_id
        return rows[mine], slots[mine]

    def _touch(self, slots: Any) -> None:
        """Marks ``slots`` (given in ascending key order) as accessed now."""
        n = int(slots.shape[0])
        if n == 0:
            return
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

    def _place_all(self, new_keys: Any, new_values: Any, new_sets: Any, table_id: int) -> None:
        """Places every new key (``admission="always"``) in closed form: the same result as one at a
        time, without a loop over keys that share a set."""
        xp = self.xp
        n_new = int(new_keys.shape[0])
        # group the new keys by set, ascending key order inside each set (keys are unique, so the
        # composite sort key is unique too and the sort needs no stability guarantee)
        order = xp.argsort(new_sets * n_new + xp.arange(n_new, dtype=xp.int64))
        group, rank, starts = _groups(xp, new_sets[order])
        group_size = xp.diff(xp.concatenate([starts, xp.asarray([n_new], dtype=starts.dtype)]))
        touched_sets = new_sets[order][starts]
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
        keep = xp.nonzero(rank >= surplus)[0]
        # one at a time, the i-th new key of a set takes the (i mod room)-th victim: past the room,
        # each new key evicts the new key that took that slot `room` keys before it
        kept_rank = (rank % room[group])[keep]
        kept_group = group[keep]
        kept_order = order[keep]

        if int(kept_rank.max()) == 0:
            victim_way = xp.argmin(priority, axis=1)[kept_group]
        else:
            victim_way = xp.argsort(priority, axis=1)[kept_group, kept_rank]
        victim = touched_sets[kept_group] * self.ways + victim_way
        evicted_owner = self._owner[victim]
        self._count_evictions(xp.bincount(evicted_owner[evicted_owner >= 0].astype(xp.int64),
                                          minlength=self.tables))  # fmt: skip

        self._keys[victim] = new_keys[kept_order]
        self._owner[victim] = table_id
        self._values[victim] = new_values[kept_order]
        # stamps follow ascending key order, the order the reference model inserts in
        self._stamp[victim] = self._clock + kept_order
        self._freq[victim] = 1
        self._clock += n_new
        self._inserts[table_id] += int(kept_order.shape[0])

    def _place_admitted(self, new_keys: Any, new_values: Any, new_sets: Any, z: Any, table_id: int) -> None:
        """Places the new keys that win admission. Keys of different sets never interact, so the r-th
        new key of every set is handled at once, r = 0, 1, ...: as many rounds as the most new keys
        any one set gets (a few on the lookup path), each vectorised over the sets."""
        xp = self.xp
        n_new = int(new_keys.shape[0])
        estimate = self._estimate(z)
        order = xp.argsort(new_sets * n_new + xp.arange(n_new, dtype=xp.int64))
        _, rank, _ = _groups(xp, new_sets[order])
        first_new = self._clock
        inserted = 0
        for r in range(int(rank.max()) + 1):
            pick = order[xp.nonzero(rank == r)[0]]
            sets = new_sets[pick]
            victim = sets * self.ways + xp.argmin(self._priority(sets), axis=1)
            held_by = self._owner[victim]
            held = held_by >= 0
            victim_estimate = self._estimate(self._hash(self._keys[victim], xp.maximum(held_by, 0)))
            admitted = xp.nonzero(~held | (estimate[pick] > victim_estimate))[0]
            pick, victim, held_by = pick[admitted], victim[admitted], held_by[admitted]
            # a victim placed earlier in this batch is replaced, not evicted: it never counted as held
            evicted = (held_by >= 0) & (self._stamp[victim] < first_new)
            replaced = (held_by >= 0) & ~evicted
            self._count_evictions(xp.bincount(held_by[evicted].astype(xp.int64), minlength=self.tables))
            inserted += int(pick.shape[0]) - int(replaced.sum())
            self._keys[victim] = new_keys[pick]
            self._owner[victim] = table_id
            self._values[victim] = new_values[pick]
            self._stamp[victim] = first_new + pick
            self._freq[victim] = 1
        self._clock = first_new + n_new
        self._inserts[table_id] += inserted

    def _count_evictions(self, per_table: Any) -> None:
        for tid, count in enumerate(to_host(per_table).tolist()):
            self._evictions[tid] += int(count)

    def _sketch_cells(self, z: Any) -> Any:
        """``(SKETCH_DEPTH, n)`` flat indices of each key's counters: the low 32 bits of one more mix pick
        the block, four 4-bit fields of the high 32 the counter in each row's 16 bytes of it."""
        xp = self.xp
        h = _mix64(z ^ xp.uint64(_SKETCH_SALT), xp)
        blocks = SKETCH_DEPTH * self.sketch_width // 64
        block = (h & xp.uint64(blocks - 1)).astype(xp.int64) * 64
        within = ((h[None, :] >> self._sketch_shifts) & xp.uint64(15)).astype(xp.int64)
        return block[None, :] + self._sketch_offsets + within

    def _record(self, z: Any) -> None:
        """Counts one batch's distinct keys: each counter they touch rises by one (capped)."""
        cells = self._sketch_cells(z).reshape(-1)
        flat = self._sketch.reshape(-1)
        # the gather completes before the scatter, so keys sharing a counter all write the same value
        flat[cells] = self.xp.minimum(flat[cells] + 1, SKETCH_COUNTER_CAP).astype(self.xp.uint8)

    def _recorded(self, n: int) -> None:
        """Ages the sketch: after every ``SKETCH_SAMPLE_FACTOR x slots`` recorded keys, halve it."""
        if self._sketch is None:
            return
        self._sketch_recorded += n
        while self._sketch_recorded >= self._sketch_sample:
            self._sketch >>= 1
            self._sketch_recorded //= 2

    def _estimate(self, z: Any) -> Any:
        return self._sketch.reshape(-1)[self._sketch_cells(z)].min(axis=0)

    def _maybe_rebase(self, upcoming: int) -> None:
        """Keeps stamps below ``STAMP_BITS`` bits by renumbering them 1..n in the same order.

        Only the relative order of stamps matters, so this changes no eviction decision; it runs once
        every ~2**44 touches, before an operation that may take up to ``upcoming`` stamps.
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


def _groups(xp: ModuleType, sorted_sets: Any) -> tuple[Any, Any, Any]:
    """For keys sorted by set: each key's group (its set's ordinal), its rank inside the group, and
    where each group starts."""
    n = sorted_sets.shape[0]
    starts_mask = xp.ones(n, dtype=bool)
    starts_mask[1:] = sorted_sets[1:] != sorted_sets[:-1]
    group = xp.cumsum(starts_mask) - 1
    starts = xp.nonzero(starts_mask)[0]
    rank = xp.arange(n, dtype=xp.int64) - starts[group]
    return group, rank, starts
