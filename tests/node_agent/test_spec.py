"""EmbeddingModel parsing: defaults, the contract's field names, and errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node_agent.errors import InvalidSpecError
from node_agent.spec import (
    HostPathSource,
    ModelStoreSpec,
    NFSSource,
    PersistentVolumeClaimSource,
    format_quantity,
    load_model_file,
    parse_model,
    parse_quantity,
    resolve_source,
)


def manifest(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"tables": [{"name": "user-id", "rows": 1000, "dim": 16}]}
    base.update(spec)
    return {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "metadata": {"name": "dlrm"}, "spec": base}


def test_design_example_parses_with_every_contract_field() -> None:
    model = parse_model(
        manifest(
            tables=[
                {"name": "user-id", "rows": 40_000_000, "dim": 128, "dtype": "float32",
                 "source": "file:///models/dlrm/user_id", "hotness": 0.3, "defaultValue": 0.5},
                {"name": "item", "rows": 10_000, "dim": 64, "dtype": "float16"},
            ],
            replicas=2, gpusPerPod=4, partitions=1,
            cache={"memoryPerGPU": "16Gi", "policy": "lfu", "hitRateThreshold": 0.8},
            volatileStore={"type": "redis", "redis": {"shards": 3, "replicasPerShard": 1, "memory": "32Gi"}},
            persistentStore={"type": "rocksdb", "storage": "500Gi"},
            placement={"strategy": "row", "maxImbalance": 1.1},
            updates={"enabled": True},
            autoscaling={"minReplicas": 1, "maxReplicas": 8, "targetQPSPerReplica": 20000},
            agent={"image": "hps/agent:1", "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu"}]},
        )
    )
    assert model.replicas == 2 and model.gpus_per_pod == 4
    assert model.cache.memory_per_gpu == 16 * 2**30 and model.cache.policy == "lfu"
    assert model.volatile_store.redis.shards == 3 and model.volatile_store.redis.memory == 32 * 2**30
    assert model.persistent_store.storage == 500 * 2**30
    assert model.placement.strategy == "row"
    assert model.autoscaling is not None and model.autoscaling.max_replicas == 8
    user = model.table("user-id")
    assert (user.row_bytes, user.default_value, user.hotness) == (512, 0.5, 0.3)
    assert model.table("item").itemsize == 2
    assert dict(model.agent.node_selector) == {"gpu": "h100"}


def test_defaults_fill_an_minimal_model() -> None:
    model = parse_model(manifest())
    assert (model.replicas, model.gpus_per_pod, model.partitions) == (1, 1, 1)
    assert model.cache.policy == "lru" and model.placement.max_imbalance == 1.05
    assert model.table("user-id").dtype == "float32"


def test_hotness_sums_to_one_and_defaults_to_rows() -> None:
    model = parse_model(
        manifest(tables=[{"name": "a", "rows": 300, "dim": 4}, {"name": "b", "rows": 100, "dim": 4},
                         {"name": "c", "rows": 100, "dim": 4, "hotness": 0.5}])
    )
    h = model.hotness()
    assert sum(h.values()) == pytest.approx(1.0)
    assert h["c"] == pytest.approx(0.5)
    assert h["a"] == pytest.approx(3 * h["b"])


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"tables": []}, "spec.tables"),
        ({"tables": [{"name": "User_ID", "rows": 1, "dim": 1}]}, "spec.tables[0].name"),
        ({"tables": [{"name": "a", "rows": 0, "dim": 1}]}, "spec.tables[0].rows"),
        ({"tables": [{"name": "a", "rows": 1, "dim": 8, "dtype": "int8"}]}, "spec.tables[0].dtype"),
        ({"tables": [{"name": "a", "rows": 1, "dim": 1}, {"name": "a", "rows": 2, "dim": 1}]}, "spec.tables[1].name"),
        ({"cache": {"memoryPerGPU": "lots"}}, "spec.cache.memoryPerGPU"),
        ({"cache": {"policy": "fifo"}}, "spec.cache.policy"),
        ({"cache": {"hitRateThreshold": 1.5}}, "spec.cache.hitRateThreshold"),
        ({"replicas": -1}, "spec.replicas"),
        ({"gpusPerPod": "four"}, "spec.gpusPerPod"),
        ({"placement": {"strategy": "random"}}, "spec.placement.strategy"),
        ({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}, "spec.autoscaling.maxReplicas"),
        ({"agent": {"port": 9000, "metricsPort": 9000}}, "spec.agent.metricsPort"),
    ],
)
def test_invalid_fields_are_named(spec: dict[str, Any], field: str) -> None:
    raw = manifest()
    raw["spec"].update(spec)
    with pytest.raises(InvalidSpecError) as err:
        parse_model(raw)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_wrong_kind_and_name_are_rejected() -> None:
    with pytest.raises(InvalidSpecError, match="kind"):
        parse_model({**manifest(), "kind": "Deployment"})
    with pytest.raises(InvalidSpecError, match=r"metadata\.name"):
        parse_model({**manifest(), "metadata": {"name": "Not_Valid"}})


def test_quantities() -> None:
    assert parse_quantity("16Gi", field="f") == 16 * 2**30
    assert parse_quantity("500M", field="f") == 500 * 10**6
    assert parse_quantity("1.5Ki", field="f") == 1536
    assert parse_quantity(4096, field="f") == 4096
    assert format_quantity(16 * 2**30) == "16Gi" and format_quantity(1000) == "1000"
    with pytest.raises(InvalidSpecError):
        parse_quantity("16GB", field="f")


def test_model_file_and_relative_sources(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(
        "apiVersion: hps.dev/v1alpha1\nkind: EmbeddingModel\nmetadata: {name: demo}\n"
        "spec:\n  tables:\n  - {name: t, rows: 4, dim: 2, source: 'file://data/t'}\n"
    )
    model = load_model_file(path)
    source = model.table("t").source
    assert source is not None
    assert resolve_source(source, base=tmp_path) == tmp_path / "data" / "t"
    assert resolve_source("file:///abs/t") == Path("/abs/t")
    with pytest.raises(InvalidSpecError, match="not found"):
        load_model_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(InvalidSpecError, match="not valid YAML"):
        load_model_file(tmp_path / "bad.yaml")
    with pytest.raises(InvalidSpecError, match="unsupported URI scheme"):
        resolve_source("s3://bucket/t")
    assert resolve_source("file://localhost/abs/t", base=tmp_path) == Path("/abs/t")  # RFC 8089's host


def test_a_file_of_two_models_is_an_error_naming_both(tmp_path: Path) -> None:
    """As hps convert-hps-config writes for an HPS config of several models: -f takes one model."""
    one = "apiVersion: hps.dev/v1alpha1\nkind: EmbeddingModel\nmetadata: {{name: {}}}\nspec: {{tables: [{{name: t, rows: 4, dim: 2}}]}}\n"
    path = tmp_path / "two.yaml"
    path.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n---\n" + one.format("wdl") + "---\n" + one.format("dcn"))
    with pytest.raises(InvalidSpecError, match=r"holds 2 EmbeddingModel documents \(wdl, dcn\); give one model per file"):
        load_model_file(path)
    path.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n---\n" + one.format("wdl"))
    assert load_model_file(path).name == "wdl"  # other kinds beside it are skipped


@pytest.mark.parametrize("source", ["s3://bucket/t", "gs://b/t", "file://host/http://x"])
def test_a_source_the_loader_cannot_open_is_an_invalid_spec_naming_the_table(source: str) -> None:
    """Caught when the model is read (plan, render, the operator's InvalidSpec), not at load time."""
    tables = [{"name": "ok", "rows": 4, "dim": 2}, {"name": "t", "rows": 4, "dim": 2, "source": source}]
    with pytest.raises(InvalidSpecError) as err:
        parse_model(manifest(tables=tables))
    assert err.value.field == "spec.tables[1].source"
    assert "unsupported URI scheme" in str(err.value) and source in str(err.value)


# ---------------------------------------------------------------------------------------------
# the model store: table sources on shared storage


def test_model_store_parses_each_volume_kind_with_safe_defaults() -> None:
    pvc = parse_model(manifest(modelStore={"persistentVolumeClaim": {"claimName": "models"}}))
    assert pvc.model_store == ModelStoreSpec(PersistentVolumeClaimSource("models", read_only=True), "/models")
    nfs = parse_model(manifest(modelStore={"nfs": {"server": "10.0.0.2", "path": "/exports/models",
                                                   "readOnly": False}, "mountPath": "/mnt/models"}))  # fmt: skip
    assert nfs.model_store == ModelStoreSpec(NFSSource("10.0.0.2", "/exports/models", False), "/mnt/models")
    host = parse_model(manifest(modelStore={"hostPath": {"path": "/data/models"}}))
    assert host.model_store == ModelStoreSpec(HostPathSource("/data/models", "Directory"), "/models")
    assert parse_model(manifest()).model_store is None


@pytest.mark.parametrize(
    ("store", "field"),
    [
        ({}, "spec.modelStore"),
        ({"persistentVolumeClaim": {"claimName": "m"}, "hostPath": {"path": "/m"}}, "spec.modelStore"),
        ({"persistentVolumeClaim": {}}, "spec.modelStore.persistentVolumeClaim.claimName"),
        ({"persistentVolumeClaim": {"claimName": "Models_PVC"}}, "spec.modelStore.persistentVolumeClaim.claimName"),
        ({"nfs": {"server": "nfs", "path": "exports/models"}}, "spec.modelStore.nfs.path"),
        ({"hostPath": {"path": "/m", "type": "DirectoryOrCreate"}}, "spec.modelStore.hostPath.type"),
        ({"hostPath": {"path": "/m"}, "mountPath": "models"}, "spec.modelStore.mountPath"),
        ({"hostPath": {"path": "/m"}, "mountPath": "/models/"}, "spec.modelStore.mountPath"),
        ({"hostPath": {"path": "/m"}, "mountPath": "/models/../etc"}, "spec.modelStore.mountPath"),
    ],
)
def test_invalid_model_stores_are_named(store: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpecError) as err:
        parse_model(manifest(modelStore=store))
    assert err.value.field == field


def _with_sources(*sources: str, mount: str = "/models") -> dict[str, Any]:
    tables = [{"name": f"t{i}", "rows": 4, "dim": 2, "source": s} for i, s in enumerate(sources)]
    return manifest(tables=tables, modelStore={"persistentVolumeClaim": {"claimName": "m"}, "mountPath": mount})


@pytest.mark.parametrize(
    "source",
    ["/data/t", "file:///data/t", "/models-old/t", "../t", "file://dlrm/../../t", "s3://bucket/t"],
)
def test_a_source_outside_the_model_store_names_the_table(source: str) -> None:
    """Absolute sources must lie under the mount path, and relative ones may not climb out of it
    (``/models-old`` is not under ``/models``); the error names the table's source field."""
    with pytest.raises(InvalidSpecError) as err:
        parse_model(_with_sources("dlrm/ok", source))
    assert err.value.field == "spec.tables[1].source"
    assert source in str(err.value)


def test_sources_resolve_under_the_mount_path_in_the_pods() -> None:
    model = parse_model(_with_sources("dlrm/user", "file://dlrm/./item/../item", "/mnt/models/v2/ads",
                                      mount="/mnt/models/v2"))  # fmt: skip
    store = model.model_store
    assert store is not None
    # relative sources resolve against the mount path; /models lies outside /mnt/models/v2
    assert store.cluster_path("dlrm/user", field="f") == "/mnt/models/v2/dlrm/user"
    assert store.cluster_path("file://dlrm/./item/../item", field="f") == "/mnt/models/v2/dlrm/item"
    assert store.cluster_path("/mnt/models/v2/ads", field="f") == "/mnt/models/v2/ads"
    assert store.cluster_path("/mnt/models/v2", field="f") == "/mnt/models/v2"
    with pytest.raises(InvalidSpecError, match="outside the model store"):
        store.cluster_path("file:///models/dlrm/ads", field="f")
    # without a model store, sources are whatever the pods' own filesystem holds
    assert parse_model(manifest(tables=[{"name": "t", "rows": 1, "dim": 1, "source": "/anywhere/t"}]))


def test_pod_knobs_parse() -> None:
    model = parse_model(manifest(agent={
        "priorityClassName": "gpu-inference",
        "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror.pull"}],
        "podLabels": {"team": "recsys", "example.com/cost-center": "ads-42", "empty": ""},
        "podAnnotations": {"sidecar.istio.io/inject": "false", "note": "any text: even spaces"},
    }))  # fmt: skip
    agent = model.agent
    assert agent.priority_class_name == "gpu-inference"
    assert agent.image_pull_secrets == ("regcred", "mirror.pull")
    assert dict(agent.pod_labels) == {"empty": "", "example.com/cost-center": "ads-42", "team": "recsys"}
    assert agent.pod_annotations["note"] == "any text: even spaces"
    defaults = parse_model(manifest()).agent
    assert (defaults.priority_class_name, defaults.image_pull_secrets) == (None, ())
    assert (dict(defaults.pod_labels), dict(defaults.pod_annotations)) == ({}, {})


@pytest.mark.parametrize(
    ("agent", "field"),
    [
        ({"priorityClassName": "High_Priority"}, "spec.agent.priorityClassName"),
        ({"imagePullSecrets": [{"name": "a"}, {"name": "a"}]}, "spec.agent.imagePullSecrets[1].name"),
        ({"imagePullSecrets": [{}]}, "spec.agent.imagePullSecrets[0].name"),
        ({"imagePullSecrets": "regcred"}, "spec.agent.imagePullSecrets"),
        ({"podLabels": {"team": "recsys ml"}}, "spec.agent.podLabels.team"),
        ({"podLabels": {"team": "a" * 64}}, "spec.agent.podLabels.team"),
        ({"podLabels": {"bad key": "x"}}, "spec.agent.podLabels"),
        ({"podLabels": {"Example.com/x": "x"}}, "spec.agent.podLabels"),
        ({"podAnnotations": {"n": 5}}, "spec.agent.podAnnotations.n"),
    ],
)
def test_invalid_pod_knobs_are_named(agent: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpecError) as err:
        parse_model(manifest(agent=agent))
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------
# unknown fields: an error naming the path and the closest known field


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"replica": 2}, "spec.replica: unknown field; did you mean replicas?"),
        ({"cache": {"hitRateTreshold": 0.5}}, "spec.cache.hitRateTreshold: unknown field; did you mean hitRateThreshold?"),
        ({"tables": [{"name": "a", "rows": 4, "dimm": 4}]}, "spec.tables[0].dimm: unknown field; did you mean dim?"),
        ({"tables": [{"name": "a", "rows": 4, "dim": 4, "colour": "red"}]},
         "spec.tables[0].colour: unknown field; the known fields here are name, rows, dim, dtype, source"),
        ({"bogusField": 1}, "spec.bogusField: unknown field; the known fields here are tables, replicas"),
        ({"volatileStore": {"redis": {"persistance": {}}}},
         "spec.volatileStore.redis.persistance: unknown field; did you mean persistence?"),
        ({"agent": {"resources": {"limit": {"cpu": 1}}}}, "spec.agent.resources.limit: unknown field; did you mean limits?"),
        ({"modelStore": {"nfs": {"server": "s", "path": "/p", "readonly": True}}},
         "spec.modelStore.nfs.readonly: unknown field; did you mean readOnly?"),
    ],
)  # fmt: skip
def test_an_unknown_field_is_an_error_naming_it_and_the_closest_known_one(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpecError) as err:
        parse_model(manifest(**raw))
    assert str(err.value).startswith(message)


def test_a_missing_required_number_says_it_is_required_not_that_it_is_zero() -> None:
    with pytest.raises(InvalidSpecError) as err:
        parse_model(manifest(tables=[{"name": "a", "rows": 4}]))
    assert str(err.value) == "spec.tables[0].dim: is required (an integer of at least 1 and at most 16384)"


def test_an_unknown_top_level_field_is_an_error_too() -> None:
    with pytest.raises(InvalidSpecError, match=r"^spce: unknown field; did you mean spec\?"):
        parse_model({**manifest(), "spce": {}})


def test_the_parser_knows_exactly_the_fields_the_crd_declares() -> None:
    """What the API server accepts (the CRD, which prunes anything else) the parser accepts, and no
    more: each object's known fields are the CRD's properties of that object."""
    from node_agent import spec as s
    from tests.operator.crd_schema import openapi_schema

    root = openapi_schema()
    node = root["properties"]["spec"]

    def at(path: str) -> set[str]:
        here = node
        for part in path.split(".") if path else []:
            here = here["items"] if part == "[]" else here["properties"][part]
        return set(here["properties"])

    assert set(s.MANIFEST_FIELDS) == set(root["properties"])
    expected = {
        "": s.SPEC_FIELDS, "tables.[]": s.TABLE_FIELDS, "cache": s.CACHE_FIELDS, "volatileStore": s.VOLATILE_FIELDS,
        "volatileStore.redis": s.REDIS_FIELDS, "volatileStore.redis.persistence": s.REDIS_PERSISTENCE_FIELDS,
        "persistentStore": s.PERSISTENT_FIELDS, "placement": s.PLACEMENT_FIELDS, "updates": s.UPDATES_FIELDS,
        "autoscaling": s.AUTOSCALING_FIELDS, "agent": s.AGENT_FIELDS, "agent.resources": s.RESOURCES_FIELDS,
        "agent.tolerations.[]": s.TOLERATION_FIELDS, "agent.imagePullSecrets.[]": ("name",),
        "modelStore": s.MODEL_STORE_FIELDS, "modelStore.persistentVolumeClaim": s.PVC_FIELDS,
        "modelStore.nfs": s.NFS_FIELDS, "modelStore.hostPath": s.HOST_PATH_FIELDS,
    }  # fmt: skip
    for path, fields in expected.items():
        assert at(path) == set(fields), path


def test_redis_persistence_defaults_to_an_append_only_file_synced_every_second() -> None:
    persistence = parse_model(manifest()).volatile_store.redis.persistence
    assert (persistence.type, persistence.appendfsync) == ("aof", "everysec")
    assert persistence.redis_args() == ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    off = parse_model(manifest(volatileStore={"redis": {"persistence": {"type": "none"}}})).volatile_store.redis
    assert off.persistence.redis_args() == ["--appendonly", "no", "--save", ""]
    with pytest.raises(InvalidSpecError, match=r"persistence\.appendfsync: must be one of everysec, always, no"):
        parse_model(manifest(volatileStore={"redis": {"persistence": {"appendfsync": "sometimes"}}}))


def test_a_directory_or_a_binary_file_given_as_the_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError, match="is a directory; give the EmbeddingModel's YAML file"):
        load_model_file(tmp_path)
    (tmp_path / "model.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xfe")
    with pytest.raises(InvalidSpecError, match="is not a text file"):
        load_model_file(tmp_path / "model.npy")
