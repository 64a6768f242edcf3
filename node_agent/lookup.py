"""The lookup path (HPS semantics): deduplicate keys, answer from the L1 cache, then L2 (volatile),
then L3 (persistent), then the table's ``defaultValue`` — and never a wrong vector.

Rules that keep it right when parts fail or race:

* A key gets the default only when the authoritative tier (L3 when there is one, else L2) has said
  it does not hold it. When that tier cannot be asked, the call raises :class:`UnavailableError`
  rather than invent a row.
* A tier that raises :class:`UnavailableError` is skipped for the call and re-probed at most every
  ``probe_interval_s``, so a dead Redis costs one timeout a second, not one per call; the path is
  ``degraded`` meanwhile.
* An update a tier could not take is kept and replayed to it before anything else is written to or
  read from it for those keys, so a Redis that comes back never serves the row from before.
* L1 fills and L3 → L2 write-backs carry the table's update epoch from before their fetch and are
  dropped when an update landed in between, so a slow fill cannot put an old row back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from node_agent.array_backend import to_host
from node_agent.cache.l1 import L1Table, build_l1
from node_agent.dedupe import unique_inverse
from node_agent.errors import InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.plan import Plan
from node_agent.spec import ModelSpec, TableSpec
from node_agent.tiers.base import Tier

log = logging.getLogger(__name__)

#: how long a tier that failed is left alone before the next call tries it again
DEFAULT_PROBE_INTERVAL_S = 1.0
#: background L1 fills waiting at most; more are dropped (they are only cache fills) and counted
DEFAULT_FILL_QUEUE_SIZE = 64


@dataclass
class _TierState:
    """One tier and what the path knows of its health."""

    role: str  # "volatile" (L2) or "persistent" (L3)
    tier: Tier
    up: bool = True
    errors: int = 0
    last_error: str = ""
    next_probe: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class LookupPath:
    """Serves lookups of a model's tables through L1 → L2 → L3 → default. Thread-safe.

    ``l1`` maps a table name to its L1 (tables absent from it are not cached). The path owns its
    tiers: :meth:`close` closes them unless ``close_tiers=False``.
    """

    def __init__(
        self,
        tables: Sequence[TableSpec],
        *,
        l1: Mapping[str, L1Table] | None,
        volatile: Tier | None,
        persistent: Tier | None,
        hit_rate_threshold: float = 0.9,
        fill_queue_size: int = DEFAULT_FILL_QUEUE_SIZE,
        probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
        close_tiers: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tables = {t.name: t for t in tables}
        self._l1 = dict(l1 or {})
        unknown = sorted(set(self._l1) - set(self._tables))
        if unknown:
            raise InvalidArgumentError(f"L1 caches given for unknown table(s): {', '.join(unknown)}")
        self._tiers = [
            _TierState(role, tier)
            for role, tier in (("volatile", volatile), ("persistent", persistent))
            if tier is not None
        ]
        # the tier whose "not found" means the model has no such key
        self._authority = self._tiers[-1] if self._tiers else None
        self.hit_rate_threshold = hit_rate_threshold
        self._probe_interval_s = probe_interval_s
        self._close_tiers = close_tiers
        self._clock = clock
        # Two locks per table, always taken in this order: `_write_locks` orders writes to the tiers
        # (updates, replays, write-backs); `_l1_locks` makes "is the epoch unchanged? then fill L1"
        # atomic against an update's "bump the epoch, refresh L1". A slow L1 fill never holds up a
        # tier write and the other way round.
        self._write_locks = {name: threading.Lock() for name in self._tables}
        self._l1_locks = {name: threading.Lock() for name in self._tables}
        self._epochs = dict.fromkeys(self._tables, 0)
        # (role, table) → updates that tier missed, oldest first; replayed before it is used again
        self._pending: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._stats_lock = threading.Lock()
        self._requested = dict.fromkeys(self._tables, 0)
        self._defaults = dict.fromkeys(self._tables, 0)
        self._sync_fills = 0
        self._background_fills = 0
        self._dropped_fills = 0
        self._stale_fills = 0
        self._closed = False
        self._fills: queue.Queue[tuple[str, np.ndarray, np.ndarray, int] | None] = queue.Queue(
            fill_queue_size
        )
        self._fill_worker = threading.Thread(target=self._run_fill_worker, name="l1-fill", daemon=True)
        self._fill_worker.start()
        devices = sorted({cache.device for cache in self._l1.values()})
        self.device = devices[0] if devices else "cpu"

    # -- the serving contract ------------------------------------------------------------------

    def tables(self) -> Mapping[str, TableSpec]:
        return MappingProxyType(self._tables)

    def lookup(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (int64, any order, repeats allowed): host NumPy ``(n, dim)`` in the
        table's dtype; keys the model does not have get rows of ``defaultValue``."""
        spec = self._table(table)
        keys = _as_keys(keys)
        if _ascending_distinct(keys):
            # what a client that deduplicates sends: no sort, and the rows are the answer as they are
            rows = self._lookup_unique(spec, keys)
        else:
            unique, inverse = unique_inverse(keys)
            rows = self._lookup_unique(spec, unique)[inverse]
        with self._stats_lock:
            self._requested[table] += int(keys.shape[0])
        return rows

    def lookup_many(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`lookup` for several tables; an unknown table fails the batch before any work."""
        for table in batch:
            self._table(table)
        return {table: self.lookup(table, keys) for table, keys in batch.items()}

    def update(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Online update: writes L2 and L3, then refreshes the rows L1 holds. Raises
        :class:`UnavailableError` when no tier took it; a tier that missed it gets it replayed."""
        spec = self._table(table)
        keys = _as_keys(keys)
        values = np.asarray(values)
        if values.ndim != 2 or values.shape != (keys.shape[0], spec.dim):
            raise InvalidArgumentError(
                f"values for table {table!r} must have shape ({keys.shape[0]}, {spec.dim}); got {values.shape}"
            )
        if values.dtype.kind != "f":
            raise InvalidArgumentError(
                f"values for table {table!r} must be floating point; got {values.dtype}"
            )
        if keys.shape[0] == 0:
            return
        unique, first_in_reversed = np.unique(keys[::-1], return_index=True)
        rows = values[::-1][first_in_reversed].astype(spec.dtype)  # the last write of a key wins
        with self._write_locks[table]:
            took, missed = [], []
            for state in self._tiers:
                if not self._may_try(state):
                    # down and not due for a probe: kept for the replay, without pushing the probe back
                    # (updates faster than the probe interval would otherwise keep it down for good)
                    missed.append(state)
                    continue
                try:
                    self._replay_pending(state, table)
                    state.tier.insert(table, unique, rows)
                except UnavailableError as exc:
                    self._tier_failed(state, exc)
                    missed.append(state)
                else:
                    self._tier_ok(state)
                    took.append(state.role)
            if not took:
                raise UnavailableError(
                    f"update of {unique.shape[0]} rows of table {table!r} reached no tier"
                    + (f" ({'; '.join(s.last_error for s in missed)})" if missed else " (none configured)")
                )
            for state in missed:
                self._pending[(state.role, table)].append((unique, rows))
            with self._l1_locks[table]:
                self._epochs[table] += 1
                l1 = self._l1.get(table)
                if l1 is not None:
                    l1.update(unique, rows)

    def invalidate_l1(self) -> None:
        """Empties every table's L1, so nothing it held is served again: what an agent does when it
        learns it missed updates. A fill that started before lands nowhere (its epoch moved on)."""
        for table in self._tables:
            with self._l1_locks[table]:
                self._epochs[table] += 1
                l1 = self._l1.get(table)
                if l1 is not None:
                    l1.clear()

    @property
    def degraded(self) -> bool:
        return any(not s.up for s in self._tiers) or any(self._pending.values())

    def stats(self) -> dict[str, Any]:
        tables: dict[str, Any] = {}
        for name in sorted(self._tables):
            l1 = self._l1.get(name)
            entry: dict[str, Any] = (
                l1.stats()
                if l1 is not None
                else {"hits": 0, "misses": 0, "hit_rate": 0.0, "evictions": 0, "size": 0, "capacity_rows": 0}
            )
            entry["keys_requested"] = self._requested[name]
            entry["defaults"] = self._defaults[name]
            tables[name] = entry
        tiers = {
            s.role: {
                **dict(s.tier.stats()),
                "name": s.tier.name,
                "up": s.up,
                "path_errors": s.errors,
                "last_error": s.last_error,
            }
            for s in self._tiers
        }
        return {
            "device": self.device,
            "degraded": self.degraded,
            "tables": tables,
            "tiers": tiers,
            "dropped_fills": self._dropped_fills,
            "fills": {
                "sync": self._sync_fills,
                "background": self._background_fills,
                "stale": self._stale_fills,
            },
            "pending_writes": {
                f"{role}/{table}": sum(int(k.shape[0]) for k, _ in batches)
                for (role, table), batches in sorted(self._pending.items())
                if batches
            },
            "hit_rate_threshold": self.hit_rate_threshold,
        }

    def wait_for_fills(self, timeout_s: float = 5.0) -> bool:
        """Blocks until queued background fills are applied (or ``timeout_s``); True if drained."""
        deadline = time.monotonic() + timeout_s
        while self._fills.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._fills.unfinished_tasks

    def close(self) -> None:
        """Stops the fill worker (dropping fills not yet applied) and closes the tiers."""
        if self._closed:
            return
        self._closed = True
        while True:  # make room for the stop signal: what is queued is only cache fills
            try:
                self._fills.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._fills.get_nowait()
                    self._fills.task_done()
                except queue.Empty:
                    pass
        self._fill_worker.join(timeout=5.0)
        if self._close_tiers:
            for state in self._tiers:
                try:
                    state.tier.close()
                except Exception:  # closing is best effort: a dead Redis must not block shutdown
                    log.warning("closing %s tier %s failed", state.role, state.tier.name, exc_info=True)

    # -- the path ------------------------------------------------------------------------------

    def _table(self, table: str) -> TableSpec:
        if not isinstance(table, str) or not table:
            raise InvalidArgumentError("table name must be a non-empty string")
        spec = self._tables.get(table)
        if spec is None:
            raise NotFoundError(f"unknown table {table!r}; known: {', '.join(sorted(self._tables))}")
        return spec

    def _lookup_unique(self, spec: TableSpec, unique: np.ndarray) -> np.ndarray:
        name = spec.name
        n = unique.shape[0]
        l1 = self._l1.get(name)
        if l1 is not None and n:
            cached, hit = l1.query(unique, sorted_unique=True)
            # the cache hands back a fresh array with zeros for misses: it becomes the answer
            rows = to_host(cached)
            if rows.dtype != spec.dtype or not rows.flags.writeable:
                rows = rows.astype(spec.dtype)
            missing = ~to_host(hit)
            if not missing.any():
                return rows
        else:
            rows = np.zeros((n, spec.dim), dtype=spec.dtype)
            missing = np.ones(n, dtype=bool)
        # read before any tier is asked: a fill from this fetch is valid only if no update lands meanwhile
        epoch = self._epochs[name]
        # the authoritative tier said it has no such key (with no tier at all, L1 is all there is)
        absent = np.full(n, self._authority is None, dtype=bool)
        volatile_answered: np.ndarray | None = None
        writeback: list[tuple[np.ndarray, np.ndarray]] = []
        fills: list[tuple[np.ndarray, np.ndarray]] = []

        for state in self._tiers:
            if not missing.any():
                break
            if not self._may_try(state):
                continue
            if self._pending.get((state.role, name)):
                with self._write_locks[name]:
                    try:
                        self._replay_pending(state, name)
                    except UnavailableError as exc:
                        self._tier_failed(state, exc)
                        continue
            ask = np.nonzero(missing)[0]
            try:
                got, found = state.tier.fetch(name, unique[ask])
            except UnavailableError as exc:
                self._tier_failed(state, exc)
                continue
            self._tier_ok(state)
            found = np.asarray(found, dtype=bool)
            if found.all():  # the usual case: the tier's fresh array is taken as it is
                hit, found_rows = ask, np.asarray(got).astype(spec.dtype, copy=False)
            else:
                hit = ask[found]
                found_rows = np.asarray(got)[found].astype(spec.dtype, copy=False)
            rows[hit] = found_rows
            missing[hit] = False
            fills.append((unique[hit], found_rows))
            if state is self._authority:
                absent[ask[~found]] = True
            if state.role == "volatile":
                volatile_answered = ask
            elif volatile_answered is not None and hit.shape[0]:
                writeback.append((unique[hit], found_rows))

        unknown = missing & ~absent
        if unknown.any():
            down = ", ".join(f"{s.role} tier {s.tier.name}" for s in self._tiers if not s.up) or "no tier"
            raise UnavailableError(
                f"{int(unknown.sum())} key(s) of table {name!r} are not cached and cannot be looked up now "
                f"({down} unavailable)"
            )
        if missing.any():
            rows[missing] = spec.default_value
            with self._stats_lock:
                self._defaults[name] += int(missing.sum())

        if writeback:
            self._write_back(name, epoch, writeback)
        if l1 is not None and fills:
            if len(fills) == 1:
                keys, values = fills[0]
            else:
                keys, values = np.concatenate([k for k, _ in fills]), np.concatenate([v for _, v in fills])
            if keys.shape[0]:
                self._fill(name, l1, keys, values, epoch)
        return rows

    def _fill(self, table: str, l1: L1Table, keys: np.ndarray, rows: np.ndarray, epoch: int) -> None:
        """Sync below the hit-rate threshold (a cold cache must warm fast), background above it (a
        warm cache should not make the caller wait for a write it barely needs)."""
        if l1.hit_rate < self.hit_rate_threshold:
            self._apply_fill(table, keys, rows, epoch)
            with self._stats_lock:
                self._sync_fills += 1
            return
        try:
            self._fills.put_nowait((table, keys, rows, epoch))
        except queue.Full:
            with self._stats_lock:
                self._dropped_fills += 1

    def _apply_fill(self, table: str, keys: np.ndarray, rows: np.ndarray, epoch: int) -> None:
        with self._l1_locks[table]:
            if self._epochs[table] != epoch:
                with self._stats_lock:
                    self._stale_fills += 1
                return
            self._l1[table].insert(keys, rows)

    def _run_fill_worker(self) -> None:
        """Applies background L1 fills in order; runs until :meth:`close` queues ``None``."""
        while True:
            task = self._fills.get()
            try:
                if task is None:
                    return
                table, keys, rows, epoch = task
                self._apply_fill(table, keys, rows, epoch)
                with self._stats_lock:
                    self._background_fills += 1
            except Exception:  # a failed cache fill costs a later miss; it must not stop the worker
                log.exception("background L1 fill failed")
            finally:
                self._fills.task_done()

    def _write_back(self, table: str, epoch: int, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Rows L3 had and L2 did not go to L2 (best effort), unless an update landed meanwhile."""
        volatile = next(s for s in self._tiers if s.role == "volatile")
        keys = np.concatenate([k for k, _ in batches])
        rows = np.concatenate([v for _, v in batches])
        with self._write_locks[table]:
            if self._epochs[table] != epoch or self._pending.get((volatile.role, table)):
                return
            try:
                volatile.tier.insert(table, keys, rows)
            except UnavailableError as exc:
                self._tier_failed(volatile, exc)

    def _replay_pending(self, state: _TierState, table: str) -> None:
        """Writes the updates ``state`` missed, oldest first; the caller holds the table's write lock."""
        batches = self._pending.get((state.role, table))
        while batches:
            keys, rows = batches[0]
            state.tier.insert(table, keys, rows)
            batches.pop(0)
        self._tier_ok(state)

    # -- tier health ---------------------------------------------------------------------------

    def _may_try(self, state: _TierState) -> bool:
        """True when the tier is up, or down and due for its next probe (claimed by this caller)."""
        if state.up:
            return True
        with state.lock:
            now = self._clock()
            if now < state.next_probe:
                return False
            state.next_probe = now + self._probe_interval_s
            return True

    def tier_answers(self, role: str) -> None:
        """A health probe found the ``role`` tier (``volatile``, ``persistent``) answering: if a lookup
        had set it down, it is up again now (a lookup that fails on it sets it down again)."""
        for state in self._tiers:
            if state.role == role:
                self._tier_ok(state)

    def _tier_failed(self, state: _TierState, exc: Exception) -> None:
        with state.lock:
            if state.up:
                log.warning("%s tier %s unavailable, serving around it: %s", state.role, state.tier.name, exc)
            state.up = False
            state.errors += 1
            state.last_error = str(exc)
            state.next_probe = self._clock() + self._probe_interval_s

    def _tier_ok(self, state: _TierState) -> None:
        if not state.up:
            with state.lock:
                log.info("%s tier %s is back", state.role, state.tier.name)
                state.up = True


def _ascending_distinct(keys: np.ndarray) -> bool:
    """True when ``keys`` are strictly ascending, i.e. already ``np.unique``'s output."""
    return keys.shape[0] < 2 or bool((keys[1:] > keys[:-1]).all())


def _as_keys(keys: Any) -> np.ndarray:
    keys = np.asarray(keys)
    if keys.ndim != 1:
        raise InvalidArgumentError(f"keys must be one-dimensional; got shape {keys.shape}")
    if keys.shape[0] and keys.dtype.kind not in "iu":
        raise InvalidArgumentError(f"keys must be int64; got {keys.dtype}")
    return keys.astype(np.int64, copy=False)


def build_lookup_path(
    model: ModelSpec,
    *,
    volatile: Tier | None,
    persistent: Tier | None,
    plan: Plan | None = None,
    partition: int = 0,
    device: str = "auto",
    layout: str = "per-table",
    **path_options: Any,
) -> LookupPath:
    """The lookup path of one partition of ``model``: an L1 of ``memoryPerGPU`` per GPU the partition
    uses under ``plan`` (one GPU holding every table when there is no plan), in front of the tiers.
    Keys of buckets the partition does not own are still answered, from L2/L3."""
    l1 = build_l1(
        model.tables,
        memory_per_gpu=model.cache.memory_per_gpu,
        plan=plan,
        partition=partition,
        policy=model.cache.policy,
        associativity=model.cache.associativity,
        layout=layout,
        device=device,
    )
    return LookupPath(
        model.tables,
        l1=l1,
        volatile=volatile,
        persistent=persistent,
        hit_rate_threshold=model.cache.hit_rate_threshold,
        **path_options,
    )
