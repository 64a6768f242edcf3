"""TLS for the agent's gRPC port: the server side reads its certificate and key from files (a mounted
Secret's ``tls.crt``/``tls.key``) and reads them again when they change, so a rotated certificate is
served from the next connection on without a restart; the client side says which CA to trust and,
for mutual TLS, which certificate to present.

Rotation is checked on every new connection (gRPC asks before each handshake), by one ``stat`` of each
file. A pair that does not match (a key written before its certificate, say) is not taken: the agent
keeps serving the pair it has and tries again on the next connection, so a rotation in two steps never
serves a broken handshake.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from node_agent.errors import InvalidArgumentError

log = logging.getLogger(__name__)

#: (inode, mtime, size) of each file: a Kubernetes Secret volume swaps a symlink, which changes all three
_Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class ServerTLS:
    """What ``hps agent --tls-cert/--tls-key [--tls-client-ca]`` serves with: a PEM certificate chain
    and its key, and optionally a CA whose certificates clients must present (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def files(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file, *((self.client_ca_file,) if self.client_ca_file else ()))


@dataclass(frozen=True)
class _Loaded:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    signature: _Signature


class CertificateReloader:
    """The server's certificate, re-read from its files when they change (see the module doc).

    :meth:`credentials` is what a gRPC server's secure port takes; gRPC calls :meth:`fetch` before every
    handshake. :meth:`stats` says how often the files were taken, and why the last change was not."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._reloads = 0
        self._rejected = 0
        self._last_error = ""
        self._rejected_signature: _Signature | None = None
        loaded = self._load()
        if isinstance(loaded, str):
            raise InvalidArgumentError(loaded)
        self._current = loaded

    def credentials(self) -> grpc.ServerCredentials:
        # the stubs say the fetcher returns a configuration; gRPC's own docstring: None keeps the current one
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._current), self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.tls.client_ca_file is not None,
        )  # fmt: skip

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and hold a matching pair; ``None`` (keep the
        current one) otherwise. Never raises: it runs inside gRPC's handshake."""
        try:
            signature = _signature(self.tls.files())
        except OSError as exc:
            self._reject(None, f"cannot read the TLS files: {exc}")
            return None
        with self._lock:
            if signature == self._current.signature or signature == self._rejected_signature:
                return None
        loaded = self._load()
        if isinstance(loaded, str):
            self._reject(signature, loaded)
            return None
        with self._lock:
            self._current = loaded
            self._reloads += 1
            self._last_error = ""
            self._rejected_signature = None
        log.info("TLS: serving the certificate now in %s", self.tls.cert_file)
        return self._configuration(loaded)

    def _reject(self, signature: _Signature | None, error: str) -> None:
        with self._lock:
            first = signature is None or signature != self._rejected_signature
            self._rejected_signature = signature
            self._last_error = error
            if first:
                self._rejected += 1
        if first:
            log.warning("TLS: keeping the certificate served so far: %s", error)

    @property
    def degraded(self) -> bool:
        return False  # the pair served is still valid; a failed rotation shows in stats()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"cert_file": str(self.tls.cert_file), "mutual": self.tls.client_ca_file is not None,
                    "reloads": self._reloads, "rejected_changes": self._rejected, "last_error": self._last_error}  # fmt: skip

    def _load(self) -> _Loaded | str:
        """The files' pair, checked to match (or the reason it cannot be served). Read, checked, and read
        again: a pair that changed in between is someone writing it, and is taken on a later try."""
        tls = self.tls
        try:
            before = _signature(tls.files())
            cert, key = tls.cert_file.read_bytes(), tls.key_file.read_bytes()
            client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        except OSError as exc:
            return f"cannot read the TLS files: {exc}"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
            if tls.client_ca_file is not None:
                context.load_verify_locations(cafile=str(tls.client_ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return (f"{tls.cert_file} and {tls.key_file} are not a PEM certificate and its key"
                    f"{' (or ' + str(tls.client_ca_file) + ' is not a PEM CA)' if tls.client_ca_file else ''}: {exc}")  # fmt: skip
        try:
            after = _signature(tls.files())
        except OSError as exc:
            return f"cannot read the TLS files: {exc}"
        if after != before:
            return "the TLS files changed while they were read"
        return _Loaded(cert, key, client_ca, after)

    @staticmethod
    def _configuration(loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.cert)], loaded.client_ca)


def _signature(files: tuple[Path, ...]) -> _Signature:
    out = []
    for path in files:
        st = os.stat(path)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


# -- the client side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the agent (and proves itself, for mutual TLS).

    ``ca_file``: the PEM CA the agent's certificate must chain to (``None``: the system's roots);
    ``cert_file``/``key_file``: this client's own certificate, when the agent asks for one;
    ``server_name``: the name the certificate must carry, when the endpoint's host is not it (a
    Service's DNS name behind a port-forward, say)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgumentError("a client certificate needs its key: give both cert_file and key_file "
                                       "(--tls-cert and --tls-key), or neither")  # fmt: skip

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC's credentials for this configuration; a file that cannot be read is an error naming it."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "the CA (--tls-ca)") if self.ca_file else None,
            private_key=_read(self.key_file, "the client key (--tls-key)") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "the client certificate (--tls-cert)") if self.cert_file else None,
        )  # fmt: skip

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(value: ClientTLS | str | os.PathLike[str] | bool | None) -> ClientTLS | None:
    """What ``Client(..., tls=...)`` accepts, as one type: a :class:`ClientTLS`; a CA file's path;
    ``True`` (the system's roots); ``None`` or ``False`` (plaintext)."""
    if value is None or value is False:
        return None
    if value is True:
        return ClientTLS()
    if isinstance(value, ClientTLS):
        return value
    if isinstance(value, str | os.PathLike):
        return ClientTLS(ca_file=Path(value))
    raise InvalidArgumentError(
        f"tls must be a CA file's path, True, or a ClientTLS; got {type(value).__name__}"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def tls_failure_hint(details: str) -> str:
    """A sentence on what a TLS failure in gRPC's words (``details`` of an UNAVAILABLE) means, or ``""``."""
    text = details.lower()
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return ("the agent's certificate is not signed by the CA this client trusts (--tls-ca), or does not "
                "name the host asked (--tls-server-name)")  # fmt: skip
    if "wrong_version_number" in text or "packet_length_too_long" in text:
        return (
            "the agent does not speak TLS: drop --tls-ca (or start the agent with --tls-cert and --tls-key)"
        )
    if "handshake" in text and ("certificate_required" in text or "peer did not return a certificate" in text
                                or "sslv3_alert" in text):  # fmt: skip
        return "the agent asks for a client certificate (mutual TLS): give --tls-cert and --tls-key"
    return ""
