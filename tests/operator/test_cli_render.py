"""``hps render``: the real console script in a subprocess; what it prints is what the operator's first
reconcile writes, valid against the official schemas, and its errors name what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hps_operator.core.reconcile import Observed, Options, reconcile

from node_agent.spec import parse_model

HPS = Path(sys.executable).parent / "hps"
ROOT = Path(__file__).resolve().parents[2]
MODEL = """\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: dlrm, namespace: recsys}
spec:
  tables:
  - {name: user-id, rows: 200000000, dim: 128}
  replicas: 2
  gpusPerPod: 4
  cache: {memoryPerGPU: 40Gi}
  autoscaling: {minReplicas: 1, maxReplicas: 4, targetQPSPerReplica: 20000}
"""


def hps(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HPS), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def node(name: str, memory_mib: int, taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": str(memory_mib)}},
            "spec": {"taints": taints or []}, "status": {"allocatable": {"nvidia.com/gpu": "8"}}}  # fmt: skip


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(MODEL)
    return path


def test_render_prints_what_the_operator_writes_first(model_file: Path) -> None:
    done = hps("render", "-f", model_file, "-o", "json", "--owner-uid", "uid-1", "--redis-password", "pw")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert (listed["apiVersion"], listed["kind"]) == ("v1", "List")
    body = yaml.safe_load(MODEL)
    body["metadata"].update(uid="uid-1", generation=1)
    decision = reconcile(Observed(model=body, nodes=[], children=[], redis_password="pw", now="1970-01-01T00:00:00Z"),
                         Options(image="ghcr.io/hps-operator/hps:latest"))  # fmt: skip
    expected = sorted([*decision.create, *decision.apply], key=lambda m: (m["kind"], m["metadata"]["name"]))
    assert listed["items"] == expected
    kinds = {m["kind"] for m in listed["items"]}
    assert {"ConfigMap", "Secret", "Service", "StatefulSet", "Job", "PodDisruptionBudget",
            "HorizontalPodAutoscaler"} <= kinds  # fmt: skip
    for item in listed["items"]:
        kubernetes_validate.validate(item, "1.35", strict=True)
        assert item["metadata"]["namespace"] == "recsys"
        assert item["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_yaml_output_has_no_owner_without_a_uid_and_reads_back(model_file: Path) -> None:
    done = hps("render", "-f", model_file)
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    assert objects and all("ownerReferences" not in o["metadata"] for o in objects)
    config = next(o for o in objects if o["metadata"]["name"] == "dlrm-config")
    # the model file agents read is a readable block, and parses to the spec
    assert parse_model(yaml.safe_load(config["data"]["model.yaml"])).name == "dlrm"
    assert "model.yaml: |" in done.stdout


def test_the_nodes_file_sets_the_budget_as_the_operator_reads_it(model_file: Path, tmp_path: Path) -> None:
    """95 GiB of rows fit 4 GPUs of 40 GiB, not 4 of 16 GiB; a 16 GiB node the agents cannot use
    (tainted) does not count."""
    nodes = tmp_path / "nodes.yaml"
    big = [node("big-0", 81920), node("big-1", 81920)]
    tainted = node("small", 16384, [{"key": "team", "value": "vision", "effect": "NoSchedule"}])
    nodes.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [*big, tainted]}))
    assert hps("render", "-f", model_file, "--nodes", nodes).returncode == 0
    nodes.write_text(yaml.safe_dump_all([*big, node("small", 16384)]))  # one Node per document
    done = hps("render", "-f", model_file, "--nodes", nodes)
    assert done.returncode == 7
    assert "InsufficientGPUMemory" in done.stderr and "available" in done.stderr


def test_errors_name_what_is_wrong(model_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MODEL.replace("dim: 128", "dim: 0"))
    done = hps("render", "-f", bad)
    assert done.returncode == 2 and "spec.tables[0].dim" in done.stderr
    not_nodes = tmp_path / "pods.yaml"
    not_nodes.write_text(yaml.safe_dump({"kind": "Pod", "metadata": {"name": "p"}}))
    done = hps("render", "-f", model_file, "--nodes", not_nodes)
    assert done.returncode == 2 and "expected Node objects" in done.stderr and str(not_nodes) in done.stderr
    done = hps("render", "-f", model_file, "--nodes", tmp_path / "missing.yaml")
    assert done.returncode == 2 and "file not found" in done.stderr
