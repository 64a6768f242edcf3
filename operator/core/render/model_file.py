"""The model file agents and loaders read (``model.yaml`` in the plan ConfigMap): the EmbeddingModel with
every default spelled out, and table sources as the paths the pods see.

Table sources on shared storage (``spec.modelStore``: a PVC, an NFS share or a hostPath) are mounted
read-only at the store's mount path in the pods that read sources. Relative sources resolve against
the mount path there, so the model file carries them as absolute ``file://`` paths (the pods read it
from ``/etc/hps``, which would otherwise be their base).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hps_operator.core.render.meta import Manifest, digest

from node_agent.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    ModelSpec,
    ModelStoreSpec,
    NFSSource,
    PersistentVolumeClaimSource,
    SecuritySpec,
    format_quantity,
)


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
    redis_spec["persistence"] = {"type": redis.persistence.type, "appendfsync": redis.persistence.appendfsync}
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
        parts = model.autoscaling.partitions
        if parts is not None:
            spec["autoscaling"]["partitions"] = {
                "min": parts.min_partitions, "max": parts.max_partitions, "targetHitRate": parts.target_hit_rate,
            }  # fmt: skip
    network = model.network
    if not network.policy or network.clients or network.metrics_from or network.redis_clients:
        # spelled out only when set, so a model without it keeps its hashes (and its running pods)
        spec["network"] = {
            "policy": network.policy,
            **({"clients": [dict(p) for p in network.clients]} if network.clients else {}),
            **({"metricsFrom": [dict(p) for p in network.metrics_from]} if network.metrics_from else {}),
            **({"redisClients": [dict(p) for p in network.redis_clients]} if network.redis_clients else {}),
        }
    if model.security != SecuritySpec():
        # spelled out only when set, as network above
        spec["security"] = security_manifest(model.security)
    if model.model_store is not None:
        spec["modelStore"] = model_store_manifest(model.model_store)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": model.name, "namespace": model.namespace},
        "spec": spec,
    }


def security_manifest(security: SecuritySpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if security.tls is not None:
        tls: dict[str, Any] = {"mutual": security.tls.mutual}
        if security.tls.secret_name:
            tls["secretName"] = security.tls.secret_name
        if security.tls.issuer is not None:
            tls["issuerRef"] = dict(security.tls.issuer)
        out["tls"] = tls
    auth = security.auth
    out["auth"] = {"writers": list(auth.writers), "readers": list(auth.readers), "restrictReads": auth.restrict_reads,
                   "audiences": list(auth.audiences)}  # fmt: skip
    out["redis"] = {"acl": security.redis.acl}
    if security.redis.tls_secret_name:
        out["redis"]["tlsSecretName"] = security.redis.tls_secret_name
    out["reflection"] = security.reflection
    return out


def model_store_manifest(store: ModelStoreSpec) -> dict[str, Any]:
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


def agent_model_hash(model: ModelSpec) -> str:
    """Hash of what an agent process reads from the model at start. Left out: replicas and autoscaling
    (scaling must not restart the pods that serve), and what the placement decides (GPUs per pod,
    partitions, placement): a pod's share of the plan and its GPUs are its agent set's own (see
    ``agents.agent_set_hash``), so a new plan makes new sets beside the old ones and never rolls an
    old set in place."""
    spec = dict(model_manifest(model)["spec"])
    for key in ("replicas", "autoscaling", "gpusPerPod", "partitions", "placement"):
        spec.pop(key, None)
    return digest(spec)
