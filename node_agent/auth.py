"""Who may call an agent's RPCs. A caller sends a bearer token in the call's metadata
(``authorization: Bearer <token>``); an :class:`Authenticator` says whose it is, and an
:class:`RpcGuard` whether that identity may write (Update) or, when reads are restricted, read
(Lookup, Describe, Stats).

Two authenticators: :class:`SharedToken` (one secret every trusted caller holds: ``hps local up``
generates it; in a cluster, a Secret) and :class:`TokenReview` (a Kubernetes projected service-account
token, verified by the API server's TokenReview API; the answers are cached briefly, as the API server
caches its own webhook answers). The guard is pure: it turns what the authenticators say into an
identity or a typed error (:class:`UnauthenticatedError` for no credential or one that is not valid,
:class:`PermissionDeniedError` for a valid one that is not allowed), which the server's edge turns
into ``UNAUTHENTICATED`` / ``PERMISSION_DENIED``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node_agent.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

#: the metadata key a credential travels in (gRPC lower-cases metadata keys)
AUTHORIZATION = "authorization"
#: the username a :class:`SharedToken` holder is known by
SHARED_TOKEN_USER = "hps:shared-token"
#: the RPCs that change what the agent serves; every other RPC reads
WRITE_METHODS = frozenset({"Update"})

#: where a pod finds its own service-account token, the cluster's CA, and the API server
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: how long a TokenReview answer is trusted: the API server's own webhook cache keeps an
#: authenticated answer 2 minutes; shorter here, so a deleted service account stops writing sooner
TOKENREVIEW_CACHE_S = 60.0
#: a token the API server refused is asked about again after this long (it may have been just issued)
TOKENREVIEW_NEGATIVE_CACHE_S = 5.0
TOKENREVIEW_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Identity:
    """Who a valid credential belongs to: a Kubernetes username (``system:serviceaccount:NS:NAME``) and
    its groups, or :data:`SHARED_TOKEN_USER`."""

    username: str
    groups: tuple[str, ...] = ()


class Authenticator(Protocol):
    """Says whose a bearer token is."""

    def authenticate(self, token: str) -> Identity | None:
        """The token's identity, or ``None`` when it is not valid here. Raises :class:`UnavailableError`
        when it cannot tell (the API server does not answer)."""
        ...

    def describe(self) -> str:
        """What kind of credential it takes, for the message a caller without one gets."""
        ...


class SharedToken:
    """A token every trusted caller holds, from a file (read again when it changes, so a rotated
    Secret is taken without a restart) or given as a value."""

    def __init__(self, *, value: str | None = None, file: Path | None = None) -> None:
        if (value is None) == (file is None):
            raise InvalidArgumentError("a shared token comes from a value or a file: give one")
        self._file = Path(file) if file is not None else None
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._token = b""
        if value is not None:
            self._token = _checked_token(value, "the shared token").encode()
        else:
            self._reload()

    def _reload(self) -> None:
        assert self._file is not None
        try:
            st = os.stat(self._file)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return
            text = self._file.read_text()
        except OSError as exc:
            if self._signature is None:
                raise InvalidArgumentError(
                    f"the shared token file {self._file}: {exc.strerror or exc}"
                ) from None
            log.warning(
                "shared token file %s unreadable (%s): keeping the token read before", self._file, exc
            )
            return
        token = _checked_token(text.strip(), f"the shared token file {self._file}")
        with self._lock:
            self._token, self._signature = token.encode(), signature

    def authenticate(self, token: str) -> Identity | None:
        if self._file is not None:
            self._reload()
        with self._lock:
            expected = self._token
        # constant time: how long a comparison takes must not tell how much of a guess was right
        return Identity(SHARED_TOKEN_USER) if hmac.compare_digest(token.encode(), expected) else None

    def describe(self) -> str:
        return "the token this agent shares with its callers"


def _checked_token(token: str, what: str) -> str:
    if not token:
        raise InvalidArgumentError(f"{what} is empty")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise InvalidArgumentError(f"{what} holds spaces or unprintable characters; a bearer token cannot")
    return token


@dataclass(frozen=True)
class KubernetesAPI:
    """How the agent reaches the API server for TokenReview: its URL, the agent's own service-account
    token (a file, read at each review: kubelet rotates it) and the CA that signed the API server."""

    url: str
    token_file: Path
    ca_file: Path | None

    @classmethod
    def in_cluster(cls, *, url: str | None = None, token_file: Path | None = None,
                   ca_file: Path | None = None) -> KubernetesAPI:  # fmt: skip
        """What a pod has: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and its mounted service-account files;
        each can be overridden."""
        if url is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if not host or not port:
                raise InvalidArgumentError(
                    "--auth-tokenreview: the API server's address is unknown (KUBERNETES_SERVICE_HOST and "
                    "KUBERNETES_SERVICE_PORT are not set outside a pod): give --auth-kube-api URL")  # fmt: skip
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token_file = token_file or SERVICE_ACCOUNT_DIR / "token"
        if ca_file is None and (SERVICE_ACCOUNT_DIR / "ca.crt").exists():
            ca_file = SERVICE_ACCOUNT_DIR / "ca.crt"
        return cls(url.rstrip("/"), Path(token_file), Path(ca_file) if ca_file else None)


@dataclass
class _Review:
    identity: Identity | None
    expires: float


class TokenReview:
    """Verifies bearer tokens with the Kubernetes TokenReview API
    (``POST /apis/authentication.k8s.io/v1/tokenreviews``; the agent's service account needs ``create``
    on ``tokenreviews``, as ClusterRole ``system:auth-delegator`` grants). ``audiences``: the token must
    be for one of them (a projected token's ``audience``); empty: the API server's own audience.

    Answers are cached by the token's SHA-256 (never the token itself): an authenticated one for
    ``cache_s``, a refused one for ``negative_cache_s``; the API server not answering is never cached."""

    def __init__(self, api: KubernetesAPI, *, audiences: Sequence[str] = (), timeout_s: float = 5.0,
                 cache_s: float = TOKENREVIEW_CACHE_S, negative_cache_s: float = TOKENREVIEW_NEGATIVE_CACHE_S,
                 clock: Any = time.monotonic) -> None:  # fmt: skip
        self.api = api
        self.audiences = tuple(audiences)
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._negative_cache_s = negative_cache_s
        self._clock = clock
        self._cache: OrderedDict[bytes, _Review] = OrderedDict()
        self._lock = threading.Lock()
        self._context = ssl.create_default_context(cafile=str(api.ca_file) if api.ca_file else None)
        self.reviews = 0

    def authenticate(self, token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None and cached.expires > now:
                self._cache.move_to_end(digest)
                return cached.identity
        identity = self._review(token)
        with self._lock:
            self._cache[digest] = _Review(
                identity, now + (self._cache_s if identity else self._negative_cache_s)
            )
            self._cache.move_to_end(digest)
            while len(self._cache) > TOKENREVIEW_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return identity

    def describe(self) -> str:
        aud = f" for audience {' or '.join(self.audiences)}" if self.audiences else ""
        return f"a Kubernetes service-account token{aud}"

    def _review(self, token: str) -> Identity | None:
        try:
            own = self.api.token_file.read_text().strip()
        except OSError as exc:
            raise UnavailableError(f"cannot verify credentials: the agent's own service-account token "
                                   f"{self.api.token_file} is unreadable: {exc.strerror or exc}") from None  # fmt: skip
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = json.dumps(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        ).encode()
        request = urllib.request.Request(
            f"{self.api.url}/apis/authentication.k8s.io/v1/tokenreviews", data=body, method="POST",
            headers={"Authorization": f"Bearer {own}", "Content-Type": "application/json",
                     "Accept": "application/json"},
        )  # fmt: skip
        with self._lock:
            self.reviews += 1
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s, context=self._context) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode(errors="replace")
            fix = (": the agent's service account needs create on tokenreviews.authentication.k8s.io "
                   "(ClusterRole system:auth-delegator)") if exc.code in (401, 403) else ""  # fmt: skip
            raise UnavailableError(f"cannot verify credentials: TokenReview answered HTTP {exc.code}{fix} "
                                   f"({detail})") from None  # fmt: skip
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UnavailableError(f"cannot verify credentials: TokenReview at {self.api.url} failed: "
                                   f"{getattr(exc, 'reason', exc)}") from None  # fmt: skip
        return identity_of_review(answer, audiences=self.audiences)


def identity_of_review(answer: Any, *, audiences: Sequence[str] = ()) -> Identity | None:
    """The identity a TokenReview answer vouches for, or ``None``. With ``audiences`` asked, the answer
    must name one of them: an API server that cannot check audiences leaves them out, and a token for
    another audience must not pass for ours."""
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, dict) or status.get("authenticated") is not True:
        return None
    if audiences and not set(status.get("audiences") or ()) & set(audiences):
        return None
    user = status.get("user") or {}
    username = user.get("username")
    if not isinstance(username, str) or not username:
        return None
    groups = tuple(str(g) for g in user.get("groups") or ())
    return Identity(username, groups)


@dataclass(frozen=True)
class Principals:
    """Who may do something: usernames (``system:serviceaccount:NS:NAME``) and groups (written
    ``group:NAME``, e.g. ``group:system:serviceaccounts:training``)."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | Iterable[str], *, flag: str = "--auth-writers") -> Principals:
        items = text.split(",") if isinstance(text, str) else list(text)
        users: set[str] = set()
        groups: set[str] = set()
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            if item.startswith("group:"):
                name = item.removeprefix("group:")
                if not name:
                    raise InvalidArgumentError(f"{flag}: 'group:' names no group")
                groups.add(name)
            elif item.startswith("system:serviceaccount:") and len(item.split(":")) != 4:
                raise InvalidArgumentError(f"{flag}: {item!r} is not system:serviceaccount:NAMESPACE:NAME")
            else:
                users.add(item)
        return cls(frozenset(users), frozenset(groups))

    def allows(self, identity: Identity) -> bool:
        return identity.username in self.users or not self.groups.isdisjoint(identity.groups)

    def __or__(self, other: Principals) -> Principals:
        return Principals(self.users | other.users, self.groups | other.groups)

    def describe(self) -> str:
        listed = sorted(self.users) + [f"group:{g}" for g in sorted(self.groups)]
        return ", ".join(listed) or "nobody"


@dataclass
class RpcGuard:
    """Decides each RPC: writes always need a credential and a writer; reads only when
    ``readers`` is set (``None``: anyone may read). A :class:`SharedToken` holder may do both.
    ``open_writes`` lets anyone write (``hps agent --no-auth``: a test bench, never a default)."""

    authenticators: Sequence[Authenticator] = ()
    writers: Principals = field(default_factory=Principals)
    readers: Principals | None = None
    open_writes: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: dict[str, int] = {}
        self._allowed = 0

    @property
    def reads_restricted(self) -> bool:
        return self.readers is not None

    @property
    def degraded(self) -> bool:
        return False

    def check(self, method: str, metadata: Iterable[tuple[str, Any]], *, model: str) -> Identity | None:
        """The caller's identity when ``method`` is allowed (``None`` when no credential was needed);
        raises :class:`UnauthenticatedError`, :class:`PermissionDeniedError` or, when the credential
        cannot be checked now, :class:`UnavailableError`."""
        write = method in WRITE_METHODS
        if (write and self.open_writes) or (not write and self.readers is None):
            return None
        try:
            identity = self._authenticate(method, metadata)
            allowed = self.writers if write else (self.readers or Principals()) | self.writers
            if identity.username != SHARED_TOKEN_USER and not allowed.allows(identity):
                who = "writers (--auth-writers)" if write else "readers (--auth-readers)"
                raise PermissionDeniedError(f"{identity.username} may not call {method} on model {model}: it is "
                                            f"not among this agent's {who}")  # fmt: skip
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            kind = "unauthenticated" if isinstance(exc, UnauthenticatedError) else "permission_denied"
            with self._lock:
                self._refused[kind] = self._refused.get(kind, 0) + 1
            raise
        with self._lock:
            self._allowed += 1
        return identity

    def _authenticate(self, method: str, metadata: Iterable[tuple[str, Any]]) -> Identity:
        token = bearer_token(metadata)
        if not self.authenticators:
            raise UnauthenticatedError(
                f"{method} is refused: this agent was started with no way to check a credential "
                "(hps agent --auth-token-file, --auth-token-env or --auth-tokenreview)")  # fmt: skip
        kinds = " or ".join(a.describe() for a in self.authenticators)
        if token is None:
            raise UnauthenticatedError(f"{method} needs a credential: send the metadata 'authorization: Bearer "
                                       f"<token>' with {kinds}")  # fmt: skip
        for authenticator in self.authenticators:
            identity = authenticator.authenticate(token)
            if identity is not None:
                return identity
        raise UnauthenticatedError(f"{method}: the credential sent is not valid here (expected {kinds})")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            refused = dict(self._refused)
            allowed = self._allowed
        return {
            "writes": "open" if self.open_writes else "credential",
            "reads": "credential" if self.readers is not None else "open",
            "authenticators": [type(a).__name__ for a in self.authenticators],
            "allowed": allowed,
            "refused": refused,
        }


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` metadata, or ``None`` without one."""
    for key, value in metadata:
        if key != AUTHORIZATION:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def authorization_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with ``token``."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


@dataclass(frozen=True)
class AuthOptions:
    """What ``hps agent``'s ``--auth-*`` flags say, turned into a guard by :meth:`guard`.

    The default asks a credential for every Update and has no way to check one, so it refuses them all
    (saying which flag to give): an agent never takes writes from anyone unless told to. ``no_auth``
    opens writes to anyone (``--no-auth``, for a test bench)."""

    #: a shared token's value (``--auth-token-env VAR``) or file (``--auth-token-file``, re-read on change)
    token: str | None = None
    token_file: Path | None = None
    #: verify tokens with the API server (``--auth-tokenreview``), for these audiences
    tokenreview: KubernetesAPI | None = None
    audiences: tuple[str, ...] = ()
    writers: Principals = field(default_factory=Principals)
    #: ``None``: reads are open; else who may read besides the writers (``--auth-reads``)
    readers: Principals | None = None
    no_auth: bool = False

    def guard(self) -> RpcGuard:
        if self.no_auth:
            if self.token is not None or self.token_file is not None or self.tokenreview is not None:
                raise InvalidArgumentError("--no-auth contradicts --auth-token-file, --auth-token-env and "
                                           "--auth-tokenreview: give one or the other")  # fmt: skip
            if self.readers is not None:
                raise InvalidArgumentError("--no-auth contradicts --auth-reads: reads cannot need a credential "
                                           "nobody can check")  # fmt: skip
            return RpcGuard(open_writes=True)
        if self.token is not None and self.token_file is not None:
            raise InvalidArgumentError(
                "--auth-token-env and --auth-token-file name the same shared token: give one"
            )
        if self.audiences and self.tokenreview is None:
            raise InvalidArgumentError("--auth-audience needs --auth-tokenreview (audiences are a Kubernetes "
                                       "token's)")  # fmt: skip
        authenticators: list[Authenticator] = []
        if self.token is not None or self.token_file is not None:
            authenticators.append(SharedToken(value=self.token, file=self.token_file))
        if self.tokenreview is not None:
            authenticators.append(TokenReview(self.tokenreview, audiences=self.audiences))
        if not authenticators and self.readers is not None:
            raise InvalidArgumentError("--auth-reads needs a way to check credentials: --auth-token-file, "
                                       "--auth-token-env or --auth-tokenreview")  # fmt: skip
        return RpcGuard(authenticators, writers=self.writers, readers=self.readers)
