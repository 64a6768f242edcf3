"""The control plane lives in ``operator/`` but must never shadow the standard library's ``operator``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_operator_from_repo_root_is_the_standard_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator, sys; print(operator.__file__); print(operator.itemgetter(1)('ab'))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    path, item = out.stdout.split()
    assert not Path(path).is_relative_to(ROOT)
    assert item == "b"


def test_control_plane_imports_as_hps_operator() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import hps_operator.cli, hps_operator.core; print(hps_operator.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(out.stdout.strip()).parent == ROOT / "operator"


def test_hps_console_script_lists_its_commands() -> None:
    hps = Path(sys.executable).parent / "hps"
    out = subprocess.run([str(hps), "--help"], capture_output=True, text=True, check=True)
    assert "usage: hps" in out.stdout
