"""The plan format round-trips, and the key → bucket hash spreads keys evenly and never changes."""

from __future__ import annotations

import numpy as np

from node_agent.plan import Assignment, Plan, PlanMetrics, bucket_of, merge_bucket_ranges, whole_table_plan


def splitmix64_reference(key: int) -> int:
    """SplitMix64's output function, written out with Python integers (Steele et al., 2014)."""
    mask = (1 << 64) - 1
    z = (key + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_bucket_of_is_splitmix64_modulo_bucket_count() -> None:
    # Clients and agents built from different releases must route a key identically: the hash is a
    # published function, checked here against an independent scalar implementation.
    keys = [0, 1, 2, 12345, -1, 2**62, -(2**63)]
    expected = [splitmix64_reference(k & ((1 << 64) - 1)) % 1000 for k in keys]
    assert bucket_of(np.array(keys, dtype=np.int64), 1000).tolist() == expected


def test_bucket_of_spreads_sequential_keys_evenly() -> None:
    counts = np.bincount(bucket_of(np.arange(1_000_000, dtype=np.int64), 64), minlength=64)
    assert counts.min() > 0.97 * counts.mean() and counts.max() < 1.03 * counts.mean()


def test_plan_round_trips_through_json_and_routes_keys() -> None:
    plan = Plan(
        version=3, bucket_count=4, partitions=2, gpus_per_pod=1, strategy="row",
        assignments=(Assignment("t", 1, 0, (2, 4), 50), Assignment("t", 0, 0, (0, 2), 50)),
        metrics=PlanMetrics(imbalance=1.0, total_bytes=100), model="m",
    )
    again = Plan.from_json(plan.to_json())
    assert again == Plan.from_dict(plan.to_dict())
    assert [a.partition for a in again.assignments] == [0, 1]
    assert again.to_dict()["assignments"][0] == {"table": "t", "partition": 0, "gpu": 0, "buckets": [0, 2], "bytes": 50}
    keys = np.arange(100, dtype=np.int64)
    expected = np.where(bucket_of(keys, 4) < 2, 0, 1)
    assert (again.partitions_of("t", keys) == expected).all()


def test_whole_table_plan_puts_everything_on_one_gpu() -> None:
    plan = whole_table_plan([("b", 10), ("a", 20)], model="m")
    assert [(a.table, a.partition, a.gpu, a.buckets) for a in plan.assignments] == [
        ("a", 0, 0, (0, 1)), ("b", 0, 0, (0, 1))]
    assert plan.metrics.total_bytes == 30


def test_merge_bucket_ranges_joins_overlapping_and_touching_ranges() -> None:
    assert merge_bucket_ranges([(8, 10), (0, 2), (2, 4), (3, 6), (12, 13)]) == [(0, 6), (8, 10), (12, 13)]
    assert merge_bucket_ranges([]) == []
