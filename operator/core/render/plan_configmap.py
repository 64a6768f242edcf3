"""The plan ConfigMap ``<model>-plan``: the model file, and the plans the operator keeps (target),
clients route by and agents load, for each phase of a make-before-break rollout (see ``rollout.py``).

While Warming and Switching the agents serve the union of the active and the target plan, and
``routing.json`` (what clients route by) flips from active to target at Switching; Draining renders
the target alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from hps_operator.core.render.meta import (
    MODEL_KEY,
    PLAN_KEY,
    PLAN_VERSION_LABEL,
    ROUTING_KEY,
    ROUTING_VERSION_LABEL,
    SERVING_KEY,
    Manifest,
    object_metadata,
    plan_configmap_name,
)
from hps_operator.core.render.model_file import model_manifest, sources_in_pods
from hps_operator.core.rollout import Phase

from node_agent.plan import Assignment, Plan
from node_agent.spec import ModelSpec


def serving_plan(active: Plan | None, target: Plan) -> Plan:
    """The plan agents load while a rollout moves from ``active`` to ``target``: every shard either
    assigns, so new owners warm up while old owners still answer what clients route to them.

    Old assignments keep their partition; a GPU index the target's pods lack folds onto an existing
    one (``gpu % gpus_per_pod``). When the two plans use different bucket counts an old bucket range
    cannot be expressed in the new one, so the old owner keeps its whole table instead (correct,
    at the price of caching more until Draining)."""
    if active is None or active.version == target.version:
        return target
    held: set[Assignment] = set(target.assignments)
    for a in active.assignments:
        gpu = a.gpu % target.gpus_per_pod
        if active.bucket_count == target.bucket_count:
            held.add(Assignment(a.table, a.partition, gpu, a.buckets, a.bytes))
        else:
            held.add(Assignment(a.table, a.partition, gpu, (0, target.bucket_count), a.bytes))
    return Plan(
        version=target.version,
        bucket_count=target.bucket_count,
        partitions=max(active.partitions, target.partitions),
        gpus_per_pod=target.gpus_per_pod,
        strategy=target.strategy,
        assignments=tuple(sorted(held)),
        metrics=target.metrics,
        model=target.model,
    )


def plans_for_phase(plan: Plan, active_plan: Plan | None, phase: Phase | str) -> tuple[Plan, Plan]:
    """``(serving, routing)`` plans for a rollout phase (see ``rollout.py``)."""
    phase = Phase(phase)  # ValueError names an unknown phase
    if active_plan is None or phase in (Phase.IDLE, Phase.DRAINING):
        return plan, plan
    serving = serving_plan(active_plan, plan)
    return serving, (active_plan if phase is Phase.WARMING else plan)


def render_plan_configmap(
    model: ModelSpec,
    plan: Plan,
    *,
    owner: Mapping[str, Any],
    serving: Plan | None = None,
    routing: Plan | None = None,
) -> Manifest:
    """``<model>-plan``: ``model.yaml``, the target ``plan.json``, the ``routing.json`` clients route by
    and the ``serving.json`` agents load (both the target plan outside a rollout)."""
    serving = serving or plan
    routing = routing or plan
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(
            model,
            plan_configmap_name(model),
            "plan",
            owner,
            extra_labels={PLAN_VERSION_LABEL: str(plan.version), ROUTING_VERSION_LABEL: str(routing.version)},
        ),
        "data": {
            MODEL_KEY: yaml.safe_dump(model_manifest(sources_in_pods(model)), sort_keys=True),
            PLAN_KEY: plan.to_json(),
            ROUTING_KEY: routing.to_json(),
            SERVING_KEY: serving.to_json(),
        },
    }
