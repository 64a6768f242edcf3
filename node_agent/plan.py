"""The placement plan: its format (defined once; the planner writes it, agents and clients read it) and
the key → bucket hash that routes a key to the partition and GPU owning it.

A plan assigns shards to ``(partition, gpu)`` slots. A shard is a table's hash-bucket range
``[lo, hi)`` out of ``bucket_count`` buckets (a whole table is ``[0, bucket_count)``). Every
replica of the model runs the same plan: a replica is ``partitions`` pods of ``gpus_per_pod`` GPUs.

Two document formats; :meth:`Plan.from_dict` reads both, :meth:`Plan.to_dict` writes v2:

* ``hps.dev/plan/v1``: a list of ``assignments``, one object per shard (about 80 bytes each: a plan
  of 10,000 GPUs runs to megabytes, over what one ConfigMap holds).
* ``hps.dev/plan/v2``: per table, the owners of consecutive bucket ranges. A GPU is one integer, its
  *slot* ``partition x gpusPerPod + gpu``. A table whose ranges cover every bucket exactly once (what
  ``auto``, ``table`` and ``row`` plan) is ``{"slots": [s0, ..., sn], "cuts": [c1, ..., cn]}``: slot
  ``si`` owns buckets ``[ci, ci+1)`` with ``c0 = 0`` and ``cn+1 = bucketCount``. Anything else (a
  bucket held several times, as in ``replicate`` or the union served during a rollout, or not at
  all) is ``{"ranges": [[lo, hi, slot, count], ...]}``: ``count`` consecutive slots from ``slot``
  each hold ``[lo, hi)``. A shard's bytes follow from the table's ``rows`` and ``rowBytes`` (the
  rows of buckets ``[lo, hi)`` are ``rows*hi // B - rows*lo // B``); where they do not (or the
  shape is unknown) a ``bytes`` list, one number per range, says them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

PLAN_FORMAT = "hps.dev/plan/v2"
#: the format of plans written before v2; still read, never written
PLAN_FORMAT_V1 = "hps.dev/plan/v1"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def bucket_of(keys: Any, bucket_count: int, xp: Any = np) -> Any:
    """Bucket of each int64 key: SplitMix64's finaliser (a bijection, so sequential keys spread
    evenly) modulo ``bucket_count``. Works on NumPy and CuPy arrays alike (``xp``)."""
    z = keys.astype(xp.uint64) + xp.uint64(_GOLDEN)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(_MIX1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(_MIX2)
    z = z ^ (z >> xp.uint64(31))
    return (z % xp.uint64(bucket_count)).astype(xp.int64)


def merge_bucket_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[lo, hi)`` ranges with overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@dataclass(frozen=True, order=True)
class Assignment:
    """Buckets ``[lo, hi)`` of ``table`` are cached on GPU ``gpu`` of partition ``partition``."""

    table: str
    partition: int
    gpu: int
    buckets: tuple[int, int]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "partition": self.partition,
            "gpu": self.gpu,
            "buckets": [self.buckets[0], self.buckets[1]],
            "bytes": self.bytes,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Assignment:
        lo, hi = raw["buckets"]
        return cls(
            str(raw["table"]), int(raw["partition"]), int(raw["gpu"]), (int(lo), int(hi)), int(raw["bytes"])
        )


@dataclass(frozen=True, order=True)
class TableShape:
    """What the bytes of a table's bucket ranges follow from: its rows and the bytes of one row."""

    table: str
    rows: int
    row_bytes: int

    def range_bytes(self, lo: int, hi: int, bucket_count: int) -> int:
        """Bytes of buckets ``[lo, hi)``: the rows hashed there, counted so a table's ranges add up to it."""
        return (self.rows * hi // bucket_count - self.rows * lo // bucket_count) * self.row_bytes


@dataclass(frozen=True)
class PlanMetrics:
    imbalance: float = 1.0
    memory_imbalance: float = 1.0
    total_bytes: int = 0
    moved_bytes: int = 0
    movement_lower_bound: int = 0
    #: why the plan misses ``spec.placement.maxImbalance``; empty when it meets it
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "imbalance": round(self.imbalance, 6),
            "memoryImbalance": round(self.memory_imbalance, 6),
            "totalBytes": self.total_bytes,
            "movedBytes": self.moved_bytes,
            "movementLowerBound": self.movement_lower_bound,
        }
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PlanMetrics:
        return cls(
            imbalance=float(raw.get("imbalance", 1.0)),
            memory_imbalance=float(raw.get("memoryImbalance", 1.0)),
            total_bytes=int(raw.get("totalBytes", 0)),
            moved_bytes=int(raw.get("movedBytes", 0)),
            movement_lower_bound=int(raw.get("movementLowerBound", 0)),
            reason=str(raw.get("reason", "")),
        )


@dataclass(frozen=True)
class Plan:
    version: int
    bucket_count: int
    partitions: int
    gpus_per_pod: int
    strategy: str
    assignments: tuple[Assignment, ...]
    metrics: PlanMetrics = field(default_factory=PlanMetrics)
    model: str = ""
    #: rows and row bytes of the planned tables, so the document need not repeat every shard's bytes;
    #: empty for plans built without them (they then carry each shard's bytes)
    shapes: tuple[TableShape, ...] = ()

    # -- queries -------------------------------------------------------------------------------

    def tables(self) -> list[str]:
        return sorted(self._by_table)

    @cached_property
    def _by_table(self) -> dict[str, tuple[Assignment, ...]]:
        # a plan of 10,000 GPUs has tens of thousands of shards: per-table queries should not scan them all
        grouped: dict[str, list[Assignment]] = {}
        for a in self.assignments:
            grouped.setdefault(a.table, []).append(a)
        return {name: tuple(shards) for name, shards in grouped.items()}

    def assignments_for(self, *, partition: int | None = None, gpu: int | None = None,
                        table: str | None = None) -> list[Assignment]:  # fmt: skip
        candidates = self.assignments if table is None else self._by_table.get(table, ())
        return [
            a for a in candidates
            if (partition is None or a.partition == partition) and (gpu is None or a.gpu == gpu)
        ]  # fmt: skip

    def owner_table(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """``(partition, gpu)`` of each bucket of ``table`` (``-1`` where nothing owns it). Where a
        bucket has several owners (strategy ``replicate``), the lowest ``(partition, gpu)`` is given."""
        partition = np.full(self.bucket_count, -1, dtype=np.int64)
        gpu = np.full(self.bucket_count, -1, dtype=np.int64)
        for a in sorted(self.assignments_for(table=table), key=lambda a: (a.partition, a.gpu), reverse=True):
            partition[a.buckets[0] : a.buckets[1]] = a.partition
            gpu[a.buckets[0] : a.buckets[1]] = a.gpu
        return partition, gpu

    def partitions_of(self, table: str, keys: np.ndarray) -> np.ndarray:
        """The partition that serves each key of ``table`` (what a client routes by)."""
        owners, _ = self.owner_table(table)
        return owners[bucket_of(np.asarray(keys, dtype=np.int64), self.bucket_count)]

    # -- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``hps.dev/plan/v2`` document (see the module docstring)."""
        shapes = {s.table: s for s in self.shapes}
        tables = {
            name: _table_entry(shards, self.bucket_count, self.gpus_per_pod, shapes.get(name))
            for name, shards in sorted(self._by_table.items())
        }
        for shape in self.shapes:  # a table the plan leaves unplaced still says its shape
            tables.setdefault(shape.table, _shape_fields(shape))
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "version": self.version,
            "strategy": self.strategy,
            "bucketCount": self.bucket_count,
            "partitions": self.partitions,
            "gpusPerPod": self.gpus_per_pod,
            "tables": tables,
            "metrics": self.metrics.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plan:
        """A plan document of either format; a malformed one is a ``ValueError`` naming what is wrong."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a plan document (a JSON object), got {type(raw).__name__}")
        fmt = raw.get("format", PLAN_FORMAT_V1)
        if fmt not in (PLAN_FORMAT, PLAN_FORMAT_V1):
            raise ValueError(
                f"unknown plan format {fmt!r}: this release reads {PLAN_FORMAT} and {PLAN_FORMAT_V1}"
            )
        bucket_count = int(raw["bucketCount"])
        gpus_per_pod = int(raw.get("gpusPerPod", 1))
        if bucket_count < 1 or gpus_per_pod < 1:
            raise ValueError(
                f"bucketCount and gpusPerPod must be at least 1, got {bucket_count} and {gpus_per_pod}"
            )
        shapes: tuple[TableShape, ...] = ()
        if fmt == PLAN_FORMAT_V1:
            assignments = [Assignment.from_dict(a) for a in raw.get("assignments", [])]
        else:
            tables = raw.get("tables")
            if not isinstance(tables, Mapping):
                raise ValueError(f"a {PLAN_FORMAT} document needs a 'tables' object")
            assignments = []
            shape_list = []
            for name, entry in tables.items():
                shape = _read_table(str(name), entry, bucket_count, gpus_per_pod, assignments)
                if shape is not None:
                    shape_list.append(shape)
            shapes = tuple(sorted(shape_list))
        return cls(
            version=int(raw["version"]),
            bucket_count=bucket_count,
            partitions=int(raw.get("partitions", 1)),
            gpus_per_pod=gpus_per_pod,
            strategy=str(raw.get("strategy", "auto")),
            assignments=tuple(sorted(assignments, key=_order)),
            metrics=PlanMetrics.from_dict(raw.get("metrics", {})),
            model=str(raw.get("model", "")),
            shapes=shapes,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def _order(a: Assignment) -> tuple[str, int, int, tuple[int, int], int]:
    """Assignment's own order as one key (sorting by it is far faster than by the dataclass's ``<``)."""
    return (a.table, a.partition, a.gpu, a.buckets, a.bytes)


def _shape_fields(shape: TableShape) -> dict[str, Any]:
    return {"rows": shape.rows, "rowBytes": shape.row_bytes}


def _table_entry(shards: Sequence[Assignment], bucket_count: int, gpus_per_pod: int,
                 shape: TableShape | None) -> dict[str, Any]:  # fmt: skip
    """One table of a v2 document: the tiling form where the shards cover each bucket once, else ranges."""
    for a in shards:
        if not 0 <= a.gpu < gpus_per_pod or a.partition < 0:
            raise ValueError(
                f"table {a.table}: GPU {a.gpu} of partition {a.partition} is outside a pod of {gpus_per_pod} GPU(s)"
            )
    ordered = sorted(shards, key=lambda a: (a.buckets, a.partition, a.gpu))
    entry: dict[str, Any] = _shape_fields(shape) if shape is not None else {}
    tiles = (
        ordered[0].buckets[0] == 0
        and ordered[-1].buckets[1] == bucket_count
        and all(prev.buckets[1] == a.buckets[0] for prev, a in itertools.pairwise(ordered))
    )
    sizes: list[int]
    if tiles:
        entry["slots"] = [a.partition * gpus_per_pod + a.gpu for a in ordered]
        if len(ordered) > 1:
            entry["cuts"] = [a.buckets[0] for a in ordered[1:]]
        sizes = [a.bytes for a in ordered]
        derived = None if shape is None else [shape.range_bytes(*a.buckets, bucket_count) for a in ordered]
    else:
        runs: list[list[int]] = []
        sizes = []
        for a in ordered:
            slot = a.partition * gpus_per_pod + a.gpu
            last = runs[-1] if runs else None
            if last and (last[0], last[1]) == a.buckets and last[2] + last[3] == slot and sizes[-1] == a.bytes:
                last[3] += 1  # the next GPU holds the same range: one run (what keeps replicate plans small)
            else:
                runs.append([a.buckets[0], a.buckets[1], slot, 1])
                sizes.append(a.bytes)
        entry["ranges"] = runs
        derived = None if shape is None else [shape.range_bytes(lo, hi, bucket_count) for lo, hi, _, _ in runs]
    if sizes != derived:
        entry["bytes"] = sizes
    return entry


def _read_table(name: str, entry: Any, bucket_count: int, gpus_per_pod: int,
                out: list[Assignment]) -> TableShape | None:  # fmt: skip
    """Appends the shards of one v2 table entry to ``out``; returns its shape when the entry gives one."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"table {name}: expected an object, got {type(entry).__name__}")
    shape = None
    if "rows" in entry or "rowBytes" in entry:
        shape = TableShape(name, int(entry["rows"]), int(entry["rowBytes"]))
    spans: list[tuple[int, int, int, int]]  # lo, hi, first slot, slot count
    if "slots" in entry:
        slots = [int(s) for s in entry["slots"]]
        cuts = [int(c) for c in entry.get("cuts", [])]
        if len(cuts) != len(slots) - 1:
            raise ValueError(f"table {name}: {len(slots)} slots need {len(slots) - 1} cuts, got {len(cuts)}")
        bounds = [0, *cuts, bucket_count]
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"table {name}: cuts must rise strictly between 0 and bucketCount {bucket_count}")
        spans = [(bounds[i], bounds[i + 1], s, 1) for i, s in enumerate(slots)]
    elif "ranges" in entry:
        spans = []
        for r in entry["ranges"]:
            lo, hi, slot, count = (int(v) for v in r)
            if not 0 <= lo < hi <= bucket_count or count < 1:
                raise ValueError(
                    f"table {name}: range {list(r)} is not [lo, hi, slot, count] within {bucket_count} buckets"
                )
            spans.append((lo, hi, slot, count))
    else:
        return shape  # a table with no shard
    sizes = entry.get("bytes")
    if sizes is None:
        if shape is None:
            raise ValueError(f"table {name}: neither rows and rowBytes nor bytes say the size of its ranges")
        sizes = [shape.range_bytes(lo, hi, bucket_count) for lo, hi, _, _ in spans]
    elif len(sizes) != len(spans):
        raise ValueError(f"table {name}: {len(spans)} ranges but {len(sizes)} byte counts")
    for (lo, hi, first, count), size in zip(spans, sizes, strict=True):
        if first < 0:
            raise ValueError(f"table {name}: slot {first} is negative")
        for slot in range(first, first + count):
            partition, gpu = divmod(slot, gpus_per_pod)
            out.append(Assignment(name, partition, gpu, (lo, hi), int(size)))
    return shape


def whole_table_plan(tables: Iterable[tuple[str, int]], *, model: str = "", version: int = 1) -> Plan:
    """The trivial plan: one partition, one GPU, every table whole. ``tables`` is ``(name, bytes)``.
    What agents run before the planner has spoken (e.g. ``hps local up`` without a plan)."""
    assignments = tuple(Assignment(name, 0, 0, (0, 1), nbytes) for name, nbytes in sorted(tables))
    total = sum(a.bytes for a in assignments)
    return Plan(version, 1, 1, 1, "replicate", assignments, PlanMetrics(total_bytes=total), model)
