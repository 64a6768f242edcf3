"""The ConfigMaps of placement: ``<model>-plan`` (the plan the operator keeps and the one clients route
by) and ``<model>-config`` (the model file and each agent set's share of a plan), for each phase of a
make-before-break rollout (see ``rollout.py``).

While Warming and Switching the active plan's agent sets run beside the target's, and
``routing.json`` (what clients route by) flips from active to target at Switching; Draining renders
the target alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from hps_operator.core.render.agents import partition_plan, partition_plan_key
from hps_operator.core.render.meta import (
    MODEL_KEY,
    PLAN_KEY,
    PLAN_VERSION_LABEL,
    ROUTING_KEY,
    ROUTING_VERSION_LABEL,
    Manifest,
    agent_config_name,
    object_metadata,
    plan_configmap_name,
)
from hps_operator.core.render.model_file import model_manifest, sources_in_pods
from hps_operator.core.rollout import Phase

from node_agent.plan import Plan
from node_agent.spec import ModelSpec

#: libyaml's emitter where PyYAML was built with it (its wheels are): the same text as ``safe_dump``,
#: about 5x faster, and the model file of a large model is most of what a reconcile computes (2,500
#: tables: 1.4 s of Python emitter every resync, 0.25 s with libyaml)
SAFE_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def rollout_plans(plan: Plan, active_plan: Plan | None, phase: Phase | str) -> tuple[list[Plan], Plan]:
    """``(generations, routing)`` for a rollout phase (see ``rollout.py``): the plans whose agent sets
    run (the target first; during Warming and Switching the active one too, so a partition whose
    share changes keeps its old pods until routing has switched) and the plan clients route by."""
    phase = Phase(phase)  # ValueError names an unknown phase
    if active_plan is None or active_plan.version == plan.version or phase in (Phase.IDLE, Phase.DRAINING):
        return [plan], plan
    return [plan, active_plan], (active_plan if phase is Phase.WARMING else plan)


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


def render_agent_config(model: ModelSpec, generations: Sequence[Plan], *, owner: Mapping[str, Any]) -> Manifest:
    """``<model>-config``, mounted at ``/etc/hps`` by agents and the loader: ``model.yaml``, and one
    file per agent set, ``p<N>-<hash>.json``: partition N's share of a plan (the target's where two
    generations share it, so a restarted pod reports the newest version)."""
    data = {MODEL_KEY: yaml.dump(model_manifest(sources_in_pods(model)), Dumper=SAFE_DUMPER, sort_keys=True)}
    for plan in generations:
        for partition in range(plan.partitions):
            data.setdefault(partition_plan_key(plan, partition), partition_plan(plan, partition).to_json())
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(
            model, agent_config_name(model), "config", owner,
            extra_labels={PLAN_VERSION_LABEL: str(generations[0].version)},
        ),
        "data": data,
    }
