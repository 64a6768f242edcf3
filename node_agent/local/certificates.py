"""A throwaway certificate authority for ``hps local up --tls``: one CA and one server certificate for
this machine's loopback names, which the agents (gRPC) and redis-server (TLS port) both serve, and which
a client trusts through the CA file alone.

Keys are ECDSA P-256 (small, fast handshakes, accepted by gRPC's BoringSSL and by OpenSSL); the CA's
key stays in the state directory, readable by its owner only, so ``up`` can issue a fresh server
certificate when the old one nears its end without clients having to trust a new CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: the names the server certificate carries: what a local client may dial
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 365
#: a server certificate with less than this left is issued again by the next ``up``
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class LocalCertificates:
    """The files of a local CA (``directory``): what servers serve and what clients trust."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key_file(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert_file(self) -> Path:
        return self.directory / "server.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "server.key"

    def exist(self) -> bool:
        return all(p.exists() for p in (self.ca_file, self.ca_key_file, self.cert_file, self.key_file))


def ensure_local_certificates(
    directory: str | Path, *, now: datetime.datetime | None = None
) -> LocalCertificates:
    """The CA and server certificate in ``directory``, made when missing; a server certificate that
    expires within :data:`RENEW_BEFORE` (or was not signed by this CA) is issued again, the CA kept."""
    certs = LocalCertificates(Path(directory).absolute())
    certs.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(certs.directory, 0o700)
    now = now or datetime.datetime.now(datetime.UTC)
    if not (certs.ca_file.exists() and certs.ca_key_file.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now)
        _write(certs.ca_key_file, _private_pem(ca_key), private=True)
        _write(certs.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
        for stale in (certs.cert_file, certs.key_file):
            stale.unlink(missing_ok=True)
    ca_cert = x509.load_pem_x509_certificate(certs.ca_file.read_bytes())
    loaded_key = serialization.load_pem_private_key(certs.ca_key_file.read_bytes(), password=None)
    if not isinstance(loaded_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{certs.ca_key_file} is not the EC key hps local made")
    if _server_current(certs, ca_cert, now):
        return certs
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_cert, loaded_key, now)
    _write(certs.key_file, _private_pem(server_key), private=True)
    _write(certs.cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    return certs


def issue_certificate(certs: LocalCertificates, cert_file: Path, key_file: Path, *, common_name: str,
                      now: datetime.datetime | None = None, days: int = SERVER_DAYS) -> None:  # fmt: skip
    """Another certificate for the loopback names signed by the local CA (a client's own, for mutual
    TLS; or a rotated server certificate)."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_cert = x509.load_pem_x509_certificate(certs.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key_file.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_certificate(key, ca_cert, ca_key, now, common_name=common_name, days=days)
    _write(key_file, _private_pem(key), private=True)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))


def _server_current(certs: LocalCertificates, ca_cert: x509.Certificate, now: datetime.datetime) -> bool:
    try:
        server = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
        certs.key_file.stat()
    except (OSError, ValueError):
        return False
    return server.issuer == ca_cert.subject and server.not_valid_after_utc - now > RENEW_BEFORE


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hps local CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hps-operator (throwaway, this machine only)")])  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                        now: datetime.datetime, *, common_name: str = "hps local server",
                        days: int = SERVER_DAYS) -> x509.Certificate:  # fmt: skip
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in LOOPBACK_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in LOOPBACK_ADDRESSES]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # both: redis-server's cluster bus and replication connect out with the same certificate
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Written beside ``path`` and renamed over it: a server re-reading its files on rotation never reads
    half of one; a key is created readable by its owner only."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    partial.replace(path)
