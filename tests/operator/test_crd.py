"""The EmbeddingModel CRD: a valid CustomResourceDefinition whose schema mirrors what
``node_agent.spec`` parses (fields, defaults, ranges, enums) and rejects what the spec parser rejects,
with a description on every field for ``kubectl explain``."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from hps_operator.core.render import model_manifest, render_children

from node_agent.errors import InvalidSpecError
from node_agent.plan import Plan, PlanMetrics
from node_agent.spec import (
    ABSOLUTE_PATH_PATTERN,
    CACHE_POLICIES,
    DTYPES,
    HOST_PATH_TYPES,
    LABEL_VALUE_PATTERN,
    PERSISTENT_TYPES,
    PLACEMENT_STRATEGIES,
    SOURCE_PATTERN,
    VOLATILE_TYPES,
    parse_model,
)
from tests.operator.crd_schema import apply_defaults, cel_rules, load_crd, openapi_schema, validation_errors


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "hps.dev/v1alpha1",
        "kind": "EmbeddingModel",
        "metadata": {"name": "dlrm", "namespace": "default"},
        "spec": {"tables": [{"name": "user-id", "rows": 1000, "dim": 16}]},
    }


def _node(path: str) -> dict[str, Any]:
    node = openapi_schema()
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def test_crd_is_a_valid_custom_resource_definition() -> None:
    crd = load_crd()
    kubernetes_validate.validate(crd, "1.35", strict=True)
    assert crd["metadata"]["name"] == "embeddingmodels.hps.dev"
    spec = crd["spec"]
    assert spec["group"] == "hps.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "EmbeddingModel", "listKind": "EmbeddingModelList", "plural": "embeddingmodels",
        "singular": "embeddingmodel", "shortNames": ["em"], "categories": ["hps"],
    }  # fmt: skip
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]


def test_status_and_scale_subresources() -> None:
    (version,) = load_crd()["spec"]["versions"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }


def test_printer_columns() -> None:
    (version,) = load_crd()["spec"]["versions"]
    columns = {c["name"]: (c["jsonPath"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ('.status.conditions[?(@.type=="Ready")].status', 0)
    assert columns["Replicas"] == (".spec.replicas", 0)
    assert columns["GPUs"] == (".spec.gpusPerPod", 0)
    assert columns["Tables"] == (".status.tableCount", 0)
    assert columns["Plan"] == (".status.placement.version", 0)
    assert columns["Age"] == (".metadata.creationTimestamp", 0)
    for wide in ("Partitions", "Imbalance", "Rebalance", "Strategy"):
        assert columns[wide][1] == 1, wide
    # every column reads a field the schema declares (KeyError otherwise)
    for path, _ in columns.values():
        if path.startswith((".spec", ".status")):
            assert _node(path.split("[")[0].strip("."))["description"]


def test_every_field_has_a_description() -> None:
    """``kubectl explain embeddingmodel.spec...`` has something to say everywhere. The root
    ``metadata`` is the one exception: structural schemas may not describe it."""
    missing: list[str] = []

    def visit(node: dict[str, Any], path: str) -> None:
        if path != ".metadata" and not node.get("description"):
            missing.append(path or "<root>")
        for key, sub in (node.get("properties") or {}).items():
            visit(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                visit(node[key], f"{path}.{key}")

    visit(openapi_schema(), "")
    assert missing == []


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string / preserves unknown fields), as the API server
    requires of a v1 CRD."""
    untyped: list[str] = []

    def visit(node: dict[str, Any], path: str) -> None:
        if not (node.get("type") or node.get("x-kubernetes-int-or-string")):
            untyped.append(path)
        for key, sub in (node.get("properties") or {}).items():
            visit(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                visit(node[key], f"{path}.{key}")

    visit(openapi_schema(), "")
    assert untyped == []


def test_every_field_the_spec_parser_reads_is_declared() -> None:
    """``model_manifest`` spells out every field ``parse_model`` reads; each must be in the schema."""
    full = parse_model(
        {**minimal(), "spec": {**minimal()["spec"], "autoscaling": {},
                               "volatileStore": {"redis": {"passwordSecret": "s"}},
                               "persistentStore": {"storageClassName": "fast"},
                               "updates": {"stream": "x"},
                               "modelStore": {"nfs": {"server": "nfs", "path": "/exports"}},
                               "agent": {"image": "img", "priorityClassName": "p",
                                         "imagePullSecrets": [{"name": "regcred"}], "podLabels": {"a": "b"},
                                         "podAnnotations": {"c": "d"}}}}
    )  # fmt: skip
    manifest = model_manifest(full)
    manifest["spec"]["tables"][0].update(source="file:///t", hotness=0.5)
    undeclared: list[str] = []

    def visit(node: dict[str, Any], value: Any, path: str) -> None:
        if isinstance(value, dict) and "additionalProperties" in node:
            return  # a map: any key
        if isinstance(value, dict) and "properties" in node:
            for key, sub in value.items():
                if key not in node["properties"]:
                    undeclared.append(f"{path}.{key}")
                else:
                    visit(node["properties"][key], sub, f"{path}.{key}")
        elif isinstance(value, list) and "items" in node:
            for item in value:
                visit(node["items"], item, f"{path}[]")

    visit(openapi_schema()["properties"]["spec"], manifest["spec"], "spec")
    assert undeclared == []
    assert validation_errors(manifest) == []
    # each model store kind too
    for store in ({"persistentVolumeClaim": {"claimName": "m"}}, {"hostPath": {"path": "/m"}}):
        with_store = model_manifest(parse_model({**minimal(), "spec": {**minimal()["spec"], "modelStore": store}}))
        visit(openapi_schema()["properties"]["spec"], with_store["spec"], "spec")
        assert undeclared == []
        assert validation_errors(with_store) == []


@pytest.mark.parametrize(
    "store",
    [None, {"persistentVolumeClaim": {"claimName": "m"}}, {"nfs": {"server": "s", "path": "/e"}},
     {"hostPath": {"path": "/m"}}],
)  # fmt: skip
def test_schema_defaults_agree_with_the_spec_parser(store: dict[str, Any] | None) -> None:
    """What the API server fills in must be what ``parse_model`` assumes when a field is absent."""
    raw = minimal()
    raw["spec"]["autoscaling"] = {}
    if store is not None:
        raw["spec"]["modelStore"] = store
    assert parse_model(apply_defaults(raw)) == parse_model(raw)


def test_enums_agree_with_the_spec_parser() -> None:
    assert _node("spec.tables.[].dtype")["enum"] == list(DTYPES)
    assert _node("spec.cache.policy")["enum"] == list(CACHE_POLICIES)
    assert _node("spec.volatileStore.type")["enum"] == list(VOLATILE_TYPES)
    assert _node("spec.persistentStore.type")["enum"] == list(PERSISTENT_TYPES)
    assert _node("spec.placement.strategy")["enum"] == list(PLACEMENT_STRATEGIES)
    assert _node("spec.modelStore.hostPath.type")["enum"] == list(HOST_PATH_TYPES)


def test_path_and_label_patterns_agree_with_the_spec_parser() -> None:
    for path in ("spec.modelStore.mountPath", "spec.modelStore.nfs.path", "spec.modelStore.hostPath.path"):
        assert _node(path)["pattern"] == ABSOLUTE_PATH_PATTERN, path
    assert _node("spec.agent.podLabels")["additionalProperties"]["pattern"] == LABEL_VALUE_PATTERN


@pytest.mark.parametrize("source", ["file:///m/t", "file://dlrm/t", "file://localhost/m/t", "/m/t", "dlrm/t",
                                    "/m/a:b/t", "c:/t", "file:", "s3://b/t", "gs://b/t", "file://h/http://x"])
def test_the_source_pattern_takes_exactly_what_the_spec_parser_takes(source: str) -> None:
    assert _node("spec.tables.[].source")["pattern"] == SOURCE_PATTERN
    manifest = minimal()
    manifest["spec"]["tables"][0]["source"] = source
    try:
        parse_model(manifest)
        parsed = True
    except InvalidSpecError as exc:
        assert exc.field == "spec.tables[0].source"
        parsed = False
    assert (validation_errors(manifest) == []) == parsed, source


def test_table_names_are_unique_dns_labels() -> None:
    tables = _node("spec.tables")
    assert tables["x-kubernetes-list-type"] == "map" and tables["x-kubernetes-list-map-keys"] == ["name"]
    assert tables["minItems"] == 1
    name = _node("spec.tables.[].name")
    assert name["maxLength"] == 63 and name["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node: Any = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return out


# (path, value) pairs both the CRD and the spec parser reject
REJECTED = [
    ("spec.security.tls", {}),
    ("spec.security.tls", {"secretName": "a", "issuerRef": {"name": "ca"}}),
    ("spec.security.auth.writers", ["trainer"]),
    ("spec.security.tls.issuerRef", {"kind": "Issuer"}),
    ("spec.network.clients", [{}]),
    ("spec.network.redisClients", [{"ipBlock": {}}]),
    ("spec.network.policy", "yes"),
    ("spec.autoscaling.partitions", {"min": 0}),
    ("spec.autoscaling.partitions", {"targetHitRate": 1.5}),
    ("spec.tables", []),
    ("spec.tables.0.name", "User_ID"),
    ("spec.tables.0.name", "a" * 64),
    ("spec.tables.0.rows", 0),
    ("spec.tables.0.dim", 0),
    ("spec.tables.0.dim", 16385),
    ("spec.tables.0.dtype", "bfloat16"),
    ("spec.tables.0.hotness", -0.1),
    ("spec.tables.0.source", ""),
    ("spec.replicas", -1),
    ("spec.gpusPerPod", 0),
    ("spec.gpusPerPod", 65),
    ("spec.partitions", -1),
    ("spec.cache.memoryPerGPU", "16GB"),
    ("spec.cache.policy", "fifo"),
    ("spec.cache.hitRateThreshold", 1.5),
    ("spec.cache.cachedFraction", 0),
    ("spec.cache.cachedFraction", 1.5),
    ("spec.cache.associativity", 0),
    ("spec.volatileStore.type", "memcached"),
    ("spec.volatileStore.redis.shards", 0),
    ("spec.volatileStore.redis.replicasPerShard", 6),
    ("spec.volatileStore.redis.memory", "lots"),
    ("spec.persistentStore.type", "leveldb"),
    ("spec.persistentStore.storage", "-1Gi"),
    ("spec.placement.strategy", "random"),
    ("spec.placement.maxImbalance", 0.9),
    ("spec.placement.bucketCount", -1),
    ("spec.updates.enabled", "yes"),
    ("spec.autoscaling", {"minReplicas": 4, "maxReplicas": 2}),
    ("spec.autoscaling", {"minReplicas": 0}),
    ("spec.agent.port", 70000),
    ("spec.agent.maxBatchKeys", 0),
    ("spec.modelStore", {}),
    ("spec.modelStore", {"persistentVolumeClaim": {"claimName": "m"}, "hostPath": {"path": "/m"}}),
    ("spec.modelStore", {"persistentVolumeClaim": {}}),
    ("spec.modelStore", {"persistentVolumeClaim": {"claimName": "Models_PVC"}}),
    ("spec.modelStore", {"persistentVolumeClaim": {"claimName": "m", "readOnly": "yes"}}),
    ("spec.modelStore", {"nfs": {"server": "nfs.local", "path": "exports/models"}}),
    ("spec.modelStore", {"nfs": {"path": "/exports/models"}}),
    ("spec.modelStore", {"hostPath": {"path": "/data/models", "type": "DirectoryOrCreate"}}),
    ("spec.modelStore", {"hostPath": {"path": "/m"}, "mountPath": "models"}),
    ("spec.modelStore", {"hostPath": {"path": "/m"}, "mountPath": "/"}),
    ("spec.modelStore", {"hostPath": {"path": "/m"}, "mountPath": "/models/"}),
    ("spec.modelStore", {"hostPath": {"path": "/m"}, "mountPath": "/models/../etc"}),
    ("spec.agent.priorityClassName", "High_Priority"),
    ("spec.agent.imagePullSecrets", [{"name": "regcred"}, {"name": "regcred"}]),
    ("spec.agent.imagePullSecrets", [{}]),
    ("spec.agent.podLabels", {"team": "recsys ml"}),
    ("spec.agent.podLabels", {"team": "a" * 64}),
    ("spec.agent.podAnnotations", {"note": 5}),
]

# boundary values both accept
ACCEPTED = [
    ("spec.security.tls", {"secretName": "dlrm-tls", "mutual": True}),
    ("spec.security.tls", {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}),
    ("spec.security.auth", {"writers": ["system:serviceaccount:ml:trainer", "group:trainers"], "restrictReads": True}),
    ("spec.security.redis", {"acl": False, "tlsSecretName": "redis-tls"}),
    ("spec.network", {"policy": False}),
    ("spec.network.clients", [{"namespaceSelector": {"matchLabels": {"team": "ranking"}}}]),
    ("spec.network.metricsFrom", [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]),
    ("spec.autoscaling.partitions", {"min": 2, "max": 16, "targetHitRate": 0.9}),
    ("spec.tables.0.dim", 16384),
    ("spec.tables.0.dtype", "float16"),
    ("spec.tables.0.hotness", 0),
    ("spec.replicas", 0),
    ("spec.gpusPerPod", 64),
    ("spec.partitions", 0),
    ("spec.cache.memoryPerGPU", "1.5Gi"),
    ("spec.cache.memoryPerGPU", 1073741824),
    ("spec.cache.hitRateThreshold", 1),
    ("spec.cache.cachedFraction", 0.05),
    ("spec.volatileStore.redis.replicasPerShard", 5),
    ("spec.volatileStore.redis", {"cluster": True, "shards": 3}),
    ("spec.placement.maxImbalance", 1),
    ("spec.autoscaling", {"minReplicas": 3, "maxReplicas": 3}),
    ("spec.agent.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("spec.agent.gpuResourceName", "nvidia.com/mig-1g.10gb"),
    ("spec.modelStore", {"persistentVolumeClaim": {"claimName": "models"}}),
    ("spec.modelStore", {"nfs": {"server": "10.0.0.2", "path": "/exports/models", "readOnly": False},
                         "mountPath": "/mnt/.models/..v2"}),
    ("spec.modelStore", {"hostPath": {"path": "/data/models", "type": ""}, "mountPath": "/var/models"}),
    ("spec.agent.priorityClassName", "system-node-critical"),
    ("spec.agent.imagePullSecrets", [{"name": "regcred"}, {"name": "mirror.pull"}]),
    ("spec.agent.podLabels", {"team": "recsys", "example.com/cost-center": "", "v": "1.2_a-b"}),
    ("spec.agent.podAnnotations", {"sidecar.istio.io/inject": "false", "note": "free text: any"}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value"), REJECTED, ids=[f"{p}={v!r}" for p, v in REJECTED])
def test_crd_rejects_what_the_spec_parser_rejects(path: str, value: Any) -> None:
    bad = _set(minimal(), path, value)
    assert validation_errors(bad), f"the CRD accepts {path}={value!r}"
    with pytest.raises(InvalidSpecError):
        parse_model(bad)


@pytest.mark.parametrize(("path", "value"), ACCEPTED, ids=[f"{p}={v!r}" for p, v in ACCEPTED])
def test_crd_accepts_what_the_spec_parser_accepts(path: str, value: Any) -> None:
    good = _set(minimal(), path, value)
    assert validation_errors(good) == []
    parse_model(good)


def test_duplicate_table_names_are_rejected_by_the_list_map() -> None:
    bad = minimal()
    bad["spec"]["tables"].append({"name": "user-id", "rows": 5, "dim": 4})
    assert any("duplicate" in e for e in validation_errors(bad))
    with pytest.raises(InvalidSpecError, match="duplicate"):
        parse_model(bad)


def test_cel_rules_say_what_a_schema_cannot() -> None:
    rules = dict(cel_rules())
    assert set(rules) == {
        "", ".spec.volatileStore.redis", ".spec.autoscaling", ".spec.modelStore", ".spec.persistentStore",
        ".spec.autoscaling.partitions", ".spec.security.tls",
    }
    cluster_of_two = _set(minimal(), "spec.volatileStore.redis", {"cluster": True, "shards": 2})
    assert validation_errors(cluster_of_two) == [
        ".spec.volatileStore.redis.shards: a Redis Cluster needs at least 3 shards (masters)"
    ]
    # defaults take part: maxReplicas defaults to 8
    assert validation_errors(_set(minimal(), "spec.autoscaling", {"minReplicas": 9})) == [
        ".spec.autoscaling.maxReplicas: maxReplicas must be at least minReplicas"
    ]


def test_volume_size_and_class_cannot_change_under_running_agents() -> None:
    """A StatefulSet's volume claim templates are immutable: such a change is refused up front with
    what to do instead, never left for the operator to meet as a 422."""
    rocks = _set(minimal(), "spec.persistentStore", {"type": "rocksdb", "storage": "100Gi"})
    assert validation_errors(rocks) == []  # a create has no old value: transition rules do not run
    bigger = _set(copy.deepcopy(rocks), "spec.persistentStore.storage", "200Gi")
    (error,) = validation_errors(bigger, old=rocks)
    assert error.startswith(".spec.persistentStore.storage: storage cannot change while type is rocksdb")
    assert "data-<model>-p<N>-<set>-<i>" in error
    fast = _set(copy.deepcopy(rocks), "spec.persistentStore.storageClassName", "fast")
    (error,) = validation_errors(fast, old=rocks)
    assert error.startswith(".spec.persistentStore.storageClassName: storageClassName cannot change")
    # without a store the size means nothing, and other fields change freely
    none = _set(minimal(), "spec.persistentStore", {"type": "none"})
    assert validation_errors(_set(copy.deepcopy(none), "spec.persistentStore.storage", "1Ti"), old=none) == []
    assert validation_errors(_set(copy.deepcopy(rocks), "spec.replicas", 5), old=rocks) == []
    # turning the store on adds a volume: the operator replaces the StatefulSet, nothing to refuse
    assert validation_errors(rocks, old=none) == []


@pytest.mark.parametrize(("name", "ok"), [("dlrm", True), ("a" * 40, True), ("a" * 41, False), ("7up", False)])
def test_model_names_fit_the_children_names(name: str, ok: bool) -> None:
    """``<name>-p9999-<hash5>`` must be a valid StatefulSet name and ``<name>-redis`` a Service name."""
    errors = validation_errors(_set(minimal(), "metadata.name", name))
    assert (errors == []) is ok, errors


@pytest.mark.parametrize("mount", ["/etc", "/etc/hps", "/etc/hps/models", "/var/lib", "/var/lib/hps/models"])
def test_the_model_store_cannot_hide_the_agents_own_files(mount: str) -> None:
    """Mounted over ``/etc/hps`` (the model file and plan) or ``/var/lib/hps`` (RocksDB), the store
    would break every agent: the CRD refuses it, and so does rendering (``Ready=False`` naming it)."""
    bad = _set(minimal(), "spec.modelStore", {"hostPath": {"path": "/m"}, "mountPath": mount})
    assert validation_errors(bad) == [
        ".spec.modelStore.mountPath: mountPath must not overlap /etc/hps or /var/lib/hps, where the agent "
        "keeps its own files"
    ]
    model = parse_model(bad)
    plan = Plan(1, 1, 1, 1, "table", (), PlanMetrics(1.0, 1.0, 0, 0, 0), "dlrm")
    owner = {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": "dlrm", "uid": "u"}
    with pytest.raises(InvalidSpecError) as caught:
        render_children(model, plan, owner=owner, image="i", redis_password="pw")
    assert caught.value.field == "spec.modelStore.mountPath"


def test_what_only_the_spec_parser_can_check() -> None:
    """No CEL rule can afford to walk 10000 tables' sources against the mount path, nor every label
    key, within the API server's cost budget: the operator reports these as ``Ready=False`` naming
    the field. This pins that gap so a future CEL rule updates this test deliberately."""
    outside = _set(minimal(), "spec.modelStore", {"persistentVolumeClaim": {"claimName": "m"}})
    outside["spec"]["tables"][0]["source"] = "file:///data/user-id"
    bad_key = _set(minimal(), "spec.agent.podLabels", {"bad key": "x"})
    for manifest, field in ((outside, "spec.tables[0].source"), (bad_key, "spec.agent.podLabels")):
        assert validation_errors(manifest) == []
        with pytest.raises(InvalidSpecError) as caught:
            parse_model(manifest)
        assert caught.value.field == field
