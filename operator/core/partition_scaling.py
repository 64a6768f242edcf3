"""The operator's side of ``spec.autoscaling.partitions``: one reconcile's hit-rate reading goes to the
partition autoscaler (:mod:`hps_operator.core.elasticity`), whose state lives in
``status.autoscaling``, and the count it decides on becomes the partitions the planner plans for.
Pure: the reading and the time come in, the status block and the count go out.

The count is the operator's, not the spec's: ``spec.partitions`` stays what the user wrote (a GitOps
tool would otherwise revert it), and ``status.autoscaling.partitions`` says what runs. Decisions are
taken only while no plan rollout is under way; a change is rolled out make-before-break like any new
plan, and the autoscaler waits for it before judging again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hps_operator.core.elasticity import (
    PartitionAutoscaler,
    PartitionAutoscalerState,
    PartitionAutoscaling,
    PartitionSample,
)

from node_agent.spec import ModelSpec


@dataclass(frozen=True)
class HitRateReading:
    """What the model's agents report through the custom metrics API: L1 hits and misses per second,
    summed over its agent pods, averaged over ``window_s``."""

    hits_per_s: float
    misses_per_s: float
    window_s: float = 60.0

    @property
    def lookups(self) -> int:
        return round((self.hits_per_s + self.misses_per_s) * self.window_s)

    @property
    def hit_rate(self) -> float | None:
        total = self.hits_per_s + self.misses_per_s
        return self.hits_per_s / total if total > 0 else None


@dataclass(frozen=True)
class PartitionScaling:
    """The count to plan for, the ``status.autoscaling`` block, and the decision if it changed the count."""

    partitions: int
    status: dict[str, Any]
    changed: bool
    action: str
    code: str
    reason: str


def scale_partitions(model: ModelSpec, *, routed_partitions: int, reading: HitRateReading | None,
                     now: float, previous_status: Mapping[str, Any], may_decide: bool,
                     tunables: Mapping[str, float] | None = None) -> PartitionScaling | None:  # fmt: skip
    """None when the model does not autoscale its partitions. ``routed_partitions`` is the count of
    the plan clients route by; ``may_decide`` is False while a rollout is under way (the previous
    decision stands)."""
    autoscaling = model.autoscaling.partitions if model.autoscaling is not None else None
    if autoscaling is None:
        return None
    before = dict(previous_status.get("autoscaling") or {})
    running = int(before.get("partitions") or routed_partitions)
    if not may_decide:
        return PartitionScaling(running, before or {"partitions": running}, False, "hold", "RolloutUnderWay",
                                "a plan rollout is under way")  # fmt: skip
    spec = dataclasses.replace(
        PartitionAutoscaling(min=autoscaling.min_partitions, max=autoscaling.max_partitions,
                             target_hit_rate=autoscaling.target_hit_rate),
        **{k: (int(v) if k == "min_lookups" else float(v)) for k, v in (tunables or {}).items()},  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        state = PartitionAutoscalerState.from_dict(json.loads(before["state"])) if before.get("state") else None
    except (ValueError, KeyError, TypeError):
        state = None  # a hand-edited status: start afresh, as after a failover
    if state is not None and state.last_sample is not None and now < state.last_sample:
        state = None  # the clock went back (another replica's): the streaks are unknown
    autoscaler = PartitionAutoscaler(spec, state)
    decision = autoscaler.observe(PartitionSample(
        time=now, partitions=routed_partitions, hit_rate=reading.hit_rate if reading else None,
        gpu_load=None, lookups=reading.lookups if reading else 0,
    ))  # fmt: skip
    block: dict[str, Any] = {
        "partitions": decision.partitions,
        "hitRate": round(reading.hit_rate, 4) if reading is not None and reading.hit_rate is not None else None,
        "decision": {"action": decision.action, "reason": decision.code, "message": decision.reason},
        "state": json.dumps(autoscaler.state.to_dict(), sort_keys=True, separators=(",", ":")),
    }
    if block["hitRate"] is None:
        del block["hitRate"]
    changed = decision.action != "hold" and decision.partitions != running
    return PartitionScaling(decision.partitions, block, changed, decision.action, decision.code, decision.reason)
