"""The L1 tier of an agent: which cache holds which table's rows on which GPU, and how big each is.

A table's L1 is one :class:`TableCache` (a table id's view of a :class:`SetAssociativeCache`), or,
when the plan spreads the table's hash buckets over several GPUs of the partition, a
:class:`BucketRoutedCache` that sends each key to the cache of the GPU owning its bucket. Keys of
buckets this partition does not own are never cached here (they still get answered from L2/L3).

Layouts (``build_l1(layout=...)``):

* ``per-table`` (default, as in HPS): every (table, GPU) gets its own cache. The GPU's byte budget
  is split in proportion to the bytes of the shards it holds, none getting more than its shard needs.
* ``shared``: the shards of one GPU that share ``dim`` and ``dtype`` share one cache, keys told apart
  by table id, so a hot table can take slots a cold one does not use.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from node_agent.array_backend import cuda_device_count, device_index, get_xp, to_host
from node_agent.cache.set_associative import SetAssociativeCache, bytes_for_rows
from node_agent.errors import InvalidArgumentError
from node_agent.plan import Plan, bucket_of, whole_table_plan
from node_agent.spec import TableSpec

log = logging.getLogger(__name__)

LAYOUTS = ("per-table", "shared")

#: a shard that fits in its GPU's budget gets this much more room than its rows, so that uneven
#: filling of the hash sets does not evict rows of a table meant to be cached whole
FULL_TABLE_HEADROOM_PERCENT = 25


@runtime_checkable
class L1Table(Protocol):
    """One table's L1 as the lookup path sees it. Arrays in are host NumPy; arrays out may live on
    the cache's device (pass them through :func:`node_agent.array_backend.to_host`)."""

    device: str

    def query(self, keys: np.ndarray, *, sorted_unique: bool = False) -> tuple[Any, Any]: ...
    def insert(self, keys: np.ndarray, values: np.ndarray) -> None: ...
    def update(self, keys: np.ndarray, values: np.ndarray) -> int: ...
    def invalidate(self, keys: np.ndarray) -> int: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...

    @property
    def hit_rate(self) -> float: ...


class CountedL1(ABC):
    """What every L1 view derives from its counters: the hit rate and the stats fields they share."""

    device: str

    @property
    @abstractmethod
    def hits(self) -> int: ...

    @property
    @abstractmethod
    def misses(self) -> int: ...

    @property
    @abstractmethod
    def inserts(self) -> int: ...

    @property
    @abstractmethod
    def evictions(self) -> int: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def capacity_rows(self) -> int: ...

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def counter_stats(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hit_rate, 6),
            "evictions": self.evictions,
            "inserts": self.inserts,
            "size": self.size,
            "capacity_rows": self.capacity_rows,
            "device": self.device,
        }


class TableCache(CountedL1):
    """One table's slice of a :class:`SetAssociativeCache` (the whole of it when not shared)."""

    def __init__(self, cache: SetAssociativeCache, *, table_id: int = 0, name: str = "") -> None:
        self.cache = cache
        self.table_id = table_id
        self.name = name
        self.device = cache.device

    def query(self, keys: Any, *, sorted_unique: bool = False) -> tuple[Any, Any]:
        return self.cache.query(keys, table_id=self.table_id, sorted_unique=sorted_unique)

    def insert(self, keys: Any, values: Any) -> None:
        self.cache.insert(keys, values, table_id=self.table_id)

    def update(self, keys: Any, values: Any) -> int:
        return self.cache.update(keys, values, table_id=self.table_id)

    def invalidate(self, keys: Any) -> int:
        return self.cache.invalidate(keys, table_id=self.table_id)

    def clear(self) -> None:
        self.cache.clear(table_id=self.table_id)

    @property
    def hits(self) -> int:
        return self.cache.hits_of(self.table_id)

    @property
    def misses(self) -> int:
        return self.cache.misses_of(self.table_id)

    @property
    def inserts(self) -> int:
        return self.cache.inserts_of(self.table_id)

    @property
    def evictions(self) -> int:
        return self.cache.evictions_of(self.table_id)

    @property
    def size(self) -> int:
        return self.cache.size_of(self.table_id)

    @property
    def capacity_rows(self) -> int:
        """Slots this table may use: the whole cache when shared."""
        return self.cache.capacity_rows

    def stats(self) -> dict[str, Any]:
        return {
            **self.counter_stats(),
            "shared": self.cache.tables > 1,
        }


@dataclass(frozen=True)
class BucketShard:
    """Buckets ``[lo, hi)`` of a table are cached in ``cache``."""

    lo: int
    hi: int
    cache: TableCache


class BucketRoutedCache(CountedL1):
    """A table whose buckets are spread over several caches (GPUs); keys of buckets none of them
    holds count as misses and are never cached. Where shards overlap (``replicate`` plans), the first
    shard listed serves the key, as :meth:`Plan.owner_table` picks the lowest ``(partition, gpu)``."""

    def __init__(self, shards: Sequence[BucketShard], *, bucket_count: int) -> None:
        if not shards:
            raise InvalidArgumentError("a bucket-routed cache needs at least one shard")
        self.shards = tuple(shards)
        self.bucket_count = bucket_count
        self.device = shards[0].cache.device
        self._owner = np.full(bucket_count, -1, dtype=np.int64)
        for index in reversed(range(len(shards))):
            self._owner[shards[index].lo : shards[index].hi] = index
        self._unrouted = 0

    def _route(self, keys: np.ndarray) -> np.ndarray:
        return self._owner[bucket_of(keys, self.bucket_count)]

    def query(self, keys: Any, *, sorted_unique: bool = False) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(keys, dtype=np.int64)
        owner = self._route(keys)
        first = self.shards[0].cache.cache
        values = np.zeros((keys.shape[0], first.dim), dtype=first.dtype)
        hit = np.zeros(keys.shape[0], dtype=bool)
        for index, shard in enumerate(self.shards):
            mine = np.nonzero(owner == index)[0]
            if mine.shape[0]:
                # a subsequence of sorted unique keys is still sorted and unique
                got, found = shard.cache.query(keys[mine], sorted_unique=sorted_unique)
                values[mine] = to_host(got)
                hit[mine] = to_host(found)
        self._unrouted += int((owner < 0).sum())
        return values, hit

    def _split(self, keys: Any, values: Any | None = None) -> list[tuple[TableCache, np.ndarray, Any]]:
        keys = np.asarray(keys, dtype=np.int64)
        owner = self._route(keys)
        parts = []
        for index, shard in enumerate(self.shards):
            mine = np.nonzero(owner == index)[0]
            if mine.shape[0]:
                parts.append((shard.cache, keys[mine], None if values is None else np.asarray(values)[mine]))
        return parts

    def insert(self, keys: Any, values: Any) -> None:
        for cache, part_keys, part_values in self._split(keys, values):
            cache.insert(part_keys, part_values)

    def update(self, keys: Any, values: Any) -> int:
        return sum(cache.update(k, v) for cache, k, v in self._split(keys, values))

    def invalidate(self, keys: Any) -> int:
        return sum(cache.invalidate(k) for cache, k, _ in self._split(keys))

    def clear(self) -> None:
        for shard in self.shards:
            shard.cache.clear()

    @property
    def hits(self) -> int:
        return sum(s.cache.hits for s in self.shards)

    @property
    def misses(self) -> int:
        return sum(s.cache.misses for s in self.shards) + self._unrouted

    @property
    def inserts(self) -> int:
        return sum(s.cache.inserts for s in self.shards)

    @property
    def evictions(self) -> int:
        return sum(s.cache.evictions for s in self.shards)

    @property
    def size(self) -> int:
        return sum(s.cache.size for s in self.shards)

    @property
    def capacity_rows(self) -> int:
        return sum(s.cache.capacity_rows for s in self.shards)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counter_stats(),
            "shards": [
                {"buckets": [s.lo, s.hi], "device": s.cache.device, "capacity_rows": s.cache.capacity_rows}
                for s in self.shards
            ],
        }


def split_budget(budget: int, wants: Mapping[str, int]) -> dict[str, int]:
    """Splits ``budget`` bytes in proportion to ``wants`` (each shard then caches the same share of
    its rows); when everything fits, each gets exactly what it wants and the rest stays free."""
    total = sum(max(0, w) for w in wants.values())
    if total <= budget:
        return {name: max(0, want) for name, want in wants.items()}
    return {name: budget * max(0, want) // total for name, want in wants.items()}


@dataclass(frozen=True)
class _ShardNeed:
    table: TableSpec
    gpu: int
    ranges: tuple[tuple[int, int], ...]
    bytes: int


def _shard_needs(tables: Sequence[TableSpec], plan: Plan, partition: int) -> list[_ShardNeed]:
    by_name = {t.name: t for t in tables}
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for a in plan.assignments_for(partition=partition):
        if a.table in by_name:
            ranges[(a.table, a.gpu)].append(a.buckets)
    needs = []
    for (name, gpu), spans in sorted(ranges.items()):
        table = by_name[name]
        buckets = sum(hi - lo for lo, hi in spans)
        rows = -(-table.rows * buckets // plan.bucket_count)  # ceil: never under-size a shard
        # headroom: hashing fills sets unevenly, so a cache of exactly `rows` slots would still miss
        wanted = rows + -(-rows * FULL_TABLE_HEADROOM_PERCENT // 100)
        needs.append(
            _ShardNeed(
                table, gpu, tuple(sorted(spans)), bytes_for_rows(wanted, dim=table.dim, dtype=table.dtype)
            )
        )
    return needs


def build_l1(
    tables: Sequence[TableSpec],
    *,
    memory_per_gpu: int,
    plan: Plan | None = None,
    partition: int = 0,
    policy: str = "lru",
    associativity: int = 32,
    layout: str = "per-table",
    device: str = "auto",
) -> dict[str, L1Table]:
    """The L1 caches of one partition: table name → its L1 (tables it holds nothing of are absent).

    Each GPU the partition uses under ``plan`` gets ``memory_per_gpu`` bytes; without a plan, the
    partition is one GPU holding every table whole.
    """
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"L1 layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if plan is None:
        plan = whole_table_plan([(t.name, t.total_bytes) for t in tables])
        partition = 0
    xp, base_device = get_xp(device)
    gpus = cuda_device_count() if xp is not np else 0
    pinned = device_index(base_device) if device.strip().lower() not in ("auto", "cuda", "gpu") else None

    def device_of(gpu: int) -> str:
        if xp is np:
            return "cpu"
        if pinned is not None:
            return f"cuda:{pinned}"
        if gpu >= gpus:
            log.warning(
                "plan uses GPU %d but %d CUDA device(s) are visible; sharing cuda:%d", gpu, gpus, gpu % gpus
            )
        return f"cuda:{gpu % gpus}"

    needs = _shard_needs(tables, plan, partition)
    caches: dict[tuple[str, int], TableCache] = {}
    for gpu in sorted({n.gpu for n in needs}):
        on_gpu = [n for n in needs if n.gpu == gpu]
        groups: dict[tuple[str, ...], list[_ShardNeed]]
        if layout == "per-table":
            groups = {(n.table.name,): [n] for n in on_gpu}
        else:
            by_layout: dict[tuple[int, str], list[_ShardNeed]] = defaultdict(list)
            for n in on_gpu:
                by_layout[(n.table.dim, n.table.dtype)].append(n)
            groups = {tuple(n.table.name for n in group): group for group in by_layout.values()}
        grants = split_budget(
            memory_per_gpu, {"/".join(k): sum(n.bytes for n in g) for k, g in groups.items()}
        )
        for key, group in groups.items():
            first = group[0].table
            cache = SetAssociativeCache(
                dim=first.dim,
                dtype=first.dtype,
                capacity_bytes=grants["/".join(key)],
                associativity=associativity,
                policy=policy,
                tables=len(group),
                xp=xp,
                device=device_of(gpu),
            )
            for table_id, need in enumerate(group):
                caches[(need.table.name, gpu)] = TableCache(cache, table_id=table_id, name=need.table.name)

    l1: dict[str, L1Table] = {}
    for table in tables:
        shards = [
            BucketShard(lo, hi, caches[(n.table.name, n.gpu)])
            for n in needs
            if n.table.name == table.name
            for lo, hi in n.ranges
        ]
        if not shards:
            continue
        if len(shards) == 1 and (shards[0].lo, shards[0].hi) == (0, plan.bucket_count):
            l1[table.name] = shards[0].cache
        else:
            l1[table.name] = BucketRoutedCache(shards, bucket_count=plan.bucket_count)
    return l1
