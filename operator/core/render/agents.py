"""The agents: one StatefulSet, headless Service and PDB per partition, and the client Service.

A new plan does not restart every agent. Agents read ``serving.json`` from the plan ConfigMap at
start; each partition's pod template carries a hash of *its own* assignments, so a new plan rolls only
the partitions whose share changed. Agents fill what is theirs alone (the in-process hash map, their
own RocksDB volume) with ``--load``; Redis, shared by all, is filled once by the loader Job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import (
    CONFIG_DIR,
    DATA_DIR,
    MODEL_HASH_ANNOTATION,
    MODEL_KEY,
    PARTITION_LABEL,
    PARTITION_PLAN_ANNOTATION,
    PLAN_VERSION_LABEL,
    ROCKSDB_DIR,
    SERVING_KEY,
    Manifest,
    agent_config_name,
    agent_name,
    client_service_name,
    digest,
    labels,
    object_metadata,
    pull_policy,
    selector_labels,
)
from hps_operator.core.render.model_file import agent_model_hash
from hps_operator.core.render.pods import (
    REDIS_PASSWORD_ENV,
    add_pod_knobs,
    mount_model_store,
    pod_metadata,
    secret_env,
)
from hps_operator.core.render.redis import redis_args, uses_redis

from node_agent.plan import Plan
from node_agent.spec import ModelSpec, format_quantity


def agent_loads_tables(model: ModelSpec) -> bool:
    """Agents fill what is theirs alone: the in-process hash map and their own RocksDB volume. Redis,
    shared by all, is filled once by the loader Job."""
    persistent = model.persistent_store
    return model.volatile_store.type == "hashmap" or (
        persistent.type == "rocksdb" and not persistent.read_only
    )


def agent_args(model: ModelSpec, partition: int) -> list[str]:
    """``hps agent ...`` as an agent pod runs it (``$(POD_NAME)`` is expanded by the kubelet)."""
    args = [
        "agent",
        "-f",
        f"{CONFIG_DIR}/{MODEL_KEY}",
        "--plan",
        f"{CONFIG_DIR}/{SERVING_KEY}",
        "--partition",
        str(partition),
        "--host",
        "0.0.0.0",
        "--port",
        str(model.agent.port),
        "--agent-id",
        "$(POD_NAME)",
        "--metrics-port",
        str(model.agent.metrics_port),
        *redis_args(model),
    ]
    if model.persistent_store.type == "rocksdb":
        args += ["--rocksdb", ROCKSDB_DIR]
        if model.persistent_store.read_only:
            args.append("--rocksdb-read-only")
    if agent_loads_tables(model):
        args.append("--load")
    return args


def _agent_resources(model: ModelSpec) -> dict[str, Any]:
    """The user's resources plus the GPUs; an extended resource's request must equal its limit."""
    resources = {k: dict(v) for k, v in model.agent.resources.items() if isinstance(v, Mapping)}
    gpus = str(model.gpus_per_pod)
    resources.setdefault("limits", {})[model.agent.gpu_resource_name] = gpus
    if "requests" in resources:
        resources["requests"][model.agent.gpu_resource_name] = gpus
    return {k: dict(sorted(v.items())) for k, v in sorted(resources.items())}


def _partition_assignments(plan: Plan, partition: int) -> list[dict[str, Any]]:
    return [a.to_dict() for a in sorted(plan.assignments_for(partition=partition))]


def render_agent_statefulset(
    model: ModelSpec, serving: Plan, partition: int, *, owner: Mapping[str, Any], image: str,
    image_pull_policy: str | None = None,
) -> Manifest:
    """Partition ``partition``'s agents: ``spec.replicas`` pods, one per data-parallel replica."""
    grpc = {"port": model.agent.port}
    container: dict[str, Any] = {
        "name": "agent",
        "image": model.agent.image or image,
        **pull_policy(image_pull_policy),
        "command": ["hps"],
        "args": agent_args(model, partition),
        "env": sorted(
            [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
            + ([secret_env(model, REDIS_PASSWORD_ENV)] if uses_redis(model) else []),
            key=lambda e: str(e["name"]),
        ),
        "ports": [
            {"name": "grpc", "containerPort": model.agent.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": model.agent.metrics_port, "protocol": "TCP"},
        ],
        "resources": _agent_resources(model),
        # loading a large table at start can take long: the startup probe holds off liveness for an hour
        "startupProbe": {"grpc": grpc, "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {"grpc": grpc, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {"grpc": grpc, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": agent_config_name(model)}}],
        # the data volume is group-writable for a non-root image user
        "securityContext": {"fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
    }
    if model.agent.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(model.agent.node_selector.items()))
    if model.agent.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in model.agent.tolerations]
    if model.agent.affinity:
        pod_spec["affinity"] = dict(model.agent.affinity)
    add_pod_knobs(model, pod_spec)
    spec: dict[str, Any] = {
        "serviceName": agent_name(model, partition),
        "replicas": model.replicas,
        # replicas are independent copies: start and stop them together
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "selector": {"matchLabels": selector_labels(model, "agent", **{PARTITION_LABEL: str(partition)})},
        "template": {
            "metadata": pod_metadata(
                model,
                labels(model, "agent", **{PARTITION_LABEL: str(partition)}),
                # only what this partition's process reads: a new plan that leaves the partition's
                # shards alone, or a change of replicas, does not restart it
                {
                    PARTITION_PLAN_ANNOTATION: digest(
                        [serving.bucket_count, _partition_assignments(serving, partition)]
                    ),
                    MODEL_HASH_ANNOTATION: agent_model_hash(model),
                    # the convention annotation-based Prometheus scraping reads
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(model.agent.metrics_port),
                    "prometheus.io/path": "/metrics",
                },
            ),
            "spec": pod_spec,
        },
    }
    if model.persistent_store.type == "rocksdb":
        mount: dict[str, Any] = {"name": "data", "mountPath": DATA_DIR}
        if model.persistent_store.read_only:
            mount["readOnly"] = True
        container["volumeMounts"].append(mount)
        claim: dict[str, Any] = {
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": format_quantity(model.persistent_store.storage)}},
            },
        }
        if model.persistent_store.storage_class:
            claim["spec"]["storageClassName"] = model.persistent_store.storage_class
        spec["volumeClaimTemplates"] = [claim]
        # the store is refilled from the table sources: drop it with the model, keep it across scale-down
        spec["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Delete", "whenScaled": "Retain"}
    if agent_loads_tables(model):
        # agents that read no source do without it: an RWO claim or a hostPath on some nodes must
        # not limit where they can run
        mount_model_store(model, pod_spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_metadata(
            model,
            agent_name(model, partition),
            "agent",
            owner,
            extra_labels={PARTITION_LABEL: str(partition)},
            annotations={PLAN_VERSION_LABEL: str(serving.version)},
        ),
        "spec": spec,
    }


def _grpc_port(model: ModelSpec) -> list[dict[str, Any]]:
    port = model.agent.port
    return [{"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]


def render_agent_service(model: ModelSpec, partition: int, *, owner: Mapping[str, Any]) -> Manifest:
    """Headless, per partition: clients resolve every ready replica of the partition and balance
    gRPC calls across them (a ClusterIP would pin a long-lived HTTP/2 connection to one pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(
            model,
            agent_name(model, partition),
            "agent",
            owner,
            extra_labels={PARTITION_LABEL: str(partition)},
        ),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(model, "agent", **{PARTITION_LABEL: str(partition)}),
            "ports": _grpc_port(model),
        },
    }


def render_client_service(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    """``<model>-agent``: one address for every agent (Describe, the plan, single-partition lookups)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(model, client_service_name(model), "agent", owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(model, "agent"),
            "ports": _grpc_port(model),
        },
    }


def render_agent_pdb(model: ModelSpec, partition: int, *, owner: Mapping[str, Any]) -> Manifest:
    """A voluntary disruption takes down at most one replica of a partition at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_metadata(
            model,
            agent_name(model, partition),
            "agent",
            owner,
            extra_labels={PARTITION_LABEL: str(partition)},
        ),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(model, "agent", **{PARTITION_LABEL: str(partition)})},
        },
    }


def render_agents(model: ModelSpec, serving: Plan, *, owner: Mapping[str, Any], image: str,
                  image_pull_policy: str | None = None) -> list[Manifest]:
    children: list[Manifest] = [render_client_service(model, owner=owner)]
    for partition in range(serving.partitions):
        children += [
            render_agent_statefulset(model, serving, partition, owner=owner, image=image,
                                     image_pull_policy=image_pull_policy),
            render_agent_service(model, partition, owner=owner),
            render_agent_pdb(model, partition, owner=owner),
        ]
    return children
