"""``charts/hps-model``: an EmbeddingModel installed with Helm (DESIGN.md: a user ``kubectl apply``s or
``helm install``s one). Rendered by the real helm, the model is what the spec parser and the CRD's
schema accept; a spec without tables fails the render with the field named. Installing it on a real
API server, served by the operator, is in ``e2e/test_cluster_operator.py``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.spec import parse_model
from tests.charts.test_chart import ROOT, helm  # noqa: F401  (fixture)
from tests.operator.crd_schema import validation_errors

CHART = ROOT / "charts" / "hps-model"


def demo_spec() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())["spec"])


def template(helm: str, tmp_path: Path, values: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:  # noqa: F811
    file = tmp_path / "values.yaml"
    file.write_text(yaml.safe_dump(values))
    return subprocess.run([helm, "template", "dlrm", str(CHART), "-n", "recsys", "-f", str(file), *extra],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_chart_renders_the_model_its_values_give(helm: str, tmp_path: Path) -> None:  # noqa: F811
    values = {"spec": demo_spec(), "labels": {"team": "ranking"}, "annotations": {"owner": "ml-platform"}}
    done = template(helm, tmp_path, values)
    assert done.returncode == 0, done.stderr
    (model,) = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert (model["kind"], model["metadata"]["name"], model["metadata"]["namespace"]) == ("EmbeddingModel", "dlrm", "recsys")
    assert model["metadata"]["labels"]["team"] == "ranking" and model["metadata"]["annotations"] == {"owner": "ml-platform"}
    assert model["spec"] == demo_spec()
    assert validation_errors(model) == []
    assert parse_model(model).name == "dlrm"
    named = template(helm, tmp_path, {**values, "name": "ctr-v2"})
    assert yaml.safe_load(named.stdout)["metadata"]["name"] == "ctr-v2"
    lint = subprocess.run([helm, "lint", str(CHART), "-f", str(tmp_path / "values.yaml")], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("spec", [{}, {"tables": []}, {"replicas": 2}])
def test_a_spec_without_tables_fails_the_render_naming_the_field(helm: str, tmp_path: Path, spec: dict[str, Any]) -> None:  # noqa: F811
    done = template(helm, tmp_path, {"spec": spec})
    assert done.returncode != 0
    assert "spec.tables: an EmbeddingModel needs at least one table" in done.stderr
