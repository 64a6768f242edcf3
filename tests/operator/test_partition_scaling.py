"""``spec.autoscaling.partitions`` in the operator's reconcile: a hit rate that stays below the target
widens the model by one partition through a new plan (spec.partitions untouched), the state survives
in ``status.autoscaling``, and nothing is decided while a rollout is under way."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from hps_operator.core.partition_scaling import HitRateReading
from hps_operator.core.reconcile import Observed, reconcile

from tests.operator.test_reconcile import NODES, OPTIONS, applied, model, with_status

FAST = dataclasses.replace(OPTIONS, partition_tunables={"widen_after_s": 30, "cooldown_s": 60, "min_lookups": 1})
T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def at(seconds: float) -> str:
    return (T0 + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(body: dict[str, Any], children: list[dict[str, Any]], seconds: float,
            reading: HitRateReading | None) -> Observed:  # fmt: skip
    return Observed(model=body, nodes=NODES, children=children, redis_password="pw", now=at(seconds), hit_rate=reading)


def test_a_low_hit_rate_widens_the_model_by_one_partition() -> None:
    body = model(partitions=1, autoscaling={"partitions": {"min": 1, "max": 3, "targetHitRate": 0.9}})
    low = HitRateReading(hits_per_s=400, misses_per_s=600)
    first = reconcile(observe(body, [], 0, None), FAST)
    assert first.status["placement"]["partitions"] == 1
    assert first.status["autoscaling"]["partitions"] == 1
    children = applied(first, [], ready=True)
    body = with_status(body, first)
    widened = None
    for t in range(10, 200, 10):
        decision = reconcile(observe(body, children, t, low), FAST)
        children = applied(decision, children, ready=True)
        body = with_status(body, decision)
        if decision.status["placement"]["partitions"] == 2:
            widened = decision
            break
    assert widened is not None, body["status"]["autoscaling"]
    (event,) = [e for e in widened.events if e.reason == "PartitionsWidened"]
    assert event.message.startswith("to 2 partitions:")
    assert widened.status["autoscaling"]["partitions"] == 2
    assert widened.status["autoscaling"]["hitRate"] == 0.4
    assert body["spec"]["partitions"] == 1  # the user's spec is left as written
    assert json.loads(widened.status["autoscaling"]["state"])  # the autoscaler's state, kept for the next round
    # while the rollout is under way, nothing more is decided (the last decision stands)
    assert widened.status["rebalance"]["phase"] == "Warming"
    during = reconcile(observe(body, children, 400, low), FAST)
    assert during.status["autoscaling"]["partitions"] == 2
    assert not [e for e in during.events if e.reason.startswith("Partitions")]


def test_models_without_partition_autoscaling_have_no_autoscaling_status() -> None:
    decision = reconcile(observe(model(), [], 0, HitRateReading(1, 1)), FAST)
    assert "autoscaling" not in decision.status


def test_the_autoscaling_status_meets_the_crd_schema() -> None:
    from tests.operator.test_status import status_schema_errors

    body = model(partitions=1, autoscaling={"partitions": {"min": 1, "max": 3, "targetHitRate": 0.9}})
    decision = reconcile(observe(body, [], 0, HitRateReading(10, 10)), FAST)
    assert status_schema_errors(decision.status) == []
