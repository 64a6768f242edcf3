"""The ConfigMaps of placement: ``<model>-plan`` (the plan the operator keeps and the one clients route
by) and ``<model>-config`` (the model file and the plan agents load), for each phase of a make-before-break rollout (see ``rollout.py``).

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
    agent_config_name,
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


#: the API server refuses a ConfigMap whose data exceeds 1 MiB
MAX_CONFIGMAP_BYTES = 1 << 20


def configmap_bytes(manifest: Mapping[str, Any]) -> int:
    """The size the API server holds against :data:`MAX_CONFIGMAP_BYTES` (keys and values)."""
    return sum(len(k) + len(str(v).encode()) for k, v in (manifest.get("data") or {}).items())


def render_plan_configmap(
    model: ModelSpec,
    plan: Plan,
    *,
    owner: Mapping[str, Any],
    routing: Plan | None = None,
) -> Manifest:
    """``<model>-plan``: the target ``plan.json`` (the planner's ``previous`` next time) and the
    ``routing.json`` clients route by (the target outside a rollout). The model file and the plan
    agents serve are in :func:`render_agent_config`: each ConfigMap holds at most three plans, so a
    large model's stays under the API server's 1 MiB."""
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
        "data": {PLAN_KEY: plan.to_json(), ROUTING_KEY: routing.to_json()},
    }


def render_agent_config(model: ModelSpec, serving: Plan, *, owner: Mapping[str, Any]) -> Manifest:
    """``<model>-config``, mounted at ``/etc/hps`` by agents and the loader: ``model.yaml`` and the
    ``serving.json`` agents load (a union of two plans during a rollout)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(
            model, agent_config_name(model), "config", owner, extra_labels={PLAN_VERSION_LABEL: str(serving.version)}
        ),
        "data": {
            MODEL_KEY: yaml.safe_dump(model_manifest(sources_in_pods(model)), sort_keys=True),
            SERVING_KEY: serving.to_json(),
        },
    }
