"""The control plane lives in ``operator/`` but must never shadow the standard library's ``operator``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str, cwd: Path | str = ROOT, stdin: str = "") -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_repo_root_first_on_sys_path_still_imports_the_standard_library_operator() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.modules.pop('operator', None)\n"
        "import operator; print(operator.__file__); print(operator.itemgetter(1)('ab'))"
    )
    path, item = run_python("-c", code, str(ROOT)).split()
    assert not Path(path).is_relative_to(ROOT)
    assert item == "b"


def test_python_dash_m_from_the_repo_root_works() -> None:
    # `-m` puts the current directory first on sys.path before runpy imports collections -> operator:
    # this is how `python -m pip install -e .` is run from a checkout.
    assert run_python("-m", "json.tool", stdin='{"a": 1}').split() == ["{", '"a":', "1", "}"]


def test_control_plane_imports_as_hps_operator() -> None:
    out = run_python("-c", "import hps_operator.cli, hps_operator.core; print(hps_operator.cli.__file__)", cwd="/")
    assert Path(out.strip()).parent == ROOT / "operator" / "cli"


def test_hps_console_script_and_module_list_their_commands() -> None:
    hps = Path(sys.executable).parent / "hps"
    for command in ([str(hps), "--help"], [sys.executable, "-m", "hps_operator", "--help"]):
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        assert "usage: hps" in out.stdout
        assert "local" in out.stdout and "plan" in out.stdout
