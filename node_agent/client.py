"""The Python client inference services import: embedding lookups against one or more node agents.

``Client(endpoint).lookup(model, table, keys)`` returns a NumPy array ``(len(keys), dim)``. Every call
carries a deadline; when an endpoint is unreachable or too slow (UNAVAILABLE, DEADLINE_EXCEEDED) the
call moves on to the next endpoint, at most ``retries`` times, and the client keeps using the one
that answered. Any other failure raises the typed error of :mod:`node_agent.errors` with the
server's own message.

Updates: with ``redis=`` the client publishes to the model's Redis Stream, which reaches every
agent serving the model (the production path); without it, ``update`` calls the Update RPC of one
agent, which publishes it there for every agent and answers once the stores hold it (an error means
it is applied nowhere).

Security: ``tls=`` (a CA file, or a :class:`~node_agent.tls.ClientTLS`) checks the agent's certificate;
``token=`` or ``token_file=`` sends ``authorization: Bearer <token>`` with every call, which the Update
RPC always asks for (and reads too on agents that restrict them). ``token_file`` is read again when it
changes: a projected service-account token is rotated by the kubelet under a running client.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from node_agent import wire
from node_agent.auth import authorization_metadata
from node_agent.dedupe import unique_inverse
from node_agent.errors import (
    FailedPreconditionError,
    HpsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from node_agent.proto.hps.v1 import hps_pb2, hps_pb2_grpc
from node_agent.redis_access import RedisAccess
from node_agent.tls import ClientTLS, client_tls, tls_failure_hint

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_SERVICE: str = hps_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

_ERROR_OF_STATUS: dict[grpc.StatusCode, type[HpsError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}

class RpcFailure(grpc.RpcError):
    """What a failed call raises is its typed error (:class:`NotFoundError`, ...) and also a
    :class:`grpc.RpcError` whose ``code()`` and ``details()`` are the status the agent answered, so
    code written against the raw stubs (``except grpc.RpcError as e: e.code()``) works unchanged."""

    _code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    _details: str = ""

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __reduce__(self) -> tuple[Any, ...]:
        # made again by rpc_failure (its class is made at run time, so pickle cannot name it): it
        # crosses a process boundary (a multiprocessing worker's error) as what it is
        kind = next(k for k in type(self).__mro__ if _FAILURE_TYPES.get(k) is type(self))
        return rpc_failure, (kind, self._code, self._details, str(self))


_FAILURE_TYPES: dict[type[HpsError], type[HpsError]] = {}


def rpc_failure(kind: type[HpsError], code: grpc.StatusCode, details: str, message: str) -> HpsError:
    """``kind(message)`` that is also a :class:`RpcFailure` answering ``code`` and ``details``."""
    failure = _FAILURE_TYPES.get(kind)
    if failure is None:  # named as its typed error: what a traceback or a log shows does not change
        failure = type(kind.__name__, (kind, RpcFailure), {"__module__": kind.__module__,
                                                           "__qualname__": kind.__qualname__})  # fmt: skip
        _FAILURE_TYPES[kind] = failure
    error = failure(message)
    error._code, error._details = code, details  # type: ignore[attr-defined]
    return error


#: gRPC target schemes passed through as they are (no HOST:PORT to check)
_TARGET_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "xds:")


def check_endpoint(endpoint: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT``), or a gRPC target such as ``unix:/path``. Without a port gRPC
    would silently try 443, so a missing or bad port is an :class:`InvalidArgumentError` saying so."""
    if endpoint.startswith(_TARGET_SCHEMES):
        return endpoint
    if endpoint.startswith("["):
        close = endpoint.find("]")
        host, rest = (endpoint[: close + 1], endpoint[close + 1 :]) if close > 0 else (endpoint, "")
        port = rest[1:] if rest.startswith(":") else None
        example = f"{host if close > 0 else endpoint + ']'}:50051"
    elif endpoint.count(":") > 1:
        raise InvalidArgumentError(f"endpoint {endpoint!r}: an IPv6 address goes in brackets, e.g. [::1]:50051")
    else:
        host, sep, after = endpoint.partition(":")
        port = after if sep else None
        example = f"{host or 'localhost'}:50051"
    if port is None:
        raise InvalidArgumentError(f"endpoint {endpoint!r} has no port: give HOST:PORT, e.g. {example}")
    if not host.strip("[]"):
        raise InvalidArgumentError(f"endpoint {endpoint!r} has no host: give HOST:PORT, e.g. localhost:{port or 50051}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"endpoint {endpoint!r}: the port must be a number from 1 to 65535, got {port!r}")
    return endpoint
    host, sep, port = endpoint.rpartition(":")
    if endpoint.startswith("[") and not endpoint.rstrip().endswith("]") and "]:" in endpoint:
        host, port = endpoint.rsplit("]:", 1)[0] + "]", endpoint.rsplit("]:", 1)[1]
    elif not sep or (host.count(":") and not host.startswith("[")) or endpoint.endswith("]"):
        raise InvalidArgumentError(
            f"endpoint {endpoint!r} has no port: give HOST:PORT, e.g. {endpoint.strip('[]') or 'localhost'}:50051"
        )
    if not host:
        raise InvalidArgumentError(f"endpoint {endpoint!r} has no host: give HOST:PORT, e.g. localhost{endpoint}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"endpoint {endpoint!r}: the port must be a number from 1 to 65535, got {port!r}")
    return endpoint


@dataclass(frozen=True)
class TableInfo:
    name: str
    rows: int
    dim: int
    dtype: str
    default_value: float


@dataclass(frozen=True)
class ModelInfo:
    """What an agent serves of a model (the Describe RPC)."""

    model: str
    tables: Mapping[str, TableInfo]
    plan_version: int
    partition: int
    device: str
    max_batch_keys: int
    degraded: bool
    updates_stream: str
    endpoint: str = field(default="", compare=False)
    #: why ``degraded``, one line per cause
    degraded_reasons: tuple[str, ...] = field(default=(), compare=False)
    #: the agent's update consumer (last applied entry, lag, gaps, ...), None without a stream
    updates: Mapping[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tables": [vars(t) for t in self.tables.values()],
            "planVersion": self.plan_version,
            "partition": self.partition,
            "device": self.device,
            "maxBatchKeys": self.max_batch_keys,
            "degraded": self.degraded,
            "updatesStream": self.updates_stream,
            "endpoint": self.endpoint,
            "degradedReasons": list(self.degraded_reasons),
            "updates": dict(self.updates) if self.updates is not None else None,
        }


class Client:
    """A connection to the node agents at ``endpoint`` (``HOST:PORT`` or several of them).

    Thread-safe: gRPC channels are shared, and one client serves any number of threads. Returned
    arrays are the caller's to keep and modify.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        timeout: float = 5.0,
        retries: int = 2,
        redis: str | Sequence[str] | None = None,
        redis_password: str | None = None,
        redis_cluster: bool = False,
        redis_access: RedisAccess | None = None,
        tls: ClientTLS | str | os.PathLike[str] | bool | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """``redis_access`` (a user, password and TLS for Redis) or ``redis_password`` (the ``default``
        user's) when publishing updates with ``redis=``; ``tls``, ``token``, ``token_file``: see the module."""
        endpoints = [e.strip() for e in endpoint.split(",")] if isinstance(endpoint, str) else list(endpoint)
        endpoints = [check_endpoint(e) for e in endpoints if e]
        if not endpoints:
            raise InvalidArgumentError("no endpoint given")
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout}")
        if retries < 0:
            raise InvalidArgumentError(f"retries must not be negative, got {retries}")
        if redis_access is not None and redis_password is not None:
            raise InvalidArgumentError("redis_access carries the password: give it or redis_password, not both")
        self.endpoints = endpoints
        self.timeout = timeout
        self.retries = retries
        self.tls = client_tls(tls)
        self._bearer = _Bearer(token, Path(token_file) if token_file is not None else None)
        if self._bearer.present and self.tls is None:
            remote = [e for e in endpoints if not _is_loopback(e)]
            if remote:
                log.warning("sending a bearer token in plaintext to %s: give the agents' CA (tls=) so it cannot "
                            "be read on the way", ", ".join(remote))  # fmt: skip
        self._closed = False
        if self.tls is not None:
            credentials = self.tls.channel_credentials()
            options = [*wire.GRPC_MESSAGE_OPTIONS, *self.tls.channel_options()]
            self._channels = [grpc.secure_channel(e, credentials, options=options) for e in endpoints]
        else:
            self._channels = [grpc.insecure_channel(e, options=wire.GRPC_MESSAGE_OPTIONS) for e in endpoints]
        self._stubs = [hps_pb2_grpc.EmbeddingServiceStub(c) for c in self._channels]
        # Lookup answers are read straight from the received bytes (no protobuf copy of the vectors)
        self._lookups = [
            c.unary_unary(
                f"/{_SERVICE}/Lookup",
                request_serializer=hps_pb2.LookupRequest.SerializeToString,
                response_deserializer=wire.decode_lookup_response,
            )
            for c in self._channels
        ]
        self._current = 0
        self._lock = threading.Lock()
        self._redis = redis
        self._redis_access = redis_access if redis_access is not None else RedisAccess(password=redis_password)
        self._redis_cluster = redis_cluster
        self._publishers: dict[str, Any] = {}
        self._described: dict[str, ModelInfo] = {}

    # -- lookups -------------------------------------------------------------------------------

    def lookup(self, model: str, table: str, keys: Any) -> np.ndarray:
        """Vectors of ``keys`` in ``table``: ``(len(keys), dim)`` in the table's dtype; keys the model
        does not hold get the table's ``defaultValue``."""
        return self.lookup_many(model, {table: keys})[table]

    def lookup_many(self, model: str, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Several tables in one round trip: ``{table: keys}`` → ``{table: (len(keys), dim)}``.

        Each table's keys go out deduplicated (recommendation batches repeat hot keys: at Zipf 1.05
        half the keys of a 4096-key batch are repeats), so the answer carries each row once; the rows
        are spread back to the keys' positions here."""
        if not isinstance(model, str) or not all(isinstance(t, str) for t in batch):
            raise InvalidArgumentError("the model and table names must be strings")
        request = hps_pb2.LookupRequest(model=model)
        inverses: list[np.ndarray] = []
        for table, keys in batch.items():
            unique, inverse = unique_inverse(wire.as_keys(keys))
            request.tables.add(table=table, keys=unique.astype(wire.KEY_WIRE_DTYPE, copy=False).tobytes(),
                               key_dtype=hps_pb2.INT64)  # fmt: skip
            inverses.append(inverse)
        response, _ = self._call("Lookup", request)
        if len(response.tables) != len(inverses):
            raise HpsError(f"Lookup answered {len(response.tables)} tables for {len(inverses)} asked")
        out: dict[str, np.ndarray] = {}
        for entry, inverse in zip(response.tables, inverses, strict=True):
            view = entry.vectors
            # the one copy: makes the rows writable (the view is on the message's read-only bytes),
            # native-endian on any host, and one per key asked. Rows are taken as bytes: the vectors
            # sit wherever the message put them, and NumPy would first copy a misaligned float view
            rows = view.view(np.uint8).take(inverse, axis=0).view(view.dtype)
            out[entry.table] = rows.astype(view.dtype.newbyteorder("="), copy=False)
        return out

    # -- updates -------------------------------------------------------------------------------

    def update(self, model: str, table: str, keys: Any, vectors: Any) -> int:
        """Overwrites the rows of ``keys``; returns the rows written.

        With ``redis=`` given: checks the table and dim against Describe, then publishes to the
        model's stream (raises :class:`UnavailableError` if Redis does not take it); every agent
        applies it within the update lag. Without: the Update RPC of one agent, which returns once the
        stores hold it and raises when it is applied nowhere (see the proto)."""
        k = wire.as_keys(keys)
        v = wire.as_vectors(vectors, rows=int(k.size))
        if self._redis is not None:
            v = self.checked_vectors(model, table, v)
            self._publisher(model, self._describe_cached(model).updates_stream).publish(table, k, v)
            return int(k.size)
        request = hps_pb2.UpdateRequest(
            model=model,
            table=table,
            keys=k.tobytes(),
            key_dtype=hps_pb2.INT64,
            vectors=wire.pack_vectors(v, v.dtype.name),
            dtype=wire.dtype_to_enum(v.dtype),
        )
        response, _ = self._call("Update", request)
        return int(response.updated)

    def checked_vectors(self, model: str, table: str, vectors: Any) -> np.ndarray:
        """``vectors`` for an update of ``table``, checked against what the agents Describe (the table
        exists, the dim, values the table's dtype can hold) and in the table's dtype: what an agent
        would reject from the update stream, refused before it is published. Raises
        :class:`NotFoundError` / :class:`InvalidArgumentError` naming what is wrong."""
        info = self._describe_cached(model)
        spec = info.tables.get(table)
        if spec is None:
            raise NotFoundError(f"table {table!r} not found in model {model!r}")
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape[1] != spec.dim:
            raise InvalidArgumentError(f"vectors have dim {v.shape[-1] if v.ndim else 0}, table {table} has dim {spec.dim}")
        return wire.to_table_dtype(v, spec.dtype, where=f"vectors of {table}")

    def _publisher(self, model: str, stream: str) -> Any:
        from node_agent.updates import UpdatePublisher, stream_name

        with self._lock:
            publisher = self._publishers.get(model)
            if publisher is None:
                assert self._redis is not None
                publisher = UpdatePublisher(
                    self._redis,
                    access=self._redis_access,
                    cluster=self._redis_cluster,
                    stream=stream or stream_name(model),
                )
                self._publishers[model] = publisher
            return publisher

    # -- what the agents serve -----------------------------------------------------------------

    def describe(self, model: str) -> ModelInfo:
        response, endpoint = self._call("Describe", hps_pb2.DescribeRequest(model=model))
        tables = {
            t.name: TableInfo(t.name, int(t.rows), int(t.dim), wire.enum_to_dtype(t.dtype), float(t.default_value))
            for t in response.tables
        }
        info = ModelInfo(
            model=response.model,
            tables=tables,
            plan_version=int(response.plan_version),
            partition=int(response.partition),
            device=response.device,
            max_batch_keys=int(response.max_batch_keys),
            degraded=bool(response.degraded),
            updates_stream=response.updates_stream,
            endpoint=endpoint,
            degraded_reasons=tuple(response.degraded_reasons),
            updates=_message_dict(response.updates) if response.HasField("updates") else None,
        )
        with self._lock:
            self._described[model] = info
        return info

    def _describe_cached(self, model: str) -> ModelInfo:
        with self._lock:
            info = self._described.get(model)
        return info if info is not None else self.describe(model)

    def stats(self, model: str) -> dict[str, Any]:
        """The agent's counters (lookup path, tiers, server, update consumer) as a dict."""
        response, endpoint = self._call("Stats", hps_pb2.StatsRequest(model=model))
        stats: dict[str, Any] = json.loads(response.stats_json or "{}")
        stats.setdefault("degraded", bool(response.degraded))
        stats["endpoint"] = endpoint
        return stats

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, method: str, request: Any) -> tuple[Any, str]:
        """Calls ``method`` with a deadline, moving to the next endpoint on UNAVAILABLE or
        DEADLINE_EXCEEDED at most ``retries`` times; returns the response and who answered."""
        if self._closed:
            raise InvalidArgumentError("the client is closed")
        with self._lock:
            index = self._current
        tried: list[str] = []
        metadata = self._bearer.metadata()
        for attempt in range(self.retries + 1):
            endpoint = self.endpoints[index]
            call = self._lookups[index] if method == "Lookup" else getattr(self._stubs[index], method)
            try:
                response = call(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                details: str = exc.details() or code.name
                tried.append(endpoint)
                if code == grpc.StatusCode.UNAUTHENTICATED and metadata is None:
                    details += " (this client sent none)"
                if code in _RETRYABLE and attempt < self.retries:
                    index = (index + 1) % len(self.endpoints)
                    continue
                if code in _RETRYABLE:
                    asked = list(dict.fromkeys(tried))
                    attempts = f", {len(tried)} attempts" if len(tried) > len(asked) else ""
                    hint = tls_failure_hint(details) or (
                        "if the agent serves TLS, give its CA (tls=, --tls-ca)"
                        if self.tls is None and _looks_like_tls_refusal(details) else "")  # fmt: skip
                    raise rpc_failure(
                        UnavailableError, code, details,
                        f"no endpoint answered {method} ({', '.join(asked)}{attempts}): {code.name}: {details}"
                        + (f" ({hint})" if hint else ""),
                    ) from None  # fmt: skip
                known = code in _ERROR_OF_STATUS
                raise rpc_failure(_ERROR_OF_STATUS.get(code, HpsError), code, details,
                                  details if known else f"{code.name}: {details}") from None  # fmt: skip
            with self._lock:
                self._current = index
            return response, endpoint
        raise AssertionError("unreachable: the loop returns or raises")

    def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            channel.close()
        for publisher in self._publishers.values():
            publisher.close()
        self._publishers.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bearer:
    """The token a client sends: a value, or a file read again when it changes (looked at no more than
    once a second: a kubelet rotates a projected token well before it expires)."""

    def __init__(self, token: str | None, file: Path | None) -> None:
        if token is not None and file is not None:
            raise InvalidArgumentError("give token or token_file, not both")
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise InvalidArgumentError("the token is empty or holds spaces")
        self._file = file
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._looked_at = 0.0
        self._metadata = authorization_metadata(token) if token is not None else None
        if file is not None:
            self._read(force=True)

    @property
    def present(self) -> bool:
        return self._metadata is not None or self._file is not None

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self._file is not None:
            self._read(force=False)
        return self._metadata

    def _read(self, *, force: bool) -> None:
        assert self._file is not None
        now = time.monotonic()
        if not force and now - self._looked_at < 1.0:
            return
        with self._lock:
            self._looked_at = now
            try:
                st = os.stat(self._file)
                signature = (st.st_ino, st.st_mtime_ns, st.st_size)
                if signature == self._signature:
                    return
                token = self._file.read_text().strip()
            except OSError as exc:
                if force:
                    raise InvalidArgumentError(f"token file {self._file}: {exc.strerror or exc}") from None
                return  # keep the token read before; the agent says so if it no longer takes it
            if not token or any(c.isspace() for c in token):
                if force:
                    raise InvalidArgumentError(f"token file {self._file} is empty or holds more than one token")
                return
            self._metadata, self._signature = authorization_metadata(token), signature


def _is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("unix:", "unix-abstract:")):
        return True
    host = endpoint.rsplit(":", 1)[0].strip("[]") if not endpoint.startswith(("dns:", "ipv4:", "ipv6:")) else ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _looks_like_tls_refusal(details: str) -> bool:
    """A plaintext client hung up on by a TLS server sees its connection closed or reset."""
    text = details.lower()
    return "socket closed" in text or "connection reset" in text or "ssl" in text


def _message_dict(message: Any) -> dict[str, Any]:
    """A flat message's fields by name, as Python values (every field, set or not)."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}
