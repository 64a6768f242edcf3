"""``spec.security`` in the cluster: who the agents are, how they are reached and who may write.

- **Identity.** Each model's agents run as their own ServiceAccount ``<model>-agent``, holding no
  permission and mounting no token, unless ``spec.security.auth`` asks the agents to check callers:
  then the token is mounted and a ClusterRoleBinding ``hps-operator:<ns>:<model>:tokenreview`` grants
  the ServiceAccount ``system:auth-delegator`` (create TokenReviews, nothing else), so an agent can ask
  the API server whose token a caller presents. A cluster-scoped object cannot be owned by a
  namespaced one: the binding carries its model's namespace and uid as labels instead, the operator
  deletes it with the model (and any whose model is gone, at start).
- **gRPC TLS.** The agents serve TLS with ``tls.crt``/``tls.key`` of a Secret mounted at
  :data:`TLS_DIR` (a Secret volume is updated in place when the certificate is renewed, and the
  agent reloads it). The Secret is the user's (``tls.secretName``) or cert-manager's: a
  ``Certificate`` ``<model>-agent-tls`` names the model's Services (every partition's, up to the
  autoscaler's maximum). With ``tls.mutual`` clients must present a certificate signed by the
  Secret's ``ca.crt``. The kubelet's gRPC probe cannot speak TLS, so the probes read ``/healthz``
  on the metrics port, which says what the gRPC health service says.
- **Redis.** With ``redis.acl`` (the default) each process connects as its role's ACL user
  (:mod:`node_agent.redis_acl`: agents read rows and consume the stream, the loader writes rows, a
  producer appends to the stream), with a password from ``<model>-redis-users`` (created once by the
  operator, never read back); the ``default`` user, with the model's Redis password, is for
  replication, probes and administration. ``redis.tlsSecretName`` serves Redis over TLS only, and
  every client checks it against the Secret's ``ca.crt``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import (
    CREDENTIALS_DIR,
    Manifest,
    agent_name,
    client_service_name,
    labels,
    object_metadata,
)

from node_agent.redis_acl import ROLES, USERS
from node_agent.spec import API_GROUP, ModelSpec

#: where an agent finds its serving certificate (``tls.crt``, ``tls.key``, ``ca.crt``)
TLS_DIR = f"{CREDENTIALS_DIR}/tls"
#: where Redis and its clients find Redis's certificate and CA
REDIS_TLS_DIR = f"{CREDENTIALS_DIR}/redis-tls"
#: what a cluster-scoped object of a model carries instead of an owner reference
OWNER_NAMESPACE_LABEL = f"{API_GROUP}/owner-namespace"
OWNER_UID_LABEL = f"{API_GROUP}/owner-uid"
#: the ClusterRole that may create TokenReviews and SubjectAccessReviews, and nothing else
TOKENREVIEW_CLUSTERROLE = "system:auth-delegator"
#: the environment variable each Redis role's password is in, in the Redis container
ROLE_PASSWORD_ENV: Mapping[str, str] = {role: f"HPS_{role.upper()}_PASSWORD" for role in ROLES}


def agent_service_account_name(model: ModelSpec) -> str:
    return f"{model.name}-agent"


def agent_tls_secret_name(model: ModelSpec) -> str | None:
    """The Secret the agents serve TLS with: the user's, or the one cert-manager fills; None: plaintext."""
    tls = model.security.tls
    if tls is None:
        return None
    return tls.secret_name or f"{model.name}-agent-tls"


def redis_users_secret_name(model: ModelSpec) -> str:
    """The passwords of the model's Redis ACL users, one key per role (``agent``, ``loader``,
    ``producer``): a training job reads ``producer`` and connects as ``hps-producer``."""
    return f"{model.name}-redis-users"


def tokenreview_binding_name(model: ModelSpec) -> str:
    return f"hps-operator:{model.namespace}:{model.name}:tokenreview"


def uses_redis_acl(model: ModelSpec) -> bool:
    return model.volatile_store.type == "redis" and model.security.redis.acl


def auth_enabled(model: ModelSpec) -> bool:
    """The agents check callers' Kubernetes tokens (some writers or readers are named, or reads are
    restricted). Without it every Update is refused and anyone who reaches the port may read."""
    return model.security.auth.enabled


# ---------------------------------------------------------------------------------------------
# identity


def render_agent_service_account(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    """The agents' own identity. Its token is mounted only where the agents check callers."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_metadata(model, agent_service_account_name(model), "agent", owner),
        "automountServiceAccountToken": auth_enabled(model),
    }


def render_tokenreview_binding(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    """``system:auth-delegator`` for the agents' ServiceAccount: cluster-scoped, so labelled with its
    model's namespace and uid instead of owned (see the module docstring)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": tokenreview_binding_name(model),
            "labels": labels(
                model, "agent", **{OWNER_NAMESPACE_LABEL: model.namespace, OWNER_UID_LABEL: str(owner["uid"])}
            ),
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": TOKENREVIEW_CLUSTERROLE,
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": agent_service_account_name(model),
                "namespace": model.namespace,
            }
        ],
    }


def agent_auth_args(model: ModelSpec) -> list[str]:
    """``hps agent``'s ``--auth-*`` and ``--reflection`` flags for ``spec.security``."""
    auth = model.security.auth
    args: list[str] = []
    if auth.enabled:
        args.append("--auth-tokenreview")
        args += [arg for audience in auth.audiences for arg in ("--auth-audience", audience)]
        if auth.writers:
            args += ["--auth-writers", ",".join(auth.writers)]
        if auth.restrict_reads:
            args.append("--auth-reads")
            if auth.readers:
                args += ["--auth-readers", ",".join(auth.readers)]
    if model.security.reflection:
        args.append("--reflection")
    return args


# ---------------------------------------------------------------------------------------------
# gRPC TLS


def service_dns_names(model: ModelSpec) -> list[str]:
    """Every name a client may reach the agents by: the client Service and each partition's (up to the
    partition autoscaler's maximum), short, namespaced and fully qualified."""
    autoscaling = model.autoscaling.partitions if model.autoscaling is not None else None
    partitions = max(model.partitions, autoscaling.max_partitions if autoscaling is not None else 0, 1)
    services = [client_service_name(model)] + [agent_name(model, p) for p in range(partitions)]
    ns = model.namespace
    return [
        name for s in services for name in (s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.cluster.local")
    ]


def render_agent_certificate(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest | None:
    """cert-manager's ``Certificate`` for the agents, when ``spec.security.tls.issuerRef`` names an
    issuer; renewed by cert-manager into ``<model>-agent-tls``."""
    tls = model.security.tls
    if tls is None or tls.issuer is None:
        return None
    name = f"{model.name}-agent-tls"
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": object_metadata(model, name, "agent", owner),
        "spec": {
            "secretName": name,
            "issuerRef": dict(sorted(tls.issuer.items())),
            "dnsNames": service_dns_names(model),
            "usages": ["server auth", "digital signature", "key encipherment"],
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        },
    }


def add_agent_tls(model: ModelSpec, pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """Mounts the serving certificate and adds the ``--tls-*`` flags (nothing without ``tls``)."""
    secret = agent_tls_secret_name(model)
    if secret is None:
        return
    pod_spec["volumes"].append({"name": "tls", "secret": {"secretName": secret, "defaultMode": 0o440}})
    # not a subPath: a renewed certificate reaches the running pod, which reloads it
    container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    container["args"] += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    if model.security.tls is not None and model.security.tls.mutual:
        container["args"] += ["--tls-client-ca", f"{TLS_DIR}/ca.crt"]


# ---------------------------------------------------------------------------------------------
# Redis


def derive_redis_user_passwords(admin_password: str) -> dict[str, str]:
    """One password per role from a random ``admin_password`` (HMAC-SHA256: one role's password
    tells nothing of another's nor of the admin's). The operator passes fresh random passwords; this
    is for callers that have only the one."""
    return {
        role: base64.urlsafe_b64encode(
            hmac.new(admin_password.encode(), role.encode(), hashlib.sha256).digest()
        )
        .decode()
        .rstrip("=")
        for role in ROLES
    }


def render_redis_users_secret(
    model: ModelSpec, *, owner: Mapping[str, Any], passwords: Mapping[str, str]
) -> Manifest:
    """The role passwords, generated once by the caller and kept (created, never updated)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_metadata(model, redis_users_secret_name(model), "redis", owner),
        "type": "Opaque",
        "data": {role: base64.b64encode(passwords[role].encode()).decode() for role in ROLES},
    }


def role_password_env(model: ModelSpec, name: str, role: str) -> dict[str, Any]:
    """``name`` set to ``role``'s Redis password, by reference to the users Secret."""
    return {
        "name": name,
        "valueFrom": {"secretKeyRef": {"name": redis_users_secret_name(model), "key": role}},
    }


def redis_role_args(model: ModelSpec, role: str) -> list[str]:
    """A Redis client's ``--redis-user`` (with ACL users) and ``--redis-tls-ca`` (with Redis TLS)."""
    args = ["--redis-user", USERS[role]] if uses_redis_acl(model) else []
    if model.security.redis.tls_secret_name:
        args += ["--redis-tls-ca", f"{REDIS_TLS_DIR}/ca.crt"]
    return args


def mount_redis_tls(model: ModelSpec, pod_spec: dict[str, Any]) -> None:
    """Redis's certificate and CA in every container of ``pod_spec`` (nothing without Redis TLS)."""
    secret = model.security.redis.tls_secret_name
    if not secret:
        return
    pod_spec["volumes"].append({"name": "redis-tls", "secret": {"secretName": secret, "defaultMode": 0o440}})
    for container in pod_spec["containers"]:
        container.setdefault("volumeMounts", []).append(
            {"name": "redis-tls", "mountPath": REDIS_TLS_DIR, "readOnly": True}
        )
