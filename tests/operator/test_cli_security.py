"""The security flags of ``hps agent``, ``hps lookup``, ``hps update`` and ``hps load``: a real agent
process started with ``--tls-cert``/``--tls-key`` and ``--auth-token-env`` answers ``hps lookup
--tls-ca`` and ``hps update --token-file``; flags that cannot work together are one-line errors naming
them (exit code 2), before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hps_operator.cli import main as hps

from node_agent.local.certificates import ensure_local_certificates
from tests.operator.test_cli_messages import model_file, one_line

TOKEN = "test-update-token"


def test_an_agent_started_with_tls_and_a_token_serves_the_cli_that_has_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = model_file(tmp_path)
    np.save(tmp_path / "user.npy", np.arange(8, dtype=np.float32).reshape(4, 2))
    certs = ensure_local_certificates(tmp_path / "tls")
    ready = tmp_path / "ready.json"
    agent = subprocess.Popen(
        [sys.executable, "-m", "hps_operator", "agent", "-f", str(path), "--port", "0", "--load", "--device", "cpu",
         "--ready-file", str(ready), "--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file),
         "--auth-token-env", "HPS_TEST_AGENT_TOKEN"],
        env={**os.environ, "HPS_TEST_AGENT_TOKEN": TOKEN}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert agent.poll() is None, agent.stderr.read().decode() if agent.stderr else ""
            assert time.monotonic() < deadline, "the agent did not start within 60 s"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["tls"] is True
        endpoint = info["endpoint"]
        lookup = ["lookup", "--endpoint", endpoint, "--model", "demo", "--table", "user", "--keys", "1,3", "-o", "json"]
        assert hps([*lookup, "--tls-ca", str(certs.ca_file)]) == 0
        assert json.loads(capsys.readouterr().out)["vectors"] == [[2.0, 3.0], [6.0, 7.0]]
        assert hps([*lookup, "--timeout", "2"]) == 5  # plaintext to a TLS port: told to give the CA
        assert "give its CA" in capsys.readouterr().err
        np.save(tmp_path / "v.npy", np.full((1, 2), 9.0, np.float32))
        update = ["update", "--endpoint", endpoint, "--model", "demo", "--table", "user", "--keys", "3",
                  "--vectors-file", str(tmp_path / "v.npy"), "--tls-ca", str(certs.ca_file)]  # fmt: skip
        (tmp_path / "wrong").write_text("not-the-token\n")
        assert hps([*update, "--token-file", str(tmp_path / "wrong")]) == 9
        assert "the credential sent is not valid here" in one_line(capsys.readouterr().err)
        (tmp_path / "token").write_text(TOKEN + "\n")
        assert hps([*update, "--token-file", str(tmp_path / "token")]) == 0
        capsys.readouterr()
        assert hps([*lookup, "--tls-ca", str(certs.ca_file)]) == 0
        assert json.loads(capsys.readouterr().out)["vectors"][1] == [9.0, 9.0]
    finally:
        agent.terminate()
        agent.wait(15)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert needs --tls-key"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--auth-readers", "system:serviceaccount:a:b"], "--auth-readers needs --auth-reads"),
        (["--auth-token-env", "HPS_TEST_UNSET_TOKEN"], "--auth-token-env: environment variable HPS_TEST_UNSET_TOKEN"),
        (["--auth-kube-api", "https://x"], "need --auth-tokenreview"),
        (["--auth-tokenreview"], "give --auth-kube-api URL"),
        (["--no-auth", "--auth-reads", "--auth-token-env", "HOME"], "--no-auth contradicts"),
        (["--auth-writers", "system:serviceaccount:ns"], "is not system:serviceaccount:NAMESPACE:NAME"),
        (["--redis", "redis://127.0.0.1:1", "--redis-tls"], "names redis:// (plaintext) but a --redis-tls flag"),
        (["--redis", "rediss://u:p@127.0.0.1:1"], "carries credentials"),
        (["--redis", "127.0.0.1:1", "--redis-tls-ca", "missing.pem"], "--redis-tls-ca: missing.pem is not a file"),
    ],
)
def test_agent_flags_that_cannot_work_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str],
    message: str,
) -> None:  # fmt: skip
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.chdir(tmp_path)
    assert hps(["agent", "-f", str(model_file(tmp_path)), "--port", "0", *args]) == 2
    assert message in one_line(capsys.readouterr().err)


def test_client_flags_that_cannot_work_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["lookup", "--endpoint", "127.0.0.1:1", "--model", "demo", "--table", "user", "--keys", "1"]
    assert hps([*base, "--tls-ca", str(tmp_path / "missing.pem")]) == 2
    assert "the CA (--tls-ca): cannot read" in one_line(capsys.readouterr().err)
    assert hps([*base, "--tls-cert", "c.pem"]) == 2
    assert "--tls-cert needs --tls-key" in one_line(capsys.readouterr().err)
    assert hps([*base, "--token-file", "t", "--token-env", "HOME"]) == 2
    assert "give one" in one_line(capsys.readouterr().err)
    assert hps([base[0], *base[3:], "--state-dir", str(tmp_path / "nothing")]) == 3  # no --endpoint, no stack
    assert "no running stack" in one_line(capsys.readouterr().err)
