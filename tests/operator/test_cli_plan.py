"""``hps plan``: the real console script in a subprocess, its JSON parsed as a user's tooling would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node_agent.plan import PLAN_FORMAT, Plan

HPS = Path(sys.executable).parent / "hps"

MODEL = """\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: dlrm}
spec:
  tables:
  - {name: user-id, rows: 4000000, dim: 128}
  - {name: item-id, rows: 500000, dim: 64}
  - {name: category, rows: 1000, dim: 16, hotness: 0.2}
  replicas: 2
  gpusPerPod: 4
  cache: {memoryPerGPU: 1Gi}
"""


def hps(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HPS), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def plan_json(*args: str | Path) -> dict[str, Any]:
    done = hps("plan", *args, "-o", "json")
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(MODEL)
    return path


def test_json_output_is_the_plan_format(model_file: Path) -> None:
    plan = plan_json("-f", model_file)
    assert plan["format"] == PLAN_FORMAT and plan["model"] == "dlrm" and plan["version"] == 1
    assert (plan["strategy"], plan["partitions"], plan["gpusPerPod"]) == ("auto", 1, 4)
    assert set(plan["metrics"]) == {
        "imbalance",
        "memoryImbalance",
        "totalBytes",
        "movedBytes",
        "movementLowerBound",
    }  # and "reason" only where the plan misses maxImbalance
    assert plan["metrics"]["totalBytes"] == 4_000_000 * 512 + 500_000 * 256 + 1000 * 64
    assert plan["metrics"]["imbalance"] <= 1.05
    assert set(plan["tables"]) == {"user-id", "item-id", "category"}
    for entry in plan["tables"].values():
        assert set(entry) <= {"rows", "rowBytes", "slots", "cuts"}  # every bucket of a table owned once
        assert len(entry.get("cuts", [])) == len(entry["slots"]) - 1
        assert all(0 <= slot < 4 for slot in entry["slots"])
    assert plan["tables"]["user-id"]["rows"] == 4_000_000 and plan["tables"]["user-id"]["rowBytes"] == 512
    parsed = Plan.from_dict(plan)
    assert parsed.to_dict() == plan
    assert sum(a.bytes for a in parsed.assignments) == plan["metrics"]["totalBytes"]


def test_flags_override_the_topology(model_file: Path) -> None:
    plan = plan_json("-f", model_file, "--gpus-per-pod", "2", "--partitions", "3", "--gpu-memory", "2Gi")
    assert (plan["partitions"], plan["gpusPerPod"]) == (3, 2)
    assert {(a.partition, a.gpu) for a in Plan.from_dict(plan).assignments} <= {
        (p, g) for p in range(3) for g in range(2)
    }


def test_a_previous_plan_is_rebalanced_with_few_moves(model_file: Path, tmp_path: Path) -> None:
    first = plan_json("-f", model_file)
    previous = tmp_path / "plan.json"
    previous.write_text(json.dumps(first))
    again = plan_json("-f", model_file, "--previous", previous)
    assert again == first  # nothing changed: the same plan, same version
    grown = plan_json("-f", model_file, "--gpus-per-pod", "5", "--previous", previous)
    assert grown["version"] == 2
    metrics = grown["metrics"]
    assert 0 < metrics["movementLowerBound"] <= metrics["movedBytes"] <= 1.1 * metrics["movementLowerBound"]
    # another model's plan is not a previous plan of this one: its version and buckets would carry over
    previous.write_text(json.dumps({**first, "model": "another"}))
    refused = hps("plan", "-f", model_file, "--previous", previous)
    assert refused.returncode == 2 and "a plan of model 'another'" in refused.stderr


def test_json_output_is_indented_with_one_line_per_table(model_file: Path) -> None:
    """A plan of thousands of GPUs stays readable and diffable: one line per table, not one per number."""
    done = hps("plan", "-f", model_file, "-o", "json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    table_lines = [line for line in lines if line.startswith('    "') and line.rstrip(",").endswith("}")]
    assert [line.split('"')[1] for line in table_lines] == ["category", "item-id", "user-id"]
    assert len(lines) == 21  # nine fields, five metrics, three tables and four lines of braces
    assert json.loads(done.stdout) == Plan.from_json(done.stdout).to_dict()


def test_a_plan_that_misses_max_imbalance_says_why(tmp_path: Path) -> None:
    path = tmp_path / "skewed.yaml"
    path.write_text(MODEL.replace("{name: category, rows: 1000, dim: 16, hotness: 0.2}",
                                  "{name: category, rows: 2, dim: 16, hotness: 0.9}"))  # fmt: skip
    metrics = plan_json("-f", path)["metrics"]
    assert metrics["imbalance"] > 1.05
    assert "one row (one key) of table category alone carries" in metrics["reason"]


def test_a_previous_plan_stored_as_v1_is_read(model_file: Path, tmp_path: Path) -> None:
    """Plans written by earlier releases (``hps.dev/plan/v1``) are what ``--previous`` meets in clusters."""
    first = Plan.from_dict(plan_json("-f", model_file))
    v1 = {key: value for key, value in first.to_dict().items() if key != "tables"}
    v1["format"] = "hps.dev/plan/v1"
    v1["assignments"] = [a.to_dict() for a in first.assignments]
    previous = tmp_path / "v1.json"
    previous.write_text(json.dumps(v1))
    again = Plan.from_dict(plan_json("-f", model_file, "--previous", previous))
    assert (again.version, again.assignments) == (first.version, first.assignments)  # unchanged: the same plan
    grown = plan_json("-f", model_file, "--gpus-per-pod", "5", "--previous", previous)
    assert grown["format"] == PLAN_FORMAT and grown["version"] == 2


def test_too_little_memory_is_one_line_with_needed_and_available(model_file: Path) -> None:
    done = hps("plan", "-f", model_file, "--gpu-memory", "100Mi", "-o", "json")
    assert done.returncode == 7
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    total = 4_000_000 * 512 + 500_000 * 256 + 1000 * 64
    assert f"needs {total} bytes" in lines[0] and f"{4 * 100 * 2**20} bytes available" in lines[0]


def test_the_default_output_is_a_table_per_gpu(model_file: Path) -> None:
    done = hps("plan", "-f", model_file)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model dlrm  plan v1  strategy auto")
    assert len([line for line in lines if line.strip().startswith("0 ")]) == 4  # partition 0, GPUs 0-3
    assert "imbalance" in lines[-1] and "movedBytes 0" in lines[-1]


def test_a_bad_previous_plan_names_the_file(model_file: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = hps("plan", "-f", model_file, "--previous", broken)
    assert done.returncode == 2
    assert str(broken) in done.stderr
