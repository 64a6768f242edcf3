"""NetworkPolicies of a model: who may reach its Redis, its agents' gRPC port and their metrics.

- ``<model>-redis``: only the model's own pods (agents, the loader, the Redis Cluster bootstrap Job,
  and the Redis pods themselves, for replication and the cluster bus) and ``spec.network.redisClients``
  reach Redis. Update producers outside the model go through the agents' authenticated Update RPC, or
  are named in ``redisClients``.
- ``<model>-agents``: the gRPC port is open to ``spec.network.clients`` (default: every pod of the
  model's namespace) and the metrics port to ``spec.network.metricsFrom`` (default: the namespace
  named ``monitoring``); nothing else reaches the agents.

Ingress only: the pods' own connections (to Redis, the API server, DNS) are left to the cluster's
egress rules. Kubernetes always lets the kubelet of a pod's node reach it, so probes keep working.
``spec.network.policy: false`` renders none (for clusters whose CNI does not enforce them, or that
manage policies elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hps_operator.core.render.meta import Manifest, object_metadata, redis_name, selector_labels
from hps_operator.core.render.redis import REDIS_BUS_PORT, REDIS_PORT, uses_redis

from node_agent.spec import ModelSpec

#: the namespace ``metricsFrom`` defaults to
MONITORING_NAMESPACE = "monitoring"
COMPONENT = "app.kubernetes.io/component"
#: the model's pods that talk to its Redis
REDIS_PEERS = ("agent", "loader", "redis", "redis-bootstrap")


def _own_pods(model: ModelSpec, components: Sequence[str]) -> dict[str, Any]:
    return {
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/instance": model.name},
            "matchExpressions": [{"key": COMPONENT, "operator": "In", "values": sorted(components)}],
        }
    }


def _peers(peers: Sequence[Mapping[str, Any]], default: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(p) for p in peers] if peers else default


def render_redis_network_policy(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    ports: list[dict[str, Any]] = [{"protocol": "TCP", "port": REDIS_PORT}]
    ingress: list[dict[str, Any]] = [
        {"from": [_own_pods(model, REDIS_PEERS), *[dict(p) for p in model.network.redis_clients]], "ports": ports}
    ]
    if model.volatile_store.redis.cluster:
        ingress.append({"from": [_own_pods(model, ("redis",))], "ports": [{"protocol": "TCP", "port": REDIS_BUS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(model, redis_name(model), "redis", owner),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(model, "redis")},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def render_agent_network_policy(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest:
    clients = _peers(model.network.clients, [{"podSelector": {}}])  # the model's namespace
    scrapers = _peers(model.network.metrics_from, [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}
    ])  # fmt: skip
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(model, f"{model.name}-agents", "agent", owner),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(model, "agent")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": clients, "ports": [{"protocol": "TCP", "port": model.agent.port}]},
                {"from": scrapers, "ports": [{"protocol": "TCP", "port": model.agent.metrics_port}]},
            ],
        },
    }


def render_network_policies(model: ModelSpec, *, owner: Mapping[str, Any]) -> list[Manifest]:
    if not model.network.policy:
        return []
    policies = [render_agent_network_policy(model, owner=owner)]
    if uses_redis(model):
        policies.append(render_redis_network_policy(model, owner=owner))
    return policies
