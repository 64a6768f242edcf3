"""The plan format round-trips (v2 written, v1 still read), bad documents are named, and the key → bucket
hash spreads keys evenly and never changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from node_agent.plan import (
    PLAN_FORMAT,
    PLAN_FORMAT_V1,
    Assignment,
    Plan,
    PlanMetrics,
    TableShape,
    bucket_of,
    merge_bucket_ranges,
    whole_table_plan,
)


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


def shaped_plan() -> Plan:
    """Table ``t`` cut over three GPUs of two pods, ``u`` whole on one: the shapes give every shard's bytes."""
    shapes = (TableShape("t", 1000, 64), TableShape("u", 10, 16))
    t, u = shapes
    assignments = (
        Assignment("t", 0, 1, (0, 3), t.range_bytes(0, 3, 8)),
        Assignment("t", 1, 0, (3, 5), t.range_bytes(3, 5, 8)),
        Assignment("t", 1, 1, (5, 8), t.range_bytes(5, 8, 8)),
        Assignment("u", 1, 0, (0, 8), u.range_bytes(0, 8, 8)),
    )
    return Plan(4, 8, 2, 2, "auto", assignments, PlanMetrics(1.01, 1.2, 64160, 320, 300), "m", shapes)


def test_v2_writes_each_table_as_owners_between_cuts() -> None:
    doc = shaped_plan().to_dict()
    assert doc["format"] == PLAN_FORMAT == "hps.dev/plan/v2"
    # slot = partition x gpusPerPod + gpu; no per-shard bytes where the shape says them
    assert doc["tables"] == {
        "t": {"rows": 1000, "rowBytes": 64, "slots": [1, 2, 3], "cuts": [3, 5]},
        "u": {"rows": 10, "rowBytes": 16, "slots": [2]},
    }
    assert "reason" not in doc["metrics"]
    again = Plan.from_json(shaped_plan().to_json())
    assert again == shaped_plan()
    assert sum(a.bytes for a in again.assignments_for(table="t")) == 1000 * 64


def test_overlapping_ranges_and_unknown_shapes_round_trip() -> None:
    """A rollout's union (a bucket held twice) and a plan built without shapes keep every shard exactly."""
    assignments = (
        Assignment("t", 0, 0, (0, 4), 50), Assignment("t", 0, 1, (0, 4), 50),
        Assignment("t", 1, 0, (2, 4), 25), Assignment("t", 1, 1, (0, 2), 25),
    )  # fmt: skip
    plan = Plan(7, 4, 2, 2, "auto", assignments, PlanMetrics(reason="3 GPU(s) above maxImbalance"), "m")
    doc = plan.to_dict()
    # GPUs 0 and 1 of pod 0 hold the same range: one run of two slots
    assert doc["tables"]["t"] == {"ranges": [[0, 2, 3, 1], [0, 4, 0, 2], [2, 4, 2, 1]], "bytes": [25, 50, 25]}
    assert doc["metrics"]["reason"] == "3 GPU(s) above maxImbalance"
    assert Plan.from_dict(json.loads(json.dumps(doc))) == plan


def test_a_replicated_plan_of_ten_thousand_gpus_is_one_run_per_table() -> None:
    shapes = tuple(TableShape(f"t{i}", 1000 + i, 128) for i in range(4))
    assignments = tuple(
        Assignment(s.table, p, g, (0, 64), s.range_bytes(0, 64, 64)) for s in shapes for p in range(1250) for g in range(8)
    )
    plan = Plan(1, 64, 1250, 8, "replicate", assignments, PlanMetrics(), "m", shapes)
    text = plan.to_json()
    assert json.loads(text)["tables"]["t3"] == {"rows": 1003, "rowBytes": 128, "ranges": [[0, 64, 0, 10_000]]}
    assert len(text) < 1024
    assert Plan.from_json(text) == plan


def test_plans_stored_as_v1_still_read_and_route_the_same() -> None:
    """Plans already in clusters' ConfigMaps are ``hps.dev/plan/v1``: a release that writes v2 reads them."""
    stored = json.dumps({
        "format": PLAN_FORMAT_V1, "model": "m", "version": 3, "strategy": "row", "bucketCount": 4,
        "partitions": 2, "gpusPerPod": 1,
        "assignments": [{"table": "t", "partition": 1, "gpu": 0, "buckets": [2, 4], "bytes": 50},
                        {"table": "t", "partition": 0, "gpu": 0, "buckets": [0, 2], "bytes": 50}],
        "metrics": {"imbalance": 1.0, "memoryImbalance": 1.0, "totalBytes": 100, "movedBytes": 0,
                    "movementLowerBound": 0},
    })  # fmt: skip
    plan = Plan.from_json(stored)
    assert [(a.partition, a.buckets, a.bytes) for a in plan.assignments] == [(0, (0, 2), 50), (1, (2, 4), 50)]
    rewritten = Plan.from_json(plan.to_json())
    assert rewritten == plan and json.loads(plan.to_json())["format"] == PLAN_FORMAT
    keys = np.arange(100, dtype=np.int64)
    expected = np.where(bucket_of(keys, 4) < 2, 0, 1)
    assert (plan.partitions_of("t", keys) == expected).all()
    assert (rewritten.partitions_of("t", keys) == expected).all()


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"t": {"rows": 10, "rowBytes": 4, "slots": [0, 1]}}, "table t: 2 slots need 1 cuts, got 0"),
        ({"t": {"rows": 10, "rowBytes": 4, "slots": [0, 1, 0], "cuts": [5, 3]}}, "table t: cuts must rise"),
        ({"t": {"rows": 10, "rowBytes": 4, "slots": [0, 1], "cuts": [8]}}, "table t: cuts must rise"),
        ({"t": {"slots": [0]}}, "table t: neither rows and rowBytes nor bytes"),
        ({"t": {"slots": [0, 1], "cuts": [4], "bytes": [3]}}, "table t: 2 ranges but 1 byte counts"),
        ({"t": {"rows": 10, "rowBytes": 4, "ranges": [[0, 9, 0, 1]]}}, r"range \[0, 9, 0, 1\] is not"),
        ({"t": [0, 1]}, "table t: expected an object"),
    ],
)
def test_a_malformed_v2_plan_names_the_table_and_the_fault(tables: dict[str, object], message: str) -> None:
    doc = {"format": PLAN_FORMAT, "version": 1, "bucketCount": 8, "partitions": 1, "gpusPerPod": 2,
           "tables": tables}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(doc)


def test_an_unknown_format_says_which_ones_this_release_reads() -> None:
    with pytest.raises(ValueError, match=r"unknown plan format 'hps.dev/plan/v9'.*v2 and .*v1"):
        Plan.from_dict({"format": "hps.dev/plan/v9", "version": 1, "bucketCount": 8})


def test_writing_a_gpu_outside_its_pod_is_refused() -> None:
    """A slot is ``partition x gpusPerPod + gpu``: a GPU index past the pod would name another pod's GPU."""
    plan = Plan(1, 4, 1, 2, "auto", (Assignment("t", 0, 2, (0, 4), 8),), PlanMetrics(), "m")
    with pytest.raises(ValueError, match="GPU 2 of partition 0 is outside a pod of 2 GPU"):
        plan.to_json()


def test_whole_table_plan_puts_everything_on_one_gpu() -> None:
    plan = whole_table_plan([("b", 10), ("a", 20)], model="m")
    assert [(a.table, a.partition, a.gpu, a.buckets) for a in plan.assignments] == [
        ("a", 0, 0, (0, 1)), ("b", 0, 0, (0, 1))]
    assert plan.metrics.total_bytes == 30
    assert Plan.from_json(plan.to_json()) == plan


def test_merge_bucket_ranges_joins_overlapping_and_touching_ranges() -> None:
    assert merge_bucket_ranges([(8, 10), (0, 2), (2, 4), (3, 6), (12, 13)]) == [(0, 6), (8, 10), (12, 13)]
    assert merge_bucket_ranges([]) == []
