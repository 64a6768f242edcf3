"""Pure builders of every Kubernetes object an EmbeddingModel owns: ``(ModelSpec, Plan) → manifests``.

KubeRay style: no client calls, no clock, no randomness (the Redis password comes in as an argument),
and the output is sorted and stable, so a re-render of an unchanged spec is byte-identical and the
operator writes nothing. One module per object family: ``meta`` (names, labels, metadata),
``model_file``, ``plan_configmap``, ``pods`` (what every pod shares), ``redis``, ``agents``,
``loader``, ``autoscaling``; :func:`render_children` returns them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.agents import (
    agent_args,
    agent_set_hash,
    agent_statefulset_name,
    partition_plan,
    partition_plan_key,
    render_agent_statefulset,
    render_agents,
)
from hps_operator.core.render.autoscaling import QPS_METRIC, render_hpa
from hps_operator.core.render.loader import loader_job_name, render_loader_job
from hps_operator.core.render.meta import (
    CONFIG_DIR,
    MODEL_KEY,
    PARTITION_LABEL,
    PLAN_KEY,
    PLAN_VERSION_LABEL,
    ROUTING_KEY,
    Manifest,
    agent_config_name,
    check_renderable,
    endpoint,
    plan_configmap_name,
    redis_secret_name,
    sort_manifests,
)
from hps_operator.core.render.model_file import model_manifest, sources_in_pods
from hps_operator.core.render.network import render_network_policies
from hps_operator.core.render.plan_configmap import (
    MAX_CONFIGMAP_BYTES,
    configmap_bytes,
    render_agent_config,
    render_plan_configmap,
    rollout_plans,
)
from hps_operator.core.render.pods import REDIS_PASSWORD_KEY
from hps_operator.core.render.redis import DEFAULT_REDIS_IMAGE, render_redis, uses_redis
from hps_operator.core.rollout import Phase

from node_agent.plan import Plan
from node_agent.spec import ModelSpec

__all__ = [
    "CONFIG_DIR",
    "MAX_CONFIGMAP_BYTES",
    "MODEL_KEY",
    "PARTITION_LABEL",
    "PLAN_KEY",
    "PLAN_VERSION_LABEL",
    "QPS_METRIC",
    "REDIS_PASSWORD_KEY",
    "ROUTING_KEY",
    "Manifest",
    "agent_args",
    "agent_config_name",
    "agent_set_hash",
    "agent_statefulset_name",
    "check_renderable",
    "configmap_bytes",
    "endpoint",
    "loader_job_name",
    "model_manifest",
    "partition_plan",
    "partition_plan_key",
    "plan_configmap_name",
    "redis_secret_name",
    "render_agent_config",
    "render_agent_statefulset",
    "render_children",
    "render_loader_job",
    "render_plan_configmap",
    "rollout_plans",
    "sources_in_pods",
]


def render_children(
    model: ModelSpec,
    plan: Plan,
    *,
    owner: Mapping[str, Any],
    image: str,
    redis_password: str | None,
    redis_user_passwords: Mapping[str, str] | None = None,
    active_plan: Plan | None = None,
    phase: Phase | str = Phase.IDLE,
    redis_image: str = DEFAULT_REDIS_IMAGE,
    image_pull_policy: str | None = None,
) -> list[Manifest]:
    """Every child of the model, sorted by (kind, name).

    ``plan`` is the target plan; ``active_plan`` the one clients route by now and ``phase`` the
    rollout phase (``rollout.Rollout.phase``): Idle and Draining render the target's agent sets alone,
    Warming and Switching the active plan's beside them (routing flips at Switching). ``image`` is the operator's default
    agent image (``spec.agent.image`` wins) and ``image_pull_policy`` the policy of the containers
    running it (None leaves Kubernetes' default). ``redis_password`` and ``redis_user_passwords`` (role →
    password, for ``spec.security.redis.acl``) fill the Secrets the operator creates once."""
    check_renderable(model)
    generations, routing = rollout_plans(plan, active_plan, phase)
    children: list[Manifest] = [
        render_plan_configmap(model, plan, owner=owner, routing=routing),
        render_agent_config(model, generations, owner=owner),
        *render_agents(model, generations, owner=owner, image=image, image_pull_policy=image_pull_policy),
        *render_redis(model, owner=owner, redis_password=redis_password, redis_user_passwords=redis_user_passwords,
                      redis_image=redis_image),
    ]
    if uses_redis(model):
        children.append(render_loader_job(model, owner=owner, image=image, image_pull_policy=image_pull_policy))
    children += render_network_policies(model, owner=owner)
    hpa = render_hpa(model, owner=owner)
    if hpa is not None:
        children.append(hpa)
    return sort_manifests(children)
