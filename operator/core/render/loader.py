"""The loader Job: fills the shared Redis tier from the table sources (``hps load``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import (
    CONFIG_DIR,
    MODEL_KEY,
    Manifest,
    agent_config_name,
    digest,
    labels,
    object_metadata,
    pull_policy,
)
from hps_operator.core.render.pods import (
    AGENT_UID,
    add_pod_knobs,
    add_scratch_volume,
    container_security,
    mount_model_store,
    pod_metadata,
    pod_security,
)
from hps_operator.core.render.redis import redis_args, redis_password_env
from hps_operator.core.render.security import mount_redis_tls

from node_agent.spec import HostPathSource, ModelSpec


def loader_job_name(model: ModelSpec, job_spec: Mapping[str, Any]) -> str:
    """``<model>-load-<hash>``: a Job's pod template is immutable, so what the Job loads (the tables,
    the Redis layout) and its whole spec are in its name; any change gets a new Job (the handler
    deletes the stale one), never a rejected update."""
    redis = model.volatile_store.redis
    loads: list[Any] = [
        [[t.name, t.rows, t.dim, t.dtype, t.source, t.default_value] for t in model.tables],
        [redis.shards, redis.replicas_per_shard, redis.cluster],
    ]
    return f"{model.name}-load-{digest([loads, job_spec], 8)}"


def render_loader_job(model: ModelSpec, *, owner: Mapping[str, Any], image: str,
                      image_pull_policy: str | None = None) -> Manifest:
    """Loads every table into the shared Redis tier (``hps load``); retries while Redis comes up."""
    args = ["load", "-f", f"{CONFIG_DIR}/{MODEL_KEY}", *redis_args(model, "loader"), "--no-progress"]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [
            {
                "name": "loader",
                "image": model.agent.image or image,
                **pull_policy(image_pull_policy),
                "command": ["hps"],
                "args": args,
                "env": [redis_password_env(model, "loader")],
                "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
                "securityContext": container_security(),
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": agent_config_name(model)}}],
        "securityContext": pod_security(AGENT_UID),
        # the loader talks to Redis only: no Kubernetes token
        "automountServiceAccountToken": False,
    }
    add_scratch_volume(pod_spec)
    mount_redis_tls(model, pod_spec)
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
    spec: dict[str, Any] = {
        "backoffLimit": 10,
        "template": {"metadata": pod_metadata(model, labels(model, "loader")), "spec": pod_spec},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_metadata(model, loader_job_name(model, spec), "loader", owner),
        "spec": spec,
    }
