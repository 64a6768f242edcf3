"""The placement plan: its format (defined once; the planner writes it, agents and clients read it) and
the key → bucket hash that routes a key to the partition and GPU owning it.

A plan assigns shards to ``(partition, gpu)`` slots. A shard is a table's hash-bucket range
``[lo, hi)`` out of ``bucket_count`` buckets (a whole table is ``[0, bucket_count)``). Every
replica of the model runs the same plan: a replica is ``partitions`` pods of ``gpus_per_pod`` GPUs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAN_FORMAT = "hps.dev/plan/v1"

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


@dataclass(frozen=True)
class PlanMetrics:
    imbalance: float = 1.0
    memory_imbalance: float = 1.0
    total_bytes: int = 0
    moved_bytes: int = 0
    movement_lower_bound: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "imbalance": round(self.imbalance, 6),
            "memoryImbalance": round(self.memory_imbalance, 6),
            "totalBytes": self.total_bytes,
            "movedBytes": self.moved_bytes,
            "movementLowerBound": self.movement_lower_bound,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PlanMetrics:
        return cls(
            imbalance=float(raw.get("imbalance", 1.0)),
            memory_imbalance=float(raw.get("memoryImbalance", 1.0)),
            total_bytes=int(raw.get("totalBytes", 0)),
            moved_bytes=int(raw.get("movedBytes", 0)),
            movement_lower_bound=int(raw.get("movementLowerBound", 0)),
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

    # -- queries -------------------------------------------------------------------------------

    def tables(self) -> list[str]:
        return sorted({a.table for a in self.assignments})

    def assignments_for(self, *, partition: int | None = None, gpu: int | None = None,
                        table: str | None = None) -> list[Assignment]:  # fmt: skip
        return [
            a for a in self.assignments
            if (partition is None or a.partition == partition)
            and (gpu is None or a.gpu == gpu)
            and (table is None or a.table == table)
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
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "version": self.version,
            "strategy": self.strategy,
            "bucketCount": self.bucket_count,
            "partitions": self.partitions,
            "gpusPerPod": self.gpus_per_pod,
            "assignments": [a.to_dict() for a in sorted(self.assignments)],
            "metrics": self.metrics.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plan:
        return cls(
            version=int(raw["version"]),
            bucket_count=int(raw["bucketCount"]),
            partitions=int(raw.get("partitions", 1)),
            gpus_per_pod=int(raw.get("gpusPerPod", 1)),
            strategy=str(raw.get("strategy", "auto")),
            assignments=tuple(sorted(Assignment.from_dict(a) for a in raw.get("assignments", []))),
            metrics=PlanMetrics.from_dict(raw.get("metrics", {})),
            model=str(raw.get("model", "")),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def whole_table_plan(tables: Iterable[tuple[str, int]], *, model: str = "", version: int = 1) -> Plan:
    """The trivial plan: one partition, one GPU, every table whole. ``tables`` is ``(name, bytes)``.
    What agents run before the planner has spoken (e.g. ``hps local up`` without a plan)."""
    assignments = tuple(Assignment(name, 0, 0, (0, 1), nbytes) for name, nbytes in sorted(tables))
    total = sum(a.bytes for a in assignments)
    return Plan(version, 1, 1, 1, "replicate", assignments, PlanMetrics(total_bytes=total), model)
