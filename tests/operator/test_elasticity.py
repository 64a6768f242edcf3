"""Elasticity decisions: the HPA algorithm as the Kubernetes controller computes it for the agents'
per-replica QPS metric, and the partition autoscaler's state machine (widen, narrow, hold, never flap)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
from hps_operator.core.elasticity import (
    HorizontalPodAutoscaler,
    HPASample,
    HPASpec,
    MetricsUnavailableError,
    PartitionAutoscaler,
    PartitionAutoscalerState,
    PartitionAutoscaling,
    PartitionDecision,
    PartitionSample,
    PodMetric,
    ScalingPolicy,
    ScalingRules,
    parse_metric_quantity,
    pods_metric_replicas,
    replay_hpa,
)
from hps_operator.core.planner import plan_placement
from hps_operator.core.render.autoscaling import QPS_METRIC, render_hpa
from hps_operator.core.topology import Topology

from node_agent.cache.l1 import build_l1
from node_agent.errors import InvalidArgumentError, InvalidSpecError
from node_agent.spec import parse_model_spec
from tests.bench_scripts import load_bench_script

TARGET = 20_000.0


def pods(*values: float | None, phase: str = "Running") -> list[PodMetric]:
    return [PodMetric(f"agent-{i}", v, phase) for i, v in enumerate(values)]  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the replica calculation (replica_calculator.go, Pods metric, AverageValue target)


def test_within_the_tolerance_the_count_stays() -> None:
    assert pods_metric_replicas(3, pods(22_000, 21_000, 22_000), TARGET).replicas == 3  # ratio 1.083
    assert pods_metric_replicas(3, pods(18_000, 18_500, 18_100), TARGET).replicas == 3  # ratio 0.91


def test_outside_the_tolerance_the_count_is_ceil_of_ratio_times_ready_pods() -> None:
    calc = pods_metric_replicas(3, pods(30_000, 30_000, 31_000), TARGET)
    assert calc.replicas == 5  # average 30333.333 → ratio 1.5167 → ceil(4.55)
    assert calc.average_value == pytest.approx(30_333.333)
    assert pods_metric_replicas(4, pods(5_000, 5_000, 5_000, 5_000), TARGET).replicas == 1


@pytest.mark.parametrize("partitions", [1, 2, 3, 4])
def test_one_pod_per_replica_asks_total_load_over_target_for_any_partition_count(partitions: int) -> None:
    """The scale selector matches partition 0's agent pods, one per replica, each reporting the RPCs
    its replica answered. Every partition of a replica answers those RPCs too, so a selector of every
    agent pod would average the same value over partitions x as many pods."""
    rng = random.Random(7)
    for _ in range(200):
        replicas, each = rng.randint(1, 12), rng.randint(1, 40) * 1_000
        total = each * replicas
        outside_tolerance = not 0.9 * TARGET <= each <= 1.1 * TARGET
        got = pods_metric_replicas(replicas, pods(*[each] * replicas), TARGET).replicas
        assert got == (math.ceil(total / TARGET) if outside_tolerance else replicas)
        every_agent_pod = pods(*[each] * (replicas * partitions))
        wrong = pods_metric_replicas(replicas * partitions, every_agent_pod, TARGET).replicas
        if outside_tolerance:
            assert wrong == math.ceil(partitions * total / TARGET)  # partitions x too many
        else:
            assert wrong == replicas * partitions


def test_a_rollout_of_partition_0_does_not_change_the_count() -> None:
    """While a rollout runs partition 0's old and new agent sets side by side, the selector matches
    two pods per replica: the new ones serve nothing yet, so they report 0 (or nothing before their
    first rate), and the proposal stays what the old pods alone ask for."""
    old = pods(30_000, 30_000, 30_000)  # 90k RPC/s over 3 replicas: 5 wanted
    new_serving_nothing = [PodMetric(f"new-{i}", 0.0) for i in range(3)]
    new_without_a_rate = [PodMetric(f"new-{i}", None) for i in range(3)]
    assert pods_metric_replicas(3, old, TARGET).replicas == 5
    assert pods_metric_replicas(3, [*old, *new_serving_nothing], TARGET).replicas == 5
    # without their rate yet, the new pods count against the direction of change: the count stays
    assert pods_metric_replicas(3, [*old, *new_without_a_rate], TARGET).replicas == 3


def test_a_missing_sample_counts_at_the_target_when_scaling_down() -> None:
    # two pods at half the target, one without a sample (Prometheus has no rate for it yet)
    calc = pods_metric_replicas(3, pods(10_000, 10_000, None), TARGET)
    assert calc.replicas == 2  # (10k + 10k + 20k) / 3 → 0.667 x 3, not 0.5 x 2 = 1
    assert (calc.ready, calc.missing) == (2, 1)


def test_a_missing_sample_counts_as_zero_when_scaling_up() -> None:
    assert pods_metric_replicas(3, pods(40_000, 40_000, None), TARGET).replicas == 4  # 80k / 3 → 1.333 x 3


def test_a_missing_sample_that_flips_the_direction_keeps_the_count() -> None:
    # 1.15 on the two reporting pods, but 0.77 once the missing one counts as 0: no change
    assert pods_metric_replicas(3, pods(23_000, 23_000, None), TARGET).replicas == 3


def test_pending_pods_count_as_zero_on_a_scale_up_only() -> None:
    up = [*pods(40_000, 40_000), PodMetric("agent-new", None, "Pending")]
    assert pods_metric_replicas(3, up, TARGET).replicas == 4
    down = [*pods(10_000, 10_000), PodMetric("agent-new", None, "Pending")]
    assert pods_metric_replicas(3, down, TARGET).replicas == 1


def test_deleted_and_failed_pods_are_ignored() -> None:
    gone = [PodMetric("old-0", 0.0, "Running", deleting=True), PodMetric("old-1", 0.0, "Failed")]
    calc = pods_metric_replicas(2, [*pods(40_000, 40_000), *gone], TARGET)
    assert (calc.replicas, calc.ignored) == (4, 2)


def test_no_pods_or_no_samples_is_an_error_naming_why() -> None:
    with pytest.raises(MetricsUnavailableError, match="no pods returned by selector"):
        pods_metric_replicas(2, [], TARGET)
    with pytest.raises(MetricsUnavailableError, match="did not receive metrics"):
        pods_metric_replicas(2, pods(None, None, phase="Pending"), TARGET)


def test_values_are_milli_units_rounded_up_like_quantities() -> None:
    # 0.1 is exactly 100m (not 101m from binary floating point), so 0.1 against "100m" is on target
    assert parse_metric_quantity("100m", field="t") == pytest.approx(0.1)
    assert pods_metric_replicas(5, pods(*[0.1] * 5), parse_metric_quantity("100m", field="t")).replicas == 5
    assert parse_metric_quantity("2k", field="t") == 2000.0
    with pytest.raises(InvalidSpecError, match="averageValue: expected a quantity"):
        parse_metric_quantity("lots", field="averageValue")


# ---------------------------------------------------------------------------------------------
# the controller's behaviours (horizontal.go)


def even_pods(total: float, replicas: int) -> list[PodMetric]:
    return pods(*[total / replicas] * replicas)


def test_default_scale_up_adds_at_most_4_pods_or_100_percent_per_15_seconds() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec(max_replicas=40, target_average_value=TARGET))
    seen = []
    replicas = 1
    for t in (0, 5, 15, 30, 45, 60):
        decision = hpa.reconcile(t, replicas, even_pods(1_000_000, replicas))
        seen.append((t, decision.desired_replicas, decision.scaling_limited))
        replicas = decision.desired_replicas
    assert seen == [
        (0, 5, "ScaleUpLimit"),  # max(1 + 4 pods, 1 x 200 %)
        (5, 5, "ScaleUpLimit"),  # the 4 pods of t=0 are within this 15 s period
        (15, 10, "ScaleUpLimit"),  # a new period starts from 5: max(5 + 4, 10)
        (30, 20, "ScaleUpLimit"),
        (45, 40, "TooManyReplicas"),  # 50 wanted, maxReplicas 40
        (60, 40, "TooManyReplicas"),
    ]


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec(max_replicas=20, target_average_value=TARGET))
    replicas = 10
    desired = {}
    for t in range(0, 330, 15):
        decision = hpa.reconcile(t, replicas, even_pods(40_000, replicas))  # needs 2
        desired[t] = (decision.desired_replicas, decision.able_to_scale)
        replicas = decision.desired_replicas
    # a new HPA records the current count as its first recommendation: 300 s of 10, then 2
    assert desired[0] == (10, "ScaleDownStabilized") and desired[285] == (10, "ScaleDownStabilized")
    assert desired[300] == (2, "ReadyForNewScale")


def test_a_brief_dip_never_scales_down_and_a_burst_scales_up_at_once() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec(max_replicas=20, target_average_value=TARGET))
    replicas = 4
    history = []
    for t in range(0, 1200, 15):
        load = 20_000.0 if 300 <= t < 420 else 80_000.0  # 2 minutes at a quarter of the load
        if 900 <= t < 915:
            load = 160_000.0  # one sync period of double load
        decision = hpa.reconcile(t, replicas, even_pods(load, replicas))
        replicas = decision.desired_replicas
        history.append(replicas)
    assert min(history) == 4  # the dip is shorter than the 300 s window
    assert history[900 // 15] == 8  # ceil(160k / 20k), within 4 pods per 15 s


def test_scale_down_window_and_policies_come_from_the_manifest() -> None:
    manifest = {
        "spec": {
            "minReplicas": 1,
            "maxReplicas": 10,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": QPS_METRIC}, "target": {"type": "AverageValue", "averageValue": "20k"},
            }}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 30}]}},
        }
    }  # fmt: skip
    spec = HPASpec.from_manifest(manifest)
    assert spec.scale_down == ScalingRules(60, (ScalingPolicy("Pods", 1, 30),))
    assert spec.scale_up.policies == (ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15))
    hpa = HorizontalPodAutoscaler(spec)
    replicas, steps = 6, []
    for t in range(0, 240, 15):
        decision = hpa.reconcile(t, replicas, even_pods(18_000, replicas))  # needs 1
        if decision.rescale:
            steps.append((t, decision.desired_replicas, decision.scaling_limited))
        replicas = decision.desired_replicas
    assert steps == [(60, 5, "ScaleDownLimit"), (90, 4, "ScaleDownLimit"), (120, 3, "ScaleDownLimit"),
                     (150, 2, "ScaleDownLimit"), (180, 1, "DesiredWithinRange")]  # fmt: skip


def test_the_rendered_hpa_is_what_the_algorithm_runs() -> None:
    model = parse_model_spec("dlrm", {
        "tables": [{"name": "t", "rows": 1000, "dim": 16}], "partitions": 2,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 6, "targetQPSPerReplica": 15000},
    })  # fmt: skip
    owner = {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": "dlrm", "uid": "u"}
    manifest = render_hpa(model, owner=owner)
    assert manifest is not None
    spec = HPASpec.from_manifest(manifest)
    assert (spec.min_replicas, spec.max_replicas, spec.target_average_value) == (1, 6, 15_000.0)
    assert spec.metric_name == QPS_METRIC and spec.scale_down.stabilization_window_seconds == 300


def test_counts_outside_min_max_go_to_the_bound_at_once() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec(min_replicas=2, max_replicas=5, target_average_value=TARGET))
    above = hpa.reconcile(0, 9, even_pods(20_000, 9))
    assert above.desired_replicas == 5
    assert above.message == "New size: 5; reason: Current number of replicas above Spec.MaxReplicas"
    below = HorizontalPodAutoscaler(hpa.spec).reconcile(0, 1, even_pods(1_000, 1))
    assert below.desired_replicas == 2
    disabled = HorizontalPodAutoscaler(hpa.spec).reconcile(0, 0, [])
    assert (disabled.desired_replicas, disabled.scaling_active) == (0, "ScalingDisabled")


def test_without_samples_the_count_stays_and_scaling_is_inactive() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec(max_replicas=5, target_average_value=TARGET))
    decision = hpa.reconcile(0, 3, pods(None, None, None, phase="Pending"))
    assert (decision.desired_replicas, decision.scaling_active) == (3, "FailedGetPodsMetric")
    assert "did not receive metrics for targeted pods" in decision.message


def test_replicas_go_1_to_3_to_1_with_two_partitions() -> None:
    """The control-plane acceptance scenario on the pure algorithm: 2 partitions, load for 2.5
    replicas, then back; the HPA reads partition 0's pod of each replica and asks for 3, not 6."""
    spec = HPASpec(min_replicas=1, max_replicas=8, target_average_value=TARGET)
    hpa = HorizontalPodAutoscaler(spec)
    replicas, trace = 1, []
    for t in range(0, 1500, 15):
        total = 50_000.0 if 60 <= t < 600 else 8_000.0
        decision = hpa.reconcile(t, replicas, even_pods(total, replicas))
        replicas = decision.desired_replicas
        trace.append(replicas)
    assert max(trace) == 3 and trace[-1] == 1
    # the last proposal of 3 was at t=585: 300 s later the window lets go
    assert trace[870 // 15] == 3 and trace[885 // 15] == 1


def test_replay_is_the_same_as_reconciling_step_by_step() -> None:
    spec = HPASpec(max_replicas=8, target_average_value=TARGET)
    loads = [70_000.0, 70_000.0, 10_000.0, 90_000.0, 30_000.0]
    timeline = [HPASample(15.0 * i, 2 + i, tuple(even_pods(load, 2 + i))) for i, load in enumerate(loads)]
    hpa = HorizontalPodAutoscaler(spec)
    by_hand = [hpa.reconcile(s.time, s.current_replicas, s.pods) for s in timeline]
    assert replay_hpa(spec, timeline) == by_hand
    assert [d.desired_replicas for d in by_hand] == [4, 4, 4, 5, 5]  # 6 → 5: the highest of the window


def test_time_must_not_go_backwards() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec(max_replicas=5, target_average_value=TARGET))
    hpa.reconcile(100, 1, even_pods(1_000, 1))
    with pytest.raises(InvalidArgumentError, match="time went backwards"):
        hpa.reconcile(99, 1, even_pods(1_000, 1))


def test_bad_hpa_specs_name_the_field() -> None:
    with pytest.raises(InvalidSpecError, match="maxReplicas"):
        HPASpec(min_replicas=3, max_replicas=2, target_average_value=TARGET)
    with pytest.raises(InvalidSpecError, match="averageValue"):
        HPASpec(max_replicas=2, target_average_value=0)
    with pytest.raises(InvalidSpecError, match="periodSeconds"):
        ScalingPolicy("Pods", 1, 3600)
    with pytest.raises(InvalidSpecError, match=r"spec\.metrics"):
        HPASpec.from_manifest({"spec": {"maxReplicas": 3, "metrics": []}})


# ---------------------------------------------------------------------------------------------
# the partition autoscaler

SPEC = PartitionAutoscaling(min=1, max=6, target_hit_rate=0.90)
STEP = 30.0  # seconds between samples


World = Callable[[float, int], float]


def run(
    autoscaler: PartitionAutoscaler,
    world: World,
    *,
    start: float,
    hours: float,
    partitions: int,
    gpu_load: float | None = 0.1,
    rollout_s: float = 120.0,
) -> tuple[list[PartitionDecision], int]:
    """Feeds samples every 30 s from ``world(time, partitions) → hit rate``, applying each change
    after ``rollout_s`` (the make-before-break rollout), and returns the decisions and the count."""
    decisions = []
    pending: tuple[float, int] | None = None
    t = start
    while t < start + hours * 3600:
        if pending is not None and t >= pending[0]:
            partitions, pending = pending[1], None
        decision = autoscaler.observe(PartitionSample(t, partitions, world(t, partitions), gpu_load, 50_000))
        decisions.append(decision)
        if decision.action != "hold":
            pending = (t + rollout_s, decision.partitions)
        t += STEP
    return decisions, partitions


def changes(decisions: list[PartitionDecision]) -> list[tuple[str, int]]:
    return [(d.action, d.partitions) for d in decisions if d.action != "hold"]


def noisy(table: dict[int, float], sd: float = 0.004, seed: int = 3) -> World:
    rng = random.Random(seed)
    return lambda _t, p: min(1.0, max(0.0, table[p] + rng.gauss(0.0, sd)))


def test_the_first_sample_starts_a_cooldown() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    first = autoscaler.observe(PartitionSample(0.0, 2, 0.5, 0.1, 50_000))
    assert (first.action, first.code, first.partitions) == ("hold", "Cooldown", 2)


def test_widens_once_the_hit_rate_stays_below_target_for_the_window() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    world = lambda _t, p: {2: 0.85, 3: 0.93}[p]  # noqa: E731
    decisions, partitions = run(autoscaler, world, start=0, hours=1, partitions=2)
    widen = next(d for d in decisions if d.action == "widen")
    # 900 s cooldown, then 600 s of samples below the target
    assert widen.time == 900 + 600 and (widen.current, widen.partitions) == (2, 3)
    assert widen.code == "HitRateBelowTarget" and "below the target 0.9 for 10m" in widen.reason
    assert partitions == 3 and changes(decisions) == [("widen", 3)]


def test_one_odd_sample_does_not_restart_the_widen_window_but_a_recovery_does() -> None:
    world = lambda t, p: 0.95 if t == 1200 else {2: 0.85, 3: 0.93}[p]  # noqa: E731
    decisions, _ = run(PartitionAutoscaler(SPEC), world, start=0, hours=1, partitions=2)
    assert next(d for d in decisions if d.action == "widen").time == 900 + 600
    recovered = lambda t, p: 0.95 if 1200 <= t < 1380 else {2: 0.85, 3: 0.93}[p]  # noqa: E731
    decisions, _ = run(PartitionAutoscaler(SPEC), recovered, start=0, hours=1, partitions=2)
    broken = next(d for d in decisions if d.time > 1200 and d.code == "WithinTarget")
    restarted = next(d for d in decisions if d.time > broken.time and d.code == "BelowTargetNotSustained")
    assert next(d for d in decisions if d.action == "widen").time == restarted.time + 600


def test_a_shortfall_within_the_sample_noise_still_widens() -> None:
    """0.004 below the target with 0.004 of noise per sample: one sample in six is above the target,
    but the smoothed rate stays below it."""
    world = noisy({2: 0.896, 3: 0.93})
    decisions, partitions = run(PartitionAutoscaler(SPEC), world, start=0, hours=2, partitions=2)
    assert changes(decisions) == [("widen", 3)] and partitions == 3
    assert next(d for d in decisions if d.action == "widen").time <= 900 + 600 + 300


def test_a_change_is_awaited_then_cooled_down() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    world = lambda _t, p: {2: 0.85, 3: 0.93}[p]  # noqa: E731
    decisions, _ = run(autoscaler, world, start=0, hours=1, partitions=2, rollout_s=300)
    after = [d for d in decisions if d.time > 1500]
    awaiting = [d for d in after if d.code == "AwaitingRollout"]
    assert len(awaiting) == 300 / STEP - 1 and all(d.partitions == 3 and d.current == 2 for d in awaiting)
    cooling = [d for d in after if d.code == "Cooldown"]
    assert cooling[0].time == 1800 and cooling[-1].time == 1800 + 900 - STEP


def test_hovering_just_above_the_target_never_changes_anything() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    decisions, partitions = run(autoscaler, noisy({3: 0.905}), start=0, hours=24, partitions=3)
    assert changes(decisions) == [] and partitions == 3


def test_narrows_when_well_above_target_and_idle_for_the_window() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    decisions, partitions = run(autoscaler, noisy({3: 0.975, 2: 0.95}), start=0, hours=1.5, partitions=3)
    narrow = next(d for d in decisions if d.action == "narrow")
    assert narrow.code == "HitRateAboveTarget" and (narrow.current, narrow.partitions) == (3, 2)
    assert narrow.time == pytest.approx(900 + 1800, abs=STEP)
    assert "assumed, not yet measured" in narrow.reason
    assert partitions == 2


def test_busy_gpus_or_an_unknown_load_forbid_narrowing() -> None:
    busy = PartitionAutoscaler(SPEC)
    decisions, _ = run(busy, lambda _t, _p: 0.99, start=0, hours=3, partitions=3, gpu_load=0.45)
    assert changes(decisions) == [] and decisions[-1].code == "GPUsBusy"
    assert "would reach 0.68 on 2 partitions, over 0.6" in decisions[-1].reason
    blind = PartitionAutoscaler(SPEC)
    decisions, _ = run(blind, lambda _t, _p: 0.99, start=0, hours=3, partitions=3, gpu_load=None)
    assert changes(decisions) == [] and decisions[-1].code == "GPULoadUnknown"


def test_a_narrow_that_falls_short_is_undone_once_and_then_remembered() -> None:
    """One partition is worth 0.04 here, more than the margin assumes: the first narrow misses the
    target, is widened back, and the measured gain keeps it from ever narrowing again that day."""
    autoscaler = PartitionAutoscaler(SPEC)
    decisions, partitions = run(autoscaler, noisy({3: 0.93, 2: 0.89}), start=0, hours=24, partitions=3)
    assert changes(decisions) == [("narrow", 2), ("widen", 3)] and partitions == 3
    narrow, undo = (d for d in decisions if d.action != "hold")
    assert undo.code == "NarrowFellShort" and "left the hit rate at 0.890" in undo.reason
    assert undo.time == narrow.time + 120 + SPEC.cooldown_s  # at the end of its cooldown, no widen window
    last = decisions[-1]
    assert last.code == "NarrowWouldMissTarget" and "(as measured)" in last.reason
    gain = autoscaler.state.gain(3, last.time, SPEC.gain_ttl_s)
    assert gain is not None and gain.gain == pytest.approx(0.04, abs=0.005)


def test_a_step_not_measured_yet_costs_more_than_a_wider_one() -> None:
    """The hit rate is concave in the cache: after 4 -> 3 cost 0.035, the unmeasured 3 -> 2 is taken
    to cost 0.035 x 3.5 / 2.5 = 0.049, and the narrow that would miss the target (0.88) is never tried."""
    autoscaler = PartitionAutoscaler(SPEC)
    before, after = {3: 0.86, 4: 0.91}, {2: 0.88, 3: 0.935, 4: 0.97}
    world = lambda t, p: (before if t < 3 * 3600 else after)[p]  # noqa: E731
    decisions, partitions = run(autoscaler, world, start=0, hours=12, partitions=3)
    assert changes(decisions) == [("widen", 4), ("narrow", 3)] and partitions == 3
    assert decisions[-1].code == "NarrowWouldMissTarget"
    assert "cost about 0.049 of hit rate (scaled from the step to 4, as measured)" in decisions[-1].reason


def test_a_measured_step_allows_the_narrow_it_predicts_safe() -> None:
    # widened from 2 to 3 for +0.03; later the traffic is more cacheable and 3 gives 0.96: 0.96 - 0.03
    # stays above the target, so it narrows and does not come back
    autoscaler = PartitionAutoscaler(PartitionAutoscaling(min=2, max=6, target_hit_rate=0.90))
    world = lambda t, p: ({2: 0.87, 3: 0.90} if t < 4 * 3600 else {2: 0.935, 3: 0.965})[p]  # noqa: E731
    decisions, partitions = run(autoscaler, world, start=0, hours=10, partitions=2)
    assert changes(decisions) == [("widen", 3), ("narrow", 2)] and partitions == 2
    narrow = next(d for d in decisions if d.action == "narrow")
    assert "predicted hit rate 0.935 (as measured)" in narrow.reason


def test_widening_that_does_not_help_stops() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    decisions, partitions = run(autoscaler, noisy({1: 0.80, 2: 0.801, 3: 0.802}, sd=0.001), start=0,
                                hours=6, partitions=1)  # fmt: skip
    assert changes(decisions) == [("widen", 2)] and partitions == 2
    assert decisions[-1].code == "WideningFutile" and "raised it by only" in decisions[-1].reason


def test_bounds_are_held_and_counts_outside_them_are_brought_in() -> None:
    spec = PartitionAutoscaling(min=2, max=3, target_hit_rate=0.9)
    low = PartitionAutoscaler(spec).observe(PartitionSample(0.0, 1, 0.95, 0.1, 50_000))
    assert (low.action, low.partitions, low.code) == ("widen", 2, "BelowMinimum")
    high = PartitionAutoscaler(spec).observe(PartitionSample(0.0, 5, 0.95, 0.1, 50_000))
    assert (high.action, high.partitions, high.code) == ("narrow", 3, "AboveMaximum")
    decisions, _ = run(PartitionAutoscaler(spec), lambda _t, _p: 0.5, start=0, hours=1, partitions=3)
    assert decisions[-1].code == "AtMaximum"
    decisions, _ = run(PartitionAutoscaler(spec), lambda _t, _p: 0.99, start=0, hours=1, partitions=2)
    assert decisions[-1].code == "AtMinimum"


def test_too_few_lookups_or_a_gap_restart_the_window() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    t = 0.0
    for t in range(0, 1200, 30):  # cooldown, then 300 s below the target
        autoscaler.observe(PartitionSample(float(t), 2, 0.8, 0.1, 50_000))
    quiet = autoscaler.observe(PartitionSample(1200.0, 2, 0.8, 0.1, 99))
    assert quiet.code == "TooFewLookups" and autoscaler.state.below is None
    autoscaler.observe(PartitionSample(1230.0, 2, 0.8, 0.1, 50_000))
    after_gap = autoscaler.observe(PartitionSample(1230.0 + 600, 2, 0.8, 0.1, 50_000))  # 10 min silence
    assert after_gap.code == "BelowTargetNotSustained" and autoscaler.state.below is not None
    assert autoscaler.state.below.since == 1830.0


def test_a_count_changed_by_hand_cancels_the_pending_change() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    decisions, _ = run(autoscaler, lambda _t, _p: 0.8, start=0, hours=0.5, partitions=2, rollout_s=10_000)
    assert decisions[-1].code == "AwaitingRollout"
    by_hand = autoscaler.observe(PartitionSample(decisions[-1].time + STEP, 5, 0.8, 0.1, 50_000))
    assert (by_hand.code, by_hand.partitions) == ("Cooldown", 5) and autoscaler.state.pending is None


def test_an_abandoned_change_is_no_longer_awaited() -> None:
    autoscaler = PartitionAutoscaler(SPEC)
    decisions, _ = run(autoscaler, lambda _t, _p: 0.8, start=0, hours=0.5, partitions=2, rollout_s=10_000)
    autoscaler.abandon(decisions[-1].time)
    again = autoscaler.observe(PartitionSample(decisions[-1].time + STEP, 2, 0.8, 0.1, 50_000))
    assert (again.code, again.partitions) == ("Cooldown", 2)


def test_the_state_survives_a_round_trip_through_json() -> None:
    """An operator that fails over restores the state and decides exactly as the old one would."""
    world = noisy({3: 0.93, 2: 0.89})
    steady = PartitionAutoscaler(SPEC)
    moved = PartitionAutoscaler(SPEC)
    t, partitions = 0.0, 3
    for t in (float(x) for x in range(0, 10 * 3600, 30)):
        hit = world(t, partitions)
        a = steady.observe(PartitionSample(t, partitions, hit, 0.1, 50_000))
        saved = json.loads(json.dumps(moved.state.to_dict()))
        moved = PartitionAutoscaler(SPEC, PartitionAutoscalerState.from_dict(saved))
        b = moved.observe(PartitionSample(t, partitions, hit, 0.1, 50_000))
        assert a == b
        if a.action != "hold":
            partitions = a.partitions
    assert steady.state == moved.state and steady.state.gains


def test_bad_partition_specs_name_the_field() -> None:
    parsed = PartitionAutoscaling.from_spec({"min": 2, "max": 4, "targetHitRate": 0.95})
    assert parsed == PartitionAutoscaling(min=2, max=4, target_hit_rate=0.95)
    cases = {
        "max: must be at least min (4)": {"min": 4, "max": 2, "targetHitRate": 0.9},
        "targetHitRate: must be between 0 and 1": {"max": 2, "targetHitRate": 1.2},
        "targetHitRate: expected a number": {"max": 2},
        "max: expected an integer": {"targetHitRate": 0.9},
        "min: must be at least 1": {"min": 0, "max": 2, "targetHitRate": 0.9},
        "minimum: unknown field": {"minimum": 1, "max": 2, "targetHitRate": 0.9},
    }
    for message, raw in cases.items():
        with pytest.raises(InvalidSpecError) as err:
            PartitionAutoscaling.from_spec(raw)
        assert str(err.value).startswith(f"spec.autoscaling.partitions.{message}"), str(err.value)


def test_samples_must_be_plausible_and_in_order() -> None:
    with pytest.raises(InvalidArgumentError, match="hit_rate"):
        PartitionSample(0.0, 2, 1.5, 0.1, 10)
    autoscaler = PartitionAutoscaler(SPEC)
    autoscaler.observe(PartitionSample(10.0, 2, 0.9, 0.1, 50_000))
    with pytest.raises(InvalidArgumentError, match="time order"):
        autoscaler.observe(PartitionSample(5.0, 2, 0.9, 0.1, 50_000))


# ---------------------------------------------------------------------------------------------
# the hit-rate model of bench/autoscale.py (Che's approximation), checked against real caches


bench = load_bench_script("autoscale")


@pytest.mark.parametrize("alpha", [0.8, 1.05])
def test_che_matches_an_exact_lru_on_a_sampled_zipf_trace(alpha: float) -> None:
    p, count = bench.zipf_popularity(5_000, alpha)
    for capacity in (50, 250, 1000):
        che = float(bench.che_hit_rate(p, count, [capacity])[0])
        exact = bench.exact_lru_hit_rate(5_000, alpha, capacity, 100_000, seed=11)
        assert che == pytest.approx(exact, abs=0.01), (alpha, capacity)


@pytest.mark.parametrize("alpha", [0.8, 1.05])
def test_che_matches_the_agents_set_associative_cache_admitting_every_miss(alpha: float) -> None:
    """The agents' own 32-way L1 with HPS's admission (every miss), fed batches of 64 keys as the
    lookup path feeds it."""
    p, count = bench.zipf_popularity(5_000, alpha)
    for capacity in (256, 1024):
        che = float(bench.che_hit_rate(p, count, [capacity])[0])
        agent = bench.agent_cache_hit_rate(5_000, alpha, capacity, 60_000, batch=64, seed=5)
        assert che == pytest.approx(agent, abs=0.015), (alpha, capacity)


@pytest.mark.parametrize("alpha", [0.8, 1.05])
def test_the_agents_default_l1_beats_the_model_and_not_a_static_top(alpha: float) -> None:
    """With TinyLFU admission (the agents' default) the L1 beats LRU: the bench's hit rates are the
    pessimistic side of the agents', never above what holding the hottest keys would give."""
    p, count = bench.zipf_popularity(5_000, alpha)
    for capacity in (256, 1024):
        che = float(bench.che_hit_rate(p, count, [capacity])[0])
        agent = bench.agent_cache_hit_rate(
            5_000, alpha, capacity, 60_000, batch=64, seed=5, admission="tinylfu"
        )
        assert che + 0.02 < agent < bench.static_top_hit_rate(p, count, capacity) + 0.005, (alpha, capacity)


def test_binned_zipf_sums_are_the_exact_sums() -> None:
    n, alpha = 300_000, 1.05
    exact_p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    exact = bench.che_hit_rate(exact_p / exact_p.sum(), np.ones(n), [1_000, 30_000, 200_000])
    p, count = bench.zipf_popularity(n, alpha)
    assert len(p) < 5_000 and count.sum() == n
    assert np.allclose(bench.che_hit_rate(p, count, [1_000, 30_000, 200_000]), exact, atol=1e-4)
    assert bench.che_hit_rate(p, count, [n, 2 * n]).tolist() == [1.0, 1.0]
    top = exact_p / exact_p.sum()
    assert bench.static_top_hit_rate(p, count, 30_000) == pytest.approx(float(top[:30_000].sum()), abs=1e-4)


def test_shard_caches_are_sized_as_the_agents_size_them() -> None:
    model = parse_model_spec("m", {
        "tables": [{"name": "a", "rows": 50_000, "dim": 8}, {"name": "b", "rows": 20_000, "dim": 8},
                   {"name": "c", "rows": 300, "dim": 8, "hotness": 0.3}],
        "gpusPerPod": 2, "partitions": 2, "cache": {"memoryPerGPU": "256Ki", "cachedFraction": 0.2},
    })  # fmt: skip
    plan = plan_placement(model, Topology.from_model(model))
    modelled = bench.shard_caches(model, plan)
    budget = model.cache.memory_per_gpu
    agents = [
        build_l1(model.tables, memory_per_gpu=budget, plan=plan, partition=part, device="cpu")
        for part in range(plan.partitions)
    ]
    for table in model.tables:
        assert sum(q for q, _ in modelled[table.name]) == pytest.approx(1.0)
        real = sum(l1[table.name].capacity_rows for l1 in agents if table.name in l1)
        assert sum(rows for _, rows in modelled[table.name]) == real, table.name
