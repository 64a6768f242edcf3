"""Names, labels and metadata every child of an EmbeddingModel shares, and the checks on a spec that
object names and labels impose (the CRD says the same with CEL rules)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from node_agent.errors import InvalidSpecError
from node_agent.spec import API_GROUP, ModelSpec

Manifest = dict[str, Any]


MANAGED_BY = "hps-operator"


PART_OF = "hps"


#: labels and annotations of our own, under the API group
PARTITION_LABEL = f"{API_GROUP}/partition"
#: the share of a plan a partition's pods serve (see ``agents.agent_set_hash``)
AGENT_SET_LABEL = f"{API_GROUP}/agent-set"


PLAN_VERSION_LABEL = f"{API_GROUP}/plan-version"


ROUTING_VERSION_LABEL = f"{API_GROUP}/routing-version"


PARTITION_PLAN_ANNOTATION = f"{API_GROUP}/partition-plan"


MODEL_HASH_ANNOTATION = f"{API_GROUP}/model-hash"


CONFIG_DIR = "/etc/hps"


DATA_DIR = "/var/lib/hps"


ROCKSDB_DIR = f"{DATA_DIR}/rocksdb"

#: where the agents' and Redis's certificates are mounted (``spec.security``)
CREDENTIALS_DIR = "/var/run/hps"


MODEL_STORE_VOLUME = "models"


#: keys of the plan ConfigMap
MODEL_KEY = "model.yaml"


PLAN_KEY = "plan.json"  # the target plan: what the planner produced last (its ``previous`` next time)


ROUTING_KEY = "routing.json"  # the plan clients route by




#: "<name>-p9999-<hash5>" must stay within a StatefulSet name's 52 characters
MAX_MODEL_NAME = 40


def redis_name(model: ModelSpec) -> str:
    return f"{model.name}-redis"


def agent_name(model: ModelSpec, partition: int) -> str:
    return f"{model.name}-agent-p{partition}"


def client_service_name(model: ModelSpec) -> str:
    return f"{model.name}-agent"


def plan_configmap_name(model: ModelSpec) -> str:
    """The operator's record of placement and the routing clients follow."""
    return f"{model.name}-plan"


def agent_config_name(model: ModelSpec) -> str:
    """What agent and loader pods mount at ``/etc/hps``: the model file and the plan they serve."""
    return f"{model.name}-config"


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


def object_metadata(
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


def digest(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sort_manifests(manifests: Iterable[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda m: (str(m["kind"]), str(m["metadata"]["name"])))


def pull_policy(policy: str | None) -> dict[str, str]:
    return {"imagePullPolicy": policy} if policy else {}


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
        for ours in (CONFIG_DIR, DATA_DIR, CREDENTIALS_DIR):
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
