"""Pure builders of every Kubernetes object an EmbeddingModel owns: ``(ModelSpec, Plan) → manifests``.

KubeRay style: no client calls, no clock, no randomness (the Redis password comes in as an argument),
and the output is sorted and stable, so a re-render of an unchanged spec is byte-identical and the
operator writes nothing. One ``render_*`` per child; :func:`render_children` returns them all.

Choices a reader will look for:

- Redis runs as ONE StatefulSet ``<model>-redis`` of ``shards * (1 + replicasPerShard)`` pods: pod
  ``k`` is shard ``k // (1 + r)``, a master when ``k % (1 + r) == 0`` and otherwise a replica of that
  master. One object to own, watch and cover with one PodDisruptionBudget, and one headless Service
  naming every node, which is what ``redis-cli --cluster create`` needs in cluster mode. (Changing
  ``replicasPerShard`` therefore re-maps ordinals: the volatile tier is refilled by the loader.)
  Redis runs ``maxmemory-policy noeviction``: a full Redis rejects writes loudly instead of silently
  dropping table rows or unconsumed online updates. ``maxmemory`` is 85% of ``redis.memory`` (the
  container limit) to leave room for client buffers, replication backlog and fragmentation.
- Table sources on shared storage (``spec.modelStore``: a PVC, an NFS share or a hostPath) are mounted
  read-only at the store's mount path in the pods that read sources: the loader Job, and the agents
  when they load (``--load``). Relative sources resolve against the mount path there, so the model
  file in the ConfigMap carries them as absolute ``file://`` paths (the pods read it from
  ``/etc/hps``, which would otherwise be their base). A hostPath store exists only on some nodes, so
  the loader then schedules like the agents.
- A new plan does not restart every agent. Agents read ``serving.json`` from the plan ConfigMap at
  start; each partition's pod template carries a hash of *its own* assignments, so a new plan rolls
  only the partitions whose share changed. Make-before-break (see ``rollout.py``): while Warming and
  Switching the agents serve the union of the active and the target plan, the ConfigMap's
  ``routing.json`` (what clients route by) flips from active to target at Switching, and Draining
  renders the target alone (the handler deletes the agent StatefulSets no longer rendered).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from hps_operator.core.rollout import Phase

from node_agent.errors import InvalidSpecError
from node_agent.plan import Assignment, Plan
from node_agent.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    HostPathSource,
    ModelSpec,
    ModelStoreSpec,
    NFSSource,
    PersistentVolumeClaimSource,
    format_quantity,
)

Manifest = dict[str, Any]

MANAGED_BY = "hps-operator"
PART_OF = "hps"
#: labels and annotations of our own, under the API group
PARTITION_LABEL = f"{API_GROUP}/partition"
PLAN_VERSION_LABEL = f"{API_GROUP}/plan-version"
ROUTING_VERSION_LABEL = f"{API_GROUP}/routing-version"
PARTITION_PLAN_ANNOTATION = f"{API_GROUP}/partition-plan"
MODEL_HASH_ANNOTATION = f"{API_GROUP}/model-hash"

CONFIG_DIR = "/etc/hps"
DATA_DIR = "/var/lib/hps"
ROCKSDB_DIR = f"{DATA_DIR}/rocksdb"
MODEL_STORE_VOLUME = "models"
#: keys of the plan ConfigMap
MODEL_KEY = "model.yaml"
PLAN_KEY = "plan.json"  # the target plan: what the planner produced last (its ``previous`` next time)
ROUTING_KEY = "routing.json"  # the plan clients route by
SERVING_KEY = "serving.json"  # the plan agents load (a union of two plans during a rollout)

REDIS_PORT = 6379
REDIS_BUS_PORT = 16379
REDIS_PASSWORD_KEY = "password"
REDIS_PASSWORD_ENV = "REDIS_PASSWORD"
DEFAULT_REDIS_IMAGE = "redis:7.4"
#: the agents' lookup-rate metric (served to the HPA by a metrics adapter)
QPS_METRIC = "hps_lookup_requests_per_second"
#: "<name>-agent-p9999" must stay within a StatefulSet name's 52 characters
MAX_MODEL_NAME = 40


# ---------------------------------------------------------------------------------------------
# names, labels, metadata


def redis_name(model: ModelSpec) -> str:
    return f"{model.name}-redis"


def agent_name(model: ModelSpec, partition: int) -> str:
    return f"{model.name}-agent-p{partition}"


def client_service_name(model: ModelSpec) -> str:
    return f"{model.name}-agent"


def plan_configmap_name(model: ModelSpec) -> str:
    return f"{model.name}-plan"


def redis_secret_name(model: ModelSpec) -> str:
    """The Secret holding the Redis AUTH password: the user's ``passwordSecret`` or ours."""
    return model.volatile_store.redis.password_secret or redis_name(model)


def endpoint(model: ModelSpec) -> str:
    """``host:port`` of the client Service, as reported in ``status.endpoint``."""
    return f"{client_service_name(model)}.{model.namespace}.svc:{model.agent.port}"


def labels(model: ModelSpec, component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "hps",
        "app.kubernetes.io/instance": model.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": PART_OF,
        **extra,
    }


def selector_labels(model: ModelSpec, component: str, **extra: str) -> dict[str, str]:
    """The immutable subset of :func:`labels` a workload selects its pods by."""
    return {"app.kubernetes.io/instance": model.name, "app.kubernetes.io/component": component, **extra}


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """``owner`` is the EmbeddingModel's ``apiVersion``, ``kind``, ``name`` and ``uid``."""
    return {
        "apiVersion": str(owner["apiVersion"]),
        "kind": str(owner["kind"]),
        "name": str(owner["name"]),
        "uid": str(owner["uid"]),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    model: ModelSpec,
    name: str,
    component: str,
    owner: Mapping[str, Any],
    *,
    extra_labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": model.namespace,
        "labels": labels(model, component, **dict(extra_labels or {})),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _digest(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def check_renderable(model: ModelSpec) -> None:
    """What ``parse_model`` accepts but Kubernetes object names or Redis cannot take (the CRD says the
    same with CEL rules): raises :class:`InvalidSpecError` naming the field."""
    if len(model.name) > MAX_MODEL_NAME or not model.name[0].isalpha():
        raise InvalidSpecError(
            "metadata.name",
            f"{model.name!r} must start with a letter and be at most {MAX_MODEL_NAME} characters: "
            "it prefixes the names of the model's Services and StatefulSets",
        )
    redis = model.volatile_store.redis
    if model.volatile_store.type == "redis" and redis.cluster and redis.shards < 3:
        raise InvalidSpecError(
            "spec.volatileStore.redis.shards", f"a Redis Cluster needs at least 3 shards, got {redis.shards}"
        )
    if model.model_store is not None:
        mount = model.model_store.mount_path
        for ours in (CONFIG_DIR, DATA_DIR):
            if mount == ours or ours.startswith(mount + "/") or mount.startswith(ours + "/"):
                raise InvalidSpecError(
                    "spec.modelStore.mountPath",
                    f"{mount} overlaps {ours}, where the agent keeps its own files; choose another path",
                )
    # the selector and the restart-on-change hashes depend on these: a user's value must not replace them
    taken_labels = labels(model, "loader") | labels(model, "agent", **{PARTITION_LABEL: "0"})
    for key in model.agent.pod_labels:
        if key in taken_labels or key.startswith(f"{API_GROUP}/"):
            raise InvalidSpecError(f"spec.agent.podLabels.{key}", "is set by the operator")
    for key in model.agent.pod_annotations:
        if key.startswith(f"{API_GROUP}/"):
            raise InvalidSpecError(
                f"spec.agent.podAnnotations.{key}", f"keys under {API_GROUP}/ are set by the operator"
            )


# ---------------------------------------------------------------------------------------------
# the model file agents and loaders read


def model_manifest(model: ModelSpec) -> Manifest:
    """The EmbeddingModel as a manifest with every default spelled out; ``parse_model`` of it gives
    back ``model``. This is the ``model.yaml`` agents and the loader read."""
    tables = []
    for t in model.tables:
        table: dict[str, Any] = {
            "name": t.name,
            "rows": t.rows,
            "dim": t.dim,
            "dtype": t.dtype,
            "defaultValue": t.default_value,
        }
        if t.source is not None:
            table["source"] = t.source
        if t.hotness is not None:
            table["hotness"] = t.hotness
        tables.append(table)
    redis = model.volatile_store.redis
    redis_spec: dict[str, Any] = {
        "shards": redis.shards,
        "replicasPerShard": redis.replicas_per_shard,
        "memory": format_quantity(redis.memory),
        "cluster": redis.cluster,
    }
    if redis.password_secret:
        redis_spec["passwordSecret"] = redis.password_secret
    persistent: dict[str, Any] = {
        "type": model.persistent_store.type,
        "storage": format_quantity(model.persistent_store.storage),
        "readOnly": model.persistent_store.read_only,
    }
    if model.persistent_store.storage_class:
        persistent["storageClassName"] = model.persistent_store.storage_class
    updates: dict[str, Any] = {"enabled": model.updates.enabled}
    if model.updates.stream:
        updates["stream"] = model.updates.stream
    agent: dict[str, Any] = {
        "resources": dict(model.agent.resources),
        "nodeSelector": dict(model.agent.node_selector),
        "tolerations": [dict(t) for t in model.agent.tolerations],
        "affinity": dict(model.agent.affinity),
        "gpuResourceName": model.agent.gpu_resource_name,
        "maxBatchKeys": model.agent.max_batch_keys,
        "port": model.agent.port,
    }
    if model.agent.image:
        agent["image"] = model.agent.image
    # spelled out only when set, so a model without them keeps its hashes (and its running pods and
    # loader Job) across an operator upgrade that added them
    if model.agent.priority_class_name:
        agent["priorityClassName"] = model.agent.priority_class_name
    if model.agent.image_pull_secrets:
        agent["imagePullSecrets"] = [{"name": name} for name in model.agent.image_pull_secrets]
    if model.agent.pod_labels:
        agent["podLabels"] = dict(model.agent.pod_labels)
    if model.agent.pod_annotations:
        agent["podAnnotations"] = dict(model.agent.pod_annotations)
    spec: dict[str, Any] = {
        "tables": tables,
        "replicas": model.replicas,
        "gpusPerPod": model.gpus_per_pod,
        "partitions": model.partitions,
        "cache": {
            "memoryPerGPU": format_quantity(model.cache.memory_per_gpu),
            "policy": model.cache.policy,
            "hitRateThreshold": model.cache.hit_rate_threshold,
            "associativity": model.cache.associativity,
        },
        "volatileStore": {"type": model.volatile_store.type, "redis": redis_spec},
        "persistentStore": persistent,
        "placement": {
            "strategy": model.placement.strategy,
            "maxImbalance": model.placement.max_imbalance,
            "bucketCount": model.placement.bucket_count,
        },
        "updates": updates,
        "agent": agent,
    }
    if model.autoscaling is not None:
        spec["autoscaling"] = {
            "minReplicas": model.autoscaling.min_replicas,
            "maxReplicas": model.autoscaling.max_replicas,
            "targetQPSPerReplica": model.autoscaling.target_qps_per_replica,
        }
    if model.model_store is not None:
        spec["modelStore"] = _model_store_manifest(model.model_store)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": model.name, "namespace": model.namespace},
        "spec": spec,
    }


def _model_store_manifest(store: ModelStoreSpec) -> dict[str, Any]:
    volume = store.volume
    out: dict[str, Any] = {"mountPath": store.mount_path}
    if isinstance(volume, PersistentVolumeClaimSource):
        out["persistentVolumeClaim"] = {"claimName": volume.claim_name, "readOnly": volume.read_only}
    elif isinstance(volume, NFSSource):
        out["nfs"] = {"server": volume.server, "path": volume.path, "readOnly": volume.read_only}
    else:
        out["hostPath"] = {"path": volume.path, "type": volume.type}
    return out


def sources_in_pods(model: ModelSpec) -> ModelSpec:
    """``model`` with every table source as the absolute ``file://`` path the pods read, relative ones
    under the model store's mount path: the pods would resolve them against the model file's folder.
    Unchanged without a model store."""
    store = model.model_store
    if store is None:
        return model
    tables = []
    for i, t in enumerate(model.tables):
        if t.source is not None:
            path = store.cluster_path(t.source, field=f"spec.tables[{i}].source")
            t = dataclasses.replace(t, source=f"file://{path}")
        tables.append(t)
    return dataclasses.replace(model, tables=tuple(tables))


def _agent_model_hash(model: ModelSpec) -> str:
    """Hash of what an agent process reads from the model at start. Replicas and autoscaling are left
    out: scaling must not restart the pods that serve."""
    spec = dict(model_manifest(model)["spec"])
    spec.pop("replicas")
    spec.pop("autoscaling", None)
    return _digest(spec)


# ---------------------------------------------------------------------------------------------
# plans


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


def _plans_for_phase(plan: Plan, active_plan: Plan | None, phase: Phase | str) -> tuple[Plan, Plan]:
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
        "metadata": _metadata(
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


# ---------------------------------------------------------------------------------------------
# Redis


def _uses_redis(model: ModelSpec) -> bool:
    return model.volatile_store.type == "redis"


def _redis_host(model: ModelSpec, ordinal: int) -> str:
    return f"{redis_name(model)}-{ordinal}.{redis_name(model)}.{model.namespace}.svc"


def redis_pod_count(model: ModelSpec) -> int:
    redis = model.volatile_store.redis
    return redis.shards * (1 + redis.replicas_per_shard)


def redis_addresses(model: ModelSpec) -> list[str]:
    """What agents and the loader get as ``--redis``: the masters in client-side sharding (shard order
    matters: it is the sharding), every node as a seed in cluster mode."""
    redis = model.volatile_store.redis
    if redis.cluster:
        ordinals = range(redis_pod_count(model))
    else:
        ordinals = range(0, redis_pod_count(model), 1 + redis.replicas_per_shard)
    return [f"{_redis_host(model, k)}:{REDIS_PORT}" for k in ordinals]


def _secret_env(model: ModelSpec, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "valueFrom": {"secretKeyRef": {"name": redis_secret_name(model), "key": REDIS_PASSWORD_KEY}},
    }


def render_redis_secret(model: ModelSpec, *, owner: Mapping[str, Any], password: str) -> Manifest:
    """The AUTH password, generated once by the caller (randomness is not pure) and kept."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(model, redis_name(model), "redis", owner),
        "type": "Opaque",
        # ``data`` rather than ``stringData``: the API server stores ``data``, so what we render is
        # what we read back and an unchanged Secret compares equal
        "data": {REDIS_PASSWORD_KEY: base64.b64encode(password.encode()).decode()},
    }


def render_redis_service(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    """Headless: a stable DNS name per Redis pod. Not-ready pods are published too, so replicas find
    their master and cluster nodes each other before any of them is ready."""
    ports = [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]
    if model.volatile_store.redis.cluster:
        ports.append(
            {"name": "cluster-bus", "port": REDIS_BUS_PORT, "targetPort": "cluster-bus", "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(model, redis_name(model), "redis", owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(model, "redis"),
            "ports": ports,
        },
    }


def _redis_server_script(model: ModelSpec) -> str:
    redis = model.volatile_store.redis
    group = 1 + redis.replicas_per_shard
    service = f"{redis_name(model)}.{model.namespace}.svc"
    lines = [
        "set -eu",
        'ordinal="${HOSTNAME##*-}"',
        "conf=/tmp/redis.conf",
        "umask 077",
        "{",
        f"  echo 'port {REDIS_PORT}'",
        "  echo 'bind 0.0.0.0'",
        "  echo 'protected-mode no'",
        "  echo 'dir /data'",
        "  echo 'save \"\"'",
        "  echo 'appendonly no'",
        f"  echo 'maxmemory {model.volatile_store.redis.memory * 85 // 100}'",
        "  echo 'maxmemory-policy noeviction'",
        '  echo "requirepass ${REDIS_PASSWORD}"',
        '  echo "masterauth ${REDIS_PASSWORD}"',
    ]
    if redis.cluster:
        lines += [
            "  echo 'cluster-enabled yes'",
            "  echo 'cluster-config-file /data/nodes.conf'",
            "  echo 'cluster-node-timeout 5000'",
            # clients are redirected by stable DNS names, which survive a pod's new IP after a restart
            f'  echo "cluster-announce-hostname ${{HOSTNAME}}.{service}"',
            "  echo 'cluster-preferred-endpoint-type hostname'",
            '} > "$conf"',
        ]
    else:
        lines += [
            '} > "$conf"',
            f"if [ $((ordinal % {group})) -ne 0 ]; then",
            f'  echo "replicaof {redis_name(model)}-$((ordinal - ordinal % {group})).{service} {REDIS_PORT}" >> "$conf"',
            "fi",
        ]
    lines.append('exec redis-server "$conf"')
    return "\n".join(lines) + "\n"


def render_redis_statefulset(
    model: ModelSpec, *, owner: Mapping[str, Any], redis_image: str = DEFAULT_REDIS_IMAGE
) -> Manifest:
    redis = model.volatile_store.redis
    memory = format_quantity(redis.memory)
    ports = [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}]
    if redis.cluster:
        ports.append({"name": "cluster-bus", "containerPort": REDIS_BUS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": "redis",
        "image": redis_image,
        "command": ["sh", "-c", _redis_server_script(model)],
        # redis-cli reads REDISCLI_AUTH, so probes never put the password on a command line
        "env": [_secret_env(model, REDIS_PASSWORD_ENV), _secret_env(model, "REDISCLI_AUTH")],
        "ports": ports,
        "resources": {"requests": {"cpu": "100m", "memory": memory}, "limits": {"memory": memory}},
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", "redis-cli -p 6379 ping | grep -q PONG"]},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "redis"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    spec: dict[str, Any] = {
        "serviceName": redis_name(model),
        "replicas": redis_pod_count(model),
        # masters and replicas find each other by DNS: no reason to start them one at a time
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": selector_labels(model, "redis")},
        "template": {
            "metadata": {"labels": labels(model, "redis")},
            "spec": {
                "containers": [container],
                "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                "terminationGracePeriodSeconds": 30,
            },
        },
    }
    if redis.cluster:
        # a cluster node's identity (nodes.conf) must survive a restart, or the node rejoins empty
        claim: dict[str, Any] = {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        if model.persistent_store.storage_class:
            claim["spec"]["storageClassName"] = model.persistent_store.storage_class
        spec["volumeClaimTemplates"] = [claim]
        spec["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Delete", "whenScaled": "Retain"}
    else:
        # the volatile tier without persistence: the loader refills it
        spec["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(model, redis_name(model), "redis", owner),
        "spec": spec,
    }


def render_redis_pdb(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(model, redis_name(model), "redis", owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(model, "redis")}},
    }


def _redis_bootstrap_script(model: ModelSpec) -> str:
    hosts = " ".join(_redis_host(model, k) for k in range(redis_pod_count(model)))
    first = _redis_host(model, 0)
    replicas = model.volatile_store.redis.replicas_per_shard
    return (
        "\n".join(
            [
                "set -eu",
                f'hosts="{hosts}"',
                "deadline=$(( $(date +%s) + 900 ))",
                "for h in $hosts; do",
                '  until redis-cli -h "$h" -p 6379 ping 2>/dev/null | grep -q PONG; do',
                '    if [ "$(date +%s)" -ge "$deadline" ]; then echo "redis node $h did not answer" >&2; exit 1; fi',
                "    sleep 2",
                "  done",
                "done",
                f'if redis-cli -h {first} -p 6379 cluster info | grep -q "^cluster_slots_assigned:16384"; then',
                '  echo "cluster already formed"; exit 0',
                "fi",
                'addrs=""',
                "for h in $hosts; do",
                # redis-cli --cluster create wants addresses; nodes announce their DNS names afterwards
                '  ip="$(getent hosts "$h" | awk \'{print $1}\')"',
                f'  addrs="$addrs $ip:{REDIS_PORT}"',
                "done",
                f"redis-cli --cluster create $addrs --cluster-replicas {replicas} --cluster-yes",
            ]
        )
        + "\n"
    )


def render_redis_bootstrap_job(
    model: ModelSpec, *, owner: Mapping[str, Any], redis_image: str = DEFAULT_REDIS_IMAGE
) -> Manifest:
    """Forms the Redis Cluster once every node answers; does nothing when it is already formed."""
    name = f"{redis_name(model)}-bootstrap"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(model, name, "redis-bootstrap", owner),
        "spec": {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": labels(model, "redis-bootstrap")},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "bootstrap",
                            "image": redis_image,
                            "command": ["sh", "-c", _redis_bootstrap_script(model)],
                            "env": [_secret_env(model, "REDISCLI_AUTH")],
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "32Mi"},
                                "limits": {"memory": "128Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                },
            },
        },
    }


def render_redis(
    model: ModelSpec,
    *,
    owner: Mapping[str, Any],
    redis_password: str | None,
    redis_image: str = DEFAULT_REDIS_IMAGE,
) -> list[Manifest]:
    """Every Redis child: StatefulSet, headless Service, PDB, the Secret (unless the user names one;
    then ``redis_password`` may be ``None``) and, in cluster mode, the bootstrap Job."""
    if not _uses_redis(model):
        return []
    children = [
        render_redis_statefulset(model, owner=owner, redis_image=redis_image),
        render_redis_service(model, owner=owner),
        render_redis_pdb(model, owner=owner),
    ]
    if not model.volatile_store.redis.password_secret:
        if not redis_password:
            raise ValueError(
                "redis_password is required when spec.volatileStore.redis.passwordSecret is empty"
            )
        children.append(render_redis_secret(model, owner=owner, password=redis_password))
    if model.volatile_store.redis.cluster:
        children.append(render_redis_bootstrap_job(model, owner=owner, redis_image=redis_image))
    return children


def _redis_args(model: ModelSpec) -> list[str]:
    if not _uses_redis(model):
        return []
    args = ["--redis", ",".join(redis_addresses(model))]
    if model.volatile_store.redis.cluster:
        args.append("--redis-cluster")
    return [*args, "--redis-password-env", REDIS_PASSWORD_ENV]


# ---------------------------------------------------------------------------------------------
# agents


def _agent_loads_tables(model: ModelSpec) -> bool:
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
        *_redis_args(model),
    ]
    if model.persistent_store.type == "rocksdb":
        args += ["--rocksdb", ROCKSDB_DIR]
        if model.persistent_store.read_only:
            args.append("--rocksdb-read-only")
    if _agent_loads_tables(model):
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


def _model_store_volume(store: ModelStoreSpec) -> dict[str, Any]:
    volume = store.volume
    if isinstance(volume, PersistentVolumeClaimSource):
        return {"name": MODEL_STORE_VOLUME,
                "persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": volume.read_only}}
    if isinstance(volume, NFSSource):
        return {"name": MODEL_STORE_VOLUME,
                "nfs": {"server": volume.server, "path": volume.path, "readOnly": volume.read_only}}
    host_path: dict[str, Any] = {"path": volume.path}
    if volume.type:
        host_path["type"] = volume.type
    return {"name": MODEL_STORE_VOLUME, "hostPath": host_path}  # fmt: skip


def _mount_model_store(model: ModelSpec, pod_spec: dict[str, Any]) -> None:
    """Adds the model store to a pod that reads table sources: read-only whatever the volume says,
    as nothing of ours writes there."""
    store = model.model_store
    if store is None:
        return
    pod_spec["volumes"].append(_model_store_volume(store))
    pod_spec["containers"][0]["volumeMounts"].append(
        {"name": MODEL_STORE_VOLUME, "mountPath": store.mount_path, "readOnly": True}
    )


def _pod_metadata(model: ModelSpec, own_labels: Mapping[str, str],
                  own_annotations: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A pod template's metadata: the user's ``podLabels``/``podAnnotations`` under ours
    (``check_renderable`` has already refused keys that would collide)."""
    meta: dict[str, Any] = {"labels": {**model.agent.pod_labels, **own_labels}}
    annotations = {**model.agent.pod_annotations, **(own_annotations or {})}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _add_pod_knobs(model: ModelSpec, pod_spec: dict[str, Any]) -> None:
    """What every pod running the agent image takes from ``spec.agent``, beyond scheduling."""
    if model.agent.priority_class_name:
        pod_spec["priorityClassName"] = model.agent.priority_class_name
    if model.agent.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in model.agent.image_pull_secrets]


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
        **_pull_policy(image_pull_policy),
        "command": ["hps"],
        "args": agent_args(model, partition),
        "env": sorted(
            [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
            + ([_secret_env(model, REDIS_PASSWORD_ENV)] if _uses_redis(model) else []),
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
        "volumes": [{"name": "config", "configMap": {"name": plan_configmap_name(model)}}],
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
    _add_pod_knobs(model, pod_spec)
    spec: dict[str, Any] = {
        "serviceName": agent_name(model, partition),
        "replicas": model.replicas,
        # replicas are independent copies: start and stop them together
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "selector": {"matchLabels": selector_labels(model, "agent", **{PARTITION_LABEL: str(partition)})},
        "template": {
            "metadata": _pod_metadata(
                model,
                labels(model, "agent", **{PARTITION_LABEL: str(partition)}),
                # only what this partition's process reads: a new plan that leaves the partition's
                # shards alone, or a change of replicas, does not restart it
                {
                    PARTITION_PLAN_ANNOTATION: _digest(
                        [serving.bucket_count, _partition_assignments(serving, partition)]
                    ),
                    MODEL_HASH_ANNOTATION: _agent_model_hash(model),
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
    if _agent_loads_tables(model):
        # agents that read no source do without it: an RWO claim or a hostPath on some nodes must
        # not limit where they can run
        _mount_model_store(model, pod_spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(
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
        "metadata": _metadata(
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
        "metadata": _metadata(model, client_service_name(model), "agent", owner),
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
        "metadata": _metadata(
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


# ---------------------------------------------------------------------------------------------
# loader and autoscaler


def _loader_pod_extras(model: ModelSpec) -> dict[str, Any]:
    """What the loader's pod template takes from the spec beyond the tables, Redis and image: only
    what is set, so the Job name of a model without them stays what it was (a re-run of the loader
    would write the tables' rows over online updates already applied)."""
    extras: dict[str, Any] = {}
    if model.model_store is not None:
        extras["modelStore"] = _model_store_manifest(model.model_store)
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
    return f"{model.name}-load-{_digest(what, 8)}"


def render_loader_job(model: ModelSpec, *, owner: Mapping[str, Any], image: str,
                      image_pull_policy: str | None = None) -> Manifest:
    """Loads every table into the shared Redis tier (``hps load``); retries while Redis comes up."""
    args = ["load", "-f", f"{CONFIG_DIR}/{MODEL_KEY}", *_redis_args(model), "--no-progress"]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [
            {
                "name": "loader",
                "image": model.agent.image or image,
                **_pull_policy(image_pull_policy),
                "command": ["hps"],
                "args": args,
                "env": [_secret_env(model, REDIS_PASSWORD_ENV)],
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
    _add_pod_knobs(model, pod_spec)
    _mount_model_store(model, pod_spec)
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
        "metadata": _metadata(model, loader_job_name(model, image), "loader", owner),
        "spec": {
            "backoffLimit": 10,
            "template": {"metadata": _pod_metadata(model, labels(model, "loader")), "spec": pod_spec},
        },
    }


def render_hpa(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest | None:
    """Scales the EmbeddingModel itself (its scale subresource), never the StatefulSets behind the
    operator's back. ``None`` without ``spec.autoscaling``."""
    if model.autoscaling is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(model, model.name, "agent", owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": model.name},
            "minReplicas": model.autoscaling.min_replicas,
            "maxReplicas": model.autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QPS_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(model.autoscaling.target_qps_per_replica),
                        },
                    },
                }
            ],
        },
    }


# ---------------------------------------------------------------------------------------------
# everything


def sort_manifests(manifests: Iterable[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda m: (str(m["kind"]), str(m["metadata"]["name"])))


def _pull_policy(policy: str | None) -> dict[str, str]:
    return {"imagePullPolicy": policy} if policy else {}


def render_children(
    model: ModelSpec,
    plan: Plan,
    *,
    owner: Mapping[str, Any],
    image: str,
    redis_password: str | None,
    active_plan: Plan | None = None,
    phase: Phase | str = Phase.IDLE,
    redis_image: str = DEFAULT_REDIS_IMAGE,
    image_pull_policy: str | None = None,
) -> list[Manifest]:
    """Every child of the model, sorted by (kind, name).

    ``plan`` is the target plan; ``active_plan`` the one clients route by now and ``phase`` the
    rollout phase (``rollout.Rollout.phase``): Idle and Draining render the target alone, Warming and
    Switching make agents serve both (routing flips at Switching). ``image`` is the operator's default
    agent image (``spec.agent.image`` wins) and ``image_pull_policy`` the policy of the containers
    running it (None leaves Kubernetes' default)."""
    check_renderable(model)
    serving, routing = _plans_for_phase(plan, active_plan, phase)
    children: list[Manifest] = [
        render_plan_configmap(model, plan, owner=owner, serving=serving, routing=routing),
        *render_agents(model, serving, owner=owner, image=image, image_pull_policy=image_pull_policy),
        *render_redis(model, owner=owner, redis_password=redis_password, redis_image=redis_image),
    ]
    if _uses_redis(model):
        children.append(render_loader_job(model, owner=owner, image=image, image_pull_policy=image_pull_policy))
    hpa = render_hpa(model, owner=owner)
    if hpa is not None:
        children.append(hpa)
    return sort_manifests(children)
