"""The agents: per partition a headless Service, a PDB and one StatefulSet per *agent set*; and the
client Service.

An agent set is the pods serving one partition's share of one plan. Its StatefulSet is named by a
hash of that share (``<model>-p<N>-<hash>``, see :func:`agent_set_hash`) and its pods read that share
from ``/etc/hps/p<N>-<hash>.json`` (the config ConfigMap holds one file per set). So:

- a new plan restarts nothing whose share did not change: same hash, same StatefulSet, same pods;
- a partition whose share changes gets a new StatefulSet *beside* the old one (make-before-break):
  during a rollout's Warming and Switching both sets run, the old one still serving what clients
  route to it, and the old set goes only at Draining, after routing switched. A partition with one
  replica never goes dark while its new pod loads (an in-place update would take its only pod down);
- the partition's Service and PDB select both sets (by the partition label); each StatefulSet
  selects its own set only (``hps.dev/agent-set``).

Agents fill what is theirs alone (the in-process hash map, their own RocksDB volume) with ``--load``;
Redis, shared by all, is filled once by the loader Job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from hps_operator.core.render.meta import (
    AGENT_SET_LABEL,
    CONFIG_DIR,
    DATA_DIR,
    MODEL_HASH_ANNOTATION,
    MODEL_KEY,
    PARTITION_LABEL,
    PARTITION_PLAN_ANNOTATION,
    PLAN_VERSION_LABEL,
    ROCKSDB_DIR,
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
    AGENT_UID,
    add_pod_knobs,
    add_scratch_volume,
    container_security,
    mount_model_store,
    pod_metadata,
    pod_security,
)
from hps_operator.core.render.redis import redis_args, redis_password_env, uses_redis
from hps_operator.core.render.security import (
    add_agent_tls,
    agent_auth_args,
    agent_service_account_name,
    auth_enabled,
    mount_redis_tls,
    render_agent_certificate,
    render_agent_service_account,
    render_tokenreview_binding,
)

from node_agent.plan import Plan
from node_agent.spec import ModelSpec, format_quantity

#: node autoscalers (cluster-autoscaler, Karpenter) must not evict an agent to consolidate nodes: its
#: GPU cache takes minutes to warm, and a rollout's old and new agent sets run on purpose side by
#: side. A model's ``spec.agent.podAnnotations`` may override them (a batch model may prefer cheap
#: nodes); voluntary evictions otherwise go through each partition's PodDisruptionBudget.
NODE_AUTOSCALER_ANNOTATIONS = {
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
    "karpenter.sh/do-not-disrupt": "true",
}


#: how long a stopping agent keeps answering after it reports NOT_SERVING (see ``agent_args``)
AGENT_DRAIN_S = 15


def agent_loads_tables(model: ModelSpec) -> bool:
    """Agents fill what is theirs alone: the in-process hash map and their own RocksDB volume. Redis,
    shared by all, is filled once by the loader Job."""
    persistent = model.persistent_store
    return model.volatile_store.type == "hashmap" or (
        persistent.type == "rocksdb" and not persistent.read_only
    )


def _partition_assignments(plan: Plan, partition: int) -> list[dict[str, Any]]:
    return [a.to_dict() for a in sorted(plan.assignments_for(partition=partition))]


def agent_set_hash(plan: Plan, partition: int) -> str:
    """What a partition's agents load of ``plan``: its assignments, the bucket count and the GPUs of
    a pod. Equal across plan versions that leave the partition's share alone."""
    return digest([plan.bucket_count, plan.gpus_per_pod, _partition_assignments(plan, partition)], 10)


def agent_statefulset_name(model: ModelSpec, plan: Plan, partition: int) -> str:
    """``<model>-p<N>-<hash5>``: at most 52 characters (a 40-character model name, 9999 partitions),
    the longest a StatefulSet name may be (its pods' revision label adds 11)."""
    return f"{model.name}-p{partition}-{agent_set_hash(plan, partition)[:5]}"


def partition_plan_key(plan: Plan, partition: int) -> str:
    """The config ConfigMap's key (and the file under ``/etc/hps``) of a partition's share."""
    return f"p{partition}-{agent_set_hash(plan, partition)}.json"


def partition_plan(plan: Plan, partition: int) -> Plan:
    """``plan`` with only ``partition``'s assignments: what its agents read (a whole plan per file
    would multiply the ConfigMap's size by the partition count)."""
    return dataclasses.replace(plan, assignments=tuple(sorted(plan.assignments_for(partition=partition))))


def agent_args(model: ModelSpec, partition: int, plan_key: str) -> list[str]:
    """``hps agent ...`` as an agent pod runs it (``$(POD_NAME)`` is expanded by the kubelet)."""
    args = [
        "agent",
        "-f",
        f"{CONFIG_DIR}/{MODEL_KEY}",
        "--plan",
        f"{CONFIG_DIR}/{plan_key}",
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
        # on a scale-down or a rollout's drain the pod fails readiness first (the readiness probe's
        # 2 x 5 s) and leaves the Service's endpoints while it still answers, then stops
        "--drain-seconds",
        str(AGENT_DRAIN_S),
        *redis_args(model, "agent"),
        *agent_auth_args(model),
    ]
    if model.persistent_store.type == "rocksdb":
        args += ["--rocksdb", ROCKSDB_DIR]
        if model.persistent_store.read_only:
            args.append("--rocksdb-read-only")
    if agent_loads_tables(model):
        args.append("--load")
    return args


def _agent_resources(model: ModelSpec, plan: Plan) -> dict[str, Any]:
    """The user's resources plus the GPUs the plan gives a pod (an old agent set keeps its GPUs while
    a new set with another count starts beside it); an extended resource's request must equal its
    limit."""
    resources = {k: dict(v) for k, v in model.agent.resources.items() if isinstance(v, Mapping)}
    gpus = str(plan.gpus_per_pod)
    resources.setdefault("limits", {})[model.agent.gpu_resource_name] = gpus
    if "requests" in resources:
        resources["requests"][model.agent.gpu_resource_name] = gpus
    return {k: dict(sorted(v.items())) for k, v in sorted(resources.items())}


def render_agent_statefulset(
    model: ModelSpec, serving: Plan, partition: int, *, owner: Mapping[str, Any], image: str,
    image_pull_policy: str | None = None,
) -> Manifest:
    """The agent set of ``partition`` under ``serving``: ``spec.replicas`` pods, one per data-parallel
    replica."""
    agent_set = agent_set_hash(serving, partition)
    set_labels = {PARTITION_LABEL: str(partition), AGENT_SET_LABEL: agent_set}
    # the kubelet's gRPC probe cannot speak TLS: /healthz on the metrics port answers what the gRPC
    # health service does (serving once loaded, not serving while draining)
    health = {"path": "/healthz", "port": "metrics"}
    container: dict[str, Any] = {
        "name": "agent",
        "image": model.agent.image or image,
        **pull_policy(image_pull_policy),
        "command": ["hps"],
        "args": agent_args(model, partition, partition_plan_key(serving, partition)),
        "env": sorted(
            [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
             # CuPy caches the kernels it compiles; the root filesystem is read-only
             {"name": "CUPY_CACHE_DIR", "value": "/tmp/cupy"}]
            + ([redis_password_env(model, "agent")] if uses_redis(model) else []),
            key=lambda e: str(e["name"]),
        ),
        "ports": [
            {"name": "grpc", "containerPort": model.agent.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": model.agent.metrics_port, "protocol": "TCP"},
        ],
        "resources": _agent_resources(model, serving),
        # loading a large table at start can take long: the startup probe holds off liveness for an hour
        "startupProbe": {"httpGet": health, "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {"httpGet": health, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {"httpGet": health, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "securityContext": container_security(),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": agent_config_name(model)}}],
        "securityContext": pod_security(AGENT_UID),
        "serviceAccountName": agent_service_account_name(model),
        # the token only where the agents ask the API server whose a caller's token is
        "automountServiceAccountToken": auth_enabled(model),
        # the drain, then calls in flight
        "terminationGracePeriodSeconds": AGENT_DRAIN_S + 15,
    }
    add_scratch_volume(pod_spec, "1Gi")
    add_agent_tls(model, pod_spec, container)
    mount_redis_tls(model, pod_spec)
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
        "selector": {"matchLabels": selector_labels(model, "agent", **set_labels)},
        "template": {
            "metadata": pod_metadata(
                model,
                labels(model, "agent", **set_labels),
                {
                    PARTITION_PLAN_ANNOTATION: agent_set,
                    MODEL_HASH_ANNOTATION: agent_model_hash(model),
                    # the convention annotation-based Prometheus scraping reads
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(model.agent.metrics_port),
                    "prometheus.io/path": "/metrics",
                },
                defaults=NODE_AUTOSCALER_ANNOTATIONS,
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
            agent_statefulset_name(model, serving, partition),
            "agent",
            owner,
            extra_labels=set_labels,
            annotations={PLAN_VERSION_LABEL: str(serving.version)},
        ),
        "spec": spec,
    }


def _partition_metadata(model: ModelSpec, partition: int, owner: Mapping[str, Any]) -> dict[str, Any]:
    """``<model>-agent-p<N>``, labelled with its partition: the partition's Service and PDB."""
    return object_metadata(model, agent_name(model, partition), "agent", owner,
                           extra_labels={PARTITION_LABEL: str(partition)})  # fmt: skip


def _grpc_port(model: ModelSpec) -> list[dict[str, Any]]:
    port = model.agent.port
    return [{"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]


def render_agent_service(model: ModelSpec, partition: int, *, owner: Mapping[str, Any]) -> Manifest:
    """Headless, per partition: clients resolve every ready replica of the partition and balance
    gRPC calls across them (a ClusterIP would pin a long-lived HTTP/2 connection to one pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _partition_metadata(model, partition, owner),
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
        "metadata": _partition_metadata(model, partition, owner),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(model, "agent", **{PARTITION_LABEL: str(partition)})},
        },
    }


def render_agents(model: ModelSpec, generations: Sequence[Plan], *, owner: Mapping[str, Any], image: str,
                  image_pull_policy: str | None = None) -> list[Manifest]:  # fmt: skip
    """The client Service, and for every partition of any of ``generations`` (the target plan first,
    then, during a rollout, the active one) its Service, PDB and an agent set per distinct share."""
    children: list[Manifest] = [render_client_service(model, owner=owner), render_agent_service_account(model, owner=owner)]
    if auth_enabled(model):
        children.append(render_tokenreview_binding(model, owner=owner))
    certificate = render_agent_certificate(model, owner=owner)
    if certificate is not None:
        children.append(certificate)
    partitions = sorted({p for plan in generations for p in range(plan.partitions)})
    for partition in partitions:
        children += [render_agent_service(model, partition, owner=owner), render_agent_pdb(model, partition, owner=owner)]
    seen: set[str] = set()
    for plan in generations:
        for partition in range(plan.partitions):
            name = agent_statefulset_name(model, plan, partition)
            if name not in seen:
                seen.add(name)
                children.append(render_agent_statefulset(model, plan, partition, owner=owner, image=image,
                                                         image_pull_policy=image_pull_policy))  # fmt: skip
    return children
