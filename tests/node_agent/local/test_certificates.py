"""The throwaway CA of ``hps local up --tls`` (``node_agent.local.certificates``): real keys and
certificates, checked with the ``cryptography`` package and with Python's own TLS stack."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509

from node_agent.local.certificates import RENEW_BEFORE, SERVER_DAYS, ensure_local_certificates


def test_the_ca_signs_a_server_certificate_for_the_loopback_names_and_keys_stay_private(tmp_path: Path) -> None:
    certs = ensure_local_certificates(tmp_path / "tls")
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    for key in (certs.ca_key_file, certs.key_file):
        assert key.stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                              ipaddress.ip_address("::1")}  # fmt: skip
    # a TLS client trusting the CA alone accepts the server by its address, as gRPC and redis-py do
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        client = ssl.create_default_context(cafile=str(certs.ca_file))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # fmt: skip
            assert tls.recv(2) == b"ok"
        thread.join(5)


def test_a_second_call_keeps_everything_and_a_certificate_near_its_end_is_issued_again(tmp_path: Path) -> None:
    first = ensure_local_certificates(tmp_path / "tls")
    ca, cert = first.ca_file.read_bytes(), first.cert_file.read_bytes()
    again = ensure_local_certificates(tmp_path / "tls")
    assert again.ca_file.read_bytes() == ca and again.cert_file.read_bytes() == cert
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=SERVER_DAYS) - RENEW_BEFORE / 2
    renewed = ensure_local_certificates(tmp_path / "tls", now=later)
    assert renewed.ca_file.read_bytes() == ca  # clients keep trusting the same CA
    assert renewed.cert_file.read_bytes() != cert
    fresh = x509.load_pem_x509_certificate(renewed.cert_file.read_bytes())
    assert fresh.not_valid_after_utc > later + RENEW_BEFORE
