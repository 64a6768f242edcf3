"""What every pod we render shares: the Pod Security "restricted" profile, the Redis password from its
Secret, the model store volume, the user's pod labels and annotations, and the agent image's pod knobs.

Every pod runs as a non-root user with a read-only root filesystem, no privilege escalation, every
capability dropped and the RuntimeDefault seccomp profile, so a namespace labelled
``pod-security.kubernetes.io/enforce=restricted`` admits all of them. What a process must write goes
to volumes made for it: ``/tmp`` (an ``emptyDir``), the agents' RocksDB volume and Redis's data.
A ``hostPath`` or ``nfs`` model store is not a volume type the restricted profile allows: in such a
namespace, mount the share through a PersistentVolumeClaim (see ``docs/table-sources.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import MODEL_STORE_VOLUME, redis_secret_name

from node_agent.spec import ModelSpec, ModelStoreSpec, NFSSource, PersistentVolumeClaimSource

#: the agent image's user (``Dockerfile.agent``: ``USER 65532``)
AGENT_UID = 65532
#: the official Redis image's ``redis`` user
REDIS_UID = 999
TMP_VOLUME = "tmp"


def pod_security(uid: int) -> dict[str, Any]:
    """The pod-level half of the restricted profile; ``fsGroup`` makes volumes writable by ``uid``."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    """The container-level half of the restricted profile, with a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def add_scratch_volume(pod_spec: dict[str, Any], size: str = "256Mi") -> None:
    """A writable ``/tmp`` in every container of ``pod_spec`` (the root filesystem is read-only)."""
    pod_spec["volumes"].append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": size}})
    for container in pod_spec["containers"]:
        container.setdefault("volumeMounts", []).append({"name": TMP_VOLUME, "mountPath": "/tmp"})


REDIS_PASSWORD_KEY = "password"


REDIS_PASSWORD_ENV = "REDIS_PASSWORD"


def secret_env(model: ModelSpec, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "valueFrom": {"secretKeyRef": {"name": redis_secret_name(model), "key": REDIS_PASSWORD_KEY}},
    }


def model_store_volume(store: ModelStoreSpec) -> dict[str, Any]:
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


def mount_model_store(model: ModelSpec, pod_spec: dict[str, Any]) -> None:
    """Adds the model store to a pod that reads table sources: read-only whatever the volume says,
    as nothing of ours writes there."""
    store = model.model_store
    if store is None:
        return
    pod_spec["volumes"].append(model_store_volume(store))
    pod_spec["containers"][0]["volumeMounts"].append(
        {"name": MODEL_STORE_VOLUME, "mountPath": store.mount_path, "readOnly": True}
    )


def pod_metadata(model: ModelSpec, own_labels: Mapping[str, str],
                  own_annotations: Mapping[str, str] | None = None, *,
                  defaults: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A pod template's metadata: the user's ``podLabels``/``podAnnotations`` under ours
    (``check_renderable`` has already refused keys that would collide), over ``defaults`` (annotations
    the user may override)."""
    meta: dict[str, Any] = {"labels": {**model.agent.pod_labels, **own_labels}}
    annotations = {**(defaults or {}), **model.agent.pod_annotations, **(own_annotations or {})}
    if annotations:
        meta["annotations"] = annotations
    return meta


def add_pod_knobs(model: ModelSpec, pod_spec: dict[str, Any]) -> None:
    """What every pod running the agent image takes from ``spec.agent``, beyond scheduling."""
    if model.agent.priority_class_name:
        pod_spec["priorityClassName"] = model.agent.priority_class_name
    if model.agent.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in model.agent.image_pull_secrets]
