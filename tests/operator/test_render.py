"""The pure renderers: whole-manifest comparisons for the agent StatefulSet and the plan ConfigMap,
every child valid against the official Kubernetes schemas for many specs, stable output, and the
behaviour a user relies on (scaling restarts nothing, a new plan restarts only the partitions it
touches, make-before-break keeps old shards served until routing has switched). The Redis
configuration the StatefulSet generates is run on a real redis-server (master + replica, AUTH)."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import redis
import yaml
from hps_operator.cli import build_parser
from hps_operator.cli import main as hps_main
from hps_operator.core.planner import plan_placement
from hps_operator.core.render import (
    MODEL_KEY,
    PLAN_KEY,
    ROUTING_KEY,
    agent_set_hash,
    model_manifest,
    partition_plan,
    partition_plan_key,
    render_agent_config,
    render_agent_statefulset,
    render_children,
    render_loader_job,
    render_plan_configmap,
    sources_in_pods,
)
from hps_operator.core.render.security import REDIS_TLS_DIR
from hps_operator.core.topology import Topology
from redis.backoff import NoBackoff
from redis.retry import Retry

from node_agent.errors import InvalidSpecError
from node_agent.local.certificates import ensure_local_certificates
from node_agent.local.redis_servers import free_port, redis_server_binary
from node_agent.plan import Assignment, Plan, PlanMetrics
from node_agent.redis_access import RedisAccess, RedisTLS
from node_agent.spec import ModelSpec, PersistentVolumeClaimSource, load_model_file, parse_model
from node_agent.tiers import TableLayout, open_tiers

KUBERNETES_VERSION = "1.35"
ROOT = Path(__file__).resolve().parents[2]
OWNER = {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": "dlrm", "uid": "0f1e-uid"}
IMAGE = "ghcr.io/hps/agent:0.1"
LABELS = {
    "app.kubernetes.io/name": "hps",
    "app.kubernetes.io/instance": "dlrm",
    "app.kubernetes.io/managed-by": "hps-operator",
    "app.kubernetes.io/part-of": "hps",
}
OWNER_REFS = [{**OWNER, "controller": True, "blockOwnerDeletion": True}]
AGENT: dict[str, Any] = {
    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
    "nodeSelector": {"gpu": "a100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
KNOBS: dict[str, Any] = {
    "priorityClassName": "gpu-inference",
    "imagePullSecrets": [{"name": "regcred"}],
    "podLabels": {"team": "recsys"},
    "podAnnotations": {"sidecar.istio.io/inject": "false"},
}


def model(**spec: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "tables": [
            {"name": "user-id", "rows": 1000, "dim": 16},
            {"name": "item-id", "rows": 3000, "dim": 8, "dtype": "float16", "source": "file:///models/item-id"},
        ],
        "replicas": 2,
        "gpusPerPod": 2,
        "partitions": 2,
        "volatileStore": {"redis": {"shards": 2, "replicasPerShard": 1, "memory": "2Gi"}},
        "persistentStore": {"storage": "20Gi", "storageClassName": "fast-ssd"},
        "agent": AGENT,
    }
    base.update(spec)
    return parse_model({"metadata": {"name": "dlrm", "namespace": "recsys"}, "spec": base})


def plan(version: int = 3, *, partitions: int = 2, gpus: int = 2, buckets: int = 4,
         layout: tuple[tuple[str, int, int, int, int], ...] = (("user-id", 0, 0, 0, 4), ("item-id", 1, 1, 0, 4)),
         ) -> Plan:  # fmt: skip
    """A hand-written plan: ``layout`` is (table, partition, gpu, lo, hi)."""
    assignments = tuple(sorted(Assignment(t, p, g, (lo, hi), 1000 * (hi - lo)) for t, p, g, lo, hi in layout))
    return Plan(version, buckets, partitions, gpus, "table", assignments, PlanMetrics(1.2, 1.1, 112000, 0, 0), "dlrm")


def by_name(manifests: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


# ---------------------------------------------------------------------------------------------
# whole manifests


def agent_sets(children: dict[tuple[str, str], dict[str, Any]], partition: int) -> list[dict[str, Any]]:
    """The agent StatefulSets of a partition (one per agent set), by name."""
    return sorted((m for (kind, _), m in children.items() if kind == "StatefulSet"
                   and m["metadata"]["labels"].get("hps.dev/partition") == str(partition)),
                  key=lambda m: m["metadata"]["name"])  # fmt: skip


def agent_set(children: dict[tuple[str, str], dict[str, Any]], partition: int) -> dict[str, Any]:
    (only,) = agent_sets(children, partition)
    return only


def test_agent_statefulset_whole() -> None:
    sts = render_agent_statefulset(model(), plan(), 1, owner=OWNER, image=IMAGE)
    health = {"path": "/healthz", "port": "metrics"}
    h = agent_set_hash(plan(), 1)
    set_labels = {"hps.dev/partition": "1", "hps.dev/agent-set": h}
    assert sts == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": f"dlrm-p1-{h[:5]}",
            "namespace": "recsys",
            "labels": {**LABELS, "app.kubernetes.io/component": "agent", **set_labels},
            "ownerReferences": OWNER_REFS,
            "annotations": {"hps.dev/plan-version": "3"},
        },
        "spec": {
            "serviceName": "dlrm-agent-p1",
            "replicas": 2,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": {"app.kubernetes.io/instance": "dlrm",
                                         "app.kubernetes.io/component": "agent", **set_labels}},
            "template": {
                "metadata": {
                    "labels": {**LABELS, "app.kubernetes.io/component": "agent", **set_labels},
                    "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                                    "karpenter.sh/do-not-disrupt": "true", "hps.dev/partition-plan": h,
                                    "hps.dev/model-hash": "9e00d04335304e34",
                                    "prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "containers": [{
                        "name": "agent",
                        "image": IMAGE,
                        "command": ["hps"],
                        "args": [
                            "agent", "-f", "/etc/hps/model.yaml", "--plan", f"/etc/hps/p1-{h}.json",
                            "--partition", "1", "--host", "0.0.0.0", "--port", "50051",
                            "--agent-id", "$(POD_NAME)", "--metrics-port", "9464", "--drain-seconds", "15",
                            "--redis", "dlrm-redis-0.dlrm-redis.recsys.svc:6379,dlrm-redis-2.dlrm-redis.recsys.svc:6379",
                            "--redis-password-env", "REDIS_PASSWORD", "--redis-user", "hps-agent",
                            "--rocksdb", "/var/lib/hps/rocksdb", "--load",
                        ],
                        "env": [
                            {"name": "CUPY_CACHE_DIR", "value": "/tmp/cupy"},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "REDIS_PASSWORD",
                             "valueFrom": {"secretKeyRef": {"name": "dlrm-redis-users", "key": "agent"}}},
                        ],
                        "ports": [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}],
                        "resources": {"limits": {"nvidia.com/gpu": "2"},
                                      "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}},
                        "startupProbe": {"httpGet": health, "periodSeconds": 10, "failureThreshold": 360},
                        "readinessProbe": {"httpGet": health, "periodSeconds": 5, "timeoutSeconds": 3,
                                           "failureThreshold": 2},
                        "livenessProbe": {"httpGet": health, "periodSeconds": 10, "timeoutSeconds": 5,
                                          "failureThreshold": 6},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/hps", "readOnly": True},
                                         {"name": "tmp", "mountPath": "/tmp"},
                                         {"name": "data", "mountPath": "/var/lib/hps"}],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True, "runAsNonRoot": True},
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "dlrm-config"}},
                                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                        "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "serviceAccountName": "dlrm-agent",
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30,
                    "nodeSelector": {"gpu": "a100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}},
                         "storageClassName": "fast-ssd"},
            }],
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
        },
    }  # fmt: skip


def test_plan_and_config_configmaps_whole() -> None:
    the_plan = plan()
    cm = render_plan_configmap(model(), the_plan, owner=OWNER)
    config = render_agent_config(model(), [the_plan], owner=OWNER)
    expected_model = {
        "apiVersion": "hps.dev/v1alpha1",
        "kind": "EmbeddingModel",
        "metadata": {"name": "dlrm", "namespace": "recsys"},
        "spec": {
            "tables": [
                {"name": "user-id", "rows": 1000, "dim": 16, "dtype": "float32", "defaultValue": 0.0},
                {"name": "item-id", "rows": 3000, "dim": 8, "dtype": "float16", "defaultValue": 0.0,
                 "source": "file:///models/item-id"},
            ],
            "replicas": 2, "gpusPerPod": 2, "partitions": 2,
            "cache": {"memoryPerGPU": "16Gi", "policy": "lru", "hitRateThreshold": 0.9, "associativity": 32},
            "volatileStore": {"type": "redis",
                              "redis": {"shards": 2, "replicasPerShard": 1, "memory": "2Gi", "cluster": False,
                                        "persistence": {"type": "aof", "appendfsync": "everysec"}}},
            "persistentStore": {"type": "rocksdb", "storage": "20Gi", "readOnly": False,
                                "storageClassName": "fast-ssd"},
            "placement": {"strategy": "auto", "maxImbalance": 1.05, "bucketCount": 0},
            "updates": {"enabled": True},
            "agent": {
                "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
                "nodeSelector": {"gpu": "a100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {}, "gpuResourceName": "nvidia.com/gpu", "maxBatchKeys": 1048576, "port": 50051,
            },
        },
    }
    plan_json = json.dumps({
        "format": "hps.dev/plan/v2", "model": "dlrm", "version": 3, "strategy": "table", "bucketCount": 4,
        "partitions": 2, "gpusPerPod": 2,
        # a slot is partition x gpusPerPod + gpu; the bytes are listed where no table shape says them
        "tables": {"item-id": {"slots": [3], "bytes": [4000]}, "user-id": {"slots": [0], "bytes": [4000]}},
        "metrics": {"imbalance": 1.2, "memoryImbalance": 1.1, "totalBytes": 112000, "movedBytes": 0,
                    "movementLowerBound": 0},
    }, sort_keys=True, separators=(",", ":"))
    assert cm == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dlrm-plan",
            "namespace": "recsys",
            "labels": {**LABELS, "app.kubernetes.io/component": "plan",
                       "hps.dev/plan-version": "3", "hps.dev/routing-version": "3"},
            "ownerReferences": OWNER_REFS,
        },
        "data": {"plan.json": plan_json, "routing.json": plan_json},
    }  # fmt: skip
    assert config == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dlrm-config",
            "namespace": "recsys",
            "labels": {**LABELS, "app.kubernetes.io/component": "config", "hps.dev/plan-version": "3"},
            "ownerReferences": OWNER_REFS,
        },
        "data": {
            "model.yaml": yaml.safe_dump(expected_model, sort_keys=True),
            # each partition's agents read their share alone
            partition_plan_key(the_plan, 0): partition_plan(the_plan, 0).to_json(),
            partition_plan_key(the_plan, 1): partition_plan(the_plan, 1).to_json(),
        },
    }  # fmt: skip
    share = Plan.from_json(config["data"][partition_plan_key(the_plan, 0)])
    assert (share.version, share.partitions, share.bucket_count) == (3, 2, 4)
    assert [a.table for a in share.assignments] == ["user-id"]


@pytest.mark.parametrize("source", ["/models/" + "/".join(["a-long-path-segment"] * 8), "/models/é ü 中文/t",
                                    "/m/it's: \"quoted\" # not a comment", "/m/yes", "/m/ leading", "/m/a\tb"])
def test_the_model_file_is_the_text_safe_dump_writes(source: str) -> None:
    """It is written with libyaml's emitter (a large model's file is most of a reconcile's work):
    the text must be what PyYAML's own emitter writes, or every agent would restart on upgrade."""
    spec = model(tables=[{"name": "t", "rows": 10, "dim": 4, "source": source}])
    text = render_agent_config(spec, [plan_placement(spec, Topology.from_model(spec))], owner=OWNER)["data"]["model.yaml"]
    assert text == yaml.safe_dump(yaml.safe_load(text), sort_keys=True)
    assert yaml.safe_load(text)["spec"]["tables"][0]["source"] == source


# ---------------------------------------------------------------------------------------------
# every child is a valid Kubernetes object


SECURITY: dict[str, Any] = {
    "tls": {"secretName": "dlrm-tls", "mutual": True},
    "auth": {"writers": ["system:serviceaccount:ml:trainer"], "readers": ["group:recsys"], "restrictReads": True,
             "audiences": ["hps"]},
    "redis": {"tlsSecretName": "dlrm-redis-tls"},
    "reflection": True,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-redis": {"volatileStore": {"redis": {"shards": 3, "replicasPerShard": 1, "cluster": True}}},
    "partitions-3": {"partitions": 3},
    "autoscaling": {"autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetQPSPerReplica": 5000}},
    "scheduling": {"agent": {
        "image": "example.com/agent:custom", "gpuResourceName": "nvidia.com/mig-1g.10gb",
        "resources": {"limits": {"memory": "16Gi"}, "requests": {"cpu": "500m", "memory": "16Gi"}},
        "nodeSelector": {"nvidia.com/gpu.product": "A100", "pool": "gpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "hps", "effect": "NoExecute",
                         "tolerationSeconds": 60}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "dlrm"}}}}]}},
        "port": 9000}},
    "hashmap-no-rocksdb": {"volatileStore": {"type": "hashmap"}, "persistentStore": {"type": "none"}},
    "read-only-rocksdb": {"persistentStore": {"readOnly": True, "storage": "1Ti"}},
    "user-secret": {"volatileStore": {"redis": {"passwordSecret": "my-redis-auth"}}},
    "security": {"security": SECURITY, "volatileStore": {"redis": {"shards": 3, "replicasPerShard": 1, "cluster": True}}},
    "cert-manager": {"security": {"tls": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}},
                     "autoscaling": {"partitions": {"min": 1, "max": 4}}},
    "no-redis-acl": {"security": {"redis": {"acl": False}}},
    "scaled-to-zero": {"replicas": 0},
    "model-store-pvc": {"modelStore": {"persistentVolumeClaim": {"claimName": "models"}}},
    "model-store-nfs": {"modelStore": {"nfs": {"server": "10.0.0.2", "path": "/exports/models"},
                                       "mountPath": "/mnt/models"},
                        "tables": [{"name": "user-id", "rows": 1000, "dim": 16, "source": "dlrm/user-id"},
                                   {"name": "item-id", "rows": 3000, "dim": 8, "source": "/mnt/models/item-id"}],
                        "volatileStore": {"type": "hashmap"}},
    "model-store-hostpath": {
        "modelStore": {"hostPath": {"path": "/data/models", "type": ""}},
        "agent": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
            "nodeSelector": {"pool": "gpu"}}},
    "pod-knobs": {"agent": {"priorityClassName": "gpu-inference", "imagePullSecrets": [{"name": "regcred"}],
                            "podLabels": {"team": "recsys"}, "podAnnotations": {"sidecar.istio.io/inject": "false"}}},
}  # fmt: skip


def _partition_plan(partitions: int) -> Plan:
    layout = tuple(("user-id" if p % 2 == 0 else "item-id", p, 0, 0, 4) for p in range(partitions))
    return plan(partitions=partitions, layout=layout)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_child_is_a_valid_kubernetes_object(variant: str) -> None:
    spec = model(**VARIANTS[variant])
    the_plan = _partition_plan(spec.partitions)
    for manifest in render_children(spec, the_plan, owner=OWNER, image=IMAGE, redis_password="s3cret"):
        if manifest["kind"] == "Certificate":  # cert-manager's kind: test_agent_tls_from_cert_manager
            continue
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_hps_command_line_is_one_the_cli_accepts(variant: str) -> None:
    """The renderer and the ``hps`` CLI agree: each agent and loader container's args parse with the
    real argument parser (what the pod would run), and the parsed values are the spec's."""
    spec = model(**VARIANTS[variant])
    the_plan = _partition_plan(spec.partitions)
    containers = [c for m in render_children(spec, the_plan, owner=OWNER, image=IMAGE, redis_password="pw")
                  if m["kind"] in ("StatefulSet", "Job")
                  for c in m["spec"]["template"]["spec"]["containers"] if c.get("command") == ["hps"]]  # fmt: skip
    assert {c["args"][0] for c in containers} >= {"agent"}
    for container in containers:
        args = build_parser().parse_args([a.replace("$(POD_NAME)", "dlrm-agent-p0-0") for a in container["args"]])
        if args.command == "agent":
            assert args.port == spec.agent.port and args.metrics_port == spec.agent.metrics_port
            assert args.partition in range(the_plan.partitions)


def test_security_reaches_the_agent_pods() -> None:
    """spec.security as the agents run it: TLS from the user's Secret (mutual: the client CA), callers'
    tokens checked with TokenReview by the agents' own ServiceAccount (bound to
    system:auth-delegator, its token mounted), reflection on, and Redis over TLS for every client."""
    children = by_name(render_children(model(security=SECURITY), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    pod = agent_set(children, 0)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--tls-cert") + 1] == "/var/run/hps/tls/tls.crt"
    assert args[args.index("--tls-key") + 1] == "/var/run/hps/tls/tls.key"
    assert args[args.index("--tls-client-ca") + 1] == "/var/run/hps/tls/ca.crt"
    assert "--auth-tokenreview" in args and "--reflection" in args and "--auth-reads" in args
    assert args[args.index("--auth-writers") + 1] == "system:serviceaccount:ml:trainer"
    assert args[args.index("--auth-readers") + 1] == "group:recsys"
    assert args[args.index("--auth-audience") + 1] == "hps"
    assert args[args.index("--redis-tls-ca") + 1] == "/var/run/hps/redis-tls/ca.crt"
    assert {"name": "tls", "secret": {"secretName": "dlrm-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert {"name": "tls", "mountPath": "/var/run/hps/tls", "readOnly": True} in container["volumeMounts"]
    assert pod["serviceAccountName"] == "dlrm-agent" and pod["automountServiceAccountToken"] is True
    assert children[("ServiceAccount", "dlrm-agent")]["automountServiceAccountToken"] is True
    binding = children[("ClusterRoleBinding", "hps-operator:recsys:dlrm:tokenreview")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "system:auth-delegator"}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dlrm-agent", "namespace": "recsys"}]
    # cluster-scoped: no namespace, no owner reference, its model named by labels
    assert "namespace" not in binding["metadata"] and "ownerReferences" not in binding["metadata"]
    assert binding["metadata"]["labels"]["hps.dev/owner-uid"] == OWNER["uid"]
    assert binding["metadata"]["labels"]["hps.dev/owner-namespace"] == "recsys"
    # the probes do not speak gRPC (the port is TLS): the metrics port's /healthz
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # the loader and Redis mount Redis's certificate too; Redis serves TLS only
    (job,) = [m for (kind, _), m in children.items() if kind == "Job"]
    assert {"name": "redis-tls", "mountPath": "/var/run/hps/redis-tls", "readOnly": True} in \
        job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]  # fmt: skip
    redis_container = children[("StatefulSet", "dlrm-redis")]["spec"]["template"]["spec"]["containers"][0]
    assert "--tls --cacert /var/run/hps/redis-tls/ca.crt" in redis_container["readinessProbe"]["exec"]["command"][2]
    assert "echo 'port 0'" in redis_container["command"][2] and "tls-port 6379" in redis_container["command"][2]

    # by default: no TLS, no token, nobody may write, no binding; the agents still have their own account
    plain = by_name(render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    pod = agent_set(plain, 0)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "dlrm-agent"
    assert not [a for a in pod["containers"][0]["args"] if a.startswith(("--tls", "--auth", "--reflection"))]
    assert not [k for k in plain if k[0] in ("ClusterRoleBinding", "Certificate")]


def test_agent_tls_from_cert_manager() -> None:
    """With an issuer, a cert-manager Certificate names every Service a client may use (each partition's up
    to the autoscaler's maximum), and the agents serve the Secret it fills."""
    spec = model(security={"tls": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}},
                 autoscaling={"partitions": {"min": 1, "max": 3}})  # fmt: skip
    children = by_name(render_children(spec, plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    certificate = children[("Certificate", "dlrm-agent-tls")]
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["metadata"]["ownerReferences"] == OWNER_REFS
    assert certificate["spec"]["secretName"] == "dlrm-agent-tls"
    assert certificate["spec"]["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "ca"}
    names = certificate["spec"]["dnsNames"]
    for service in ("dlrm-agent", "dlrm-agent-p0", "dlrm-agent-p1", "dlrm-agent-p2"):
        assert {service, f"{service}.recsys", f"{service}.recsys.svc", f"{service}.recsys.svc.cluster.local"} <= set(names)
    assert "dlrm-agent-p3" not in names
    pod = agent_set(children, 0)["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "dlrm-agent-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert "--tls-client-ca" not in pod["containers"][0]["args"]


def test_a_model_store_cannot_cover_the_certificates() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        render_children(model(modelStore={"persistentVolumeClaim": {"claimName": "m"}, "mountPath": "/var/run"},
                              tables=[{"name": "t", "rows": 10, "dim": 4}]),
                        plan(), owner=OWNER, image=IMAGE, redis_password="pw")  # fmt: skip
    assert caught.value.field == "spec.modelStore.mountPath" and "/var/run/hps" in str(caught.value)


def test_children_during_a_rollout_are_valid_too() -> None:
    active, target = _partition_plan(3), _partition_plan(2)
    target = Plan(4, target.bucket_count, 2, 2, "table", target.assignments, target.metrics, "dlrm")
    for phase in ("Warming", "Switching", "Draining"):
        for manifest in render_children(model(), target, owner=OWNER, image=IMAGE, redis_password="pw",
                                        active_plan=active, phase=phase):  # fmt: skip
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# what a user relies on


def test_render_is_sorted_stable_and_owned() -> None:
    first = render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw")
    again = render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw")
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    keys = [(m["kind"], m["metadata"]["name"]) for m in first]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert keys == [
        ("ConfigMap", "dlrm-config"),
        ("ConfigMap", "dlrm-plan"),
        ("Job", keys[2][1]),
        ("NetworkPolicy", "dlrm-agents"),
        ("NetworkPolicy", "dlrm-redis"),
        ("PodDisruptionBudget", "dlrm-agent-p0"),
        ("PodDisruptionBudget", "dlrm-agent-p1"),
        ("PodDisruptionBudget", "dlrm-redis"),
        ("Secret", "dlrm-redis"),
        ("Secret", "dlrm-redis-users"),
        ("Service", "dlrm-agent"),
        ("Service", "dlrm-agent-p0"),
        ("Service", "dlrm-agent-p1"),
        ("Service", "dlrm-redis"),
        ("ServiceAccount", "dlrm-agent"),
        ("StatefulSet", f"dlrm-p0-{agent_set_hash(plan(), 0)[:5]}"),
        ("StatefulSet", f"dlrm-p1-{agent_set_hash(plan(), 1)[:5]}"),
        ("StatefulSet", "dlrm-redis"),
    ]
    assert keys[2][1].startswith("dlrm-load-")
    for m in first:
        meta = m["metadata"]
        assert meta["namespace"] == "recsys"
        assert meta["ownerReferences"] == OWNER_REFS
        assert LABELS.items() <= meta["labels"].items()
        assert meta["labels"]["app.kubernetes.io/component"] in ("agent", "redis", "loader", "plan", "config")


def test_scaling_replicas_restarts_nothing() -> None:
    before = by_name(render_children(model(replicas=2), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    after = by_name(render_children(model(replicas=5), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    assert before.keys() == after.keys()
    changed = {key for key in before if before[key] != after[key]}
    # the agent StatefulSets' replica counts, and the model file in the ConfigMap
    sets = {("StatefulSet", agent_set(before, p)["metadata"]["name"]) for p in (0, 1)}
    assert changed == sets | {("ConfigMap", "dlrm-config")}
    for p in (0, 1):
        old, new = agent_set(before, p), agent_set(after, p)
        assert (old["spec"]["replicas"], new["spec"]["replicas"]) == (2, 5)
        assert old["spec"]["template"] == new["spec"]["template"]


def test_a_new_plan_rolls_only_the_partitions_it_touches() -> None:
    v3 = plan(3, layout=(("user-id", 0, 0, 0, 4), ("item-id", 1, 1, 0, 4)))
    v4 = plan(4, layout=(("user-id", 0, 0, 0, 4), ("item-id", 1, 0, 0, 4)))  # item-id moves GPU in p1
    before = by_name(render_children(model(), v3, owner=OWNER, image=IMAGE, redis_password="pw"))
    after = by_name(render_children(model(), v4, owner=OWNER, image=IMAGE, redis_password="pw"))
    # partition 0's share is the same: the same agent set, its pods untouched (only the StatefulSet's
    # plan-version annotation moves); partition 1 gets a new set
    assert agent_set(before, 0)["metadata"]["name"] == agent_set(after, 0)["metadata"]["name"]
    assert agent_set(before, 0)["spec"] == agent_set(after, 0)["spec"]
    assert agent_set(before, 1)["metadata"]["name"] != agent_set(after, 1)["metadata"]["name"]


def test_make_before_break_keeps_the_old_agent_sets_until_routing_has_switched() -> None:
    """A partition whose share changes gets new pods beside the old ones: while Warming and
    Switching both agent sets run (each reading its own share), clients route by the active plan
    until Switching, and the old sets go at Draining. Partition 2, gone from the target, keeps its
    Service and pods until then too."""
    active = plan(3, partitions=3, layout=(("user-id", 0, 0, 0, 4), ("item-id", 2, 1, 0, 4)))
    target = plan(4, partitions=2, layout=(("user-id", 0, 0, 0, 4), ("item-id", 1, 1, 0, 4)))

    def render(phase: str) -> dict[tuple[str, str], dict[str, Any]]:
        return by_name(render_children(model(), target, owner=OWNER, image=IMAGE, redis_password="pw",
                                       active_plan=active, phase=phase))  # fmt: skip

    def routing(children: dict[tuple[str, str], dict[str, Any]]) -> int:
        return Plan.from_json(children[("ConfigMap", "dlrm-plan")]["data"][ROUTING_KEY]).version

    warming, switching, draining = render("Warming"), render("Switching"), render("Draining")
    assert Plan.from_json(warming[("ConfigMap", "dlrm-plan")]["data"][PLAN_KEY]) == target
    assert (routing(warming), routing(switching), routing(draining)) == (3, 4, 4)
    # partition 0's share did not change: one agent set, the same in every phase
    assert len(agent_sets(warming, 0)) == 1 and agent_set(warming, 0) == agent_set(draining, 0)
    # partition 1 owned nothing and now owns item-id: its new set beside the old; partition 2 (gone
    # from the target) keeps its old set
    assert sorted(m["metadata"]["annotations"]["hps.dev/plan-version"] for m in agent_sets(warming, 1)) == ["3", "4"]
    assert [m["metadata"]["annotations"]["hps.dev/plan-version"] for m in agent_sets(warming, 2)] == ["3"]
    assert ("Service", "dlrm-agent-p2") in warming and ("PodDisruptionBudget", "dlrm-agent-p2") in warming
    config = warming[("ConfigMap", "dlrm-config")]["data"]
    for p in (0, 1, 2):
        for sts in agent_sets(warming, p):
            key = sts["spec"]["template"]["spec"]["containers"][0]["args"][4].removeprefix("/etc/hps/")
            assert key in config  # every set finds its share in the config ConfigMap
    assert switching == {**warming, ("ConfigMap", "dlrm-plan"): switching[("ConfigMap", "dlrm-plan")]}
    assert agent_sets(draining, 2) == [] and ("Service", "dlrm-agent-p2") not in draining
    assert draining == by_name(render_children(model(), target, owner=OWNER, image=IMAGE, redis_password="pw"))


def test_a_partition_whose_share_changes_runs_both_agent_sets_during_the_rollout() -> None:
    """gpusPerPod 4 -> 8 with one replica: every partition's share changes, so every partition has
    its old set (still serving) and its new set while the new pods load."""
    active = plan(3, gpus=4, layout=(("user-id", 0, 0, 0, 4), ("item-id", 1, 3, 0, 4)))
    target = plan(4, gpus=8, layout=(("user-id", 0, 0, 0, 4), ("item-id", 1, 7, 0, 4)))
    warming = by_name(render_children(model(replicas=1), target, owner=OWNER, image=IMAGE, redis_password="pw",
                                      active_plan=active, phase="Warming"))  # fmt: skip
    for p in (0, 1):
        sets = agent_sets(warming, p)
        assert len(sets) == 2 and sets[0]["spec"]["selector"] != sets[1]["spec"]["selector"]
        assert {m["spec"]["replicas"] for m in sets} == {1}
        assert sorted(m["metadata"]["annotations"]["hps.dev/plan-version"] for m in sets) == ["3", "4"]
        gpus = {m["metadata"]["annotations"]["hps.dev/plan-version"]:
                m["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for m in sets}
        assert gpus == {"3": "4", "4": "8"}
    # the old sets are exactly what was running before the change: nothing of theirs is updated
    before = by_name(render_children(model(replicas=1, gpusPerPod=4), active, owner=OWNER, image=IMAGE,
                                     redis_password="pw"))  # fmt: skip
    for p in (0, 1):
        old = next(m for m in agent_sets(warming, p) if m["metadata"]["annotations"]["hps.dev/plan-version"] == "3")
        assert old["spec"] == agent_set(before, p)["spec"]


def test_model_file_round_trips_through_the_spec_parser() -> None:
    """The pods' model file parses back to the spec, but for sources, which it spells as the absolute
    paths the pods read (unchanged without a model store)."""
    specs = [model(**v) for v in VARIANTS.values()]
    specs += [load_model_file(ROOT / "examples" / name) for name in ("demo.yaml", "criteo.yaml")]
    specs.append(model(tables=[{"name": "t", "rows": 1, "dim": 1, "source": "dlrm/t"}],
                       modelStore={"hostPath": {"path": "/m"}}))  # fmt: skip
    for spec in specs:
        cm = render_agent_config(spec, [_partition_plan(2)], owner=OWNER)
        in_pods = parse_model(yaml.safe_load(cm["data"][MODEL_KEY]))
        assert in_pods == sources_in_pods(spec)
        assert sources_in_pods(in_pods) == in_pods
        if spec.model_store is None:
            assert in_pods == spec
        assert parse_model(model_manifest(spec)) == spec


def test_agent_and_loader_commands_follow_the_tiers() -> None:
    def agent_args(**spec: Any) -> list[str]:
        children = by_name(render_children(model(**spec), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
        return agent_set(children, 0)["spec"]["template"]["spec"]["containers"][0]["args"]

    cluster = agent_args(volatileStore={"redis": {"shards": 3, "replicasPerShard": 1, "cluster": True}})
    hosts = cluster[cluster.index("--redis") + 1].split(",")
    assert hosts == [f"dlrm-redis-{k}.dlrm-redis.recsys.svc:6379" for k in range(6)]  # every node seeds
    assert "--redis-cluster" in cluster

    hashmap = agent_args(volatileStore={"type": "hashmap"}, persistentStore={"type": "none"})
    assert "--redis" not in hashmap and "--rocksdb" not in hashmap and "--load" in hashmap

    read_only = agent_args(persistentStore={"readOnly": True})
    assert read_only[-2:] == ["/var/lib/hps/rocksdb", "--rocksdb-read-only"] and "--load" not in read_only

    children = by_name(render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    (loader,) = [m for key, m in children.items() if key[0] == "Job"]
    container = loader["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "load", "-f", "/etc/hps/model.yaml",
        "--redis", "dlrm-redis-0.dlrm-redis.recsys.svc:6379,dlrm-redis-2.dlrm-redis.recsys.svc:6379",
        "--redis-password-env", "REDIS_PASSWORD", "--redis-user", "hps-loader", "--no-progress",
    ]  # fmt: skip
    # a changed table is a new loader Job (a Job's pod template cannot change)
    other = by_name(render_children(model(tables=[{"name": "user-id", "rows": 2000, "dim": 16}]), plan(),
                                    owner=OWNER, image=IMAGE, redis_password="pw"))  # fmt: skip
    assert {k for k in other if k[0] == "Job"} != {k for k in children if k[0] == "Job"}


def test_redis_children_follow_the_spec() -> None:
    plain = by_name(render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    sts = plain[("StatefulSet", "dlrm-redis")]
    assert sts["spec"]["replicas"] == 4  # 2 shards x (1 master + 1 replica)
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"memory": "2Gi"}
    assert plain[("Secret", "dlrm-redis")]["data"] == {"password": "cHc="}

    cluster = by_name(render_children(model(volatileStore={"redis": {"shards": 3, "replicasPerShard": 1,
                                                                     "cluster": True}}),
                                      plan(), owner=OWNER, image=IMAGE, redis_password="pw"))  # fmt: skip
    (job,) = [m for (kind, name), m in cluster.items() if kind == "Job" and name.startswith("dlrm-redis-bootstrap-")]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "--cluster-replicas 1" in script and "dlrm-redis-5.dlrm-redis.recsys.svc" in script
    assert cluster[("StatefulSet", "dlrm-redis")]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    # the user's password Secret: the operator makes none, and (with ACL users, the default) the
    # processes' role passwords are still the operator's own Secret
    roles = {"agent": "a", "loader": "l", "producer": "p"}
    users = by_name(render_children(model(volatileStore={"redis": {"passwordSecret": "my-auth"}}), plan(),
                                    owner=OWNER, image=IMAGE, redis_password=None, redis_user_passwords=roles))  # fmt: skip
    assert ("Secret", "dlrm-redis") not in users
    assert users[("Secret", "dlrm-redis-users")]["data"] == {"agent": "YQ==", "loader": "bA==", "producer": "cA=="}
    env = agent_set(users, 0)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "dlrm-redis-users", "key": "agent"}}} in env
    redis_env = users[("StatefulSet", "dlrm-redis")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "my-auth", "key": "password"}}} in redis_env
    with pytest.raises(ValueError, match="redis_user_passwords"):
        render_children(model(volatileStore={"redis": {"passwordSecret": "my-auth"}}), plan(), owner=OWNER,
                        image=IMAGE, redis_password=None)  # fmt: skip
    no_acl = by_name(render_children(model(volatileStore={"redis": {"passwordSecret": "my-auth"}},
                                           security={"redis": {"acl": False}}), plan(),
                                     owner=OWNER, image=IMAGE, redis_password=None))  # fmt: skip
    assert ("Secret", "dlrm-redis-users") not in no_acl
    env = agent_set(no_acl, 0)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "my-auth", "key": "password"}}} in env
    assert "--redis-user" not in agent_set(no_acl, 0)["spec"]["template"]["spec"]["containers"][0]["args"]

    none = by_name(render_children(model(volatileStore={"type": "none"}), plan(), owner=OWNER, image=IMAGE,
                                   redis_password=None))  # fmt: skip
    assert not any(k[1].startswith("dlrm-redis") or k[0] == "Job" for k in none)


def test_hpa_scales_the_embedding_model() -> None:
    spec = model(autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetQPSPerReplica": 5000})
    hpa = by_name(render_children(spec, plan(), owner=OWNER, image=IMAGE, redis_password="pw"))[
        ("HorizontalPodAutoscaler", "dlrm")
    ]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": "dlrm"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "5000"}


@pytest.mark.parametrize(
    ("name", "spec", "field"),
    [
        ("a" * 41, {}, "metadata.name"),
        ("9lives", {}, "metadata.name"),
        ("dlrm", {"volatileStore": {"redis": {"shards": 2, "cluster": True}}}, "spec.volatileStore.redis.shards"),
    ],
)
def test_what_kubernetes_cannot_name_is_an_invalid_spec(name: str, spec: dict[str, Any], field: str) -> None:
    raw = {"metadata": {"name": name}, "spec": {"tables": [{"name": "t", "rows": 1, "dim": 1}], **spec}}
    with pytest.raises(InvalidSpecError) as caught:
        render_children(parse_model(raw), plan(), owner=OWNER, image=IMAGE, redis_password="pw")
    assert caught.value.field == field


# ---------------------------------------------------------------------------------------------
# table sources on shared storage, and the pod knobs


def test_model_store_and_pod_knobs_in_the_agent_statefulset() -> None:
    """Against the whole-manifest golden above, a PVC model store and the pod knobs add exactly this;
    the model hash changes too, as the agents read a different model file."""
    base = render_agent_statefulset(model(), plan(), 1, owner=OWNER, image=IMAGE)
    spec = model(modelStore={"persistentVolumeClaim": {"claimName": "models"}}, agent={**AGENT, **KNOBS})
    sts = render_agent_statefulset(spec, plan(), 1, owner=OWNER, image=IMAGE)
    expected = copy.deepcopy(base)
    template = expected["spec"]["template"]
    template["metadata"]["labels"]["team"] = "recsys"
    template["metadata"]["annotations"].update({
        "sidecar.istio.io/inject": "false",
        "hps.dev/model-hash": sts["spec"]["template"]["metadata"]["annotations"]["hps.dev/model-hash"],
    })  # fmt: skip
    pod = template["spec"]
    pod["priorityClassName"] = "gpu-inference"
    pod["imagePullSecrets"] = [{"name": "regcred"}]
    pod["volumes"].append({"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}})
    pod["containers"][0]["volumeMounts"].append({"name": "models", "mountPath": "/models", "readOnly": True})
    assert sts == expected
    assert template["metadata"]["annotations"]["hps.dev/model-hash"] != "6219a5560671158b"
    # the selector still selects the pods
    assert sts["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_loader_job_whole_with_a_host_path_store() -> None:
    """A hostPath exists on the GPU nodes only: the loader goes where the agents go (their node
    selector, tolerations and node affinity, not their pod anti-affinity), mounts it read-only, and
    takes the pod knobs."""
    anti = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "x"}}}}]}
    node = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}
    spec = model(modelStore={"hostPath": {"path": "/data/models"}, "mountPath": "/models"},
                 agent={**AGENT, **KNOBS, "affinity": {"nodeAffinity": node, "podAntiAffinity": anti}})
    job = render_loader_job(spec, owner=OWNER, image=IMAGE)
    assert job == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job["metadata"]["name"],
            "namespace": "recsys",
            "labels": {**LABELS, "app.kubernetes.io/component": "loader"},
            "ownerReferences": OWNER_REFS,
        },
        "spec": {
            "backoffLimit": 10,
            "template": {
                "metadata": {
                    "labels": {**LABELS, "app.kubernetes.io/component": "loader", "team": "recsys"},
                    "annotations": {"sidecar.istio.io/inject": "false"},
                },
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [{
                        "name": "loader",
                        "image": IMAGE,
                        "command": ["hps"],
                        "args": [
                            "load", "-f", "/etc/hps/model.yaml",
                            "--redis", "dlrm-redis-0.dlrm-redis.recsys.svc:6379,dlrm-redis-2.dlrm-redis.recsys.svc:6379",
                            "--redis-password-env", "REDIS_PASSWORD", "--redis-user", "hps-loader", "--no-progress",
                        ],
                        "env": [{"name": "REDIS_PASSWORD",
                                 "valueFrom": {"secretKeyRef": {"name": "dlrm-redis-users", "key": "loader"}}}],
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/hps", "readOnly": True},
                                         {"name": "tmp", "mountPath": "/tmp"},
                                         {"name": "models", "mountPath": "/models", "readOnly": True}],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True, "runAsNonRoot": True},
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "dlrm-config"}},
                                {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                                {"name": "models", "hostPath": {"path": "/data/models", "type": "Directory"}}],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                        "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "priorityClassName": "gpu-inference",
                    "imagePullSecrets": [{"name": "regcred"}],
                    "nodeSelector": {"gpu": "a100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": node},
                },
            },
        },
    }  # fmt: skip
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_the_model_store_is_mounted_only_where_sources_are_read() -> None:
    """Agents that load nothing (Redis filled by the loader, a read-only RocksDB) do without it, so an
    RWO claim or a hostPath on some nodes does not limit where they run."""
    store = {"modelStore": {"persistentVolumeClaim": {"claimName": "models"}}}

    def mounts(children: dict[tuple[str, str], dict[str, Any]]) -> dict[str, bool]:
        return {kind: any(v["name"] == "models" for v in m["spec"]["template"]["spec"].get("volumes", []))
                for (kind, _), m in children.items() if kind in ("StatefulSet", "Job") and "redis" not in _}  # fmt: skip

    def render(**spec: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return by_name(render_children(model(**store, **spec), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))

    assert mounts(render()) == {"StatefulSet": True, "Job": True}  # agents fill their own RocksDB
    assert mounts(render(persistentStore={"readOnly": True})) == {"StatefulSet": False, "Job": True}
    assert mounts(render(volatileStore={"type": "hashmap"})) == {"StatefulSet": True}  # no loader Job
    assert mounts(by_name(render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))) == {
        "StatefulSet": False, "Job": False}  # fmt: skip


def test_loader_job_name_changes_with_what_its_pod_runs_and_loads() -> None:
    """A Job's pod template cannot change, so whatever changes it changes the Job's name (a new Job,
    never an update the API server rejects); what leaves the pod alone keeps the name."""

    def name(**kwargs: Any) -> str:
        policy = kwargs.pop("pull", None)
        return str(render_loader_job(model(**kwargs), owner=OWNER, image=IMAGE, image_pull_policy=policy)
                   ["metadata"]["name"])  # fmt: skip

    assert name().startswith("dlrm-load-") and name() == name()
    claim = {"persistentVolumeClaim": {"claimName": "models"}}
    names = [
        name(),
        name(modelStore=claim),
        name(modelStore={"persistentVolumeClaim": {"claimName": "models", "readOnly": False}}),
        name(modelStore={"persistentVolumeClaim": {"claimName": "models-v2"}}),
        name(modelStore={"hostPath": {"path": "/data/models"}}),
        name(modelStore={"hostPath": {"path": "/data/models"}}, agent={**AGENT, "nodeSelector": {"gpu": "h100"}}),
        *(name(agent={**AGENT, key: value}) for key, value in KNOBS.items()),
        name(pull="Always"),
        name(tables=[{"name": "user-id", "rows": 2000, "dim": 16}]),
        name(volatileStore={"redis": {"shards": 3}}),
    ]
    assert len(set(names)) == len(names)
    # the agents' node selector is none of a PVC-fed loader's business
    assert name(modelStore=claim) == name(modelStore=claim, agent={**AGENT, "nodeSelector": {"gpu": "h100"}})


def test_node_autoscalers_leave_agents_alone_unless_the_model_says_otherwise() -> None:
    def annotations(**agent: Any) -> dict[str, str]:
        children = by_name(render_children(model(agent={**AGENT, **agent}), plan(), owner=OWNER, image=IMAGE,
                                           redis_password="pw"))  # fmt: skip
        return dict(agent_set(children, 0)["spec"]["template"]["metadata"]["annotations"])

    assert annotations()["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations()["karpenter.sh/do-not-disrupt"] == "true"
    assert annotations(podAnnotations={"karpenter.sh/do-not-disrupt": "false"})["karpenter.sh/do-not-disrupt"] == "false"


@pytest.mark.parametrize(
    ("agent", "field"),
    [
        ({"podLabels": {"app.kubernetes.io/instance": "other"}}, "spec.agent.podLabels.app.kubernetes.io/instance"),
        ({"podLabels": {"app.kubernetes.io/component": "x"}}, "spec.agent.podLabels.app.kubernetes.io/component"),
        ({"podLabels": {"hps.dev/partition": "0"}}, "spec.agent.podLabels.hps.dev/partition"),
        ({"podAnnotations": {"hps.dev/model-hash": "0"}}, "spec.agent.podAnnotations.hps.dev/model-hash"),
    ],
)
def test_pod_labels_and_annotations_cannot_replace_the_operators(agent: dict[str, Any], field: str) -> None:
    """The selectors and the restart-on-change hashes rest on them: a user's value is refused, naming it."""
    with pytest.raises(InvalidSpecError) as caught:
        render_children(model(agent=agent), plan(), owner=OWNER, image=IMAGE, redis_password="pw")
    assert caught.value.field == field
    # a label of the same family the operator does not set is the user's to use
    render_children(model(agent={"podLabels": {"app.kubernetes.io/version": "1.2"}}), plan(), owner=OWNER,
                    image=IMAGE, redis_password="pw")  # fmt: skip


@pytest.mark.parametrize("redis_tls", [False, True], ids=["plain", "redis-tls"])
def test_the_loader_pod_loads_into_the_rendered_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      redis_tls: bool) -> None:  # fmt: skip
    """The loader pod and the Redis pod, played on this machine: Redis runs the StatefulSet's own start
    script (ACL users; with ``tlsSecretName`` TLS only, the Secret's files in the mounted folder), and
    the Job's own command line runs the real ``hps load`` as the ``hps-loader`` user with the password
    its env names. The store is a folder at its mountPath, the ConfigMap's model file lies in a folder
    of its own as at /etc/hps, and relative sources are found in the store."""
    store = tmp_path / "store"
    rng = np.random.default_rng(7)
    user = rng.standard_normal((50, 8)).astype(np.float32)
    item_keys = np.arange(1000, 1030, dtype=np.int64)
    item = rng.standard_normal((30, 4)).astype(np.float16)
    (store / "dlrm" / "user-id").mkdir(parents=True)
    (store / "dlrm" / "item-id").mkdir()
    np.save(store / "dlrm" / "user-id" / "vectors.npy", user)
    np.save(store / "dlrm" / "item-id" / "vectors.npy", item)
    np.save(store / "dlrm" / "item-id" / "keys.npy", item_keys)
    security = {"redis": {"tlsSecretName": "storeload-redis-tls"}} if redis_tls else {}
    spec = parse_model({"metadata": {"name": "storeload", "namespace": "recsys"}, "spec": {
        "tables": [{"name": "user-id", "rows": 50, "dim": 8, "source": "dlrm/user-id"},
                   {"name": "item-id", "rows": 30, "dim": 4, "dtype": "float16", "source": "file://dlrm/./item-id"}],
        "volatileStore": {"redis": {"shards": 1, "memory": "64Mi", "persistence": {"type": "none"}}},
        "security": security,
        "modelStore": {"persistentVolumeClaim": {"claimName": "models"}, "mountPath": str(store)}}})  # fmt: skip
    the_plan = plan_placement(spec, Topology.from_model(spec), None)
    rendered = render_children(spec, the_plan, owner=OWNER, image=IMAGE, redis_password="pw")
    children = by_name(rendered)
    (job,) = [m for key, m in children.items() if key[0] == "Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "models", "mountPath": str(store), "readOnly": True} in container["volumeMounts"]

    if redis_tls:  # the Secret cert-manager (or the user) would fill: the server's certificate and its CA
        certs = ensure_local_certificates(tmp_path / "ca")
        (tmp_path / "redis-tls").mkdir()
        for src, dst in ((certs.cert_file, "tls.crt"), (certs.key_file, "tls.key"), (certs.ca_file, "ca.crt")):
            shutil.copy(src, tmp_path / "redis-tls" / dst)
        assert {"name": "redis-tls", "secret": {"secretName": "storeload-redis-tls", "defaultMode": 0o440}} in pod["volumes"]
        assert {"name": "redis-tls", "mountPath": REDIS_TLS_DIR, "readOnly": True} in container["volumeMounts"]
    (script,) = _scripts(rendered)
    env = {"REDIS_PASSWORD": "admin-pw", **_role_passwords(rendered)}
    port = free_port()
    server = _start_redis_pod(_redis_conf(script, hostname="storeload-redis-0", env=env, tmp=tmp_path),
                              tmp=tmp_path, name="redis", port=port)  # fmt: skip
    tls = RedisTLS(ca_file=tmp_path / "redis-tls" / "ca.crt") if redis_tls else None
    admin = RedisAccess(password="admin-pw", tls=tls)
    try:
        _wait(lambda: redis.Redis(port=port, socket_timeout=2, **admin.client_options()).ping())
        etc = tmp_path / "etc-hps"
        etc.mkdir()
        (etc / "model.yaml").write_text(children[("ConfigMap", "storeload-config")]["data"][MODEL_KEY])
        args = [a.replace(REDIS_TLS_DIR, str(tmp_path / "redis-tls")) for a in container["args"]]
        args[args.index("-f") + 1] = str(etc / "model.yaml")
        args[args.index("--redis") + 1] = f"127.0.0.1:{port}"
        assert args[args.index("--redis-user") + 1] == "hps-loader"
        assert ("--redis-tls-ca" in args) == redis_tls
        (password_env,) = container["env"]
        assert password_env["valueFrom"]["secretKeyRef"] == {"name": "storeload-redis-users", "key": "loader"}
        monkeypatch.setenv(password_env["name"], env["HPS_LOADER_PASSWORD"])
        assert hps_main(args) == 0

        in_pods = load_model_file(etc / "model.yaml")
        (tier,) = open_tiers([TableLayout.of(t) for t in in_pods.tables], model=in_pods.name,
                             redis_addresses=[f"127.0.0.1:{port}"], redis_access=admin)  # fmt: skip
        values, found = tier.fetch("user-id", np.arange(50, dtype=np.int64))
        assert found.all() and np.array_equal(values, user)
        values, found = tier.fetch("item-id", item_keys)
        assert found.all() and np.array_equal(values, item)
        tier.close()
        if redis_tls:  # and nothing is served in plaintext
            with pytest.raises(redis.ConnectionError):
                redis.Redis(port=port, password="admin-pw", socket_timeout=2, retry=Retry(NoBackoff(), 0)).ping()
    finally:
        _stop([server])


def _scripts(children: list[dict[str, Any]]) -> Iterator[str]:
    for m in children:
        if m["kind"] in ("StatefulSet", "Job"):
            for c in m["spec"]["template"]["spec"]["containers"]:
                if c.get("command", [])[:2] == ["sh", "-c"]:
                    yield c["command"][2]


def test_shell_scripts_parse() -> None:
    spec = model(volatileStore={"redis": {"shards": 3, "replicasPerShard": 1, "cluster": True}})
    scripts = list(_scripts(render_children(spec, plan(), owner=OWNER, image=IMAGE, redis_password="pw")))
    scripts += list(_scripts(render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw")))
    assert len(scripts) == 3
    for script in scripts:
        subprocess.run(["sh", "-n", "-c", script], check=True, timeout=10)


def _role_passwords(children: list[dict[str, Any]]) -> dict[str, str]:
    """The role passwords of the rendered users Secret, as a pod's environment has them."""
    (secret,) = [m for m in children if m["kind"] == "Secret" and m["metadata"]["name"].endswith("-redis-users")]
    return {f"HPS_{role.upper()}_PASSWORD": base64.b64decode(v).decode() for role, v in secret["data"].items()}


def _redis_conf(script: str, *, hostname: str, env: dict[str, str], tmp: Path) -> str:
    """Runs the StatefulSet's start script as a pod would (its /tmp and certificate folder moved under
    ``tmp``), but prints the config instead of starting the server."""
    pod = tmp / hostname
    pod.mkdir(exist_ok=True)
    script = script.replace("conf=/tmp/redis.conf", f"conf={pod / 'redis.conf'}").replace("/tmp/users.acl", str(pod / "users.acl"))
    script = script.replace(REDIS_TLS_DIR, str(tmp / "redis-tls")).replace('exec redis-server "$conf"', 'cat "$conf"')
    out = subprocess.run(["sh", "-c", script], env={"HOSTNAME": hostname, "PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
    return out.stdout


def _start_redis_pod(conf: str, *, tmp: Path, name: str, port: int, master: tuple[str, int] | None = None) -> subprocess.Popen[bytes]:
    """A rendered config on this machine: loopback, a free port, its own data folder (and, for a
    replica, its master's address on this machine)."""
    conf = conf.replace("port 6379", f"port {port}").replace("bind 0.0.0.0", "bind 127.0.0.1")
    (tmp / name).mkdir(exist_ok=True)
    conf = conf.replace("dir /data", f"dir {tmp / name}")
    if master is not None:
        conf = conf.replace(f"{master[0]} 6379", f"127.0.0.1 {master[1]}")
    conf += "repl-diskless-sync-delay 0\n"  # test only: start the first sync at once, not after 5 s
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    return subprocess.Popen([redis_server_binary(), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        p.kill()
        p.wait(timeout=10)


def test_generated_redis_config_runs_a_master_and_its_replica_with_a_user_per_role(tmp_path: Path) -> None:
    """The rendered start script on a real redis-server: AUTH, replication as the default user, and
    each role's ACL user allowed what the role does and refused the rest."""
    spec = model(volatileStore={"redis": {"shards": 2, "replicasPerShard": 1, "memory": "64Mi"}})
    children = render_children(spec, plan(), owner=OWNER, image=IMAGE, redis_password="pw")
    (script,) = [s for s in _scripts(children)]
    env = {"REDIS_PASSWORD": "s3cret", **_role_passwords(children)}
    master_conf = _redis_conf(script, hostname="dlrm-redis-2", env=env, tmp=tmp_path)
    replica_conf = _redis_conf(script, hostname="dlrm-redis-3", env=env, tmp=tmp_path)
    assert "replicaof" not in master_conf
    # pod 3 replicates pod 2, the master of shard 1
    assert "replicaof dlrm-redis-2.dlrm-redis.recsys.svc 6379" in replica_conf
    # the role passwords are in the ACL file only, which only the server's user may read
    assert not any(password in master_conf for name, password in env.items() if name.startswith("HPS_"))
    assert (tmp_path / "dlrm-redis-2" / "users.acl").stat().st_mode & 0o077 == 0

    ports = free_port(), free_port()
    processes = [_start_redis_pod(master_conf, tmp=tmp_path, name="m", port=ports[0])]
    try:
        processes.append(_start_redis_pod(replica_conf, tmp=tmp_path, name="r", port=ports[1],
                                          master=("dlrm-redis-2.dlrm-redis.recsys.svc", ports[0])))  # fmt: skip
        master = redis.Redis(port=ports[0], password="s3cret", socket_timeout=2)
        replica = redis.Redis(port=ports[1], password="s3cret", socket_timeout=2)
        _wait(master.ping)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=ports[0], socket_timeout=2, retry=Retry(NoBackoff(), 0)).get("k")
        # maxmemory a bit below the container's limit, and no silent eviction
        assert master.config_get("maxmemory") == {"maxmemory": str(64 * 2**20 * 85 // 100)}
        assert master.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        master.set("k", b"v")
        assert _wait(lambda: replica.get("k")) == b"v"  # replication authenticated as the default user

        def user(role: str) -> redis.Redis:
            return redis.Redis(port=ports[0], username=f"hps-{role}", password=env[f"HPS_{role.upper()}_PASSWORD"],
                               socket_timeout=2, retry=Retry(NoBackoff(), 0))  # fmt: skip

        rows, stream = "hps:{dlrm:user-id:0}", "hps:{dlrm}:updates"
        user("loader").hset(rows, "1", b"row")
        assert user("agent").hmget(rows, ["1"]) == [b"row"]
        user("producer").xadd(stream, {"k": "v"})
        assert user("agent").xlen(stream) == 1
        refused = [(user("agent"), "FLUSHALL"), (user("agent"), "CONFIG", "GET", "*"),
                   (user("agent"), "HMGET", "hps:{other:user-id:0}", "1"), (user("loader"), "XADD", stream, "*", "k", "v"),
                   (user("loader"), "HMGET", rows, "1"), (user("producer"), "HMGET", rows, "1"),
                   (user("producer"), "HSET", rows, "1", "x")]  # fmt: skip
        for client, *command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=ports[0], username="hps-agent", password="wrong", socket_timeout=2).ping()
    finally:
        _stop(processes)


# ---------------------------------------------------------------------------------------------
# Pod Security "restricted"

#: the volume types the restricted profile admits
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """Why the Pod Security "restricted" profile (v1.35) would refuse a pod with this spec, plus our own
    bar: a read-only root filesystem."""
    found: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        found.append("host namespaces")
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            found.append(f"{c['name']}: capabilities not dropped")
        if set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities added")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            found.append(f"{c['name']}: runAsNonRoot")
        if 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
            found.append(f"{c['name']}: runs as root")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccomp {seccomp}")
        if not sc.get("readOnlyRootFilesystem"):
            found.append(f"{c['name']}: writable root filesystem")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            found.append(f"{c['name']}: hostPort")
    return found


def pod_specs(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"])
            for m in manifests if m["kind"] in ("StatefulSet", "Job")]  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_meets_the_restricted_pod_security_profile(variant: str) -> None:
    """So a namespace labelled pod-security.kubernetes.io/enforce=restricted admits every pod (the e2e
    proves it on the real API server); a hostPath or NFS model store is the documented exception."""
    spec = model(**VARIANTS[variant])
    children = render_children(spec, plan(), owner=OWNER, image=IMAGE, redis_password="pw")
    for name, pod in pod_specs(children):
        problems = restricted_violations(pod)
        store = spec.model_store
        if store is not None and not isinstance(store.volume, PersistentVolumeClaimSource):
            problems = [p for p in problems if not p.startswith("volume models:")]
        assert problems == [], f"{variant}: {name}: {problems}"


def test_redis_keeps_what_it_was_given_unless_told_not_to() -> None:
    """``persistence`` (default AOF, fsync every second) turns Redis's append-only file on and gives
    each Redis pod a volume for it; ``none`` keeps the volatile tier in an emptyDir."""
    def redis_sts(**persistence: Any) -> dict[str, Any]:
        redis = {"shards": 1, "memory": "4Gi", **({"persistence": persistence} if persistence else {})}
        children = by_name(render_children(model(volatileStore={"redis": redis}), plan(), owner=OWNER, image=IMAGE,
                                           redis_password="pw"))  # fmt: skip
        return children[("StatefulSet", "dlrm-redis")]

    default = redis_sts()
    script = default["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "echo 'appendonly yes'" in script and "echo 'appendfsync everysec'" in script
    (claim,) = default["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"  # twice the memory: room for a rewrite
    assert "echo 'appendfsync always'" in redis_sts(type="aof", appendfsync="always")["spec"]["template"]["spec"]["containers"][0]["command"][2]
    cache = redis_sts(type="none")
    assert "echo 'appendonly no'" in cache["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "volumeClaimTemplates" not in cache["spec"]
    assert {"name": "data", "emptyDir": {}} in cache["spec"]["template"]["spec"]["volumes"]


def test_network_policies_let_only_the_models_pods_reach_redis_and_named_peers_reach_the_agents() -> None:
    children = by_name(render_children(model(), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    redis = children[("NetworkPolicy", "dlrm-redis")]["spec"]
    assert redis["podSelector"] == {"matchLabels": {"app.kubernetes.io/instance": "dlrm", "app.kubernetes.io/component": "redis"}}
    (rule,) = redis["ingress"]
    (own,) = rule["from"]
    assert own["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "dlrm"}
    assert own["podSelector"]["matchExpressions"][0]["values"] == ["agent", "loader", "redis", "redis-bootstrap"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    agents = children[("NetworkPolicy", "dlrm-agents")]["spec"]
    grpc, metrics = agents["ingress"]
    assert grpc == {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 50051}]}  # same namespace
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

    ranker = {"namespaceSelector": {"matchLabels": {"team": "ranking"}}, "podSelector": {"matchLabels": {"app": "ranker"}}}
    trainer = {"podSelector": {"matchLabels": {"app": "trainer"}}}
    named = by_name(render_children(model(network={"clients": [ranker], "redisClients": [trainer]}), plan(),
                                    owner=OWNER, image=IMAGE, redis_password="pw"))  # fmt: skip
    assert named[("NetworkPolicy", "dlrm-agents")]["spec"]["ingress"][0]["from"] == [ranker]
    assert named[("NetworkPolicy", "dlrm-redis")]["spec"]["ingress"][0]["from"][1] == trainer
    cluster = by_name(render_children(model(volatileStore={"redis": {"shards": 3, "cluster": True}}), plan(),
                                      owner=OWNER, image=IMAGE, redis_password="pw"))  # fmt: skip
    bus = cluster[("NetworkPolicy", "dlrm-redis")]["spec"]["ingress"][1]
    assert bus["ports"] == [{"protocol": "TCP", "port": 16379}]
    off = by_name(render_children(model(network={"policy": False}), plan(), owner=OWNER, image=IMAGE, redis_password="pw"))
    assert not [k for k in off if k[0] == "NetworkPolicy"]
    for manifest in (*children.values(), *named.values(), *cluster.values()):
        if manifest["kind"] == "NetworkPolicy":
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
