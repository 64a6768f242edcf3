"""What the ``hps`` commands say when the input is wrong: one line on stderr naming the problem and the
fix, the documented exit code, and nothing started. Commands run in process (``hps_operator.cli.main``)
except where what the user reads includes log lines: those run as the real command in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hps_operator.cli import main as hps

from node_agent.local.redis_servers import RedisProcess, free_port

MODEL = """\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: demo}
spec:
  tables:
  - {name: user, rows: 4, dim: 2, source: user.npy}
"""


def model_file(tmp_path: Path, text: str = MODEL) -> Path:
    np.save(tmp_path / "user.npy", np.zeros((4, 2), np.float32))
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [["plan", "-o", "json", "-f"], ["load", "--check", "-f"], ["local", "up", "--state-dir", "{state}", "-f"]],
)
def test_every_command_reading_a_model_refuses_an_unknown_field_naming_the_closest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = model_file(tmp_path, MODEL + "  replica: 2\n")
    args = [a.replace("{state}", str(tmp_path / "state")) for a in command]
    assert hps([*args, str(path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.endswith("spec.replica: unknown field; did you mean replicas?")
    assert not (tmp_path / "state" / "state.json").exists()  # nothing was started


@pytest.mark.parametrize(
    "command",
    [["plan", "-o", "json", "-f"], ["load", "--check", "-f"], ["local", "up", "--state-dir", "{state}", "-f"]],
)
def test_a_directory_given_as_the_model_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    args = [a.replace("{state}", str(tmp_path / "state")) for a in command]
    assert hps([*args, str(tmp_path)]) == 2
    assert "is a directory; give the EmbeddingModel's YAML file" in one_line(capsys.readouterr().err)


def test_an_endpoint_without_a_port_is_refused_instead_of_trying_443(capsys: pytest.CaptureFixture[str]) -> None:
    assert hps(["lookup", "--endpoint", "localhost", "--model", "demo", "--table", "user", "--keys", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.endswith("endpoint 'localhost' has no port: give HOST:PORT, e.g. localhost:50051")


def test_no_endpoint_answered_names_each_endpoint_once(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    code = hps(["lookup", "--endpoint", dead, "--model", "demo", "--table", "user", "--keys", "1", "--timeout", "0.5"])
    assert code == 5
    line = one_line(capsys.readouterr().err)
    assert f"no endpoint answered Lookup ({dead}, 3 attempts)" in line
    ours = line.split(": UNAVAILABLE")[0]  # what follows is gRPC's own reason, which names it again
    assert ours.count(dead) == 1


@pytest.mark.parametrize("keys", ["a,b", "1,,x", "1.5"])
def test_keys_that_are_not_integers_are_named(capsys: pytest.CaptureFixture[str], keys: str) -> None:
    assert hps(["lookup", "--endpoint", "127.0.0.1:1", "--model", "demo", "--table", "user", "--keys", keys]) == 2
    line = one_line(capsys.readouterr().err)
    assert "is not an integer; give comma-separated integer keys, e.g. --keys 1,2,3" in line
    assert "invalid literal" not in line


def test_update_without_the_redis_password_says_where_it_goes_once(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    np.save(tmp_path / "v.npy", np.zeros((1, 2), np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "hps_operator", "update", "--redis", redis_server.address, "--model", "demo",
         "--table", "user", "--keys", "1", "--vectors-file", str(tmp_path / "v.npy")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 9
    line = one_line(proc.stderr)
    assert f"Redis at {redis_server.address} requires a password and none was given" in line
    assert "--redis-password-env VAR" in line and "--state-dir DIR" in line
    assert "HELLO" not in proc.stderr
