"""How a process reaches Redis: as which ACL user, with which password, and over TLS or not.

Every client the data plane makes (the agents' tier, probes, update consumers and producers, the
loader) takes one :class:`RedisAccess` and turns it into redis-py's options here, so TLS and users
work the same everywhere. Addresses stay ``HOST:PORT`` lists; ``rediss://HOST:PORT`` is accepted
where addresses are given and turns TLS on (``redis://`` is plain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from node_agent.errors import InvalidArgumentError


@dataclass(frozen=True)
class RedisTLS:
    """TLS to Redis: ``ca_file`` the CA its certificate chains to (``None``: the system's roots),
    ``cert_file``/``key_file`` this client's certificate when Redis asks for one (``tls-auth-clients``),
    ``check_hostname`` whether the certificate must name the host connected to (off for a Redis Cluster
    whose nodes announce addresses their certificates do not carry; the chain is checked either way)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgumentError("a Redis client certificate needs its key: give both --redis-tls-cert and "
                                       "--redis-tls-key, or neither")  # fmt: skip
        for what, path in (("--redis-tls-ca", self.ca_file), ("--redis-tls-cert", self.cert_file),
                           ("--redis-tls-key", self.key_file)):  # fmt: skip
            if path is not None and not Path(path).is_file():
                raise InvalidArgumentError(f"{what}: {path} is not a file")

    def options(self) -> dict[str, Any]:
        return {
            "ssl_ca_certs": str(self.ca_file) if self.ca_file else None,
            "ssl_certfile": str(self.cert_file) if self.cert_file else None,
            "ssl_keyfile": str(self.key_file) if self.key_file else None,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": self.check_hostname,
        }


@dataclass(frozen=True)
class RedisAccess:
    """One process's way into Redis. ``username`` ``None`` is Redis's ``default`` user (what a bare
    ``requirepass`` sets the password of); a role's ACL user otherwise (:mod:`node_agent.redis_acl`)."""

    username: str | None = None
    password: str | None = None
    tls: RedisTLS | None = None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` and ``redis.RedisCluster``."""
        out: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls is not None:
            out.update(ssl=True, **self.tls.options())
        return out

    def pool_options(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.ConnectionPool`` (which takes a connection class, not ``ssl``)."""
        out: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls is not None:
            out.update(connection_class=redis.SSLConnection, **self.tls.options())
        return out

    def with_tls(self, tls: RedisTLS | None) -> RedisAccess:
        return replace(self, tls=tls)

    def describe(self) -> str:
        """Who connects, and how, for messages (never the password)."""
        user = self.username or "default"
        return f"user {user}{'' if self.password else ' (no password)'}, {'TLS' if self.tls else 'plaintext'}"


#: no user, no password, no TLS: a throwaway test server
PLAIN = RedisAccess()


def access_of(access: RedisAccess | None) -> RedisAccess:
    return access if access is not None else PLAIN


def parse_redis_addresses(text: str | Sequence[str]) -> tuple[list[str], bool | None]:
    """``HOST:PORT[,HOST:PORT...]``, each optionally ``redis://`` or ``rediss://``, as plain addresses and
    whether TLS was asked (``True`` for ``rediss``, ``False`` for ``redis``, ``None`` when no scheme was
    written). Mixed schemes, or a URL carrying a user, password or path, are errors that say why."""
    items = [a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a and a.strip()]
    addresses: list[str] = []
    schemes: set[str] = set()
    for item in items:
        scheme, sep, rest = item.partition("://")
        if not sep:
            scheme, rest = "", item
        elif scheme not in ("redis", "rediss"):
            raise InvalidArgumentError(f"Redis address {item!r}: the scheme must be redis:// or rediss://")
        if "@" in rest:
            raise InvalidArgumentError(
                f"Redis address {item!r} carries credentials: give the user with --redis-user and the password "
                "through --redis-password-env (a password on a command line is visible to every process)")  # fmt: skip
        rest = rest.rstrip("/")
        if "/" in rest:
            raise InvalidArgumentError(
                f"Redis address {item!r}: a database number or path is not used; give HOST:PORT"
            )
        schemes.add(scheme)
        addresses.append(rest)
    named = schemes - {""}
    if len(named) > 1:
        raise InvalidArgumentError(
            "Redis addresses mix redis:// and rediss://: one Redis is TLS or it is not"
        )
    return addresses, (None if not named else named == {"rediss"})
