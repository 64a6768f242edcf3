"""The placement planner: ``plan_placement(model, topology, previous) → Plan``, a pure and deterministic
function that assigns tables (whole, or as hash-bucket ranges) to the ``(partition, gpu)`` slots of one
replica under each GPU's cache budget, balancing expected lookup load and moving little on re-plans.

Decisions (the contract the tests hold it to):

* **Load** of a shard is its share of the table's lookups times the row size: ``hotness x (rows in the
  shard / rows) x row_bytes`` (hotness normalised by :meth:`ModelSpec.hotness`); **bytes** of a shard
  are the rows its buckets hold, ``rows*hi // B - rows*lo // B`` of them, so the bytes of a table's
  shards add up exactly to the table. A table's **density**, its load per byte, is ``hotness / rows``
  for every shard of it (a bucket of a table smaller than ``B`` may hold no row, and then no load).
* **Budget**: a GPU caches ``spec.cache.cachedFraction`` (f, HPS's gpucacheper) of the rows of every
  shard it owns; the L2/L3 tiers serve the rest. So a slot may own up to ``gpu_memory_bytes / f``
  bytes of shards (its *capacity*), and with f = 1 (the default) a slot's shards fit whole in its
  cache. ``replicate`` needs f x the whole model on each GPU. Too little memory raises
  :class:`InsufficientGPUMemoryError` with the cache bytes needed (f x shard bytes) and available.
* **Cap**: no slot's load may exceed ``maxImbalance x mean``, or, where one row (one key) or, for
  ``table``, one table alone carries more, that unit's load: a slot holding it cannot do better.
* **Bucket count** ``B``: ``spec.placement.bucketCount`` when set; otherwise the smallest power of two
  at least ``64``, ``8 x slots``, ``8 x (largest table load) / ((maxImbalance - 1) x mean slot load)``
  and ``8 x (largest table bytes) / (capacity - mean slot bytes)`` (so one bucket of any table moves a
  slot by at most an eighth of the load tolerance or of the free memory), capped at 2^20. Against a
  previous plan ``B`` only ever grows by powers of two, so old bucket ranges map exactly onto new ones
  (bucket ``b`` of ``B`` is buckets ``b + j*B`` of ``k*B``: the hash is taken modulo), and only as far
  as the load and memory terms ask: growing cuts every previous range in ``k``.
* **Strategies**: ``replicate`` puts every table on every slot; ``table`` keeps tables whole
  (largest-load-first onto the least-loaded slot with room); ``row`` splits every table into near-equal
  bucket counts on every slot; ``auto`` balances load and bytes together (below).
* **auto, fresh**: a *paired fill*. Tables whose single rows are coarse (a row carries more than an
  eighth of the load tolerance: few rows, many lookups) go first, whole rows onto the least-loaded
  slots. The other tables, sorted by density, form a line with the hottest bytes at one end and the
  coldest at the other; slot after slot draws from both ends the mix that brings the running totals
  to ``s x`` the mean load and ``s x`` the mean bytes (a lever: hot bytes for load, cold bytes for
  volume). What is left between the ends always has the density the remaining slots need, so the
  running totals stay within a quarter of the load tolerance and of the free memory of the line (a
  slot within half); a piece whose rest fits in that slack is not cut. Each slot cuts at most two pieces along the line, so a plan has
  about two shards per slot plus one per table, whatever the headroom.
* **auto, re-plans** (``previous`` given): every piece stays on its slot when the slot still exists and
  stays within the cap and the budget; over-full slots shed their pieces with the most load per byte
  first (least bytes moved per unit of load shed). The shed and orphaned pieces (removed slots, new
  tables) form a pool, placed in passes: coarse rows first (as above); then the rest at the pool's
  own mix onto the least-loaded slots, up to a soft level halfway between the water level and the
  cap; then onto each slot's remaining room at the mix of that room (hot where load room is left,
  cold where memory is); then, if pieces are still left, where memory is free, least-loaded slots
  first, whatever the cap. Slots still over the cap are repaired by *swaps*: an over-loaded slot
  trades hot buckets for colder buckets of the slot with the most load room (pieces that move anyway
  first, so a swap adds as few moved bytes as it can). ``row`` re-plans per table, keeping each slot's
  buckets up to its ``⌈B/slots⌉`` share. A re-plan with no change returns ``previous`` itself (same
  version); any change is ``previous.version + 1``. Replicas never enter the plan.
* **Best effort**: where the planner finds no layout within ``maxImbalance`` (too little memory, a
  row or a whole table heavier than the cap, coarse rows, a bucket count fixed too low) it returns the
  best it found and says why in ``metrics.reason``; it never searches without bound.
* **movedBytes** counts the bytes of ``(table, bucket)`` pieces a slot holds that it did not hold in
  ``previous`` (0 without a previous plan: an initial load is not a move).
* **movementLowerBound** is the larger of two bounds on what any plan within the cap and the budget
  must move. (1) Bytes held only by removed slots or by no slot (new tables) must move, and each
  surviving slot over the cap (or the budget) must shed at least its excess, carried by its densest
  pieces (a fractional knapsack). (2) What memory forces: the ``k`` least-loaded slots must together
  carry at least the load the other slots cannot (``total - (slots - k) x cap``); where they hold less,
  they must receive the difference (at best as the densest bytes held elsewhere), and where their
  memory is full, first send out as many bytes (at best their coldest). Bound (2) is evaluated for up
  to 64 values of ``k``. Both are fractional: where whole buckets or rows are coarse against what a
  slot must shed, movedBytes exceeds them by up to a bucket per slot. For ``row`` the bound counts
  buckets above each slot's ``⌈B/slots⌉`` share instead, and for ``replicate`` what every slot lacks.
  When the previous plan held a bucket on several slots (``replicate``) only the orphaned bytes count.
* **partitions = 0**: the smallest ``P ≥ ⌈total bytes / (gpus_per_pod x budget)⌉`` (1 for
  ``replicate``) whose plan fits, trying at most 8 consecutive values.

Work, for ``S`` slots, ``T`` tables and ``P`` pieces (about ``2S + T`` for an ``auto`` plan; a previous
plan's pieces multiply by ``B / B_previous`` when ``B`` grows). Every loop is bounded by work, never
by time:

* fresh ``auto``: ``O(T log T + S log S)``: the coarse rows take one heap step per batch of rows, the
  line one step per slot plus one per piece it empties;
* re-plan: ``O(P log P + 64 S)`` to shed and place the pool (the water level is a bisection of 64
  steps over the slots); the last pass at most ``8 x (S + P)`` heap steps, then whole pieces;
* swap repair: at most ``REPAIR_WORK x (S + P)`` pieces and heap entries looked at, and at most
  ``REPAIR_TRIES`` partners per over-loaded slot; either bound ends it with a ``reason``;
* movement bound: ``O(P log P + 64 T)``;
* ``table``: ``O(T S)`` at worst (a heap of slots, skipping full ones); ``row`` and ``replicate``:
  ``O(T S)``, what they produce.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from hps_operator.core.topology import Topology

from node_agent.errors import InsufficientGPUMemoryError
from node_agent.plan import Assignment, Plan, PlanMetrics, TableShape, merge_bucket_ranges
from node_agent.spec import ModelSpec

#: a shard being placed: (table index, first bucket, end bucket)
Piece = tuple[int, int, int]

MAX_BUCKET_COUNT = 1 << 20
MIN_BUCKET_COUNT = 64
#: one bucket of any table carries at most 1/BALANCE_GRAIN of a slot's load tolerance or free memory
BALANCE_GRAIN = 8
#: consecutive partition counts tried when the spec leaves ``partitions`` to the planner
PARTITION_SEARCH = 8
#: the swap repair looks at no more than this many pieces and heap entries per slot and piece
REPAIR_WORK = 32
#: partners an over-loaded slot tries before the repair gives up on it
REPAIR_TRIES = 16
#: slot-set sizes the memory term of the movement bound is evaluated at
BOUND_CHECKPOINTS = 64
#: bisection steps of the water level (a relative precision of 2^-64: exact in float64)
LEVEL_STEPS = 64
#: tolerance of load comparisons, so a re-plan of an unchanged plan never sheds on rounding noise
_EPS = 1e-9


@dataclass(frozen=True)
class _Tables:  # not slotted: the cached Python copies of its arrays live in the instance dict
    """The model's tables as arrays, in spec order, for one bucket count."""

    names: tuple[str, ...]
    rows: np.ndarray
    row_bytes: np.ndarray
    #: each table's load (hotness x row bytes): its share of the lookups, in bytes read
    load: np.ndarray
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
            load=hotness * row_bytes,
            density=hotness / rows,
            bucket_count=bucket_count,
        )

    @cached_property
    def rows_of(self) -> tuple[int, ...]:
        # Python ints: the layout's inner loops index them many times, NumPy scalars cost more
        return tuple(int(r) for r in self.rows)

    @cached_property
    def row_bytes_of(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.row_bytes)

    @cached_property
    def density_of(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self.density)

    def range_bytes(self, t: int, lo: int, hi: int) -> int:
        rows = self.rows_of[t]
        b = self.bucket_count
        return (rows * hi // b - rows * lo // b) * self.row_bytes_of[t]

    def load_of(self, piece: Piece) -> float:
        """A shard's load is its share of the table's lookups: of its keys, so of its rows (an empty
        bucket of a table smaller than ``B`` carries none), which makes load per byte exact."""
        return self.density_of[piece[0]] * self.range_bytes(*piece)

    def max_bucket_bytes(self, t: int) -> int:
        """Bytes of the fullest bucket of table ``t`` (a conservative size for one bucket)."""
        return -(-int(self.rows[t]) // self.bucket_count) * int(self.row_bytes[t])

    def table_load(self) -> np.ndarray:
        return self.load

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
    #: per surviving slot, the load and the bytes of what it owns
    load: list[float]
    used: list[int]


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
    last = first + PARTITION_SEARCH - 1
    for partitions in range(first, last + 1):
        try:
            return _plan_on(model, topology.with_partitions(partitions), previous)
        except InsufficientGPUMemoryError as exc:
            if model.placement.strategy == "replicate":
                raise  # more partitions give a replicate plan no more room per GPU
            failure = exc
    assert failure is not None
    # what the model needs and what the most partitions tried have, not what the last try left over
    memory = topology.gpu_memory_bytes
    raise InsufficientGPUMemoryError(
        _cache_bytes(int(tables.table_bytes().sum()), model), last * topology.gpus_per_pod * memory,
        f"no placement on {first} to {last} partition(s) x {topology.gpus_per_pod} GPU(s) x {memory} bytes "
        f"(spec.partitions 0 tries those); on {last}: {failure.detail}, {failure.needed} bytes left over",
    )


def choose_bucket_count(model: ModelSpec, slots: int, previous: Plan | None = None, *,
                        capacity: int | None = None) -> int:  # fmt: skip
    """The plan's bucket count (see the module docstring for the rule); ``capacity`` is the shard bytes
    one slot may own (without it, memory does not enter the rule)."""
    if model.placement.bucket_count:
        return model.placement.bucket_count
    hot = model.hotness()
    loads = [hot[t.name] * t.row_bytes for t in model.tables]
    total = sum(loads)
    tolerance = max(model.placement.max_imbalance - 1.0, 0.01)
    for_balance = BALANCE_GRAIN * max(loads) * slots / (tolerance * total) if total > 0 else 1.0
    total_bytes = model.total_bytes
    free = (capacity - total_bytes / slots) if capacity is not None and slots > 0 else 0.0
    largest = max(t.total_bytes for t in model.tables)
    # a model that does not fit at all fails later with the bytes it needs; no count helps it
    for_memory = BALANCE_GRAIN * largest / free if free > 0 else 1.0
    need = max(MIN_BUCKET_COUNT, math.ceil(for_balance), math.ceil(min(for_memory, MAX_BUCKET_COUNT)))
    if previous is not None and previous.bucket_count > 0:
        # growing splits every range of the previous plan in two (the hash is taken modulo): only for
        # the grain of balance and memory, not for the slot count alone
        count = previous.bucket_count
        while count < need and count * 2 <= MAX_BUCKET_COUNT:
            count *= 2
        return count
    need = max(need, 8 * slots)
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
    bucket_count = choose_bucket_count(model, slots, previous, capacity=budget)
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
    max_imbalance = model.placement.max_imbalance
    cap = max_imbalance * float(tables.table_load().sum()) / slots

    reason = ""
    try:
        if strategy == "replicate":
            layout = [[(t, 0, bucket_count) for t in range(len(tables.names))] for _ in range(slots)]
        elif strategy == "row":
            layout = _row_layout(tables, slots, prior)
        elif strategy == "table":
            layout = _table_layout(tables, slots, budget, prior, cap=_hard_cap(tables, strategy, cap))
        else:
            layout, reason = _auto_layout(tables, slots, budget, prior, cap=cap, hard=_hard_cap(tables, strategy, cap))
    except InsufficientGPUMemoryError as exc:  # the layout counts shard bytes; users read cache bytes
        raise InsufficientGPUMemoryError(
            _cache_bytes(exc.needed, model), int(exc.available * model.cache.cached_fraction), exc.detail + cached
        ) from None
    _check_budget(tables, layout, model, topology)

    # sorted as plain tuples (Assignment's own ordering compares field by field, far slower)
    shards = sorted(
        (tables.names[t], s // topology.gpus_per_pod, s % topology.gpus_per_pod, (lo, hi), tables.range_bytes(t, lo, hi))
        for s, pieces in enumerate(layout)
        for t, lo, hi in _merged(pieces)
    )
    assignments = tuple(Assignment(*shard) for shard in shards)
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
    metrics = _metrics(tables, layout, prior, strategy, max_imbalance, budget, reason=reason,
                       gpus_per_pod=topology.gpus_per_pod)  # fmt: skip
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
    if old_count == new_count:
        return [(lo, hi)]
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
        if len(joined) > 1:
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
    used = [sum(tables.range_bytes(*p) for p in pieces) for pieces in owned]
    density = tables.density_of
    load = [sum(density[p[0]] * tables.range_bytes(*p) for p in pieces) for pieces in owned]
    return _Previous(holdings, owned, orphans, multi_owner, load, used)


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
# table: whole tables, largest load first onto the least-loaded slot with room


def _table_layout(tables: _Tables, slots: int, budget: int, prior: _Previous | None, *,
                  cap: float) -> list[list[Piece]]:  # fmt: skip
    if prior is None:
        kept: list[list[Piece]] = [[] for _ in range(slots)]
        pool = [(t, 0, tables.bucket_count) for t in range(len(tables.names))]
    else:
        kept, pool = _whole_tables_only(tables, [list(p) for p in prior.owned], list(prior.orphans))
    load = np.array([sum(tables.load_of(p) for p in ps) for ps in kept], dtype=np.float64)
    used = [sum(tables.range_bytes(*p) for p in ps) for ps in kept]
    for s in range(slots):
        if load[s] > cap * (1 + _EPS) or used[s] > budget:
            kept[s], shed = _shed(tables, kept[s], load_over=load[s] - cap * (1 + _EPS), bytes_over=used[s] - budget,
                                  split=False)  # fmt: skip
            pool.extend(shed)
            load[s] = sum(tables.load_of(p) for p in kept[s])
            used[s] = sum(tables.range_bytes(*p) for p in kept[s])
    pool.sort(key=lambda p: (-tables.load_of(p), -tables.range_bytes(*p), p))
    heap = [(float(load[s]), s) for s in range(slots)]
    heapq.heapify(heap)
    smallest = min((tables.range_bytes(*p) for p in pool), default=0)
    for t, lo, hi in pool:
        whole = tables.range_bytes(t, lo, hi)
        skipped: list[tuple[float, int]] = []
        chosen: tuple[float, int] | None = None
        while heap:
            entry = heapq.heappop(heap)
            free = budget - used[entry[1]]
            if free >= whole:
                chosen = entry
                break
            if free >= smallest:
                skipped.append(entry)  # full for this table, maybe not for a smaller one
        for entry in skipped:
            heapq.heappush(heap, entry)
        if chosen is None:
            raise InsufficientGPUMemoryError(
                whole,
                max((budget - u for u in used), default=0),
                f"table {tables.names[t]} buckets [{lo}, {hi}) fit no GPU's free cache "
                "(strategy table keeps tables whole)",
            )
        slot_load, s = chosen
        kept[s].append((t, lo, hi))
        used[s] += whole
        heapq.heappush(heap, (slot_load + tables.load_of((t, lo, hi)), s))
    return kept


# ---------------------------------------------------------------------------------------------
# auto: the paired fill, the pool's passes and the swap repair


class _Pool:
    """Pieces waiting for a slot, hottest (most load per byte) first. A slot draws hot buckets from the
    front and cold ones from the back, so it can take any mix of load and bytes the pool holds."""

    def __init__(self, tables: _Tables, pieces: Iterable[Piece]) -> None:
        self.tables = tables
        ordered = sorted(pieces, key=lambda p: (-tables.density_of[p[0]], -tables.load_of(p), p))
        self.items = [[t, lo, hi] for t, lo, hi in ordered if hi > lo]
        self.front = 0
        self.back = len(self.items) - 1
        self.load = sum(tables.load_of(p) for p in ordered)
        self.bytes = sum(tables.range_bytes(*p) for p in ordered)

    def empty(self) -> bool:
        return self.front > self.back

    def remaining(self) -> list[Piece]:
        return [(t, lo, hi) for t, lo, hi in self.items[self.front : self.back + 1] if hi > lo]

    def end(self, hot: bool) -> list[int]:
        return self.items[self.front if hot else self.back]

    def take(self, hot: bool, k: int) -> Piece:
        """The first ``k`` buckets of the piece at the hot (front) or the cold (back) end."""
        item = self.end(hot)
        t, lo, hi = item
        piece = (t, lo, min(lo + k, hi))
        item[1] = piece[2]
        self.load -= self.tables.load_of(piece)
        self.bytes -= self.tables.range_bytes(*piece)
        if item[1] == hi:
            if hot:
                self.front += 1
            else:
                self.back -= 1
        return piece


class _Layout:
    """A layout being built: each slot's pieces with its load and bytes, under ``cap`` and ``budget``."""

    def __init__(self, tables: _Tables, pieces: list[list[Piece]], load: list[float], used: list[int], *,
                 budget: int, cap: float, hard: float, prior: _Previous | None) -> None:  # fmt: skip
        self.tables = tables
        self.pieces = pieces
        self.load = load
        self.used = used
        self.budget = budget
        #: the balance target (what the paired fill aims its slack by)
        self.cap = cap
        #: what no slot may exceed: the target, or the heaviest row where one row is heavier
        self.hard = hard
        self.limit = hard * (1 + _EPS)
        self.prior = prior

    def add(self, s: int, piece: Piece) -> None:
        self.pieces[s].append(piece)
        self.load[s] += self.tables.load_of(piece)
        self.used[s] += self.tables.range_bytes(*piece)

    def move(self, src: int, dst: int, piece: Piece) -> None:
        """Moves ``piece``, the top buckets of one of ``src``'s pieces, to ``dst``."""
        _take(self.pieces[src], *piece)
        self.load[src] -= self.tables.load_of(piece)
        self.used[src] -= self.tables.range_bytes(*piece)
        self.add(dst, piece)

    def moves_anyway(self, s: int, piece: Piece) -> bool:
        """Whether ``piece`` on ``s`` is new there: moving it on adds no moved bytes."""
        prior = self.prior
        return prior is None or _overlap_bytes(self.tables, *piece, prior.holdings.get((piece[0], s), ())) == 0

    def fill(self, s: int, pool: _Pool, need_load: float, need_bytes: float, *, slack_load: float,
             slack_bytes: float, short_ok: bool = True) -> None:  # fmt: skip
        """Moves about ``need_load`` load and ``need_bytes`` bytes from ``pool`` to slot ``s``: from the hot
        and the cold end in the mix that meets both (the load first where the pool's ends cannot).

        The slot may end up to the slack off either need (over it, or with ``short_ok`` under it) so
        that a piece is not cut: a piece goes whole when the slot, topped up from the other end, still
        lands within the slack, and a slice the slot could do without is left. Never over the cap or
        the budget. Each turn of the loop takes the whole rest of a pool piece or ends the fill, so a
        fill costs one step per pool piece it empties, plus one."""
        tables = self.tables
        goal_load, goal_bytes = self.load[s] + need_load, self.used[s] + need_bytes
        slack_load, slack_bytes = max(slack_load, 0.0), max(slack_bytes, 0.0)
        box_load = min(goal_load + slack_load, self.limit)
        box_bytes = min(goal_bytes + slack_bytes, float(self.budget))
        floor_load = goal_load - slack_load if short_ok else goal_load
        floor_bytes = goal_bytes - slack_bytes if short_ok else goal_bytes

        def lands(load: float, used: float) -> bool:
            return floor_load <= load <= box_load and floor_bytes <= used <= box_bytes

        while not pool.empty():
            hot, cold = pool.end(True), pool.end(False)
            dh, dc = tables.density_of[hot[0]], tables.density_of[cold[0]]
            # a goal beyond the hard limits (the slots before fell behind) is met in the same mix, scaled
            # down: meeting its load alone would fill the slot with hot bytes and leave the bytes behind
            short_load = min(goal_load, box_load) - self.load[s]
            short_bytes = min(goal_bytes, box_bytes) - self.used[s]
            wants: list[tuple[bool, float]]  # (hot end?, bytes to take there)
            if hot is cold or dh <= dc * (1 + 1e-6):  # one density left: the line's order, by load
                wants = [(True, short_load / dh if dh > 0 else short_bytes)]
            else:
                x, y = _lever(short_load, short_bytes, dh, dc)
                wants = [(True, x), (False, y)]
            took_whole = False
            for side, want in wants:
                if want <= 0:
                    continue
                t, lo, hi = pool.end(side)
                after_load = self.load[s] + tables.load_of((t, lo, hi))
                after_bytes = self.used[s] + tables.range_bytes(t, lo, hi)
                if after_load > box_load or after_bytes > box_bytes:
                    continue  # whole, it would overshoot what the slot may take: a slice is cut below
                other = tables.density_of[pool.end(not side)[0]] if len(wants) > 1 else tables.density_of[t]
                if _nearest_buckets(tables, t, lo, hi, want) >= hi - lo or lands(
                    *_topped_up(after_load, after_bytes, goal_load, goal_bytes, other, box_load)
                ):
                    self.add(s, pool.take(side, hi - lo))
                    took_whole = True
                    break
            if took_whole:
                continue
            planned = [(max(want, 0.0) * tables.density_of[pool.end(side)[0]], max(want, 0.0)) for side, want in wants]
            end_load = self.load[s] + sum(pl for pl, _ in planned)
            end_bytes = self.used[s] + sum(pb for _, pb in planned)
            for (side, want), (part_load, part_bytes) in zip(wants, planned, strict=True):
                if want <= 0 or pool.empty():
                    continue
                if lands(end_load - part_load, end_bytes - part_bytes):
                    end_load -= part_load  # the slot does without this slice: the piece stays whole
                    end_bytes -= part_bytes
                    continue
                t, lo, hi = pool.end(side)
                n = min(_nearest_buckets(tables, t, lo, hi, want), self._fits(s, (t, lo, hi), box_load, box_bytes))
                if n < 1 and self.load[s] < goal_load:
                    n = self._heavy_row(s, (t, lo, hi))
                if n >= 1:
                    self.add(s, pool.take(side, n))
            return

    def _heavy_row(self, s: int, item: Piece) -> int:
        """The leading buckets holding one row of ``item`` when that row alone carries more than the
        balance target (a table of few rows and many lookups: wherever it goes, that slot is over, so
        the slot short of its goal takes it, within the hard cap and the budget), else 0."""
        t, lo, hi = item
        row_bytes = self.tables.row_bytes_of[t]
        if self.tables.density_of[t] * row_bytes <= self.cap:
            return 0
        k = _count_buckets(self.tables, t, lo, hi, row_bytes, top=False, at_least=True)
        chunk = (t, lo, lo + k)
        if self.used[s] + self.tables.range_bytes(*chunk) > self.budget or self.load[s] + self.tables.load_of(chunk) > self.limit:
            return 0
        return k

    def _fits(self, s: int, item: Piece, box_load: float, box_bytes: float) -> int:
        """The most leading buckets of ``item`` slot ``s`` takes within the box."""
        t, lo, hi = item
        room = box_bytes - self.used[s]
        density = self.tables.density_of[t]
        if density > 0 and box_load < math.inf:  # load is bytes x density: one room in bytes
            room = min(room, (box_load - self.load[s]) / density * (1 + 1e-12))
        if room < 0:
            return 0
        return _count_buckets(self.tables, t, lo, hi, room, top=False, at_least=False)


def _count_buckets(tables: _Tables, t: int, lo: int, hi: int, nbytes: float, *, top: bool, at_least: bool) -> int:
    """How many buckets of ``[lo, hi)``, counted down from ``hi`` (``top``) or up from ``lo``: the fewest
    holding at least ``nbytes`` (all when they hold less) with ``at_least``, else the most holding at
    most ``nbytes``. Exact in rows (a bucket of a table smaller than ``B`` may hold none): buckets
    ``[0, b)`` hold ``rows*b // B`` rows, so the answer is a ceiling division."""
    rows, row_bytes, count = tables.rows_of[t], tables.row_bytes_of[t], tables.bucket_count
    n = hi - lo
    if nbytes == math.inf:
        return n
    if at_least:
        want = max(math.ceil(nbytes / row_bytes), 0)
        if rows * hi // count - rows * lo // count < want:
            return n
        if top:  # the fewest k with rows*(hi-k)//B <= rows*hi//B - want
            return max(0, hi + 1 - -(-((rows * hi // count - want + 1) * count) // rows))
        return max(0, -(-((rows * lo // count + want) * count) // rows) - lo)
    most = math.floor(nbytes / row_bytes)
    if most < 0:
        return 0
    if top:  # the most k with rows*(hi-k)//B >= rows*hi//B - most
        return max(0, min(n, hi - -(-((rows * hi // count - most) * count) // rows)))
    return max(0, min(n, -(-((rows * lo // count + most + 1) * count) // rows) - 1 - lo))


def _nearest_buckets(tables: _Tables, t: int, lo: int, hi: int, nbytes: float) -> int:
    """The leading buckets of ``[lo, hi)`` whose bytes come nearest to ``nbytes``."""
    under = _count_buckets(tables, t, lo, hi, nbytes, top=False, at_least=False)
    over = _count_buckets(tables, t, lo, hi, nbytes, top=False, at_least=True)
    if nbytes - tables.range_bytes(t, lo, lo + under) <= tables.range_bytes(t, lo, lo + over) - nbytes:
        return under
    return over


def _topped_up(load: float, used: float, goal_load: float, goal_bytes: float, density: float,
               box_load: float) -> tuple[float, float]:  # fmt: skip
    """Where a slot at ``(load, used)`` ends when the rest comes at ``density``: up to the load goal, or,
    with the load met, up to the bytes goal as far as the load box allows."""
    if load < goal_load:
        return (goal_load, used + (goal_load - load) / density) if density > 0 else (load, max(used, goal_bytes))
    if used < goal_bytes:
        add = goal_bytes - used if density <= 0 else min(goal_bytes - used, max(box_load - load, 0.0) / density)
        return load + add * density, used + add
    return load, used


def _lever(short_load: float, short_bytes: float, dense: float, sparse: float) -> tuple[float, float]:
    """Bytes to take at density ``dense`` and at ``sparse`` (< ``dense``) so that their load and bytes
    make up the shortfall: exact where its density lies between the two, else all load from the dense
    end (bytes run over) or all bytes from the sparse one (load runs over)."""
    if short_load > 0 and short_bytes > 0:
        if short_load >= dense * short_bytes:
            return short_load / dense, 0.0
        if short_load <= sparse * short_bytes:
            return 0.0, short_bytes
        x = (short_load - sparse * short_bytes) / (dense - sparse)
        return x, short_bytes - x
    if short_load > 0:
        return short_load / dense, 0.0
    return 0.0, max(short_bytes, 0.0)


def _auto_layout(tables: _Tables, slots: int, budget: int, prior: _Previous | None, *, cap: float,
                 hard: float) -> tuple[list[list[Piece]], str]:  # fmt: skip
    """The ``auto`` layout and, where it misses the cap, why."""
    if prior is None:
        layout = _Layout(tables, [[] for _ in range(slots)], [0.0] * slots, [0] * slots, budget=budget, cap=cap,
                         hard=hard, prior=None)  # fmt: skip
        # tables of few, hot rows first (whole rows: they cannot follow the line finely), then the line
        pool = _Pool(tables, _place_rows(layout, [(t, 0, tables.bucket_count) for t in range(len(tables.names))]))
        _paired_fill(layout, pool)
        leftover = pool.remaining()
    else:
        layout = _Layout(tables, [list(p) for p in prior.owned], list(prior.load), list(prior.used), budget=budget,
                         cap=cap, hard=hard, prior=prior)  # fmt: skip
        orphans = list(prior.orphans)
        for s in range(slots):
            if layout.load[s] > layout.limit or layout.used[s] > budget:
                kept, shed = _shed(tables, layout.pieces[s], load_over=layout.load[s] - layout.limit,
                                   bytes_over=layout.used[s] - budget, split=True)  # fmt: skip
                layout.pieces[s] = kept
                layout.load[s] -= sum(tables.load_of(p) for p in shed)
                layout.used[s] -= sum(tables.range_bytes(*p) for p in shed)
                orphans.extend(shed)
        leftover = orphans
    _place_pool(layout, leftover)
    return layout.pieces, _repair(layout)


def _paired_fill(layout: _Layout, pool: _Pool) -> None:
    """The fresh ``auto`` layout (see the module docstring); what the slots cannot take stays in ``pool``."""
    slots = len(layout.pieces)
    mean_load = (sum(layout.load) + pool.load) / slots  # slots may hold rows placed before the line
    mean_bytes = (sum(layout.used) + pool.bytes) / slots
    slack_load = max(layout.cap - mean_load, 0.0) / 4
    slack_bytes = max(layout.budget - mean_bytes, 0.0) / 4
    placed_load, placed_bytes = 0.0, 0
    for s in range(slots):
        if pool.empty():
            return
        if s == slots - 1:
            layout.fill(s, pool, pool.load, pool.bytes, slack_load=math.inf, slack_bytes=math.inf, short_ok=False)
            return
        # the line's cumulative goal, less what the slot already holds (rows placed before the line)
        layout.fill(s, pool, (s + 1) * mean_load - placed_load - layout.load[s],
                    (s + 1) * mean_bytes - placed_bytes - layout.used[s],
                    slack_load=slack_load, slack_bytes=slack_bytes)  # fmt: skip
        placed_load += layout.load[s]
        placed_bytes += layout.used[s]


def _place_pool(layout: _Layout, pieces: list[Piece]) -> None:
    """Places every piece: pieces of tables with coarse rows first, row by row, then the rest at the
    pool's mix, then at each slot's room, then by bytes alone. Raises
    :class:`InsufficientGPUMemoryError` when some bucket fits no slot's free memory."""
    pool = _Pool(layout.tables, _place_rows(layout, pieces))
    if not pool.empty():
        _fill_at_pool_mix(layout, pool)
    if not pool.empty():
        _fill_rooms(layout, pool)
    if not pool.empty():
        _fill_by_bytes(layout, pool)


def _place_rows(layout: _Layout, pieces: list[Piece]) -> list[Piece]:
    """Places the pieces of tables whose single rows are coarse (heavier than an eighth of the load
    tolerance: few rows, many lookups) before the rest can fragment the room they need: heaviest rows
    first, as many whole rows as fit onto the least-loaded slot up to a soft level halfway between the
    water level and the cap, then the next least-loaded. A heap of the slots: each step places a batch
    or ends the table. Returns the other pieces and the rows that found no room (the later passes
    place them)."""
    tables = layout.tables
    slots = len(layout.load)
    mean = (sum(layout.load) + sum(tables.load_of(p) for p in pieces)) / slots
    grain = max(layout.cap - mean, 0.01 * mean) / 4  # the line absorbs rows up to its slack
    row_load = [density * size for density, size in zip(tables.density_of, tables.row_bytes_of, strict=True)]
    coarse = sorted((p for p in pieces if row_load[p[0]] > grain), key=lambda p: (-row_load[p[0]], p))
    rest = [p for p in pieces if row_load[p[0]] <= grain]
    if not coarse:
        return rest
    level = min(_water_level(np.array(layout.load), sum(tables.load_of(p) for p in coarse)), layout.hard)
    soft = level + 0.5 * (layout.hard - level)
    heap = [(layout.load[s], s) for s in range(slots)]
    heapq.heapify(heap)
    for t, lo, hi in coarse:
        unit, unit_bytes = row_load[t], tables.row_bytes_of[t]
        while lo < hi:
            load, s = heap[0]
            # up to the soft level; a row heavier than that room goes alone up to the hard cap
            fit = math.floor((soft - load) / unit + 1e-9) or min(math.floor((layout.hard - load) / unit + 1e-9), 1)
            rows = min(fit, (layout.budget - layout.used[s]) // unit_bytes)
            k = _count_buckets(tables, t, lo, hi, rows * unit_bytes, top=False, at_least=False) if rows > 0 else 0
            if k < 1:
                break  # the least-loaded slot has no room for a row of this table: the later passes decide
            layout.add(s, (t, lo, lo + k))
            lo += k
            heapq.heapreplace(heap, (layout.load[s], s))
        if lo < hi:
            rest.append((t, lo, hi))
    return rest


def _water_level(load: np.ndarray, poured: float) -> float:
    """The level ``L`` with ``Σ max(0, L - load) = poured``: where pouring would bring the least-loaded slots."""
    ordered = np.sort(load)
    filled = (poured + np.cumsum(ordered)) / np.arange(1, len(ordered) + 1)
    reach = np.flatnonzero(ordered <= filled + _EPS * max(abs(float(filled[-1])), 1.0))
    return float(filled[int(reach[-1])])


def _fill_at_pool_mix(layout: _Layout, pool: _Pool) -> None:
    """Each receiving slot takes a share of the pool at the pool's own load-per-byte mix, least-loaded
    slots first, up to a soft level halfway between the water level and the cap (fewer receivers than
    the level alone, so fewer cut pieces). The water level is where the pool would bring the slots
    when each takes as much as its free memory allows at that mix."""
    load = np.array(layout.load)
    used = np.array(layout.used, dtype=np.float64)
    pool_load, pool_bytes = max(pool.load, 0.0), float(pool.bytes)
    by_bytes = np.maximum(layout.budget - used, 0.0) / pool_bytes if pool_bytes > 0 else np.full(len(load), np.inf)
    if pool_load <= 0:
        shares = by_bytes
    else:

        def share(level: float) -> np.ndarray:
            return np.minimum(np.maximum(level - load, 0.0) / pool_load, by_bytes)

        low, high = float(load.min()), layout.hard
        if share(high).sum() >= 1:
            for _ in range(LEVEL_STEPS):
                mid = (low + high) / 2
                if share(mid).sum() >= 1:
                    high = mid
                else:
                    low = mid
        shares = share(high + 0.5 * (layout.hard - high))
    receivers = np.flatnonzero(shares > 0)
    free = layout.budget - used
    receivers = receivers[np.lexsort((receivers, -free[receivers], load[receivers]))]
    target_load = target_bytes = got_load = got_bytes = 0.0
    for s in receivers.tolist():
        if pool.empty():
            return
        share_s = float(min(shares[s], 1.0))
        target_load += share_s * pool_load
        target_bytes += share_s * pool_bytes
        need_load, need_bytes = target_load - got_load, target_bytes - got_bytes
        before_load, before_bytes = layout.load[s], layout.used[s]
        layout.fill(s, pool, need_load, need_bytes,
                    slack_load=(layout.hard - before_load - need_load) / 2,
                    slack_bytes=(layout.budget - before_bytes - need_bytes) / 2)  # fmt: skip
        got_load += layout.load[s] - before_load
        got_bytes += layout.used[s] - before_bytes


def _fill_rooms(layout: _Layout, pool: _Pool) -> None:
    """Each slot with room left takes the pool's pieces in the mix of its room: hot where load room is
    left, cold where memory is; the slots with the most load room per free byte go first."""
    rooms = [(layout.limit - layout.load[s], layout.budget - layout.used[s], s) for s in range(len(layout.load))]
    rooms = [r for r in rooms if r[0] > 0 and r[1] > 0]
    rooms.sort(key=lambda r: (-r[0] / r[1], r[2]))
    for room_load, room_bytes, s in rooms:
        if pool.empty():
            return
        layout.fill(s, pool, room_load, room_bytes, slack_load=0.0, slack_bytes=0.0)


def _fill_by_bytes(layout: _Layout, pool: _Pool) -> None:
    """The last resort, for pieces no slot has load room for: each goes where memory is free, the
    least-loaded slot first, in batches that bring it level with the next least-loaded one (the swap
    repair then trades load back). Bounded by work: after ``8 x (slots + pieces)`` batches the rest goes
    in whole pieces. Raises :class:`InsufficientGPUMemoryError` when some bucket fits no free memory."""
    tables = layout.tables
    heap = [(layout.load[s], s) for s in range(len(layout.load))]
    heapq.heapify(heap)
    work = BALANCE_GRAIN * (len(heap) + pool.back - pool.front + 1)
    full: list[tuple[float, int]] = []  # slots without memory for the piece at hand
    while not pool.empty() and heap:
        load, s = heapq.heappop(heap)
        if load != layout.load[s]:
            heapq.heappush(heap, (layout.load[s], s))
            continue
        t, lo, hi = pool.end(True)
        work -= 1
        level = heap[0][0] if heap and work > 0 else math.inf
        density = tables.density_of[t]
        want = (level - load) / density if density > 0 and level < math.inf else math.inf
        k = min(_count_buckets(tables, t, lo, hi, max(want, 1.0), top=False, at_least=True),
                layout._fits(s, (t, lo, hi), math.inf, float(layout.budget)))  # fmt: skip
        if k < 1:
            full.append((load, s))
            if not heap:  # no slot has memory for this piece's next bucket
                break
            continue
        layout.add(s, pool.take(True, k))
        heapq.heappush(heap, (layout.load[s], s))
        for entry in full:  # the next piece may be smaller
            heapq.heappush(heap, entry)
        full.clear()
    if not pool.empty():
        t, lo, hi = pool.end(True)
        free = max(layout.budget - u for u in layout.used)
        raise InsufficientGPUMemoryError(
            pool.bytes, free,
            f"table {tables.names[t]} buckets [{lo}, {hi}) fit no GPU's free cache (its buckets hold up "
            f"to {tables.max_bucket_bytes(t)} bytes each)",
        )  # fmt: skip


def _repair(layout: _Layout) -> str:
    """Brings slots over the cap under it by swaps, in place, and returns why it could not where it could
    not. An over-loaded slot ``o`` (the most loaded first) trades with the slot ``r`` with the most load
    room: ``o``'s hot buckets go to ``r``, and where ``r``'s memory is full, ``r``'s coldest buckets go
    to ``o`` in their place. Bounded by work (see the module docstring)."""
    slots = len(layout.pieces)
    over = sorted((s for s in range(slots) if layout.load[s] > layout.limit), key=lambda s: (-layout.load[s], s))
    if not over:
        return ""
    work = REPAIR_WORK * (slots + sum(len(p) for p in layout.pieces))
    heap = [(-(layout.hard - layout.load[s]), s) for s in range(slots) if layout.load[s] < layout.hard]
    heapq.heapify(heap)
    for o in over:
        failed: list[tuple[float, int]] = []
        tries = 0
        while layout.load[o] > layout.limit and tries < REPAIR_TRIES and work > 0 and heap:
            neg_room, r = heapq.heappop(heap)
            work -= 1
            room = layout.hard - layout.load[r]
            if r == o or room <= _EPS * layout.hard:
                continue
            if -neg_room != room:  # a stale entry: the slot's room changed since it was pushed
                heapq.heappush(heap, (-room, r))
                continue
            tries += 1
            swapped, spent = _swap(layout, o, r)
            work -= spent
            room = layout.hard - layout.load[r]
            if room > _EPS * layout.hard:
                (heapq.heappush(heap, (-room, r)) if swapped else failed.append((-room, r)))
        for entry in failed:
            heapq.heappush(heap, entry)
    still = [s for s in range(slots) if layout.load[s] > layout.limit]
    if not still:
        return ""
    tables = layout.tables
    mean = sum(layout.load) / slots
    worst = max(layout.load[s] for s in still) / mean if mean > 0 else 1.0
    # the heaviest single row on the slots still over: where it is coarse, whole rows are the limit
    heavy, heavy_load = max(((t, tables.density_of[t] * tables.row_bytes_of[t]) for s in still for t, _, _ in layout.pieces[s]),
                            key=lambda x: (x[1], -x[0]))  # fmt: skip
    if work <= 0:
        why = "the swap repair reached its work bound"
    elif heavy_load > max(layout.cap - mean, 0.01 * mean) / BALANCE_GRAIN:
        why = (f"rows of table {tables.names[heavy]} are coarse (one carries {heavy_load / mean:.4f} x the mean "
               "load) and whole rows do not pack closer within the GPUs' memory")  # fmt: skip
    else:
        why = ("the GPUs with load room have no free memory for hot buckets and hold no colder buckets "
               "to trade for them")  # fmt: skip
    return (f"{len(still)} GPU(s) above maxImbalance, the worst at {worst:.4f} x the mean load: {why}; "
            "more GPU memory (or cachedFraction < 1) gives the planner room")  # fmt: skip


def _swap(layout: _Layout, o: int, r: int) -> tuple[bool, int]:
    """Trades hot buckets of over-loaded ``o`` for colder buckets of ``r``, so that ``o`` sheds load and
    ``r`` stays within the cap and the budget: ``r`` takes as much of ``o``'s excess as its load room
    allows and, where its memory is short, sends back its coldest buckets (the fewest load per byte
    freed). Where one row of ``o`` is more than ``r``'s load room (a table of few, hot rows), ``r`` also
    sends back load, its densest buckets colder than that row (the fewest bytes per load freed).
    Returns whether anything moved, and the work spent."""
    tables = layout.tables
    spent = 0
    hot_pieces = sorted(layout.pieces[o], key=lambda p: (not layout.moves_anyway(o, p), -tables.density_of[p[0]], p))
    moved = False
    for t, lo, hi in hot_pieces:
        spent += 1
        excess = layout.load[o] - layout.hard
        room = layout.hard - layout.load[r]
        if excess <= _EPS * layout.hard:
            break
        density = tables.density_of[t]
        if density <= 0:
            continue
        k = _count_buckets(tables, t, lo, hi, min(excess, max(room, 0.0)) / density, top=True, at_least=True)
        if tables.load_of((t, hi - k, hi)) > room:
            k = _count_buckets(tables, t, lo, hi, room / density, top=True, at_least=False) if room > 0 else 0
        if k < 1:  # not even one row fits r's room: r makes room for one
            k = _count_buckets(tables, t, lo, hi, 1, top=True, at_least=True)
        chunk = (t, hi - k, hi)
        chunk_bytes = tables.range_bytes(*chunk)
        short_bytes = chunk_bytes - (layout.budget - layout.used[r])
        short_load = tables.load_of(chunk) - room
        # what r may send back: the bytes it lacks, and for load no more bytes than the chunk brings
        # (colder buckets carry less load per byte: beyond that the trade moves more than it balances)
        allowed = max(short_bytes, 0) + (chunk_bytes if short_load > 0 else 0)
        if short_bytes <= 0 and short_load <= 0:
            back: list[Piece] = []
        else:
            colder = [p for p in layout.pieces[r] if tables.density_of[p[0]] < density * (1 - _EPS)]
            spent += len(colder)
            # pieces that move anyway first; then the coldest (bytes short) or the densest (load short)
            sign = -1 if short_load > 0 else 1
            colder.sort(key=lambda p: (not layout.moves_anyway(r, p), sign * tables.density_of[p[0]], p))
            back = []
            for ct, clo, chi in colder:
                if short_bytes <= 0 and short_load <= 0:
                    break
                cold_density = tables.density_of[ct]
                want = max(short_bytes, short_load / cold_density if cold_density > 0 and short_load > 0 else 0.0)
                piece = (ct, chi - _buckets_for_bytes(tables, ct, clo, chi, math.ceil(want)), chi)
                back.append(piece)
                short_bytes -= tables.range_bytes(*piece)
                short_load -= tables.load_of(piece)
            if short_bytes > 0 or short_load > _EPS * layout.hard:
                continue  # r cannot make room for this chunk
        back_bytes = sum(tables.range_bytes(*p) for p in back)
        if back and back_bytes > allowed + max(tables.max_bucket_bytes(p[0]) for p in back):
            continue  # (a bucket of slack: back buckets are whole)
        gain = tables.load_of(chunk) - sum(tables.load_of(p) for p in back)
        if gain <= 0 or layout.used[o] - tables.range_bytes(*chunk) + back_bytes > layout.budget:
            continue
        for piece in back:
            layout.move(r, o, piece)
        layout.move(o, r, chunk)
        moved = True
    return moved, spent


# ---------------------------------------------------------------------------------------------
# shared by the strategies


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
    rest = sorted(pieces, key=lambda p: (-tables.density_of[p[0]], p))
    shed: list[Piece] = []
    while rest and (load_over > 0 or bytes_over > 0):
        top = tables.density_of[rest[0][0]]
        densest = [i for i, p in enumerate(rest) if tables.density_of[p[0]] >= top * (1 - _EPS)]
        i, k = _cut(tables, [rest[i] for i in densest], load_over, bytes_over, split=split)
        i = densest[i]
        t, lo, hi = rest[i]
        if k < hi - lo:
            rest[i] = (t, lo, hi - k)
        else:
            del rest[i]
        shed.append((t, hi - k, hi))
        load_over -= tables.load_of((t, hi - k, hi))
        bytes_over -= tables.range_bytes(t, hi - k, hi)
    return rest, shed


def _cut(tables: _Tables, candidates: Sequence[Piece], load_over: float, bytes_over: int, *,
         split: bool) -> tuple[int, int]:  # fmt: skip
    """Which of equally dense ``candidates`` to shed from, and how many of its top buckets: the one
    covering the excess with the least overshoot when one can, else the largest whole."""
    best: tuple[float, int, int] | None = None
    for i, (t, lo, hi) in enumerate(candidates):
        density = tables.density_of[t]
        n = hi - lo
        if not split:
            k = n
        else:
            by_load = math.ceil(load_over / density) if load_over > 0 and density > 0 else 0
            k = _buckets_for_bytes(tables, t, lo, hi, max(by_load, bytes_over, 1))
        top = tables.range_bytes(t, hi - k, hi)
        covers = density * top >= load_over * (1 - _EPS) and top >= bytes_over
        if not covers:
            continue
        if best is None or top < best[0]:
            best = (float(top), i, k)
    if best is not None:
        return best[1], best[2]
    largest = max(range(len(candidates)),
                  key=lambda i: (tables.range_bytes(*candidates[i]), -i))  # fmt: skip
    t, lo, hi = candidates[largest]
    return largest, hi - lo


def _buckets_for_bytes(tables: _Tables, t: int, lo: int, hi: int, need: int) -> int:
    """The fewest top buckets of ``[lo, hi)`` holding at least ``need`` bytes (all when they don't)."""
    return max(1, _count_buckets(tables, t, lo, hi, need, top=True, at_least=True))


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
             max_imbalance: float, budget: int, *, reason: str, gpus_per_pod: int) -> PlanMetrics:  # fmt: skip
    slots = len(layout)
    rows_of, row_bytes_of, density_of, count = tables.rows_of, tables.row_bytes_of, tables.density_of, tables.bucket_count
    holdings = prior.holdings if prior is not None else None
    loads, sizes = [0.0] * slots, [0] * slots
    moved = 0
    for s, pieces in enumerate(layout):  # inlined: tens of thousands of pieces at 10,000 GPUs
        slot_load, slot_bytes = 0.0, 0
        for t, lo, hi in pieces:
            rows = rows_of[t]
            nbytes = (rows * hi // count - rows * lo // count) * row_bytes_of[t]
            slot_load += density_of[t] * nbytes
            slot_bytes += nbytes
            if holdings is not None:
                held = holdings.get((t, s))
                if not held:
                    moved += nbytes
                elif not (len(held) == 1 and held[0][0] <= lo and hi <= held[0][1]):
                    moved += nbytes - _overlap_bytes(tables, t, lo, hi, held)
        loads[s], sizes[s] = slot_load, slot_bytes
    load = np.array(loads)
    used = np.array(sizes, dtype=np.int64)
    bound = 0 if prior is None else _movement_bound(tables, layout, prior, strategy, max_imbalance, budget)
    # rounded as the plan file writes them, so a plan read back equals the plan written
    imbalance = round(_ratio(load), 6)
    if imbalance > max_imbalance + 1e-6 and (not reason or _hard_cap(tables, strategy, 0.0) > max_imbalance * load.mean()):
        reason = _why_over(tables, load, strategy, max_imbalance, gpus_per_pod)
    return PlanMetrics(
        imbalance=imbalance,
        memory_imbalance=round(_ratio(used.astype(np.float64)), 6),
        total_bytes=int(used.sum()),
        moved_bytes=moved,
        movement_lower_bound=bound,
        reason=reason,
    )


def _why_over(tables: _Tables, load: np.ndarray, strategy: str, max_imbalance: float, gpus_per_pod: int) -> str:
    """Why a plan of ``strategy`` misses ``maxImbalance`` (the ``auto`` layout says it itself)."""
    mean = float(load.mean())
    worst = int(np.argmax(load))
    where = f"partition {worst // gpus_per_pod} GPU {worst % gpus_per_pod} carries {float(load[worst]) / mean:.4f} x the mean load"
    table_load = tables.table_load()
    row_load = tables.density * tables.row_bytes
    heavy = int(np.argmax(row_load))
    if strategy != "table" and float(row_load[heavy]) > max_imbalance * mean:
        return (f"{where}: one row (one key) of table {tables.names[heavy]} alone carries "
                f"{float(row_load[heavy]) / mean:.4f} x the mean load and rows are not split; strategy "
                "replicate caches a small, hot table on every GPU")  # fmt: skip
    if strategy == "table":
        largest = int(np.argmax(table_load))
        if float(table_load[largest]) > max_imbalance * mean:
            return (f"{where}: strategy table keeps tables whole and table {tables.names[largest]} alone carries "
                    f"{float(table_load[largest]) / mean:.4f} x the mean load; strategy auto splits it")  # fmt: skip
        return f"{where}: strategy table keeps tables whole and whole tables do not pack closer; strategy auto splits them"
    if strategy == "replicate":
        return f"{where}: strategy replicate"
    bucket_loads = [tables.density_of[t] * tables.max_bucket_bytes(t) for t in range(len(tables.names))]
    heaviest = int(np.argmax(bucket_loads))
    return (f"{where}: one bucket of table {tables.names[heaviest]} carries "
            f"{bucket_loads[heaviest] / mean:.4f} x the mean load at {tables.bucket_count} buckets; a larger "
            "spec.placement.bucketCount (or 0, the planner's choice) balances finer")  # fmt: skip


def _hard_cap(tables: _Tables, strategy: str, cap: float) -> float:
    """The load no slot may exceed: the balance target, unless the smallest unit a strategy moves (a whole
    table for ``table``, one row, a single key, for the others) alone carries more: a slot holding it
    cannot do better by moving it, and a re-plan must not shuffle it around."""
    unit = tables.table_bytes() if strategy == "table" else tables.row_bytes
    return max(cap, float((tables.density * unit).max()))


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
    cap = _hard_cap(tables, strategy, max_imbalance * float(tables.table_load().sum()) / slots)
    shed = 0.0
    for pieces, load, used in zip(prior.owned, prior.load, prior.used, strict=True):
        shed += max(float(used - budget), _least_bytes_carrying(tables, pieces, load - cap))
    return int(max(orphaned + shed, _memory_bound(tables, prior, cap, budget)))


def _least_bytes_carrying(tables: _Tables, pieces: Sequence[Piece], load: float) -> float:
    """Fractional knapsack: the fewest bytes of ``pieces`` whose load adds up to ``load``."""
    if load <= 0:
        return 0.0
    nbytes = 0.0
    for t, lo, hi in sorted(pieces, key=lambda p: (-tables.density_of[p[0]], p)):
        piece_load = tables.load_of((t, lo, hi))
        piece_bytes = tables.range_bytes(t, lo, hi)
        if piece_load >= load:
            return nbytes + piece_bytes * load / piece_load
        nbytes += piece_bytes
        load -= piece_load
    return nbytes


def _memory_bound(tables: _Tables, prior: _Previous, cap: float, budget: int) -> float:
    """Bound (2) of the module docstring. The ``k`` least-loaded surviving slots must end with at least
    ``total - (slots - k) x cap`` load. Where they hold less, the difference arrives as bytes from
    elsewhere (at best the densest held outside the set, orphans included), and where their memory
    cannot take those bytes, they first send out as many (at best their coldest). Both are moves, of
    different bytes, so any plan within the cap and the budget moves at least their sum."""
    slots = len(prior.owned)
    total_load = float(tables.table_load().sum())
    if cap <= 0 or total_load <= 0:
        return 0.0
    first = math.floor(slots - total_load / cap) + 1  # fewer slots: the others can carry all the load
    if first > slots:
        return 0.0
    load = np.array(prior.load)
    order = np.argsort(load, kind="stable").tolist()
    sizes = sorted(set(np.geomspace(max(first, 1), slots, BOUND_CHECKPOINTS).round().astype(int).tolist()))
    density = tables.density
    hot_first = np.argsort(-density, kind="stable")
    cold_first = hot_first[::-1]
    table_bytes = tables.table_bytes().astype(np.float64)
    held = np.zeros(len(tables.names))
    held_load = 0.0
    best = 0.0
    k = 0
    for size in sizes:
        for s in order[k:size]:
            for p in prior.owned[s]:
                held[p[0]] += tables.range_bytes(*p)
                held_load += tables.load_of(p)
        k = size
        short = total_load - (slots - size) * cap - held_load
        if short <= _EPS * total_load:
            continue
        outside = np.maximum(table_bytes - held, 0.0)[hot_first]
        inside = held[cold_first]
        gain = (np.concatenate(([0.0], np.cumsum(outside))), np.concatenate(([0.0], np.cumsum(outside * density[hot_first]))))
        loss = (np.concatenate(([0.0], np.cumsum(inside))), np.concatenate(([0.0], np.cumsum(inside * density[cold_first]))))
        best = max(best, _least_exchange(gain, loss, max(size * budget - float(held.sum()), 0.0), short))
    return best


def _least_exchange(gain: tuple[np.ndarray, np.ndarray], loss: tuple[np.ndarray, np.ndarray], free: float,
                    short: float) -> float:  # fmt: skip
    """The fewest bytes ``r + y`` a set of slots with ``free`` bytes of memory moves to gain ``short`` load:
    it receives ``r`` bytes carrying ``R(r)`` load and, for what exceeds ``free``, sends ``y = r - free``
    bytes carrying ``Q(y)``. ``gain`` and ``loss`` are ``R`` and ``Q`` as cumulative (bytes, load)
    breakpoints. 0 when no exchange gains ``short`` (then no plan meets the cap, and there is no bound)."""
    gain_bytes, gain_load = gain
    loss_bytes, loss_load = loss
    top = min(float(gain_bytes[-1]), float(loss_bytes[-1]) + free)
    candidates = np.unique(np.concatenate((gain_bytes, loss_bytes + free, [free])))
    candidates = candidates[candidates <= top]
    net = np.interp(candidates, gain_bytes, gain_load) - np.interp(np.maximum(candidates - free, 0.0), loss_bytes, loss_load)
    reach = np.flatnonzero(net >= short)
    if len(reach) == 0:
        return 0.0
    i = int(reach[0])
    if i == 0:
        r = float(candidates[0])
    else:
        # net is linear between breakpoints: where it crosses ``short``
        a, b = float(candidates[i - 1]), float(candidates[i])
        na, nb = float(net[i - 1]), float(net[i])
        r = a + (short - na) * (b - a) / (nb - na)
    return r + max(0.0, r - free)
