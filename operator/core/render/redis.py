"""The volatile tier in the cluster: the Redis StatefulSet, its headless Service, PDB, password Secret and,
in cluster mode, the Job that forms the Redis Cluster.

Redis runs as ONE StatefulSet ``<model>-redis`` of ``shards * (1 + replicasPerShard)`` pods: pod ``k``
is shard ``k // (1 + r)``, a master when ``k % (1 + r) == 0`` and otherwise a replica of that master.
One object to own, watch and cover with one PodDisruptionBudget, and one headless Service naming every
node, which is what ``redis-cli --cluster create`` needs in cluster mode. (Changing
``replicasPerShard`` therefore re-maps ordinals: the volatile tier is refilled by the loader.) Redis
runs ``maxmemory-policy noeviction``: a full Redis rejects writes loudly instead of silently dropping
table rows or unconsumed online updates. ``maxmemory`` is 85% of ``redis.memory`` (the container
limit) to leave room for client buffers, replication backlog and fragmentation.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import (
    Manifest,
    digest,
    labels,
    object_metadata,
    redis_name,
    selector_labels,
)
from hps_operator.core.render.pods import (
    REDIS_PASSWORD_ENV,
    REDIS_PASSWORD_KEY,
    REDIS_UID,
    add_scratch_volume,
    container_security,
    pod_security,
    secret_env,
)
from hps_operator.core.render.security import (
    REDIS_TLS_DIR,
    ROLE_PASSWORD_ENV,
    derive_redis_user_passwords,
    mount_redis_tls,
    redis_role_args,
    render_redis_users_secret,
    role_password_env,
    uses_redis_acl,
)

from node_agent.redis_acl import ROLES, USERS, role_rules
from node_agent.spec import ModelSpec, format_quantity
from node_agent.updates import stream_name

REDIS_PORT = 6379


REDIS_BUS_PORT = 16379


DEFAULT_REDIS_IMAGE = "redis:7.4"


def uses_redis(model: ModelSpec) -> bool:
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


def render_redis_secret(model: ModelSpec, *, owner: Mapping[str, Any], password: str) -> Manifest:
    """The AUTH password, generated once by the caller (randomness is not pure) and kept."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_metadata(model, redis_name(model), "redis", owner),
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
        "metadata": object_metadata(model, redis_name(model), "redis", owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(model, "redis"),
            "ports": ports,
        },
    }


def _persistence_lines(model: ModelSpec) -> list[str]:
    """``redis.conf`` lines for ``spec.volatileStore.redis.persistence`` (the same settings ``hps local``
    gives its servers)."""
    persistence = model.volatile_store.redis.persistence
    if persistence.type == "none":
        return ["  echo 'appendonly no'"]
    return ["  echo 'appendonly yes'", f"  echo 'appendfsync {persistence.appendfsync}'"]


def redis_cli_tls(model: ModelSpec) -> str:
    """``redis-cli``'s flags to reach a Redis that serves TLS (empty without Redis TLS)."""
    return f" --tls --cacert {REDIS_TLS_DIR}/ca.crt" if model.security.redis.tls_secret_name else ""


def _tls_lines(model: ModelSpec) -> list[str]:
    """TLS only, on the Redis port: clients, replication and (in cluster mode) the cluster bus. Clients
    need no certificate of their own (their ACL user's password authenticates them)."""
    if not model.security.redis.tls_secret_name:
        return [f"  echo 'port {REDIS_PORT}'"]
    lines = ["  echo 'port 0'", f"  echo 'tls-port {REDIS_PORT}'", f"  echo 'tls-cert-file {REDIS_TLS_DIR}/tls.crt'",
             f"  echo 'tls-key-file {REDIS_TLS_DIR}/tls.key'", f"  echo 'tls-ca-cert-file {REDIS_TLS_DIR}/ca.crt'",
             "  echo 'tls-auth-clients optional'", "  echo 'tls-replication yes'"]  # fmt: skip
    if model.volatile_store.redis.cluster:
        lines.append("  echo 'tls-cluster yes'")
    return lines


#: the ACL file a Redis with per-role users reads (written at start from the passwords' Secrets)
ACL_FILE = "/tmp/users.acl"


def _auth_lines(model: ModelSpec) -> list[str]:
    """``requirepass`` alone, or with ACL users an ACL file: ``default`` (the model's Redis password:
    replication, probes, administration) and one user per role with only what the role needs (see
    :mod:`node_agent.redis_acl`), each password from the environment, never on a command line."""
    if not uses_redis_acl(model):
        return ['  echo "requirepass ${REDIS_PASSWORD}"', '  echo "masterauth ${REDIS_PASSWORD}"']
    return ["  echo 'masteruser default'", '  echo "masterauth ${REDIS_PASSWORD}"', f"  echo 'aclfile {ACL_FILE}'"]


def _acl_file_lines(model: ModelSpec) -> list[str]:
    if not uses_redis_acl(model):
        return []
    lines = ["{", '  echo "user default reset on >${REDIS_PASSWORD} ~* &* +@all"']
    stream = stream_name(model)
    for role in ROLES:
        rules = " ".join(role_rules(role, model=model.name, stream=stream))
        lines.append(f"  printf '%s\\n' \"user {USERS[role]} reset on >${{{ROLE_PASSWORD_ENV[role]}}} \""
                     f"{shlex.quote(rules)}")  # fmt: skip
    return [*lines, f'}} > "{ACL_FILE}"']


def _redis_server_script(model: ModelSpec) -> str:
    redis = model.volatile_store.redis
    group = 1 + redis.replicas_per_shard
    service = f"{redis_name(model)}.{model.namespace}.svc"
    lines = [
        "set -eu",
        'ordinal="${HOSTNAME##*-}"',
        "conf=/tmp/redis.conf",
        "umask 077",
        *_acl_file_lines(model),
        "{",
        *_tls_lines(model),
        "  echo 'bind 0.0.0.0'",
        # a password (and ACL users) guard every connection; protected mode only matters without one
        "  echo 'protected-mode no'",
        "  echo 'dir /data'",
        # no RDB snapshots: with persistence the append-only file is the record (a snapshot of a
        # large L2 would fork and stall the server every few minutes)
        "  echo 'save \"\"'",
        *_persistence_lines(model),
        f"  echo 'maxmemory {model.volatile_store.redis.memory * 85 // 100}'",
        "  echo 'maxmemory-policy noeviction'",
        *_auth_lines(model),
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
        "env": [secret_env(model, REDIS_PASSWORD_ENV), secret_env(model, "REDISCLI_AUTH")]
        + ([role_password_env(model, ROLE_PASSWORD_ENV[role], role) for role in ROLES] if uses_redis_acl(model) else []),
        "ports": ports,
        "resources": {"requests": {"cpu": "100m", "memory": memory}, "limits": {"memory": memory}},
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", f"redis-cli{redis_cli_tls(model)} -p {REDIS_PORT} ping | grep -q PONG"]},
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
        "securityContext": container_security(),
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
                "volumes": [],
                # the image's redis user; the server writes only /data and its config in /tmp
                "securityContext": pod_security(REDIS_UID),
                "terminationGracePeriodSeconds": 30,
            },
        },
    }
    persists = redis.persistence.type != "none"
    if redis.cluster or persists:
        # the append-only file (room for a rewrite: twice the memory) and, in cluster mode, the node's
        # identity (nodes.conf) must survive a restart, or the node comes back empty
        size = format_quantity(2 * redis.memory) if persists else "1Gi"
        claim: dict[str, Any] = {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
        }
        if model.persistent_store.storage_class:
            claim["spec"]["storageClassName"] = model.persistent_store.storage_class
        spec["volumeClaimTemplates"] = [claim]
        spec["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Delete", "whenScaled": "Retain"}
    else:
        # the volatile tier without persistence (spec.volatileStore.redis.persistence.type: none): the
        # loader refills it after a restart, and online updates since the load are lost
        spec["template"]["spec"]["volumes"].append({"name": "data", "emptyDir": {}})
    add_scratch_volume(spec["template"]["spec"], "64Mi")
    mount_redis_tls(model, spec["template"]["spec"])
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_metadata(model, redis_name(model), "redis", owner),
        "spec": spec,
    }


def render_redis_pdb(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_metadata(model, redis_name(model), "redis", owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(model, "redis")}},
    }


def _redis_bootstrap_script(model: ModelSpec) -> str:
    hosts = " ".join(_redis_host(model, k) for k in range(redis_pod_count(model)))
    first = _redis_host(model, 0)
    replicas = model.volatile_store.redis.replicas_per_shard
    cli = f"redis-cli{redis_cli_tls(model)}"
    return (
        "\n".join(
            [
                "set -eu",
                f'hosts="{hosts}"',
                "deadline=$(( $(date +%s) + 900 ))",
                "for h in $hosts; do",
                f'  until {cli} -h "$h" -p {REDIS_PORT} ping 2>/dev/null | grep -q PONG; do',
                '    if [ "$(date +%s)" -ge "$deadline" ]; then echo "redis node $h did not answer" >&2; exit 1; fi',
                "    sleep 2",
                "  done",
                "done",
                f'if {cli} -h {first} -p {REDIS_PORT} cluster info | grep -q "^cluster_slots_assigned:16384"; then',
                '  echo "cluster already formed"; exit 0',
                "fi",
                'addrs=""',
                "for h in $hosts; do",
                # redis-cli --cluster create wants addresses; nodes announce their DNS names afterwards
                '  ip="$(getent hosts "$h" | awk \'{print $1}\')"',
                f'  addrs="$addrs $ip:{REDIS_PORT}"',
                "done",
                f"{cli} --cluster create $addrs --cluster-replicas {replicas} --cluster-yes",
            ]
        )
        + "\n"
    )


def render_redis_bootstrap_job(
    model: ModelSpec, *, owner: Mapping[str, Any], redis_image: str = DEFAULT_REDIS_IMAGE
) -> Manifest:
    """Forms the Redis Cluster once every node answers; does nothing when it is already formed."""
    spec: dict[str, Any] = {
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
                        "env": [secret_env(model, "REDISCLI_AUTH")],
                        "resources": {
                            "requests": {"cpu": "50m", "memory": "32Mi"},
                            "limits": {"memory": "128Mi"},
                        },
                        "securityContext": container_security(),
                    }
                ],
                "volumes": [],
                "securityContext": pod_security(REDIS_UID),
            },
        },
    }
    add_scratch_volume(spec["template"]["spec"], "16Mi")
    mount_redis_tls(model, spec["template"]["spec"])
    # the script names every node, so it changes with the shard count: a Job's template is immutable,
    # so the spec's hash is in the name and a change makes a new Job instead of a rejected update
    name = f"{redis_name(model)}-bootstrap-{digest(spec, 8)}"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_metadata(model, name, "redis-bootstrap", owner),
        "spec": spec,
    }


def render_redis(
    model: ModelSpec,
    *,
    owner: Mapping[str, Any],
    redis_password: str | None,
    redis_user_passwords: Mapping[str, str] | None = None,
    redis_image: str = DEFAULT_REDIS_IMAGE,
) -> list[Manifest]:
    """Every Redis child: StatefulSet, headless Service, PDB, the Secret (unless the user names one;
    then ``redis_password`` may be ``None``), with ACL users their passwords' Secret (role → password
    in ``redis_user_passwords``, else derived from ``redis_password``) and, in cluster mode, the
    bootstrap Job."""
    if not uses_redis(model):
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
    if uses_redis_acl(model):
        if redis_user_passwords is None:
            if not redis_password:
                raise ValueError("redis_user_passwords (or redis_password to derive them) is required with ACL users")
            redis_user_passwords = derive_redis_user_passwords(redis_password)
        children.append(render_redis_users_secret(model, owner=owner, passwords=redis_user_passwords))
    if model.volatile_store.redis.cluster:
        children.append(render_redis_bootstrap_job(model, owner=owner, redis_image=redis_image))
    return children


def redis_args(model: ModelSpec, role: str) -> list[str]:
    """How a process of ``role`` (``agent``, ``loader``) reaches the model's Redis: the addresses, its
    ACL user and Redis's CA; the password is in :data:`REDIS_PASSWORD_ENV` (:func:`redis_password_env`)."""
    if not uses_redis(model):
        return []
    args = ["--redis", ",".join(redis_addresses(model))]
    if model.volatile_store.redis.cluster:
        args.append("--redis-cluster")
    return [*args, "--redis-password-env", REDIS_PASSWORD_ENV, *redis_role_args(model, role)]


def redis_password_env(model: ModelSpec, role: str) -> dict[str, Any]:
    """:data:`REDIS_PASSWORD_ENV` of a ``role`` process: its ACL user's password, or the model's one."""
    if uses_redis_acl(model):
        return role_password_env(model, REDIS_PASSWORD_ENV, role)
    return secret_env(model, REDIS_PASSWORD_ENV)
