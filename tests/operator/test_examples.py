"""The example models: accepted by the CRD (schema, list-map keys, CEL rules) and by the spec parser,
shaped as documented (a laptop-sized demo; a Criteo-1TB-like model), placeable by the planner, and
rendered into valid Kubernetes objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hps_operator.core.planner import plan_placement
from hps_operator.core.render import render_children
from hps_operator.core.topology import Topology

from node_agent.spec import PersistentVolumeClaimSource, load_model_file, parse_model
from tests.operator.crd_schema import validation_errors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELS = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
#: Criteo 1TB Click Logs, per categorical feature (the MLPerf DLRM-DCNv2 table sizes)
CRITEO_1TB_ROWS = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10, 2209, 11267, 128,
    4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]  # fmt: skip


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def test_both_examples_exist() -> None:
    assert {"demo.yaml", "criteo.yaml"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_example_is_accepted_by_the_crd_and_the_spec_parser(name: str) -> None:
    manifest = load(name)
    assert validation_errors(manifest) == []
    assert parse_model(manifest) == load_model_file(EXAMPLES / name)


@pytest.mark.parametrize("name", MODELS)
def test_example_places_and_renders_valid_objects(name: str) -> None:
    model = load_model_file(EXAMPLES / name)
    plan = plan_placement(model, Topology.from_model(model), None)
    assert plan.metrics.imbalance <= model.placement.max_imbalance
    owner = {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": model.name, "uid": "uid-1"}
    for manifest in render_children(model, plan, owner=owner, image="hps:test", redis_password="pw"):
        kubernetes_validate.validate(manifest, "1.35", strict=True)


def test_demo_runs_on_a_laptop() -> None:
    model = load_model_file(EXAMPLES / "demo.yaml")
    assert len(model.tables) == 3
    assert all(1000 <= t.rows < 100_000 and 16 <= t.dim <= 64 for t in model.tables)
    assert {t.dtype for t in model.tables} == {"float32", "float16"}
    assert [t.source for t in model.tables] == [f"file://data/demo/{t.name}" for t in model.tables]
    assert model.volatile_store.type == "redis"
    assert model.cache.memory_per_gpu <= 256 * 2**20 and model.total_bytes < 64 * 2**20


def test_criteo_is_heavy_tailed_like_criteo_1tb() -> None:
    model = load_model_file(EXAMPLES / "criteo.yaml")
    assert [t.rows for t in model.tables] == CRITEO_1TB_ROWS
    assert {t.dim for t in model.tables} == {128}
    rows = [t.rows for t in model.tables]
    assert 0.25 <= max(rows) / sum(rows) <= 0.30
    # does not fit one pod's GPUs: the planner has to spread it over partitions
    assert model.total_bytes > model.gpus_per_pod * model.cache.memory_per_gpu


def test_criteo_reads_its_tables_from_a_read_only_claim() -> None:
    """Every source lies on the claim, which the loader Job and the agents mount read-only."""
    model = load_model_file(EXAMPLES / "criteo.yaml")
    store = model.model_store
    assert store is not None and store.volume == PersistentVolumeClaimSource("criteo-models", read_only=True)
    for t in model.tables:
        assert t.source is not None
        assert store.cluster_path(t.source, field=t.name) == f"{store.mount_path}/criteo/{t.name}"
    plan = plan_placement(model, Topology.from_model(model), None)
    owner = {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": model.name, "uid": "uid-1"}
    readers = [m for m in render_children(model, plan, owner=owner, image="hps:test", redis_password="pw")
               if m["kind"] in ("StatefulSet", "Job") and m["metadata"]["labels"]["app.kubernetes.io/component"]
               in ("agent", "loader")]  # fmt: skip
    assert {m["kind"] for m in readers} == {"StatefulSet", "Job"}
    for m in readers:
        pod = m["spec"]["template"]["spec"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "criteo-models", "readOnly": True}} in pod["volumes"]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
