"""The placement planner: ``plan_placement(model, topology, previous) → Plan``, a pure and deterministic
function that assigns tables (whole, or as hash-bucket ranges) to the ``(partition, gpu)`` slots of one
replica under each GPU's cache budget, balancing expected lookup load and moving little on re-plans.

Decisions (the contract the tests hold it to):

* **Load** of a shard is ``hotness x (buckets / bucket_count) x row_bytes`` (hotness normalised by
  :meth:`ModelSpec.hotness`); **bytes** of a shard are the rows its buckets hold, counted as
  ``rows*hi // B - rows*lo // B`` so the bytes of a table's shards add up exactly to the table.
* **Budget**: a GPU caches ``spec.cache.cachedFraction`` (f, HPS's gpucacheper) of the rows of every
  shard it owns; the L2/L3 tiers serve the rest. So a slot may own up to ``gpu_memory_bytes / f``
  bytes of shards (its *capacity*), and with f = 1 (the default) a slot's shards fit whole in its
  cache. ``replicate`` needs f x the whole model on each GPU. Too little memory raises
  :class:`InsufficientGPUMemoryError` with the cache bytes needed (f x shard bytes) and available.
* **Bucket count** ``B``: ``spec.placement.bucketCount`` when set; otherwise the smallest power of two
  at least ``64``, ``8 x slots`` and ``2 x (largest table load) / ((maxImbalance - 1) x mean slot load)``
  (so one bucket of any table moves a slot by at most half the imbalance tolerance), capped at 2^20.
  Against a previous plan ``B`` only ever grows by powers of two, so old bucket ranges map exactly
  onto new ones (bucket ``b`` of ``B`` is buckets ``b + j*B`` of ``k*B``: the hash is taken modulo).
* **Strategies**: ``replicate`` puts every table on every slot; ``table`` keeps tables whole
  (largest-load-first onto the least-loaded slot with room); ``row`` splits every table into near-equal
  bucket counts on every slot; ``auto`` is largest-first onto the least-loaded slot too, but keeps a
  table whole only while the slot stays under a soft cap halfway between the mean and
  ``maxImbalance x mean``, and otherwise splits it to fill slots up to the mean.
* **Re-plans** (``previous`` given): every piece stays on its slot when the slot still exists and
  stays within ``maxImbalance x mean`` load and the budget; over-full slots shed their pieces with the
  most load per byte first (least bytes moved per unit of load shed); shed and orphaned pieces
  (removed slots, new tables) water-fill the least-loaded slots. Where that leaves a slot over the cap
  because the slots with load room are full of cold bytes, ``auto`` exchanges: the over-loaded slot's
  hot buckets go to the slot with the most load room, which first sends its coldest buckets to slots
  with free bytes (or back to the over-loaded slot), pieces that move anyway first, in whole buckets,
  until every slot is within the cap or no exchange helps. ``row`` re-plans per table, keeping
  each slot's buckets up to its ``⌈B/slots⌉`` share. A re-plan with no change returns ``previous``
  itself (same version); any change is ``previous.version + 1``. Replicas never enter the plan.
* **movedBytes** counts the bytes of ``(table, bucket)`` pieces a slot holds that it did not hold in
  ``previous`` (0 without a previous plan: an initial load is not a move).
* **movementLowerBound**: bytes held only by removed slots or by no slot (new tables) must move; and
  each surviving slot whose load exceeds ``maxImbalance x mean`` (or whose bytes exceed the budget)
  must shed at least that excess, carried by its densest pieces (a fractional-knapsack bound). For
  ``row`` the per-table bound counts buckets above each slot's ``⌈B/slots⌉`` share instead, and for
  ``replicate`` the bound is what every slot lacks. When the previous plan held a bucket on several
  slots (``replicate``) only the orphaned bytes are counted. Every term is bytes that any plan
  within the cap and budget must move, so the bound stays a true lower bound; it does not count the
  cold bytes a memory-full slot must give up to take load (an exchange), so there movedBytes may
  exceed it by those bytes.
* **partitions = 0**: the smallest ``P ≥ ⌈total bytes / (gpus_per_pod x budget)⌉`` (1 for
  ``replicate``) whose plan fits, trying at most 8 consecutive values.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from hps_operator.core.topology import Topology

from node_agent.errors import InsufficientGPUMemoryError
from node_agent.plan import Assignment, Plan, PlanMetrics, TableShape, merge_bucket_ranges
from node_agent.spec import ModelSpec

#: a shard being placed: (table index, first bucket, end bucket)
Piece = tuple[int, int, int]

MAX_BUCKET_COUNT = 1 << 20
MIN_BUCKET_COUNT = 64
#: one bucket of any table carries at most 1/BALANCE_GRAIN of the imbalance tolerance of a slot
BALANCE_GRAIN = 8
#: consecutive partition counts tried when the spec leaves ``partitions`` to the planner
PARTITION_SEARCH = 8
#: tolerance of load comparisons, so a re-plan of an unchanged plan never sheds on rounding noise
_EPS = 1e-9


@dataclass(frozen=True)
class _Tables:
    """The model's tables as arrays, in spec order, for one bucket count."""

    names: tuple[str, ...]
    rows: np.ndarray
    row_bytes: np.ndarray
    #: expected load of one bucket (hotness x row bytes / B)
    bucket_load: np.ndarray
    #: load per byte, the order in which over-full slots shed
    density: np.ndarray
    bucket_count: int

    @classmethod
    def of(cls, model: ModelSpec, bucket_count: int) -> _Tables:
        hot = model.hotness()
        rows = np.array([t.rows for t in model.tables], dtype=np.int64)
        row_bytes = np.array([t.row_bytes for t in model.tables], dtype=np.int64)
        hotness = np.array([hot[t.name] for t in model.tables], dtype=np.float64)
        return cls(
            names=tuple(t.name for t in model.tables),
            rows=rows,
            row_bytes=row_bytes,
            bucket_load=hotness * row_bytes / bucket_count,
            density=hotness / rows,
            bucket_count=bucket_count,
        )

    def range_bytes(self, t: int, lo: int, hi: int) -> int:
        rows = int(self.rows[t])
        b = self.bucket_count
        return (rows * hi // b - rows * lo // b) * int(self.row_bytes[t])

    def max_bucket_bytes(self, t: int) -> int:
        """Bytes of the fullest bucket of table ``t`` (a conservative size for one bucket)."""
        return -(-int(self.rows[t]) // self.bucket_count) * int(self.row_bytes[t])

    def table_load(self) -> np.ndarray:
        return self.bucket_load * self.bucket_count

    def table_bytes(self) -> np.ndarray:
        return self.rows * self.row_bytes


@dataclass
class _Previous:
    """The previous plan seen through the new topology and bucket count."""

    #: (table, slot) → merged bucket ranges that slot already holds (surviving slots only)
    holdings: dict[tuple[int, int], list[tuple[int, int]]]
    #: per surviving slot, the pieces it owns (one owner per bucket)
    owned: list[list[Piece]]
    #: pieces no surviving slot holds: removed slots' pieces and tables new to the plan
    orphans: list[Piece]
    #: some bucket had several holders (a replicate plan): the send-side bound does not apply
    multi_owner: bool


def plan_placement(model: ModelSpec, topology: Topology, previous: Plan | None = None) -> Plan:
    """The placement of ``model`` on ``topology``, moving as little as the balance target allows
    from ``previous``. Raises :class:`InsufficientGPUMemoryError` when nothing fits."""
    if topology.partitions > 0:
        return _plan_on(model, topology, previous)
    tables = _Tables.of(model, 1)
    per_pod = topology.gpus_per_pod * _capacity(topology.gpu_memory_bytes, model)
    first = (
        1
        if model.placement.strategy == "replicate"
        else max(1, -(-int(tables.table_bytes().sum()) // per_pod))
    )
    failure: InsufficientGPUMemoryError | None = None
    for partitions in range(first, first + PARTITION_SEARCH):
        try:
            return _plan_on(model, topology.with_partitions(partitions), previous)
        except InsufficientGPUMemoryError as exc:
            if model.placement.strategy == "replicate":
                raise  # more partitions give a replicate plan no more room per GPU
            failure = exc
    assert failure is not None
    raise failure


def choose_bucket_count(model: ModelSpec, slots: int, previous: Plan | None = None) -> int:
    """The plan's bucket count (see the module docstring for the rule)."""
    if model.placement.bucket_count:
        return model.placement.bucket_count
    hot = model.hotness()
    loads = [hot[t.name] * t.row_bytes for t in model.tables]
    total = sum(loads)
    tolerance = max(model.placement.max_imbalance - 1.0, 0.01)
    for_balance = BALANCE_GRAIN * max(loads) * slots / (tolerance * total) if total > 0 else 1.0
    need = max(MIN_BUCKET_COUNT, 8 * slots, math.ceil(for_balance))
    if previous is not None and previous.bucket_count > 0:
        count = previous.bucket_count
        while count < need and count * 2 <= MAX_BUCKET_COUNT:
            count *= 2
        return count
    return min(1 << (need - 1).bit_length(), MAX_BUCKET_COUNT)


# ---------------------------------------------------------------------------------------------
# one topology


def _capacity(gpu_memory_bytes: int, model: ModelSpec) -> int:
    """Bytes of shards one GPU may own: its cache holds ``cachedFraction`` of them."""
    return int(gpu_memory_bytes / model.cache.cached_fraction)


def _cache_bytes(shard_bytes: int, model: ModelSpec) -> int:
    return math.ceil(shard_bytes * model.cache.cached_fraction)


def _plan_on(model: ModelSpec, topology: Topology, previous: Plan | None) -> Plan:
    slots = topology.slots
    memory = topology.gpu_memory_bytes
    budget = _capacity(memory, model)  # in shard bytes, the unit the layout works in
    strategy = model.placement.strategy
    bucket_count = choose_bucket_count(model, slots, previous)
    tables = _Tables.of(model, bucket_count)
    total_bytes = int(tables.table_bytes().sum())
    cached = "" if model.cache.cached_fraction == 1 else f"; each GPU caches {model.cache.cached_fraction:g} of what it owns"
    if strategy == "replicate":
        if total_bytes > budget:
            raise InsufficientGPUMemoryError(
                _cache_bytes(total_bytes, model), memory, "strategy replicate caches every table on every GPU" + cached
            )
    elif total_bytes > slots * budget:
        raise InsufficientGPUMemoryError(
            _cache_bytes(total_bytes, model),
            slots * memory,
            f"{topology.partitions} partition(s) x {topology.gpus_per_pod} GPU(s) x {memory} bytes" + cached,
        )
    prior = _see_previous(previous, tables, topology) if previous is not None else None

    if strategy == "replicate":
        layout = [[(t, 0, bucket_count) for t in range(len(tables.names))] for _ in range(slots)]
    elif strategy == "row":
        layout = _row_layout(tables, slots, prior)
    else:
        try:
            layout = _balanced_layout(
                tables,
                slots,
                budget,
                prior,
                max_imbalance=model.placement.max_imbalance,
                split=strategy == "auto",
            )
        except InsufficientGPUMemoryError as exc:  # the layout counts shard bytes; users read cache bytes
            raise InsufficientGPUMemoryError(
                _cache_bytes(exc.needed, model), int(exc.available * model.cache.cached_fraction), exc.detail + cached
            ) from None
    _check_budget(tables, layout, model, topology)

    assignments = tuple(
        sorted(
            Assignment(
                tables.names[t],
                s // topology.gpus_per_pod,
                s % topology.gpus_per_pod,
                (lo, hi),
                tables.range_bytes(t, lo, hi),
            )
            for s, pieces in enumerate(layout)
            for t, lo, hi in _merged(pieces)
        )
    )
    if (
        previous is not None
        and previous.bucket_count == bucket_count
        and previous.partitions == topology.partitions
        and previous.gpus_per_pod == topology.gpus_per_pod
        and previous.strategy == strategy
        and previous.model == model.name
        and previous.assignments == assignments
    ):
        return previous
    metrics = _metrics(tables, layout, prior, strategy, model.placement.max_imbalance, budget)
    version = previous.version + 1 if previous is not None else 1
    shapes = tuple(sorted(TableShape(t.name, t.rows, t.row_bytes) for t in model.tables))
    return Plan(version, bucket_count, topology.partitions, topology.gpus_per_pod, strategy, assignments,
                metrics, model.name, shapes)  # fmt: skip


def _check_budget(tables: _Tables, layout: list[list[Piece]], model: ModelSpec, topology: Topology) -> None:
    budget = _capacity(topology.gpu_memory_bytes, model)
    for s, pieces in enumerate(layout):
        used = sum(tables.range_bytes(t, lo, hi) for t, lo, hi in pieces)
        if used > budget:
            raise InsufficientGPUMemoryError(
                _cache_bytes(used, model),
                topology.gpu_memory_bytes,
                f"partition {s // topology.gpus_per_pod} GPU {s % topology.gpus_per_pod} would hold "
                f"{', '.join(sorted({tables.names[t] for t, _, _ in pieces}))}",
            )


def _merged(pieces: Iterable[Piece]) -> list[Piece]:
    """Pieces of one slot with adjacent ranges of a table joined (fewer, larger ranges)."""
    out: list[Piece] = []
    for t, lo, hi in sorted(pieces):
        if out and out[-1][0] == t and out[-1][2] == lo:
            out[-1] = (t, out[-1][1], hi)
        else:
            out.append((t, lo, hi))
    return out


# ---------------------------------------------------------------------------------------------
# the previous plan


def _ranges_in(lo: int, hi: int, old_count: int, new_count: int) -> list[tuple[int, int]]:
    """Old buckets ``[lo, hi)`` of ``old_count`` as ranges of ``new_count`` (a multiple of it)."""
    if lo == 0 and hi == old_count:
        return [(0, new_count)]
    return [(lo + j, hi + j) for j in range(0, new_count, old_count)]


def _see_previous(previous: Plan, tables: _Tables, topology: Topology) -> _Previous:
    index = {name: t for t, name in enumerate(tables.names)}
    slots = topology.slots
    new_count = tables.bucket_count
    owned: list[list[Piece]] = [[] for _ in range(slots)]
    holdings: dict[tuple[int, int], list[tuple[int, int]]] = {}
    orphans: list[Piece] = []
    multi_owner = False
    compatible = previous.bucket_count > 0 and new_count % previous.bucket_count == 0
    # per table: every previously held range with its slot (-1: a slot that no longer exists)
    held: dict[int, list[tuple[int, int, int]]] = {t: [] for t in range(len(tables.names))}
    if compatible:
        for a in previous.assignments:
            t = index.get(a.table)
            if t is None:
                continue  # a table the model no longer has
            alive = a.partition < topology.partitions and a.gpu < topology.gpus_per_pod
            s = a.partition * topology.gpus_per_pod + a.gpu if alive else -1
            for lo, hi in _ranges_in(a.buckets[0], a.buckets[1], previous.bucket_count, new_count):
                held[t].append((lo, hi, s))
                if s >= 0:
                    holdings.setdefault((t, s), []).append((lo, hi))
    for key, joined in holdings.items():
        holdings[key] = merge_bucket_ranges(joined)

    for t, ranges in held.items():
        ranges.sort()
        if any(ranges[i][0] < ranges[i - 1][1] for i in range(1, len(ranges))):
            multi_owner = True
            _own_shared(t, ranges, new_count, owned, orphans)
            continue
        cursor = 0
        for lo, hi, s in ranges:
            if lo > cursor:
                orphans.append((t, cursor, lo))  # buckets the previous plan left unowned
            (owned[s] if s >= 0 else orphans).append((t, lo, hi))
            cursor = hi
        if cursor < new_count:
            orphans.append((t, cursor, new_count))
    return _Previous(holdings, owned, orphans, multi_owner)


def _own_shared(t: int, ranges: Sequence[tuple[int, int, int]], bucket_count: int,
                owned: list[list[Piece]], orphans: list[Piece]) -> None:  # fmt: skip
    """Where several slots hold a bucket, the lowest surviving slot keeps it."""
    none = np.iinfo(np.int64).max
    owner = np.full(bucket_count, none, dtype=np.int64)
    for lo, hi, s in ranges:
        if s >= 0:
            np.minimum(owner[lo:hi], s, out=owner[lo:hi])
    edges = np.flatnonzero(np.diff(owner)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [bucket_count]))
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        s = int(owner[lo])
        (orphans if s == none else owned[s]).append((t, lo, hi))


# ---------------------------------------------------------------------------------------------
# table / auto: largest first onto the least-loaded slot, splitting (auto) to fill up to the mean


def _balanced_layout(tables: _Tables, slots: int, budget: int, prior: _Previous | None, *,
                     max_imbalance: float, split: bool) -> list[list[Piece]]:  # fmt: skip
    mean = float(tables.table_load().sum()) / slots
    cap = max_imbalance * mean
    if not split:  # a slot holding one table above the cap cannot do better by moving it
        cap = max(cap, float(tables.table_load().max()))
    if prior is None:
        kept: list[list[Piece]] = [[] for _ in range(slots)]
        pool = [(t, 0, tables.bucket_count) for t in range(len(tables.names))]
    else:
        kept = [list(p) for p in prior.owned]
        pool = list(prior.orphans)
        if not split:
            kept, pool = _whole_tables_only(tables, kept, pool)
    load = np.array(
        [sum((hi - lo) * tables.bucket_load[t] for t, lo, hi in p) for p in kept], dtype=np.float64
    )
    used = [sum(tables.range_bytes(t, lo, hi) for t, lo, hi in p) for p in kept]
    for s in range(slots):
        if load[s] > cap * (1 + _EPS) or used[s] > budget:
            kept[s], shed = _shed(tables, kept[s], load_over=load[s] - cap * (1 + _EPS), bytes_over=used[s] - budget,
                                  split=split)  # fmt: skip
            pool.extend(shed)
            load[s] = sum((hi - lo) * tables.bucket_load[t] for t, lo, hi in kept[s])
            used[s] = sum(tables.range_bytes(t, lo, hi) for t, lo, hi in kept[s])
    if not pool:
        return kept
    pool_load = float(sum((hi - lo) * tables.bucket_load[t] for t, lo, hi in pool))
    level = _water_level(load, pool_load)
    soft = level + 0.5 * max(cap - level, 0.0)
    pool.sort(key=lambda p: (-(p[2] - p[1]) * tables.bucket_load[p[0]], -tables.range_bytes(*p), p))
    heap = [(float(load[s]), s) for s in range(slots)]
    heapq.heapify(heap)
    smallest_bucket = min(tables.max_bucket_bytes(t) for t in range(len(tables.names)))
    for t, lo, hi in pool:
        w = float(tables.bucket_load[t])
        bucket_bytes = tables.max_bucket_bytes(t)
        while lo < hi:
            whole = tables.range_bytes(t, lo, hi)
            skipped: list[tuple[float, int]] = []
            chosen: tuple[float, int] | None = None
            while heap:
                entry = heapq.heappop(heap)
                free = budget - used[entry[1]]
                if free >= whole or (split and free >= bucket_bytes):
                    chosen = entry
                    break
                if free >= smallest_bucket:
                    skipped.append(entry)  # full for this table, maybe not for a smaller one
            for entry in skipped:
                heapq.heappush(heap, entry)
            if chosen is None:
                raise InsufficientGPUMemoryError(
                    whole,
                    max((budget - u for u in used), default=0),
                    f"table {tables.names[t]} buckets [{lo}, {hi}) fit no GPU's free cache"
                    + ("" if split else " (strategy table keeps tables whole)"),
                )
            slot_load, s = chosen
            free = budget - used[s]
            n = hi - lo
            if not split or (free >= whole and slot_load + n * w <= soft * (1 + _EPS)):
                k = n
            else:
                k = math.ceil((level - slot_load) / w - _EPS) if w > 0 else n
                if k < 1:
                    k = math.floor((cap - slot_load) / w + _EPS)
                k = min(max(k, 1), n)
                if free < tables.range_bytes(t, lo, lo + k):
                    k = max(1, min(k, free // bucket_bytes))
            kept[s].append((t, lo, lo + k))
            used[s] += tables.range_bytes(t, lo, lo + k)
            heapq.heappush(heap, (slot_load + k * w, s))
            lo += k
    if split:
        _repair_balance(tables, kept, budget, cap, prior)
    return kept


def _repair_balance(tables: _Tables, layout: list[list[Piece]], budget: int, cap: float,
                    prior: _Previous | None) -> None:  # fmt: skip
    """Brings slots still over ``cap`` after the water-fill under it, in place. The water-fill fails
    where the slots with load room have no byte room (full of large, rarely read tables): then an
    over-loaded slot's hot buckets go to the slot with the most load room, and that slot first sends
    cold buckets (least load per byte) to slots with free bytes, or back to the over-loaded slot (an
    exchange). Pieces that already move (not held there in ``previous``) go first, so an exchange
    adds as few moved bytes as it can. Stops when every slot is within ``cap`` or no exchange helps;
    costs one pass over the pieces when nothing is over."""
    slots = len(layout)
    load = np.array(
        [sum((hi - lo) * float(tables.bucket_load[t]) for t, lo, hi in p) for p in layout], dtype=np.float64
    )
    limit = cap * (1 + _EPS)
    if slots < 2 or float(load.max()) <= limit:
        return
    used = np.array([sum(tables.range_bytes(*p) for p in pieces) for pieces in layout], dtype=np.int64)
    hopeless: set[int] = set()
    tried: set[tuple[int, int]] = set()
    # each exchange lowers the total excess by at least one bucket's load, so this bound is never the
    # reason to stop on a solvable layout of sane size; it only keeps a pathological one finite
    for _ in range(8 * slots + 64):
        over = [s for s in np.flatnonzero(load > limit).tolist() if s not in hopeless]
        if not over:
            return
        o = max(over, key=lambda s: (load[s], -s))
        room = cap - load
        open_ = room > _EPS * cap
        open_[o] = False
        for s in [r for oo, r in tried if oo == o]:
            open_[s] = False
        if not open_.any():
            hopeless.add(o)
            continue
        r = int(np.argmax(np.where(open_, room, -np.inf)))
        moves = _exchange(tables, layout, prior, o, r, load=load, used=used, budget=budget, cap=cap)
        if moves is None:
            tried.add((o, r))
            continue
        for src, dst, (t, lo, hi) in moves:
            _take(layout[src], t, lo, hi)
            layout[dst].append((t, lo, hi))
            piece_load = (hi - lo) * float(tables.bucket_load[t])
            piece_bytes = tables.range_bytes(t, lo, hi)
            load[src] -= piece_load
            load[dst] += piece_load
            used[src] -= piece_bytes
            used[dst] += piece_bytes


def _exchange(tables: _Tables, layout: list[list[Piece]], prior: _Previous | None, o: int, r: int, *,
              load: np.ndarray, used: np.ndarray, budget: int, cap: float) -> list[tuple[int, int, Piece]] | None:  # fmt: skip
    """The moves ``(from, to, piece)`` that shift up to ``o``'s excess load from over-loaded slot ``o``
    to slot ``r`` without taking ``r`` over ``cap``, making byte room on ``r`` with its coldest buckets
    as needed; None when no piece of ``o`` can go."""
    limit = cap * (1 + _EPS)
    excess = float(load[o]) - cap
    room = cap - float(load[r])
    free = budget - used
    after = load.copy()

    def moved_anyway(s: int, p: Piece) -> bool:
        return prior is None or _overlap_bytes(tables, *p, prior.holdings.get((p[0], s), ())) == 0

    hot_first = sorted(layout[o], key=lambda p: (not moved_anyway(o, p), -tables.density[p[0]], p))
    cold_first = sorted(layout[r], key=lambda p: (not moved_anyway(r, p), tables.density[p[0]], p))
    moves: list[tuple[int, int, Piece]] = []
    for t, lo, hi in hot_first:
        if excess <= _EPS * cap or room <= _EPS * cap:
            break
        w = float(tables.bucket_load[t])
        if w <= 0:
            continue
        k = min(hi - lo, max(1, math.ceil(excess / w - _EPS)), math.floor(room / w + _EPS))
        if k < 1:
            continue
        hot = (t, hi - k, hi)
        hot_bytes = tables.range_bytes(*hot)
        need = hot_bytes - int(free[r])
        trial_free, trial_load, trial_cold = free.copy(), after.copy(), list(cold_first)
        trial_free[o] += hot_bytes
        trial_load[o] -= k * w
        cold: list[tuple[int, int, Piece]] = []
        if need > 0:
            made = _make_room(tables, trial_cold, r, need, below=float(tables.density[t]), free=trial_free,
                              load=trial_load, limit=limit, prefer_not=o)  # fmt: skip
            if made is None:
                continue
            cold = made
        trial_free[r] -= hot_bytes
        trial_load[r] += k * w
        free, after, cold_first = trial_free, trial_load, trial_cold
        moves += cold
        moves.append((o, r, hot))
        # what r sheds lowers its load too: its room is what keeps it within the cap
        excess -= k * w
        room = cap - float(after[r])
    return moves or None


def _make_room(tables: _Tables, cold_first: list[Piece], r: int, need: int, *, below: float, free: np.ndarray,
               load: np.ndarray, limit: float, prefer_not: int) -> list[tuple[int, int, Piece]] | None:  # fmt: skip
    """Moves of slot ``r``'s buckets from ``cold_first`` (density under ``below``, so ``r`` gains load
    overall) freeing ``need`` bytes, each to the slot with the most free bytes that stays within
    ``limit`` (``prefer_not`` only when no other can take it). ``cold_first``, ``free`` and ``load`` are
    updated; None when the bytes find no home."""
    moves: list[tuple[int, int, Piece]] = []
    for i, (t, lo, hi) in enumerate(cold_first):
        if need <= 0:
            break
        if tables.density[t] >= below * (1 - _EPS):
            continue
        w = float(tables.bucket_load[t])
        bucket_bytes = tables.max_bucket_bytes(t)
        while need > 0 and lo < hi:
            k = _buckets_for_bytes(tables, t, lo, hi, need)
            fits_load = load + k * w <= limit
            fits_load[r] = False
            candidates = fits_load & (free >= tables.range_bytes(t, hi - k, hi))
            others = candidates.copy()
            others[prefer_not] = False
            pick = others if others.any() else candidates
            if not pick.any():  # no slot takes the whole chunk: the roomiest takes what it can
                pick = fits_load
                if not pick.any():
                    return None
                d = int(np.argmax(np.where(pick, free, -1)))
                k = min(k, int(free[d]) // bucket_bytes)
                if k < 1:
                    return None
            else:
                d = int(np.argmax(np.where(pick, free, -1)))
            chunk_bytes = tables.range_bytes(t, hi - k, hi)
            moves.append((r, d, (t, hi - k, hi)))
            free[d] -= chunk_bytes
            free[r] += chunk_bytes
            load[d] += k * w
            load[r] -= k * w
            need -= chunk_bytes
            hi -= k
        cold_first[i] = (t, lo, hi)
    return moves if need <= 0 else None


def _take(pieces: list[Piece], t: int, lo: int, hi: int) -> None:
    """Removes buckets ``[lo, hi)`` of table ``t`` from the top of the slot's piece ending at ``hi``."""
    for i, (pt, plo, phi) in enumerate(pieces):
        if pt == t and phi == hi and plo <= lo:
            if plo < lo:
                pieces[i] = (t, plo, lo)
            else:
                del pieces[i]
            return
    raise AssertionError(f"no piece of table {t} ends at bucket {hi}")


def _whole_tables_only(tables: _Tables, kept: list[list[Piece]], pool: list[Piece]
                       ) -> tuple[list[list[Piece]], list[Piece]]:  # fmt: skip
    """For ``table``: a table stays only where it sits whole on one slot; anything split is re-placed."""
    full = tables.bucket_count
    whole_on = {p[0]: s for s, pieces in enumerate(kept) for p in pieces if p[1] == 0 and p[2] == full}
    out = [[p for p in pieces if whole_on.get(p[0]) == s] for s, pieces in enumerate(kept)]
    homeless = sorted({p[0] for p in pool} | {p[0] for pieces in kept for p in pieces} - set(whole_on))
    return out, [(t, 0, full) for t in homeless]


def _shed(tables: _Tables, pieces: list[Piece], *, load_over: float, bytes_over: int,
          split: bool) -> tuple[list[Piece], list[Piece]]:  # fmt: skip
    """Sheds the slot's most load-per-byte pieces until ``load_over`` load and ``bytes_over`` bytes are
    gone: the fewest bytes that bring the slot back under its caps. Shedding is in whole buckets, so
    among equally dense pieces the one whose buckets overshoot ``load_over`` least is cut."""
    rest = sorted(pieces, key=lambda p: (-tables.density[p[0]], p))
    shed: list[Piece] = []
    while rest and (load_over > 0 or bytes_over > 0):
        top = tables.density[rest[0][0]]
        densest = [i for i, p in enumerate(rest) if tables.density[p[0]] >= top * (1 - _EPS)]
        i, k = _cut(tables, [rest[i] for i in densest], load_over, bytes_over, split=split)
        i = densest[i]
        t, lo, hi = rest[i]
        if k < hi - lo:
            rest[i] = (t, lo, hi - k)
        else:
            del rest[i]
        shed.append((t, hi - k, hi))
        load_over -= k * float(tables.bucket_load[t])
        bytes_over -= tables.range_bytes(t, hi - k, hi)
    return rest, shed


def _cut(tables: _Tables, candidates: Sequence[Piece], load_over: float, bytes_over: int, *,
         split: bool) -> tuple[int, int]:  # fmt: skip
    """Which of equally dense ``candidates`` to shed from, and how many of its top buckets: the one
    covering the excess with the least overshoot when one can, else the largest whole."""
    best: tuple[float, int, int] | None = None
    for i, (t, lo, hi) in enumerate(candidates):
        w = float(tables.bucket_load[t])
        n = hi - lo
        if not split:
            k = n
        else:
            by_load = math.ceil(load_over / w - _EPS) if load_over > 0 and w > 0 else 0
            by_bytes = _buckets_for_bytes(tables, t, lo, hi, bytes_over) if bytes_over > 0 else 0
            k = max(by_load, by_bytes, 1)
            if k > n:
                continue
        covers = k * w >= load_over * (1 - _EPS) and tables.range_bytes(t, hi - k, hi) >= bytes_over
        if not covers:
            continue
        waste = float(tables.range_bytes(t, hi - k, hi))
        if best is None or waste < best[0]:
            best = (waste, i, k)
    if best is not None:
        return best[1], best[2]
    largest = max(range(len(candidates)),
                  key=lambda i: (tables.range_bytes(*candidates[i]), -i))  # fmt: skip
    t, lo, hi = candidates[largest]
    return largest, hi - lo


def _buckets_for_bytes(tables: _Tables, t: int, lo: int, hi: int, need: int) -> int:
    """The fewest top buckets of ``[lo, hi)`` holding at least ``need`` bytes (all when they don't)."""
    per_bucket = int(tables.rows[t]) * int(tables.row_bytes[t]) / tables.bucket_count
    k = min(hi - lo, max(1, math.ceil(need / per_bucket))) if per_bucket > 0 else hi - lo
    while k < hi - lo and tables.range_bytes(t, hi - k, hi) < need:
        k += 1  # integer row rounding: at most a bucket or two short
    return k


def _water_level(load: np.ndarray, poured: float) -> float:
    """The level ``L`` with ``Σ max(0, L - load) = poured``: where pouring the pool would bring the
    least-loaded slots."""
    ordered = np.sort(load)
    filled = (poured + np.cumsum(ordered)) / np.arange(1, len(ordered) + 1)
    reach = np.flatnonzero(ordered <= filled + _EPS * max(abs(float(filled[-1])), 1.0))
    return float(filled[int(reach[-1])])


# ---------------------------------------------------------------------------------------------
# row: every table on every slot, near-equal bucket counts


def _row_layout(tables: _Tables, slots: int, prior: _Previous | None) -> list[list[Piece]]:
    count = tables.bucket_count
    base, extra = divmod(count, slots)
    layout: list[list[Piece]] = [[] for _ in range(slots)]
    orphans_of: dict[int, list[Piece]] = {}
    if prior is not None:
        for p in prior.orphans:
            orphans_of.setdefault(p[0], []).append(p)
    rotation = 0
    for t in range(len(tables.names)):
        if prior is None:
            # the slots that take one extra bucket rotate from table to table, so counts even out
            lo = 0
            for j in range(slots):
                n = base + (1 if j < extra else 0)
                if n:
                    layout[(rotation + j) % slots].append((t, lo, lo + n))
                lo += n
            rotation = (rotation + extra) % slots
            continue
        owned = [[p for p in prior.owned[s] if p[0] == t] for s in range(slots)]
        have = np.array([sum(hi - lo for _, lo, hi in o) for o in owned], dtype=np.int64)
        # the slots already holding the most keep the extra buckets: the fewest buckets move
        target = np.full(slots, base, dtype=np.int64)
        target[np.argsort(-have, kind="stable")[:extra]] += 1
        pool: list[Piece] = list(orphans_of.get(t, []))
        for s in range(slots):
            keep = sorted(owned[s])
            surplus = int(have[s] - target[s])
            while surplus > 0:
                pt, lo, hi = keep.pop()
                k = min(surplus, hi - lo)
                if k < hi - lo:
                    keep.append((pt, lo, hi - k))
                pool.append((pt, hi - k, hi))
                surplus -= k
            layout[s].extend(keep)
        pool.sort()
        for s in range(slots):
            deficit = int(target[s] - min(have[s], target[s]))
            while deficit > 0:
                pt, lo, hi = pool.pop()
                k = min(deficit, hi - lo)
                if k < hi - lo:
                    pool.append((pt, lo, hi - k))
                layout[s].append((pt, hi - k, hi))
                deficit -= k
    return layout


# ---------------------------------------------------------------------------------------------
# metrics


def _metrics(tables: _Tables, layout: list[list[Piece]], prior: _Previous | None, strategy: str,
             max_imbalance: float, budget: int) -> PlanMetrics:  # fmt: skip
    slots = len(layout)
    load = np.zeros(slots, dtype=np.float64)
    used = np.zeros(slots, dtype=np.int64)
    moved = 0
    for s, pieces in enumerate(layout):
        for t, lo, hi in pieces:
            nbytes = tables.range_bytes(t, lo, hi)
            load[s] += (hi - lo) * tables.bucket_load[t]
            used[s] += nbytes
            if prior is not None:
                moved += nbytes - _overlap_bytes(tables, t, lo, hi, prior.holdings.get((t, s), ()))
    bound = 0 if prior is None else _movement_bound(tables, layout, prior, strategy, max_imbalance, budget)
    return PlanMetrics(
        # rounded as the plan file writes them, so a plan read back equals the plan written
        imbalance=round(_ratio(load), 6),
        memory_imbalance=round(_ratio(used.astype(np.float64)), 6),
        total_bytes=int(used.sum()),
        moved_bytes=moved,
        movement_lower_bound=bound,
    )


def _ratio(values: np.ndarray) -> float:
    mean = float(values.mean()) if len(values) else 0.0
    return float(values.max()) / mean if mean > 0 else 1.0


def _overlap_bytes(tables: _Tables, t: int, lo: int, hi: int, held: Sequence[tuple[int, int]]) -> int:
    total = 0
    for a, b in held:
        if b <= lo:
            continue
        if a >= hi:
            break
        total += tables.range_bytes(t, max(a, lo), min(b, hi))
    return total


def _movement_bound(tables: _Tables, layout: list[list[Piece]], prior: _Previous, strategy: str,
                    max_imbalance: float, budget: int) -> int:  # fmt: skip
    if strategy == "replicate":
        return sum(
            tables.range_bytes(t, lo, hi) - _overlap_bytes(tables, t, lo, hi, prior.holdings.get((t, s), ()))
            for s, pieces in enumerate(layout)
            for t, lo, hi in pieces
        )
    orphaned = sum(tables.range_bytes(*p) for p in prior.orphans)
    if prior.multi_owner:
        return orphaned
    slots = len(layout)
    if strategy == "row":
        # per table, ``B mod slots`` slots may keep ``⌊B/slots⌋ + 1`` buckets and the others ``⌊B/slots⌋``;
        # letting the slots that hold the most keep the extra bucket minimises what leaves
        base, extra = divmod(tables.bucket_count, slots)
        smallest = tables.rows // tables.bucket_count * tables.row_bytes
        have: dict[int, list[int]] = {}
        for pieces in prior.owned:
            per_table: dict[int, int] = {}
            for t, lo, hi in pieces:
                per_table[t] = per_table.get(t, 0) + hi - lo
            for t, n in per_table.items():
                have.setdefault(t, []).append(n)
        surplus = 0
        for t, counts in have.items():
            above = [n - base for n in counts if n > base]
            surplus += (sum(above) - min(extra, len(above))) * int(smallest[t])
        return orphaned + surplus
    cap = max_imbalance * float(tables.table_load().sum()) / slots
    if strategy == "table":
        cap = max(cap, float(tables.table_load().max()))
    shed = 0.0
    for pieces in prior.owned:
        load = sum((hi - lo) * tables.bucket_load[t] for t, lo, hi in pieces)
        used = sum(tables.range_bytes(t, lo, hi) for t, lo, hi in pieces)
        shed += max(float(used - budget), _least_bytes_carrying(tables, pieces, load - cap))
    return orphaned + int(shed)


def _least_bytes_carrying(tables: _Tables, pieces: Sequence[Piece], load: float) -> float:
    """Fractional knapsack: the fewest bytes of ``pieces`` whose load adds up to ``load``."""
    if load <= 0:
        return 0.0
    nbytes = 0.0
    for t, lo, hi in sorted(pieces, key=lambda p: (-tables.density[p[0]], p)):
        piece_load = (hi - lo) * float(tables.bucket_load[t])
        piece_bytes = tables.range_bytes(t, lo, hi)
        if piece_load >= load:
            return nbytes + piece_bytes * load / piece_load
        nbytes += piece_bytes
        load -= piece_load
    return nbytes
