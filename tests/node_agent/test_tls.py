"""gRPC TLS on the agent (``node_agent.tls``, ``serve(tls=...)``) over real loopback sockets, with
certificates from the throwaway CA ``hps local up --tls`` makes: lookups and updates through the
client trusting that CA, refusals of a client that trusts another CA or speaks plaintext, a certificate
rotated under a running server, and mutual TLS."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from node_agent.auth import RpcGuard, SharedToken
from node_agent.client import Client
from node_agent.errors import InvalidArgumentError, UnavailableError
from node_agent.local.certificates import LocalCertificates, ensure_local_certificates, issue_certificate
from node_agent.lookup import LookupPath, build_lookup_path
from node_agent.server import RunningServer, serve
from node_agent.spec import load_model_file
from node_agent.tiers.hashmap import HashMapTier
from node_agent.tls import ClientTLS, ServerTLS
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model

TOKEN = "test-update-token"


@dataclass
class Secure:
    data: dict[str, TableData]
    lookup: LookupPath
    certs: LocalCertificates
    #: the files the server reads (copies, so a test can rotate them)
    served: ServerTLS

    def serve(self, *, client_ca: Path | None = None) -> RunningServer:
        tls = ServerTLS(self.served.cert_file, self.served.key_file, client_ca)
        return serve(self.lookup, model="demo", tls=tls, guard=RpcGuard([SharedToken(value=TOKEN)]))


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    tier = HashMapTier(layouts(model))
    fill(tier, data)
    lookup = build_lookup_path(model, volatile=tier, persistent=None, device="cpu")
    certs = ensure_local_certificates(tmp_path / "tls")
    served = ServerTLS(tmp_path / "served" / "tls.crt", tmp_path / "served" / "tls.key")
    served.cert_file.parent.mkdir()
    shutil.copy(certs.cert_file, served.cert_file)
    shutil.copy(certs.key_file, served.key_file)
    yield Secure(data, lookup, certs, served)
    lookup.close()


def replace_file(source: Path, target: Path) -> None:
    """As a Secret volume or a careful operator does it: the new file appears whole, by a rename."""
    partial = target.with_name(target.name + ".new")
    shutil.copy(source, partial)
    partial.replace(target)


def test_lookups_and_updates_over_tls_with_the_generated_ca(secure: Secure) -> None:
    server = secure.serve()
    try:
        with Client(server.endpoint, tls=secure.certs.ca_file, token=TOKEN) as client:
            keys = [1, 4, 7, 999]
            np.testing.assert_array_equal(
                client.lookup("demo", "user", keys), secure.data["user"].expected(keys)
            )
            assert client.update("demo", "user", [4], np.full((1, 8), 2.5, np.float32)) == 1
            np.testing.assert_array_equal(
                client.lookup("demo", "user", [4]), np.full((1, 8), 2.5, np.float32)
            )
        # the endpoint's name in the certificate, not only its address
        with Client(f"localhost:{server.port}", tls=secure.certs.ca_file) as client:
            assert client.describe("demo").model == "demo"
        assert client_stats_tls(server) == {"reloads": 0, "rejected_changes": 0}
    finally:
        server.stop(0)


def client_stats_tls(server: RunningServer) -> dict[str, int]:
    tls = server.servicer.snapshot()["tls"]
    return {k: tls[k] for k in ("reloads", "rejected_changes")}


def test_a_client_trusting_another_ca_or_speaking_plaintext_is_refused_and_told_why(
    secure: Secure, tmp_path: Path
) -> None:
    server = secure.serve()
    other = ensure_local_certificates(tmp_path / "other-ca")
    try:
        with (
            Client(server.endpoint, tls=other.ca_file, retries=0, timeout=2) as client,
            pytest.raises(UnavailableError, match="not signed by the CA this client trusts"),
        ):
            client.lookup("demo", "user", [1])
        with (
            Client(server.endpoint, retries=0, timeout=2) as client,
            pytest.raises(UnavailableError, match=r"if the agent serves TLS, give its CA"),
        ):
            client.lookup("demo", "user", [1])
        # a name the certificate does not carry is refused too (the CA alone is not enough)
        elsewhere = ClientTLS(secure.certs.ca_file, server_name="agent.example.com")
        with (
            Client(server.endpoint, tls=elsewhere, retries=0, timeout=2) as client,
            pytest.raises(UnavailableError),
        ):
            client.lookup("demo", "user", [1])
    finally:
        server.stop(0)


def test_a_rotated_certificate_is_served_from_the_next_connection_without_a_restart(
    secure: Secure, tmp_path: Path
) -> None:
    server = secure.serve()
    rotated = ensure_local_certificates(tmp_path / "next-ca")  # a new CA too: only the new pair can verify
    try:
        with Client(server.endpoint, tls=secure.certs.ca_file) as before:
            assert before.describe("demo").model == "demo"
        replace_file(rotated.key_file, secure.served.key_file)
        replace_file(rotated.cert_file, secure.served.cert_file)
        with Client(server.endpoint, tls=rotated.ca_file, retries=0, timeout=2) as after:
            np.testing.assert_array_equal(
                after.lookup("demo", "user", [1]), secure.data["user"].expected([1])
            )
        with (
            Client(server.endpoint, tls=secure.certs.ca_file, retries=0, timeout=2) as stale,
            pytest.raises(UnavailableError, match="not signed"),
        ):
            stale.describe("demo")
        assert client_stats_tls(server) == {"reloads": 1, "rejected_changes": 0}
    finally:
        server.stop(0)


def test_a_rotation_half_written_keeps_the_served_pair_until_the_key_matches(
    secure: Secure, tmp_path: Path
) -> None:
    server = secure.serve()
    rotated = ensure_local_certificates(tmp_path / "next-ca")
    try:
        replace_file(rotated.cert_file, secure.served.cert_file)  # the key is still the old one
        with Client(server.endpoint, tls=secure.certs.ca_file, retries=0, timeout=2) as client:
            assert client.describe("demo").model == "demo"  # still the old pair: no broken handshake
        tls = server.servicer.snapshot()["tls"]
        assert tls["reloads"] == 0 and tls["rejected_changes"] == 1
        assert "not a PEM certificate and its key" in tls["last_error"]
        replace_file(rotated.key_file, secure.served.key_file)
        with Client(server.endpoint, tls=rotated.ca_file, retries=0, timeout=2) as client:
            assert client.describe("demo").model == "demo"
        assert server.servicer.snapshot()["tls"]["reloads"] == 1
    finally:
        server.stop(0)


def test_mutual_tls_refuses_a_client_without_a_certificate(secure: Secure, tmp_path: Path) -> None:
    server = secure.serve(client_ca=secure.certs.ca_file)
    issue_certificate(secure.certs, tmp_path / "client.crt", tmp_path / "client.key", common_name="trainer")
    try:
        with (
            Client(server.endpoint, tls=secure.certs.ca_file, retries=0, timeout=2) as anonymous,
            pytest.raises(UnavailableError),
        ):
            anonymous.describe("demo")
        mine = ClientTLS(secure.certs.ca_file, tmp_path / "client.crt", tmp_path / "client.key")
        with Client(server.endpoint, tls=mine, token=TOKEN) as client:
            assert client.update("demo", "user", [7], np.full((1, 8), 1.0, np.float32)) == 1
        assert server.servicer.snapshot()["tls"]["mutual"] is True
    finally:
        server.stop(0)


def test_a_key_that_is_not_its_certificates_is_refused_before_the_port_opens(
    secure: Secure, tmp_path: Path
) -> None:
    other = ensure_local_certificates(tmp_path / "other-ca")
    with pytest.raises(
        InvalidArgumentError, match=r"tls\.crt and .*tls\.key are not a PEM certificate and its key"
    ):
        serve(secure.lookup, model="demo", tls=ServerTLS(secure.served.cert_file, other.key_file.rename(
            tmp_path / "tls.key")))  # fmt: skip


def test_client_tls_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"the CA \(--tls-ca\): cannot read .*missing\.crt"):
        Client("127.0.0.1:1", tls=tmp_path / "missing.crt")
    with pytest.raises(InvalidArgumentError, match="needs its key"):
        ClientTLS(tmp_path / "ca.crt", cert_file=tmp_path / "c.crt")
