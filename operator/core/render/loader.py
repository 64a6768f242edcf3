"""The loader Job: fills the shared Redis tier from the table sources (``hps load``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import (
    CONFIG_DIR,
    MODEL_KEY,
    Manifest,
    digest,
    labels,
    object_metadata,
    plan_configmap_name,
    pull_policy,
)
from hps_operator.core.render.model_file import model_manifest, model_store_manifest
from hps_operator.core.render.pods import (
    REDIS_PASSWORD_ENV,
    add_pod_knobs,
    mount_model_store,
    pod_metadata,
    secret_env,
)
from hps_operator.core.render.redis import redis_args

from node_agent.spec import HostPathSource, ModelSpec


def _loader_pod_extras(model: ModelSpec) -> dict[str, Any]:
    """What the loader's pod template takes from the spec beyond the tables, Redis and image: only
    what is set, so the Job name of a model without them stays what it was (a re-run of the loader
    would write the tables' rows over online updates already applied)."""
    extras: dict[str, Any] = {}
    if model.model_store is not None:
        extras["modelStore"] = model_store_manifest(model.model_store)
        if isinstance(model.model_store.volume, HostPathSource):
            extras["scheduling"] = [dict(model.agent.node_selector), list(model.agent.tolerations),
                                    dict(model.agent.affinity).get("nodeAffinity")]  # fmt: skip
    agent = model_manifest(model)["spec"]["agent"]
    for key in ("priorityClassName", "imagePullSecrets", "podLabels", "podAnnotations"):
        if key in agent:
            extras[key] = agent[key]
    return extras


def loader_job_name(model: ModelSpec, image: str) -> str:
    """``<model>-load-<hash>``: a Job's pod template cannot change, so what it loads and how its pod
    runs is in its name, and a change gets a new Job (the handler deletes the stale one)."""
    redis = model.volatile_store.redis
    what: list[Any] = [
        [[t.name, t.rows, t.dim, t.dtype, t.source, t.default_value] for t in model.tables],
        [redis.shards, redis.replicas_per_shard, redis.cluster],
        model.agent.image or image,
    ]
    extras = _loader_pod_extras(model)
    if extras:
        what.append(extras)
    return f"{model.name}-load-{digest(what, 8)}"


def render_loader_job(model: ModelSpec, *, owner: Mapping[str, Any], image: str,
                      image_pull_policy: str | None = None) -> Manifest:
    """Loads every table into the shared Redis tier (``hps load``); retries while Redis comes up."""
    args = ["load", "-f", f"{CONFIG_DIR}/{MODEL_KEY}", *redis_args(model), "--no-progress"]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [
            {
                "name": "loader",
                "image": model.agent.image or image,
                **pull_policy(image_pull_policy),
                "command": ["hps"],
                "args": args,
                "env": [secret_env(model, REDIS_PASSWORD_ENV)],
                "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": plan_configmap_name(model)}}],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    }
    add_pod_knobs(model, pod_spec)
    mount_model_store(model, pod_spec)
    if model.model_store is not None and isinstance(model.model_store.volume, HostPathSource):
        # the files exist only on the nodes the agents run on: go where they go (node affinity only;
        # the agents' pod (anti-)affinity is about agents, not this Job)
        if model.agent.node_selector:
            pod_spec["nodeSelector"] = dict(sorted(model.agent.node_selector.items()))
        if model.agent.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in model.agent.tolerations]
        node_affinity = model.agent.affinity.get("nodeAffinity")
        if node_affinity:
            pod_spec["affinity"] = {"nodeAffinity": node_affinity}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_metadata(model, loader_job_name(model, image), "loader", owner),
        "spec": {
            "backoffLimit": 10,
            "template": {"metadata": pod_metadata(model, labels(model, "loader")), "spec": pod_spec},
        },
    }
