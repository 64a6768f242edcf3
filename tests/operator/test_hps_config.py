"""``hps convert-hps-config``: HugeCTR HPS configurations (shaped like HugeCTR's documented examples)
with real sparse-model directories in tmp_path become EmbeddingModels the spec parser accepts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from hps_operator.cli import main
from hps_operator.core.hps_config import SparseModelFiles, convert_hps_config, dns1123_label
from hps_operator.core.planner import plan_placement
from hps_operator.core.topology import Topology

from node_agent.errors import InvalidSpecError, TableSourceError
from node_agent.loader import open_source
from node_agent.spec import load_model_file, parse_model, parse_quantity

ROOT = Path(__file__).resolve().parents[2]


def write_sparse_model(path: Path, rows: int, dim: int, *, seed: int = 0) -> Path:
    """A HugeCTR sparse-model directory: ``key`` (raw int64) and ``emb_vector`` (raw float32)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    rng.choice(10 * rows, size=rows, replace=False).astype("<i8").tofile(path / "key")
    rng.standard_normal((rows, dim)).astype("<f4").tofile(path / "emb_vector")
    return path


@pytest.fixture
def wdl_config(tmp_path: Path) -> dict[str, Any]:
    """The ``models`` example of HugeCTR's HPS docs (two tables, dims 1 and 15) with the documented
    redis_cluster volatile_db, rocks_db persistent_db and Kafka update_source."""
    write_sparse_model(tmp_path / "wdl/1/wdl0_sparse_20000.model", rows=1000, dim=1, seed=1)
    write_sparse_model(tmp_path / "wdl/1/wdl1_sparse_20000.model", rows=3000, dim=15, seed=2)
    return {
        "supportlonglong": True,
        "fuse_embedding_table": False,
        "volatile_db": {
            "type": "redis_cluster",
            "address": "127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005",
            "user_name": "default",
            "password": "hunter2",
            "num_partitions": 8,
            "max_batch_size": 65536,
            "overflow_margin": 10000000,
            "overflow_policy": "evict_random",
            "overflow_resolution_target": 0.8,
            "initial_cache_rate": 1.0,
            "cache_missed_embeddings": False,
            "update_filters": [".+"],
        },
        "persistent_db": {"type": "rocks_db", "path": "/tmp/rocksdb", "num_threads": 16,
                          "read_only": False, "max_batch_size": 65536, "update_filters": [".+"]},
        "update_source": {"type": "kafka_message_queue", "brokers": "127.0.0.1:9092",
                          "poll_timeout_ms": 500, "max_batch_size": 8192},
        "models": [{
            "model": "wdl",
            "sparse_files": [str(tmp_path / "wdl/1/wdl0_sparse_20000.model"),
                             str(tmp_path / "wdl/1/wdl1_sparse_20000.model")],
            "dense_file": "/wdl_infer/model/wdl/1/wdl_dense_20000.model",
            "network_file": "/wdl_infer/model/wdl/1/wdl.json",
            "num_of_worker_buffer_in_pool": 4,
            "num_of_refresher_buffer_in_pool": 1,
            "deployed_device_list": [0, 1],
            "max_batch_size": 64,
            "default_value_for_each_table": [0.0, 0.5],
            "maxnum_des_feature_per_sample": 26,
            "maxnum_catfeature_query_per_table_per_sample": [2, 26],
            "embedding_vecsize_per_table": [1, 15],
            "embedding_table_names": ["table1", "table2"],
            "refresh_delay": 0,
            "refresh_interval": 0,
            "hit_rate_threshold": 0.8,
            "gpucacheper": 0.5,
            "gpucache": True,
            "cache_refresh_percentage_per_iteration": 0.2,
            "label_dim": 1,
            "slot_num": 10,
            "use_static_table": False,
        }],
    }  # fmt: skip


@pytest.fixture
def dlrm_config(tmp_path: Path) -> dict[str, Any]:
    """HugeCTR's DLRM sample shape: parallel_hash_map volatile_db, persistent_db disabled, no update
    source, relative sparse paths, no table names (HugeCTR's defaults apply)."""
    write_sparse_model(tmp_path / "dlrm/1/dlrm0_sparse_20000.model", rows=500, dim=8, seed=3)
    return {
        "supportlonglong": True,
        "volatile_db": {"type": "parallel_hash_map", "num_partitions": 15,
                        "overflow_policy": "evict_random", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "disabled", "path": "/tmp/rocksdb"},
        "models": [{
            "model": "DLRM_Model",
            "sparse_files": ["dlrm/1/dlrm0_sparse_20000.model"],
            "dense_file": "dlrm/1/dlrm_dense_20000.model",
            "network_file": "dlrm/1/dlrm.json",
            "deployed_device_list": [0],
            "max_batch_size": 1024,
            "default_value_for_each_table": [0.0],
            "maxnum_catfeature_query_per_table_per_sample": [26],
            "embedding_vecsize_per_table": [8],
            "hit_rate_threshold": 1.1,
            "gpucacheper": 1.0,
            "gpucache": True,
        }],
    }  # fmt: skip


def write_json(tmp_path: Path, config: dict[str, Any], name: str = "hps.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=2))
    return path


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["convert-hps-config", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_documented_wdl_config_becomes_a_valid_model(tmp_path: Path, wdl_config: dict[str, Any],
                                                     run_cli: Run) -> None:  # fmt: skip
    code, out, err = run_cli(str(write_json(tmp_path, wdl_config)))
    assert code == 0, err
    model_file = tmp_path / "model.yaml"
    model_file.write_text(out)
    model = load_model_file(model_file)

    assert model.name == "wdl"
    assert [(t.name, t.rows, t.dim, t.dtype) for t in model.tables] == [
        ("table1", 1000, 1, "float32"),
        ("table2", 3000, 15, "float32"),
    ]
    assert model.table("table2").default_value == 0.5
    assert model.table("table1").source == f"file://{tmp_path}/wdl/1/wdl0_sparse_20000.model"
    assert model.gpus_per_pod == 2  # two deployed devices
    # gpucacheper 0.5 of (1000*1 + 3000*15) float32 = 92000 bytes, rounded up to whole MiB
    assert model.cache.memory_per_gpu == 2**20
    assert model.cache.cached_fraction == 0.5  # each GPU caches half of what it owns, as HPS does
    assert model.cache.hit_rate_threshold == 0.8
    assert model.placement.strategy == "replicate"
    assert model.volatile_store.type == "redis"
    assert model.volatile_store.redis.shards == 3 and model.volatile_store.redis.cluster
    assert model.persistent_store.type == "rocksdb" and not model.persistent_store.read_only
    assert model.updates.enabled
    assert model.agent.max_batch_keys == 64 * (2 + 26)
    # the converted model places as HPS deployed it: every table replicated on every GPU
    plan = plan_placement(model, Topology.from_model(model))
    assert plan.strategy == "replicate" and len(plan.assignments) == 2 * len(model.tables)


def test_converted_models_pass_the_crd_schema(
    tmp_path: Path, wdl_config: dict[str, Any], run_cli: Run
) -> None:
    """What the converter writes must also be accepted by the API server, not just by the parser."""
    crd = yaml.safe_load((ROOT / "crds/hps.dev_embeddingmodels.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = version["schema"]["openAPIV3Schema"]
    code, out, err = run_cli(str(write_json(tmp_path, wdl_config)))
    assert code == 0, err
    for doc in yaml.safe_load_all(out):
        jsonschema.validate(doc, schema)
        assert undeclared_fields(doc["spec"], schema["properties"]["spec"], "spec") == []


def undeclared_fields(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Fields the CRD does not declare: the API server would silently prune them."""
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += undeclared_fields(item, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [
            f
            for i, item in enumerate(value)
            for f in undeclared_fields(item, schema["items"], f"{path}[{i}]")
        ]
    return []


def test_settings_without_equivalent_go_to_stderr_and_never_the_password(
    tmp_path: Path, wdl_config: dict[str, Any], run_cli: Run
) -> None:
    code, out, err = run_cli(str(write_json(tmp_path, wdl_config)))
    assert code == 0
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("# note: ") for line in lines)
    for setting in ("dense_file", "network_file", "num_of_worker_buffer_in_pool", "volatile_db.num_partitions",
                    "persistent_db.path", "fuse_embedding_table", "update_source"):  # fmt: skip
        assert any(setting in line for line in lines), setting
    assert "dense part of the model is served by the inference server" in err
    assert "hunter2" not in out and "hunter2" not in err
    assert "127.0.0.1:7003" not in out  # the operator runs its own Redis


def test_dlrm_sample_relative_paths_default_names_and_hash_map(tmp_path: Path, dlrm_config: dict[str, Any],
                                                               run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # relative sparse paths are read next to the JSON file, and written relative to where the YAML
    # goes: on stdout, the current directory (here the JSON's own)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(str(write_json(tmp_path, dlrm_config)))
    assert code == 0, err
    (doc,) = list(yaml.safe_load_all(out))
    model = parse_model(doc)
    assert model.name == "dlrm-model"
    assert [(t.name, t.rows, t.dim) for t in model.tables] == [("sparse-embedding0", 500, 8)]
    assert model.tables[0].source == "dlrm/1/dlrm0_sparse_20000.model"  # relative stays relative
    assert model.volatile_store.type == "hashmap"
    assert model.persistent_store.type == "none"
    assert not model.updates.enabled
    assert model.cache.hit_rate_threshold == 1.0  # HPS's "> 1 means always synchronous"
    assert "'DLRM_Model' renamed 'dlrm-model'" in err


def test_several_models_become_several_documents_with_unique_names(tmp_path: Path,
                                                                    dlrm_config: dict[str, Any],
                                                                    run_cli: Run) -> None:  # fmt: skip
    second = dict(dlrm_config["models"][0], model="dlrm.model", embedding_table_names=["C1_emb"])
    dlrm_config["models"].append(second)
    code, out, err = run_cli(str(write_json(tmp_path, dlrm_config)), "--namespace", "recsys")
    assert code == 0, err
    models = [parse_model(d) for d in yaml.safe_load_all(out)]
    assert [m.name for m in models] == ["dlrm-model", "dlrm-model-2"]
    assert [m.namespace for m in models] == ["recsys", "recsys"]
    assert models[1].tables[0].name == "c1-emb"


def test_rows_come_from_the_key_file_and_a_mismatched_vector_file_is_named(tmp_path: Path,
                                                                          dlrm_config: dict[str, Any],
                                                                          run_cli: Run) -> None:  # fmt: skip
    vectors = tmp_path / "dlrm/1/dlrm0_sparse_20000.model/emb_vector"
    vectors.write_bytes(vectors.read_bytes()[:-4])
    code, out, err = run_cli(str(write_json(tmp_path, dlrm_config)))
    assert code == TableSourceError.exit_code
    assert out == ""
    assert "dlrm0_sparse_20000.model/emb_vector" in err and "expected 16000" in err


def test_missing_sparse_files_fail_unless_rows_are_given(tmp_path: Path, dlrm_config: dict[str, Any],
                                                         run_cli: Run) -> None:  # fmt: skip
    dlrm_config["models"][0]["sparse_files"] = ["/nowhere/dlrm0_sparse_20000.model"]
    path = write_json(tmp_path, dlrm_config)
    code, out, err = run_cli(str(path))
    assert code == TableSourceError.exit_code
    assert "/nowhere/dlrm0_sparse_20000.model" in err and "--rows" in err

    code, out, err = run_cli(str(path), "--rows", "sparse_embedding0=123456")
    assert code == 0, err
    model = parse_model(yaml.safe_load(out))
    assert model.tables[0].rows == 123456
    assert model.tables[0].source == "file:///nowhere/dlrm0_sparse_20000.model"


def test_a_file_instead_of_a_sparse_directory_is_named(tmp_path: Path, dlrm_config: dict[str, Any],
                                                       run_cli: Run) -> None:  # fmt: skip
    (tmp_path / "old.model").write_bytes(b"\0" * 64)
    dlrm_config["models"][0]["sparse_files"] = ["old.model"]
    code, _, err = run_cli(str(write_json(tmp_path, dlrm_config)))
    assert code == TableSourceError.exit_code
    assert "old.model: not a HugeCTR sparse-model directory" in err


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda c: c.pop("models"), "models: is required"),
        (lambda c: c["models"][0].pop("sparse_files"), "models[0].sparse_files: is required"),
        (
            lambda c: c["models"][0].pop("embedding_vecsize_per_table"),
            "models[0].embedding_vecsize_per_table",
        ),
        (lambda c: c["models"][0].pop("deployed_device_list"), "models[0].deployed_device_list: is required"),
        (lambda c: c["models"][0].pop("model"), "models[0].model: is required"),
        (
            lambda c: c["models"][0].update(embedding_vecsize_per_table=[8, 8]),
            "one positive vector size per sparse file",
        ),
        (lambda c: c["models"][0].update(gpucacheper="lots"), "models[0].gpucacheper: expected a number"),
        (
            lambda c: c["volatile_db"].update(type="memcached"),
            "volatile_db.type: unknown HPS volatile database",
        ),
        (lambda c: c.update(models=[]), "models: expected a non-empty list"),
    ],
)
def test_malformed_configs_fail_naming_the_key(tmp_path: Path, dlrm_config: dict[str, Any], run_cli: Run,
                                               mutate: Callable[[dict[str, Any]], object], named: str) -> None:  # fmt: skip
    mutate(dlrm_config)
    code, out, err = run_cli(str(write_json(tmp_path, dlrm_config)))
    assert code == InvalidSpecError.exit_code
    assert out == ""
    assert named in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_bad_json_is_a_one_line_error_with_the_position(tmp_path: Path, run_cli: Run) -> None:
    path = tmp_path / "hps.json"
    path.write_text('{"models": [\n  {"model": "wdl",}\n]}')
    code, out, err = run_cli(str(path))
    assert code == InvalidSpecError.exit_code and out == ""
    assert f"{path}: not valid JSON" in err and "line 2" in err


def test_output_file_option_writes_the_yaml(
    tmp_path: Path, dlrm_config: dict[str, Any], run_cli: Run
) -> None:
    target = tmp_path / "out.yaml"
    code, out, _ = run_cli(str(write_json(tmp_path, dlrm_config)), "-o", str(target))
    assert code == 0 and out == ""
    assert load_model_file(target).tables[0].rows == 500


def test_relative_sparse_paths_are_rebased_to_where_the_yaml_is_written(
    tmp_path: Path, dlrm_config: dict[str, Any], run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HPS reads them next to the JSON, a model file's sources are read next to the model file: the
    converted model's source opens from where the YAML lands (-o elsewhere, or stdout in another
    directory), so hps load and hps local up find the tables."""
    config = write_json(tmp_path, dlrm_config)
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "m.yaml"
    assert run_cli(str(config), "-o", str(target))[0] == 0
    table = load_model_file(target).tables[0]
    assert table.source == "../dlrm/1/dlrm0_sparse_20000.model"
    assert open_source(table, base_dir=target.parent).rows == 500
    monkeypatch.chdir(tmp_path / "out")
    code, out, _ = run_cli(str(config))
    (doc,) = list(yaml.safe_load_all(out))
    assert code == 0 and doc["spec"]["tables"][0]["source"] == "../dlrm/1/dlrm0_sparse_20000.model"


def test_cache_budget_is_gpucacheper_of_the_model_bytes() -> None:
    rows, dim = 1_000_000, 64  # 256 MB of float32
    config = {"models": [{"model": "m", "sparse_files": ["/t"], "deployed_device_list": [0, 1, 2, 3],
                          "embedding_vecsize_per_table": [dim], "gpucacheper": 0.25}]}  # fmt: skip
    files = {"/t": SparseModelFiles("/t", key_bytes=rows * 8, vector_bytes=rows * dim * 4)}
    (manifest,) = convert_hps_config(config, sparse_files=files).manifests
    budget = parse_quantity(manifest["spec"]["cache"]["memoryPerGPU"], field="memoryPerGPU")
    assert budget == 64_000_000 + (-64_000_000 % 2**20)  # a quarter of the bytes, rounded up to MiB
    assert manifest["spec"]["gpusPerPod"] == 4


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("DLRM_Model", "dlrm-model"),
        ("  a..b  ", "a-b"),
        ("_x_", "x"),
        ("___", "fallback"),
        ("x" * 80, "x" * 63),
    ],
)
def test_names_become_dns1123_labels(name: str, label: str) -> None:
    assert dns1123_label(name, fallback="fallback") == label
