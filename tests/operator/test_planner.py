"""The placement planner: every bucket placed exactly once, budgets held, deterministic, balanced on a
Criteo-like mix and on memory-tight models, re-plans that move close to the least any balanced plan could
move, and a reason wherever a plan misses maxImbalance. Speed is measured in bench/placement.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hps_operator.core import planner
from hps_operator.core.planner import choose_bucket_count, plan_placement
from hps_operator.core.topology import Topology
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.errors import InsufficientGPUMemoryError
from node_agent.plan import Assignment, Plan, bucket_of, whole_table_plan
from node_agent.spec import ModelSpec, parse_model_spec

#: Criteo-1TB's 26 categorical cardinalities (public), the mix production DLRMs are sized by
CRITEO_ROWS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def make_model(rows: tuple[int, ...], *, strategy: str = "auto", gpus: int = 4, partitions: int = 1,
               memory: str | int = "64Gi", hotness: tuple[float, ...] | None = None, dim: int = 128,
               replicas: int = 1, max_imbalance: float = 1.05, cached_fraction: float = 1.0) -> ModelSpec:  # fmt: skip
    tables: list[dict[str, Any]] = [{"name": f"t{i}", "rows": r, "dim": dim} for i, r in enumerate(rows)]
    if hotness is not None:
        for table, h in zip(tables, hotness, strict=True):
            table["hotness"] = h
    return parse_model_spec("m", {
        "tables": tables, "replicas": replicas, "gpusPerPod": gpus, "partitions": partitions,
        "cache": {"memoryPerGPU": memory, "cachedFraction": cached_fraction},
        "placement": {"strategy": strategy, "maxImbalance": max_imbalance},
    })  # fmt: skip


def plan_for(model: ModelSpec, previous: Plan | None = None, **overrides: Any) -> Plan:
    return plan_placement(model, Topology.from_model(model, **overrides), previous)


def assert_valid(plan: Plan, model: ModelSpec, budget: int) -> None:
    """Each bucket of each table has exactly one owner (every slot holds everything for replicate), the
    bytes add up, and no GPU holds more than its budget."""
    slots = plan.partitions * plan.gpus_per_pod
    for table in model.tables:
        counts = np.zeros(plan.bucket_count, dtype=np.int64)
        for a in plan.assignments_for(table=table.name):
            assert 0 <= a.partition < plan.partitions and 0 <= a.gpu < plan.gpus_per_pod
            counts[a.buckets[0] : a.buckets[1]] += 1
        assert (counts == (slots if plan.strategy == "replicate" else 1)).all(), table.name
    per_slot: dict[tuple[int, int], int] = {}
    for a in plan.assignments:
        per_slot[(a.partition, a.gpu)] = per_slot.get((a.partition, a.gpu), 0) + a.bytes
    assert max(per_slot.values()) <= budget
    copies = slots if plan.strategy == "replicate" else 1
    assert plan.metrics.total_bytes == sum(per_slot.values()) == copies * model.total_bytes


mixes = st.lists(st.integers(min_value=1, max_value=5_000_000), min_size=1, max_size=12).map(tuple)
hotness_mixes = st.one_of(st.none(), st.just("zipf"))


@SETTINGS
@given(rows=mixes, gpus=st.integers(1, 9), partitions=st.integers(1, 3),
       strategy=st.sampled_from(["auto", "table", "row"]), skewed=hotness_mixes)  # fmt: skip
def test_every_bucket_owned_once_within_budget_and_deterministic(
    rows: tuple[int, ...], gpus: int, partitions: int, strategy: str, skewed: str | None
) -> None:
    hotness = tuple(1.0 / (i + 1) ** 1.2 for i in range(len(rows))) if skewed else None
    model = make_model(rows, strategy=strategy, gpus=gpus, partitions=partitions, memory="8Gi",
                       hotness=hotness, dim=64)  # fmt: skip
    plan = plan_for(model)
    assert_valid(plan, model, 8 * 2**30)
    assert plan.version == 1 and plan.metrics.moved_bytes == 0
    assert plan_for(model).to_json() == plan.to_json()
    assert Plan.from_json(plan.to_json()) == plan


@SETTINGS
@given(rows=mixes, gpus=st.integers(1, 8))
def test_replicate_puts_every_table_on_every_gpu(rows: tuple[int, ...], gpus: int) -> None:
    model = make_model(rows, strategy="replicate", gpus=gpus, partitions=2, dim=32)
    plan = plan_for(model)
    assert_valid(plan, model, 64 * 2**30)
    assert plan.metrics.imbalance == pytest.approx(1.0)


@SETTINGS
@given(
    rows=mixes, memory=st.integers(1, 10**9), strategy=st.sampled_from(["auto", "table", "row", "replicate"])
)
def test_a_model_that_cannot_fit_names_needed_and_available(
    rows: tuple[int, ...], memory: int, strategy: str
) -> None:
    model = make_model(rows, strategy=strategy, gpus=2, partitions=2, memory=memory, dim=64)
    try:
        plan = plan_for(model)
    except InsufficientGPUMemoryError as exc:
        assert exc.needed > exc.available >= 0
        assert str(exc.needed) in str(exc) and str(exc.available) in str(exc)
        whole = model.total_bytes
        if strategy == "replicate":
            assert exc.needed == whole > memory
        elif whole > 4 * memory:
            assert (exc.needed, exc.available) == (whole, 4 * memory)
    else:
        assert_valid(plan, model, memory)


def test_too_little_memory_reports_model_bytes_against_all_gpus() -> None:
    model = make_model(CRITEO_ROWS, gpus=8, memory="8Gi")
    with pytest.raises(InsufficientGPUMemoryError) as caught:
        plan_for(model)
    assert caught.value.needed == model.total_bytes
    assert caught.value.available == 8 * 8 * 2**30


def test_table_strategy_reports_a_table_larger_than_one_gpu() -> None:
    model = make_model((1_000_000, 10), strategy="table", gpus=4, memory=200 * 2**20)  # t0: 512 MB
    with pytest.raises(InsufficientGPUMemoryError) as caught:
        plan_for(model)
    assert caught.value.needed == 1_000_000 * 128 * 4
    assert caught.value.available == 200 * 2**20
    assert "t0" in str(caught.value)


@pytest.mark.parametrize("gpus", [8, 16, 64])
def test_auto_meets_the_imbalance_target_on_a_criteo_mix(gpus: int) -> None:
    model = make_model(CRITEO_ROWS, gpus=gpus)
    plan = plan_for(model)
    assert_valid(plan, model, 64 * 2**30)
    assert plan.metrics.imbalance <= 1.05
    # the largest table (27% of all rows) cannot sit whole on one of many GPUs: auto splits it,
    # while the small tables stay whole
    assert len(plan.assignments_for(table="t0")) > 1
    assert all(a.buckets == (0, plan.bucket_count) for a in plan.assignments_for(table="t25"))


def test_auto_meets_the_target_with_skewed_hotness() -> None:
    rng = np.random.default_rng(3)
    rows = tuple(int(r) for r in rng.integers(1_000, 2_000_000, size=60))
    hotness = tuple(float(h) for h in 1.0 / np.arange(1, 61) ** 1.1)
    model = make_model(rows, gpus=16, hotness=hotness, max_imbalance=1.02)
    plan = plan_for(model)
    assert_valid(plan, model, 64 * 2**30)
    assert plan.metrics.imbalance <= 1.02


def test_table_strategy_keeps_tables_whole() -> None:
    model = make_model(CRITEO_ROWS, strategy="table", gpus=8)
    plan = plan_for(model)
    assert len(plan.assignments) == len(CRITEO_ROWS)
    assert {a.buckets for a in plan.assignments} == {(0, plan.bucket_count)}


def test_row_strategy_spreads_every_table_over_every_gpu() -> None:
    model = make_model(CRITEO_ROWS, strategy="row", gpus=8)
    plan = plan_for(model)
    for table in model.tables:
        held = sorted({(a.partition, a.gpu) for a in plan.assignments_for(table=table.name)})
        assert held == [(0, g) for g in range(8)]
    assert plan.metrics.imbalance < 1.01


@SETTINGS
@given(
    rows=mixes, replicas=st.integers(0, 50), strategy=st.sampled_from(["auto", "table", "row", "replicate"])
)
def test_changing_replicas_moves_nothing(rows: tuple[int, ...], replicas: int, strategy: str) -> None:
    first = plan_for(make_model(rows, strategy=strategy, gpus=3, replicas=1, dim=16))
    again = plan_for(make_model(rows, strategy=strategy, gpus=3, replicas=replicas, dim=16), first)
    assert again is first  # the same plan, same version: nothing to roll out
    assert again.to_json() == first.to_json()


@pytest.mark.parametrize("strategy", ["auto", "table", "row", "replicate"])
def test_a_gpu_change_is_a_new_version_and_a_repeat_is_not(strategy: str) -> None:
    model = make_model(CRITEO_ROWS, strategy=strategy, gpus=4, memory="400Gi")
    first = plan_for(model)
    grown = plan_for(model, first, gpus_per_pod=5)
    assert grown.version == 2 and grown.gpus_per_pod == 5
    assert plan_for(model, grown, gpus_per_pod=5) is grown
    assert (
        plan_for(model, grown, gpus_per_pod=5).to_json() == plan_for(model, grown, gpus_per_pod=5).to_json()
    )


def _scaled(previous_gpus: int, gpus: int, *, model: ModelSpec) -> tuple[Plan, Plan]:
    before = plan_for(model, gpus_per_pod=previous_gpus)
    after = plan_for(model, before, gpus_per_pod=gpus)
    return before, after


@pytest.mark.parametrize("n", [4, 8, 16, 30])
@pytest.mark.parametrize("change", ["n+1", "2n", "n-1"])
def test_rescaling_moves_within_ten_percent_of_the_lower_bound(n: int, change: str) -> None:
    gpus = {"n+1": n + 1, "2n": 2 * n, "n-1": n - 1}[change]
    model = make_model(CRITEO_ROWS, memory="64Gi")
    before, after = _scaled(n, gpus, model=model)
    assert_valid(after, model, 64 * 2**30)
    assert after.metrics.imbalance <= 1.05
    m = after.metrics
    assert m.movement_lower_bound <= m.moved_bytes <= 1.1 * m.movement_lower_bound
    if change == "n-1":  # the removed GPU's bytes must move, and nothing else needs to
        removed = sum(a.bytes for a in before.assignments_for(gpu=n - 1))
        assert m.movement_lower_bound == removed == m.moved_bytes


def test_a_few_more_gpus_within_the_tolerance_move_nothing() -> None:
    """64 → 65 GPUs: the mean falls by 1.5%, within maxImbalance 1.05, so no byte has to move."""
    model = make_model(CRITEO_ROWS)
    before, after = _scaled(64, 65, model=model)
    assert after.version == before.version + 1
    assert after.metrics.moved_bytes == after.metrics.movement_lower_bound == 0
    assert after.metrics.imbalance <= 1.05


@SETTINGS
@given(rows=st.lists(st.integers(10_000, 3_000_000), min_size=2, max_size=10).map(tuple),
       n=st.integers(2, 12), delta=st.sampled_from([-1, 1, 2]),
       strategy=st.sampled_from(["auto", "row", "table"]), skewed=hotness_mixes)  # fmt: skip
def test_rescaled_plans_stay_valid_and_never_move_less_than_the_bound(
    rows: tuple[int, ...], n: int, delta: int, strategy: str, skewed: str | None
) -> None:
    hotness = tuple(1.0 / (i + 1) for i in range(len(rows))) if skewed else None
    model = make_model(rows, strategy=strategy, hotness=hotness, dim=32)
    before, after = _scaled(n, n * delta if delta == 2 else n + delta, model=model)
    assert_valid(after, model, 64 * 2**30)
    assert after.bucket_count % before.bucket_count == 0
    assert after.metrics.movement_lower_bound <= after.metrics.moved_bytes <= model.total_bytes
    if strategy == "auto":
        assert after.metrics.imbalance <= 1.05 + 1e-9


def test_moved_bytes_count_only_what_a_gpu_did_not_hold() -> None:
    """From a whole-table plan on one GPU to two GPUs: GPU 0 keeps what it had, GPU 1 receives the rest."""
    model = make_model((1000, 3000, 5000), gpus=2, dim=8)
    previous = whole_table_plan([(t.name, t.total_bytes) for t in model.tables], model="m")
    plan = plan_for(model, previous)
    assert plan.version == previous.version + 1
    on_new_gpu = sum(a.bytes for a in plan.assignments_for(gpu=1))
    assert plan.metrics.moved_bytes == on_new_gpu > 0
    assert_valid(plan, model, 64 * 2**30)


def test_removing_a_partition_moves_its_bytes_to_the_others() -> None:
    model = make_model(CRITEO_ROWS, gpus=4, partitions=3)
    before = plan_for(model)
    after = plan_for(model, before, partitions=2)
    lost = sum(a.bytes for a in before.assignments_for(partition=2))
    assert after.metrics.moved_bytes == after.metrics.movement_lower_bound == lost
    assert after.partitions == 2 and after.metrics.imbalance <= 1.05


def test_a_new_table_is_placed_and_old_ones_stay() -> None:
    before = plan_for(make_model(CRITEO_ROWS[:10], gpus=8))
    model = make_model((*CRITEO_ROWS[:10], 5_000_000), gpus=8)
    after = plan_for(model, before)
    new_bytes = model.table("t10").total_bytes
    assert after.metrics.movement_lower_bound >= new_bytes
    assert after.metrics.moved_bytes <= 1.1 * after.metrics.movement_lower_bound
    assert after.metrics.imbalance <= 1.05


def test_unset_partitions_choose_the_smallest_count_that_fits() -> None:
    model = make_model(CRITEO_ROWS, gpus=8, partitions=0, memory="8Gi")  # 96 GB of tables, 64 GiB per pod
    plan = plan_for(model)
    assert plan.partitions == 2
    assert_valid(plan, model, 8 * 2**30)
    with pytest.raises(InsufficientGPUMemoryError):
        plan_for(model, partitions=1)


def test_unset_partitions_that_fit_no_count_tried_say_what_the_model_needs_and_what_they_had() -> None:
    # strategy table keeps a table whole, and this one (512 MB) is larger than a GPU (64 MiB)
    model = make_model((1_000_000,), strategy="table", gpus=1, partitions=0, memory="64Mi")
    with pytest.raises(InsufficientGPUMemoryError) as failed:
        plan_for(model)
    assert (failed.value.needed, failed.value.available) == (512_000_000, 15 * 64 * 2**20)
    assert "no placement on 8 to 15 partition(s) x 1 GPU(s) x 67108864 bytes" in str(failed.value)
    assert "strategy table keeps tables whole" in str(failed.value)


def test_bucket_count_follows_the_spec_or_grows_by_powers_of_two() -> None:
    model = make_model(CRITEO_ROWS, gpus=8)
    chosen = choose_bucket_count(model, 8)
    assert chosen >= 64 and chosen & (chosen - 1) == 0
    fixed = parse_model_spec("m", {"tables": [{"name": "a", "rows": 10, "dim": 4}],
                                   "placement": {"bucketCount": 100}})  # fmt: skip
    assert plan_for(fixed).bucket_count == 100
    before = plan_for(model)
    assert plan_for(model, before, gpus_per_pod=64).bucket_count % before.bucket_count == 0


def test_every_key_routes_to_the_partition_holding_its_bucket() -> None:
    model = make_model(CRITEO_ROWS, gpus=1, partitions=8)
    plan = plan_for(model)
    keys = np.arange(0, 100_000, 7, dtype=np.int64)
    buckets = bucket_of(keys, plan.bucket_count)
    for table in ("t0", "t5", "t19", "t25"):
        owners = plan.partitions_of(table, keys)
        held = np.zeros(len(keys), dtype=bool)
        for a in plan.assignments_for(table=table):
            held |= (owners == a.partition) & (buckets >= a.buckets[0]) & (buckets < a.buckets[1])
        assert held.all()
    # the largest tables (each over one GPU's share of the load) span partitions
    assert len(set(plan.partitions_of("t19", keys).tolist())) > 1


def test_topology_defaults_come_from_the_model() -> None:
    model = make_model(CRITEO_ROWS, gpus=4, partitions=2, memory="16Gi")
    assert Topology.from_model(model) == Topology(2, 4, 16 * 2**30)
    assert Topology.from_model(model, gpu_memory="1Gi", gpus_per_pod=8).gpu_memory_bytes == 2**30


@pytest.mark.parametrize("strategy", ["auto", "table", "row"])
def test_a_model_larger_than_gpu_memory_places_when_gpus_cache_a_fraction(strategy: str) -> None:
    """HPS's gpucacheper: 8 GPUs of 1Gi own ~30 GiB of rows when each caches a tenth of what it owns."""
    rows = (18_000_000, 12_000_000, 6_000_000, 1_000_000)  # x 128 x 4 bytes = ~17.6 GiB; each table < 10 GiB
    whole = make_model(rows, strategy=strategy, gpus=8, memory="1Gi")
    with pytest.raises(InsufficientGPUMemoryError) as err:
        plan_for(whole)
    assert err.value.needed == whole.total_bytes and err.value.available == 8 * 2**30
    tenth = make_model(rows, strategy=strategy, gpus=8, memory="1Gi", cached_fraction=0.1)
    plan = plan_for(tenth)
    assert_valid(plan, tenth, 10 * 2**30)  # a GPU owns up to memory / cachedFraction bytes
    assert plan.metrics.total_bytes == tenth.total_bytes


def test_infeasible_with_a_fraction_reports_cache_bytes_needed() -> None:
    model = make_model((40_000_000,), gpus=2, memory="1Gi", cached_fraction=0.5)
    with pytest.raises(InsufficientGPUMemoryError, match=r"caches 0\.5 of what it owns") as err:
        plan_for(model)
    assert err.value.needed == model.total_bytes // 2 and err.value.available == 2 * 2**30


def test_a_whole_table_too_large_for_any_gpu_reports_its_cache_bytes() -> None:
    model = make_model((40_000_000, 1_000), strategy="table", gpus=8, memory="1Gi", cached_fraction=0.1)
    with pytest.raises(InsufficientGPUMemoryError, match="keeps tables whole") as err:
        plan_for(model)
    assert err.value.needed == 40_000_000 * 128 * 4 // 10  # a tenth of the table must be cached
    assert err.value.available <= 2**30


def test_auto_meets_the_target_when_memory_is_tight_after_losing_a_gpu() -> None:
    """4 → 3 GPUs with little free memory: after the minimal re-plan one GPU is full of large, rarely
    read tables, so the load shed by the others has nowhere to land unless cold bytes make room."""
    rows = (11234, 10697, 80560, 1595, 111547, 23993, 972086, 1103165, 2635323, 755352, 146376)
    hotness = (0.316, 0.089, 0.081, 0.185, 0.233, 0.113, 1.0, 0.130, 0.0996, 0.483, 0.152)
    model = make_model(rows, gpus=4, memory=316_049_317, hotness=hotness, dim=32)
    _, after = _scaled(4, 3, model=model)
    assert_valid(after, model, 316_049_317)
    assert after.metrics.imbalance <= 1.05
    assert after.metrics.movement_lower_bound <= after.metrics.moved_bytes <= 1.1 * after.metrics.movement_lower_bound


# ---------------------------------------------------------------------------------------------
# memory-tight models: what the cluster looks like when planning matters most


def tight_model(count: int, *, gpus: int, headroom: float, gpus_per_pod: int = 8, seed: int = 10,
                memory_gpus: int | None = None) -> ModelSpec:  # fmt: skip
    """The shape of a production model: rows log-normal (median 160k, capped at 60M), dim 64 or 128, hotness
    uniform at random; GPU memory ``headroom`` x the model's bytes over ``memory_gpus`` (default ``gpus``)."""
    rng = np.random.default_rng(seed)
    rows = np.clip(rng.lognormal(np.log(160_000), 2.0, count), 1, 60_000_000).astype(np.int64)
    dims = rng.choice([64, 128], count)
    hotness = rng.uniform(0.0, 1.0, count)
    tables = [{"name": f"t{i}", "rows": int(r), "dim": int(d), "hotness": float(h)}
              for i, (r, d, h) in enumerate(zip(rows, dims, hotness, strict=True))]  # fmt: skip
    total = sum(t["rows"] * t["dim"] * 4 for t in tables)
    memory = int(headroom * total / (memory_gpus or gpus))
    return parse_model_spec("tight", {"tables": tables, "gpusPerPod": gpus_per_pod, "partitions": gpus // gpus_per_pod,
                                      "cache": {"memoryPerGPU": memory}})  # fmt: skip


def test_a_memory_tight_model_of_hundreds_of_tables_places_validly() -> None:
    """300 tables on 64 GPUs with 10% more GPU memory than the model: every bucket owned once, no GPU over its
    budget, the load within maxImbalance, and about two shards per GPU plus one per table."""
    model = tight_model(300, gpus=64, headroom=1.1)
    budget = model.cache.memory_per_gpu
    plan = plan_for(model)
    assert_valid(plan, model, budget)
    assert plan.metrics.imbalance <= 1.05 and plan.metrics.reason == ""
    assert len(plan.assignments) <= 3 * 64 + 300


@pytest.mark.parametrize("change", ["n+1", "2n", "n-1"])
def test_re_plans_of_a_memory_tight_model_stay_valid_and_near_the_bound(change: str) -> None:
    """The same model, the memory per GPU sized so that 56 GPUs (one pod fewer) still have 10% to spare."""
    model = tight_model(300, gpus=64, headroom=1.1, memory_gpus=56)
    before = plan_for(model)
    partitions = {"n+1": 9, "2n": 16, "n-1": 7}[change]
    after = plan_for(model, before, partitions=partitions)
    assert_valid(after, model, model.cache.memory_per_gpu)
    m = after.metrics
    assert m.imbalance <= 1.05 and m.reason == ""
    assert m.movement_lower_bound <= m.moved_bytes <= 1.1 * m.movement_lower_bound
    if change == "n-1":  # the removed pod's bytes must move, and nothing else needs to
        removed = sum(a.bytes for a in before.assignments_for(partition=7))
        assert m.moved_bytes == m.movement_lower_bound == removed


def test_losing_a_pod_without_the_memory_for_it_names_needed_and_available() -> None:
    model = tight_model(300, gpus=64, headroom=1.1)
    before = plan_for(model)
    with pytest.raises(InsufficientGPUMemoryError) as caught:
        plan_for(model, before, partitions=7)
    assert caught.value.needed == model.total_bytes
    assert caught.value.available == 56 * model.cache.memory_per_gpu


def cold_full_previous(model: ModelSpec) -> Plan:
    """4 GPUs full of large, rarely read tables and 4 GPUs with all the hot ones: the layout an older planner
    (or a change of hotness) leaves behind."""
    assignments = [Assignment(f"cold{i}", 0, i, (0, 64), model.table(f"cold{i}").total_bytes) for i in range(4)]
    assignments += [Assignment(f"hot{j}", 0, 4 + j % 4, (0, 64), model.table(f"hot{j}").total_bytes) for j in range(24)]
    return Plan(1, 64, 1, 8, "auto", tuple(sorted(assignments)), model=model.name)


def cold_and_hot_model(memory: int) -> ModelSpec:
    tables: list[dict[str, Any]] = [{"name": f"cold{i}", "rows": 1_000_000, "dim": 128, "hotness": 0.02} for i in range(4)]
    tables += [{"name": f"hot{i}", "rows": 50_000, "dim": 128, "hotness": 0.5} for i in range(24)]
    return parse_model_spec("m", {"tables": tables, "gpusPerPod": 8, "cache": {"memoryPerGPU": memory}})


def test_the_bound_counts_the_cold_bytes_memory_forces_out() -> None:
    """GPUs full of cold tables must take hot buckets to balance, and can only by sending cold bytes away: the
    lower bound counts both, so the re-plan's movedBytes stays within 10% of it."""
    model = cold_and_hot_model(memory=int(1.02 * 512_000_000))  # a cold GPU has 10 MB free
    previous = cold_full_previous(model)
    plan = plan_for(model, previous)
    assert_valid(plan, model, model.cache.memory_per_gpu)
    m = plan.metrics
    assert m.imbalance <= 1.05 and m.reason == ""
    cold_moved = sum(a.bytes for a in plan.assignments if a.table.startswith("cold") and a.gpu != int(a.table[4:]))
    assert cold_moved > 0.3 * m.moved_bytes  # memory forced these out: the over-loaded GPUs' shedding alone would not
    assert m.movement_lower_bound <= m.moved_bytes <= 1.1 * m.movement_lower_bound


def test_the_swap_repair_is_bounded_by_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no work allowed, the repair stops at once and the plan says so; it is still a valid plan."""
    monkeypatch.setattr(planner, "REPAIR_WORK", 0)
    model = cold_and_hot_model(memory=int(1.02 * 512_000_000))
    plan = plan_for(model, cold_full_previous(model))
    assert_valid(plan, model, model.cache.memory_per_gpu)
    assert plan.metrics.imbalance > 1.05
    assert "the swap repair reached its work bound" in plan.metrics.reason


def test_a_row_heavier_than_the_cap_is_reported_and_left_in_place() -> None:
    """A table of 3 rows that takes 90% of the lookups: no layout of whole rows meets maxImbalance. The plan
    says why, and re-planning it moves nothing."""
    tables = [{"name": "country", "rows": 3, "dim": 16, "hotness": 0.9}] + [
        {"name": f"t{i}", "rows": 200_000, "dim": 64, "hotness": 0.01} for i in range(10)
    ]
    model = parse_model_spec("m", {"tables": tables, "gpusPerPod": 8, "cache": {"memoryPerGPU": "1Gi"}})
    plan = plan_for(model)
    assert_valid(plan, model, 2**30)
    assert plan.metrics.imbalance > 1.05
    assert "one row (one key) of table country alone carries" in plan.metrics.reason
    assert plan_for(model, plan) is plan


def test_whole_tables_over_the_cap_say_so() -> None:
    model = make_model(CRITEO_ROWS, strategy="table", gpus=8)
    plan = plan_for(model)
    assert plan.metrics.imbalance > 1.05
    assert "strategy table keeps tables whole and table t19 alone carries" in plan.metrics.reason


@SETTINGS
@given(rows=st.lists(st.integers(1_000, 3_000_000), min_size=2, max_size=12).map(tuple),
       hot=st.lists(st.floats(0.01, 1.0), min_size=12, max_size=12), gpus=st.integers(2, 8),
       partitions=st.integers(2, 4), headroom=st.sampled_from([1.05, 1.1, 1.5]))  # fmt: skip
def test_memory_tight_plans_are_valid_and_balanced_or_say_why(
    rows: tuple[int, ...], hot: list[float], gpus: int, partitions: int, headroom: float
) -> None:
    model = make_model(rows, gpus=gpus, partitions=partitions, memory=int(headroom * sum(rows) * 64 * 4 / (gpus * partitions)),
                       hotness=tuple(hot[: len(rows)]), dim=64)  # fmt: skip
    budget = model.cache.memory_per_gpu
    plan = plan_for(model)
    assert_valid(plan, model, budget)
    assert plan.metrics.imbalance <= 1.05 or plan.metrics.reason
    after = plan_for(model, plan, partitions=partitions + 1)
    assert_valid(after, model, budget)
    assert after.metrics.imbalance <= 1.05 or after.metrics.reason
    if not after.metrics.reason:
        assert after.metrics.movement_lower_bound <= after.metrics.moved_bytes


def test_a_plan_of_ten_thousand_gpus_is_a_small_document() -> None:
    """1,000 tables on 1,250 pods of 8 GPUs, memory-tight: the plan a ConfigMap holds stays well under 1 MiB."""
    model = tight_model(1000, gpus=10_000, headroom=1.1)
    plan = plan_for(model)
    document = plan.to_json()
    assert len(document) < 512 * 1024
    used: dict[tuple[int, int], int] = {}
    for a in plan.assignments:
        used[(a.partition, a.gpu)] = used.get((a.partition, a.gpu), 0) + a.bytes
    assert len(used) == 10_000 and max(used.values()) <= model.cache.memory_per_gpu
    assert Plan.from_json(document) == plan
