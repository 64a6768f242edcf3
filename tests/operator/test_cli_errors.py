"""What a user who points a flag at the wrong thing sees: one line naming it and an exit code, never a
traceback (a directory or an unreadable file where a file goes, JSON of another shape, a port out of
range, a Redis that does not answer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hps_operator.cli import main

from node_agent.local.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "demo.yaml"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "object.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "nodes.yaml").write_text("kind: Node\nmetadata: 5\n")
    (tmp_path / "hps.json").write_text(json.dumps({"models": 5}))
    np.save(tmp_path / "t.npy", np.ones((4, 2), dtype=np.float32))
    (tmp_path / "model.yaml").write_text("apiVersion: hps.dev/v1alpha1\nkind: EmbeddingModel\nmetadata: {name: m}\n"
                                         "spec: {tables: [{name: t, rows: 4, dim: 2, source: t.npy}]}\n")
    return {p.name: p for p in tmp_path.iterdir()}


def cases(f: dict[str, Path], tmp: Path) -> list[tuple[list[str], int, str]]:
    plan = ["plan", "-f", str(MODEL), "--previous"]
    return [
        ([*plan, str(f["folder"])], 2, str(f["folder"])),
        ([*plan, str(f["list.json"])], 2, "expected a plan document"),
        ([*plan, str(f["object.json"])], 2, "has no 'bucketCount' field"),
        (["render", "-f", str(MODEL), "--nodes", str(f["binary"])], 2, "is not a text file"),
        (["render", "-f", str(MODEL), "--nodes", str(f["nodes.yaml"])], 2, "a Node's metadata must be a mapping"),
        (["local", "status", "--state-dir", str(f["a-file"])], 2, str(f["a-file"])),
        (["convert-hps-config", str(f["hps.json"])], 2, "models"),
        (["convert-hps-config", str(MODEL.with_name("nope.json")), "-o", str(tmp / "no" / "dir" / "m.yaml")], 2, "nope.json"),
        (["agent", "-f", str(MODEL), "--port", "99999"], 2, "a port is 0 (any free one) to 65535"),
        (["local", "up", "-f", str(MODEL), "--port", "-1", "--state-dir", str(tmp / "s")], 2, "a port is 0"),
        (["load", "-f", str(f["model.yaml"]), "--redis", f"127.0.0.1:{free_port()}"], 5, "Redis"),
    ]


def test_a_wrong_path_or_shape_is_one_line_and_an_exit_code(files: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for argv, code, said in cases(files, tmp_path):
        try:
            got = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            got = int(exc.code or 0)
        err = capsys.readouterr().err
        assert (got, said in err, "Traceback" in err) == (code, True, False), (argv, got, err)
