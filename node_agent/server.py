"""Serves one model's :class:`~node_agent.lookup.LookupPath` over gRPC (``hps.v1.EmbeddingService``),
with the standard health service beside it (and server reflection, when asked).

This is the data plane's edge: typed errors from the core become gRPC status codes here and only
here. The hot path does no per-key Python work: a keys buffer is viewed in place as ``int64``, the
lookup path answers the whole batch, and the vectors go back as one packed buffer.

Security: the port serves TLS when given a certificate (:mod:`node_agent.tls`, re-read on rotation),
and an :class:`~node_agent.auth.RpcGuard` decides each RPC before its request is looked at (Update
always needs a credential; reads when restricted). The health service stays open: kubelet's gRPC
probes send no credential, and it tells nothing about the model.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from node_agent import wire
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
from node_agent.tls import CertificateReloader, ServerTLS

if TYPE_CHECKING:
    from node_agent.auth import RpcGuard
    from node_agent.lookup import LookupPath
    from node_agent.plan import Plan

log = logging.getLogger(__name__)

SERVICE_NAME: str = hps_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

#: default limit on keys per request; the spec's ``agent.maxBatchKeys`` overrides it
DEFAULT_MAX_BATCH_KEYS = 1 << 20

#: longest model or table name a request may carry (a DNS subdomain's limit; real names are labels of
#: at most 63). A longer one is refused without being echoed: gRPC carries the error message in a
#: header, and a name of kilobytes would overflow it (the client would see RESOURCE_EXHAUSTED)
MAX_NAME_LENGTH = 253
#: an error message is cut to this many characters for the same reason
MAX_ERROR_MESSAGE = 1024
#: at most one log line per this many seconds about requests that could not be decoded, and one about
#: calls refused for their credential (a client retrying without one must not fill the log)
UNDECODABLE_LOG_INTERVAL_S = 10.0

#: what the Update RPC calls when the agent consumes an update stream: ``(table, keys, vectors,
#: timeout_s) -> entry id``, answering once the update is applied (see UpdateConsumer.commit)
Updater = Callable[[str, np.ndarray, np.ndarray, float], str]
#: how long the Update RPC waits for an update to be applied when the caller set no deadline
DEFAULT_UPDATE_TIMEOUT_S = 10.0


_STATUS_OF_ERROR: tuple[tuple[type[HpsError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


def status_of(error: HpsError) -> grpc.StatusCode:
    """The gRPC status code a typed error becomes (``INTERNAL`` for errors with no better match)."""
    for kind, code in _STATUS_OF_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class StatsSource(Protocol):
    """Something beside the lookup path whose counters belong in Stats (e.g. the update consumer)."""

    @property
    def degraded(self) -> bool: ...

    def stats(self) -> Mapping[str, Any]: ...


class EmbeddingServicer(hps_pb2_grpc.EmbeddingServiceServicer):
    """Answers ``hps.v1.EmbeddingService`` for one model from one lookup path."""

    def __init__(
        self,
        lookup: LookupPath,
        *,
        model: str,
        max_batch_keys: int = DEFAULT_MAX_BATCH_KEYS,
        plan_version: int = 0,
        partition: int = 0,
        device: str = "cpu",
        updates_stream: str = "",
        extras: dict[str, StatsSource] | None = None,
        updater: Updater | None = None,
        update_refusal: str = "",
        guard: RpcGuard | None = None,
    ) -> None:
        self._lookup = lookup
        self._model = model
        self._max_batch_keys = max_batch_keys
        self._plan_version = plan_version
        self._partition = partition
        self._device = device
        self._updates_stream = updates_stream
        # the caller's dict itself: an agent adds its update consumer after the server started
        self._extras: dict[str, StatsSource] = extras if extras is not None else {}
        self._updater = updater
        self._update_refusal = update_refusal
        self._counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        self._undecodable = _RateLimitedLog(UNDECODABLE_LOG_INTERVAL_S, "undecodable request answered INVALID_ARGUMENT")
        self._refusals = _RateLimitedLog(UNDECODABLE_LOG_INTERVAL_S, "call refused")
        self._guard = guard
        # read on every Lookup: one attribute test when reads are open (the default)
        self._guard_reads = guard is not None and guard.reads_restricted

    def set_updater(self, updater: Updater | None, *, refusal: str = "") -> None:
        """Where Update RPCs go from now on: ``updater`` (through the update stream), else this agent's
        own lookup path, unless ``refusal`` says why updates cannot be applied here."""
        self._updater = updater
        self._update_refusal = refusal

    def add_stats_source(self, name: str, source: StatsSource) -> None:
        """Adds counters (and health) that Stats, Describe and metrics report from now on."""
        self._extras[name] = source

    # -- RPCs ----------------------------------------------------------------------------------

    def Lookup(self, request: hps_pb2.LookupRequest, context: grpc.ServicerContext) -> hps_pb2.LookupResponse:
        """Answers with a :class:`~node_agent.wire.PackedLookupResponse`, which serialises to the same
        bytes as the ``LookupResponse`` it stands for (see :func:`add_embedding_service`)."""
        with self._edge("Lookup", context):
            if self._guard_reads:
                self._authorize("Lookup", context)
            _check_decoded(request)
            self._check_model(request.model)
            total = sum(wire.count_keys(t.keys) for t in request.tables)
            if total > self._max_batch_keys:
                raise ResourceExhaustedError(
                    f"batch of {total} keys exceeds max_batch_keys={self._max_batch_keys}"
                )
            tables = self._lookup.tables()
            names: list[str] = []
            keys: list[np.ndarray] = []
            for i, entry in enumerate(request.tables):
                self._check_table(entry.table, tables, where=f"tables[{i}]")
                keys.append(wire.unpack_keys(entry.keys, entry.key_dtype, where=f"tables[{i}] ({entry.table}) keys"))
                names.append(entry.table)
            if len(set(names)) == len(names):
                found = self._lookup.lookup_many({n: k for n, k in zip(names, keys, strict=True) if k.size})
                results = [found.get(n) for n in names]
            else:  # the same table twice: answer each entry on its own
                results = [self._lookup.lookup(n, k) if k.size else None for n, k in zip(names, keys, strict=True)]
            answers = []
            for name, k, vectors in zip(names, keys, results, strict=True):
                spec = tables[name]
                if vectors is not None:  # little-endian and contiguous already: no copy on the usual host
                    vectors = np.ascontiguousarray(vectors, dtype=wire.VECTOR_WIRE_DTYPES[spec.dtype])
                answers.append(
                    wire.TableVectors(name, spec.dim, wire.dtype_to_enum(spec.dtype), int(k.size), vectors)
                )
            self._count(lookups=1, keys=total)
            # serialised by gRPC's worker into LookupResponse's wire bytes, the vectors copied once
            return wire.PackedLookupResponse(answers)  # type: ignore[return-value]

    def Update(self, request: hps_pb2.UpdateRequest, context: grpc.ServicerContext) -> hps_pb2.UpdateResponse:
        with self._edge("Update", context):
            self._authorize("Update", context)
            _check_decoded(request)
            self._check_model(request.model)
            tables = self._lookup.tables()
            self._check_table(request.table, tables, where="table")
            spec = tables[request.table]
            keys = wire.unpack_keys(request.keys, request.key_dtype, where=f"keys of {request.table}")
            if keys.size > self._max_batch_keys:
                raise ResourceExhaustedError(
                    f"batch of {keys.size} keys exceeds max_batch_keys={self._max_batch_keys}"
                )
            sent = spec.dtype if request.dtype == hps_pb2.DTYPE_UNSPECIFIED else wire.enum_to_dtype(request.dtype)
            vectors = wire.unpack_vectors(
                request.vectors, dtype=sent, rows=int(keys.size), dim=spec.dim, where=f"vectors of {request.table}"
            )
            vectors = wire.to_table_dtype(vectors, spec.dtype, where=f"vectors of {request.table}")
            entry = self._apply_update(request.table, keys, vectors, context)
            self._count(updates=1, updated_keys=int(keys.size))
            return hps_pb2.UpdateResponse(updated=int(keys.size), entry_id=entry)

    def _apply_update(self, table: str, keys: np.ndarray, vectors: np.ndarray, context: grpc.ServicerContext) -> str:
        """Through the update stream when there is one (every agent applies it); otherwise into this
        agent's own tiers, checked *before* anything is written so an error means nothing changed."""
        if self._updater is not None:
            left = context.time_remaining()
            # answer before the caller's deadline (the withdraw after a timeout takes up to a Redis
            # round trip more): the caller then learns the truth rather than DEADLINE_EXCEEDED
            timeout = DEFAULT_UPDATE_TIMEOUT_S if left is None else max(0.05, min(DEFAULT_UPDATE_TIMEOUT_S, left - 1.0))
            return self._updater(table, keys, vectors, timeout)
        if self._update_refusal:
            raise FailedPreconditionError(self._update_refusal)
        if keys.size:
            self._lookup.update(table, keys, vectors)
        return ""

    def Describe(
        self, request: hps_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> hps_pb2.DescribeResponse:
        with self._edge("Describe", context):
            if self._guard_reads:
                self._authorize("Describe", context)
            _check_decoded(request)
            self._check_model(request.model)
            response = hps_pb2.DescribeResponse(
                model=self._model,
                plan_version=self._plan_version,
                partition=self._partition,
                device=self._device,
                max_batch_keys=self._max_batch_keys,
                degraded=self.degraded,
                updates_stream=self._updates_stream,
                degraded_reasons=self.degraded_reasons(),
            )
            consumer = self._extras.get("updates")
            if consumer is not None:
                response.updates.CopyFrom(_consumer_status(consumer.stats()))
            for name, spec in sorted(self._lookup.tables().items()):
                response.tables.add(
                    name=name,
                    rows=spec.rows,
                    dim=spec.dim,
                    dtype=wire.dtype_to_enum(spec.dtype),
                    default_value=spec.default_value,
                )
            return response

    def Stats(self, request: hps_pb2.StatsRequest, context: grpc.ServicerContext) -> hps_pb2.StatsResponse:
        with self._edge("Stats", context):
            if self._guard_reads:
                self._authorize("Stats", context)
            _check_decoded(request)
            self._check_model(request.model)
            stats = self.snapshot()
            return hps_pb2.StatsResponse(
                model=self._model, degraded=stats["degraded"], stats_json=json.dumps(stats, default=_jsonable)
            )

    def snapshot(self) -> dict[str, Any]:
        """Everything the agent counts, as the Stats RPC and the Prometheus endpoint report it."""
        with self._counters_lock:
            server = dict(self._counters)
        stats: dict[str, Any] = {
            "model": self._model,
            "degraded": self.degraded,
            "degraded_reasons": self.degraded_reasons(),
            "device": self._device,
            "server": server,
            "lookup": dict(self._lookup.stats()),
        }
        for name, source in list(self._extras.items()):
            stats[name] = dict(source.stats())
        return stats

    # -- shared --------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device

    @property
    def degraded(self) -> bool:
        return bool(self._lookup.degraded) or any(s.degraded for s in list(self._extras.values()))

    def degraded_reasons(self) -> list[str]:
        """Why the agent is degraded, one line per cause (empty when it is not)."""
        reasons: list[str] = []
        stats = dict(self._lookup.stats()) if self._lookup.degraded else {}
        for role, tier in sorted((stats.get("tiers") or {}).items()):
            if isinstance(tier, Mapping) and not tier.get("up", True):
                reasons.append(f"{role} tier {tier.get('name')} down: {tier.get('last_error')}")
        pending = stats.get("pending_writes")
        if pending:
            reasons.append(f"updates waiting for a tier: {pending}")
        for name, source in list(self._extras.items()):
            if source.degraded:
                explain = getattr(source, "reasons", None)
                found = explain() if callable(explain) else [getattr(source, "reason", "") or f"{name} degraded"]
                reasons.extend(r for r in found if r not in reasons)
        return reasons

    @contextmanager
    def _edge(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Translates the core's typed errors into a status code and the error's own message."""
        try:
            yield
        except HpsError as exc:
            code = status_of(exc)
            self._count(**{f"errors.{code.name.lower()}": 1})
            if isinstance(exc, _Undecodable):
                self._undecodable.note(method, str(exc))
            elif isinstance(exc, UnauthenticatedError | PermissionDeniedError):
                self._refusals.note(method, f"{code.name}: {exc} (from {context.peer()})")
            else:
                log.debug("%s -> %s: %s", method, code.name, exc)
            _abort(context, code, _bounded(str(exc)))

    def _authorize(self, method: str, context: grpc.ServicerContext) -> None:
        """Lets the call on or raises the typed error the guard found. Without a guard nothing is
        checked (a lookup path served inside a test, or a process that checks its callers itself); an
        RPC that writes is then open, which :func:`serve`'s caller decided."""
        if self._guard is not None:
            self._guard.check(method, context.invocation_metadata(), model=self._model)

    def _check_model(self, model: str) -> None:
        if not model:
            raise InvalidArgumentError("model name is empty")
        _check_name_length(model, "model")
        if model != self._model:
            raise NotFoundError(f"model {model!r} not found: this agent serves {self._model!r}")

    def _check_table(self, table: str, tables: Mapping[str, Any], *, where: str) -> None:
        if not table:
            raise InvalidArgumentError(f"{where}: table name is empty")
        _check_name_length(table, f"{where}: table")
        if table not in tables:
            known = ", ".join(sorted(tables)) or "none"
            raise NotFoundError(f"table {table!r} not found in model {self._model!r} (tables: {known})")

    def _count(self, **increments: int) -> None:
        with self._counters_lock:
            self._counters.update(increments)

    def lookup_table(self, model: str, table: str, keys: np.ndarray, *, via: str) -> tuple[Any, np.ndarray]:
        """One table's rows for a transport other than gRPC (``via``: the same-node endpoint): Lookup's
        checks, limits and counters, its typed errors raised (and counted by the status they map to)
        for that transport to translate. Returns the table's spec and the rows."""
        try:
            self._check_model(model)
            if keys.size > self._max_batch_keys:
                raise ResourceExhaustedError(f"batch of {keys.size} keys exceeds max_batch_keys={self._max_batch_keys}")
            tables = self._lookup.tables()
            self._check_table(table, tables, where="table")
            spec = tables[table]
            rows = self._lookup.lookup(table, keys) if keys.size else np.empty((0, spec.dim), dtype=spec.dtype)
        except HpsError as exc:
            self._count(**{f"errors.{status_of(exc).name.lower()}": 1})
            raise
        self._count(lookups=1, keys=int(keys.size), **{f"lookups.{via}": 1})
        return spec, rows


def _check_name_length(name: str, what: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(
            f"{what} name is {len(name)} characters long; names are at most {MAX_NAME_LENGTH} "
            f"(it starts {name[:32]!r})"
        )


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return message[: MAX_ERROR_MESSAGE - 40] + f"... ({len(message)} characters in all)"


class _Undecodable(InvalidArgumentError):
    """A request whose bytes are not the message the method takes."""


@dataclass(frozen=True)
class UndecodableRequest:
    """What a deserializer hands the servicer when the bytes are not the method's message: the RPC
    then answers INVALID_ARGUMENT with the reason (gRPC itself would log a traceback per request and
    answer INTERNAL)."""

    type_name: str
    size: int
    error: str


def _check_decoded(request: Any) -> None:
    if isinstance(request, UndecodableRequest):
        raise _Undecodable(
            f"request is not a valid {request.type_name} ({request.size} bytes): {request.error}"
        )


def lenient(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """``parse`` (a message's ``FromString``) that returns an :class:`UndecodableRequest` instead of
    raising, so a malformed request is answered by the servicer like any other bad input."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or a buffer of the wrong kind
            return UndecodableRequest(type_name, len(data), str(exc) or type(exc).__name__)

    return deserialize


class _RateLimitedLog:
    """One warning per ``interval_s`` about requests of one kind (undecodable, refused), counting the
    ones in between: a client sending garbage must not fill the log (nor slow the agent writing it)."""

    def __init__(self, interval_s: float, what: str) -> None:
        self._interval_s = interval_s
        self._what = what
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def note(self, method: str, error: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval_s
        more = f" (and {suppressed} more since the last such line)" if suppressed else ""
        log.warning("%s: %s: %s%s", method, self._what, _bounded(error)[:300], more)


def _consumer_status(stats: Mapping[str, Any]) -> hps_pb2.UpdateConsumerStatus:
    """The update consumer's counters as Describe carries them."""

    def number(name: str) -> float:
        value = stats.get(name)
        return float(value) if isinstance(value, int | float) else 0.0

    behind = stats.get("entries_behind")
    return hps_pb2.UpdateConsumerStatus(
        stream=str(stats.get("stream") or ""),
        group=str(stats.get("group") or ""),
        last_applied_id=str(stats.get("last_applied_id") or ""),
        applied_watermark=str(stats.get("applied_watermark") or ""),
        store_writer=bool(stats.get("store_writer")),
        applied_entries=int(number("applied_entries")),
        rejected_entries=int(number("rejected_entries")),
        withdrawn_entries=int(number("withdrawn_entries")),
        gaps=int(number("gaps")),
        missed_entries=int(number("missed_entries")),
        entries_behind=int(behind) if isinstance(behind, int) else -1,
        lag_ms_p50=number("lag_ms_p50"),
        lag_ms_p99=number("lag_ms_p99"),
        lag_ms_last=number("lag_ms_last"),
        caught_up=bool(stats.get("caught_up")),
        degraded=bool(stats.get("degraded")),
        reason=str(stats.get("reason") or ""),
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc's abort returned")  # abort always raises; this keeps mypy honest


def _jsonable(value: Any) -> Any:
    """NumPy scalars and other odd values in stats → plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@dataclass
class RunningServer:
    """A started gRPC server: its bound ``port``, and how to stop or wait for it."""

    server: grpc.Server
    host: str
    port: int
    health: health.HealthServicer
    servicer: EmbeddingServicer
    #: the certificate served, re-read on rotation (``None``: plaintext)
    tls: CertificateReloader | None = None
    #: what the health service answers now (the metrics port's ``/healthz`` says the same, for probes
    #: that cannot speak TLS)
    serving: bool = False

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        """What the health service answers (degraded is still SERVING: lookups still answer)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)
        self.serving = serving

    def stop(self, grace: float | None = 1.0) -> None:
        """Answers NOT_SERVING, lets RPCs in flight finish for ``grace`` seconds, then closes."""
        self.serving = False
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(timeout=(grace or 0) + 5)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops (``True``) or ``timeout`` passes (``False``)."""
        return bool(self.server.wait_for_termination(timeout))


def serve(
    lookup: LookupPath,
    *,
    model: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_batch_keys: int = DEFAULT_MAX_BATCH_KEYS,
    max_workers: int = 4,
    plan: Plan | None = None,
    partition: int = 0,
    device: str | None = None,
    updates_stream: str = "",
    extras: dict[str, StatsSource] | None = None,
    updater: Updater | None = None,
    update_refusal: str = "",
    tls: ServerTLS | None = None,
    guard: RpcGuard | None = None,
    reflection: bool = False,
) -> RunningServer:
    """Starts serving ``lookup`` as ``model`` on ``host:port`` (``0`` picks a free port) and returns at
    once; the health service answers SERVING from then on.

    ``tls``: serve TLS with these files (re-read when they change); ``guard``: who may call what (without
    one every RPC is open, Update included: ``hps agent`` always passes one); ``reflection``: also serve
    gRPC server reflection, which lists the services to anyone who asks (off unless asked).

    A small pool is enough: the work per RPC is NumPy on whole batches, which releases the GIL.
    Raises :class:`UnavailableError` when the address cannot be bound, :class:`InvalidArgumentError`
    when the TLS files are not a matching certificate and key.
    """
    if max_batch_keys < 1:
        raise InvalidArgumentError(f"max_batch_keys must be at least 1, got {max_batch_keys}")
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be 0 (any free one) to 65535, got {port}")
    reloader = CertificateReloader(tls) if tls is not None else None  # a bad pair fails here, before binding
    servicer = EmbeddingServicer(
        lookup,
        model=model,
        max_batch_keys=max_batch_keys,
        plan_version=plan.version if plan is not None else 0,
        partition=partition,
        device=device or device_of(lookup),
        updates_stream=updates_stream,
        extras=extras,
        updater=updater,
        update_refusal=update_refusal,
        guard=guard,
    )
    if reloader is not None:
        servicer.add_stats_source("tls", reloader)
    if guard is not None:
        servicer.add_stats_source("auth", guard)
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hps-grpc")
    # no SO_REUSEPORT (gRPC's default): a second agent on a port already served must fail to bind,
    # not share it and answer half the calls from another model or an empty cache
    server = grpc.server(pool, options=[*wire.GRPC_MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)])
    add_embedding_service(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        services = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    grpc_reflection.SERVICE_NAME)  # fmt: skip
        grpc_reflection.enable_server_reflection(services, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if reloader is not None:
            bound = server.add_secure_port(address, reloader.credentials())
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise UnavailableError(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise UnavailableError(f"cannot listen on {address}")
    server.start()
    running = RunningServer(server, host, bound, health_servicer, servicer, reloader)
    running.set_serving(True)
    log.info("serving model %s on %s (%s; device %s)", model, running.endpoint,
             "TLS" if reloader is not None else "plaintext", servicer.device)  # fmt: skip
    return running


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def add_embedding_service(servicer: hps_pb2_grpc.EmbeddingServiceServicer, server: grpc.Server) -> None:
    """What the generated ``add_EmbeddingServiceServicer_to_server`` does, but Lookup's answer is
    serialised by its own ``SerializeToString``: a :class:`~node_agent.wire.PackedLookupResponse`
    writes the vectors into the message bytes in one copy, where a protobuf message costs three."""
    # every request is parsed leniently: bytes that are not the message become INVALID_ARGUMENT
    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup,
            request_deserializer=lenient(hps_pb2.LookupRequest.FromString, "hps.v1.LookupRequest"),
            response_serializer=_serialize,
        ),
        "Update": grpc.unary_unary_rpc_method_handler(
            servicer.Update,
            request_deserializer=lenient(hps_pb2.UpdateRequest.FromString, "hps.v1.UpdateRequest"),
            response_serializer=hps_pb2.UpdateResponse.SerializeToString,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=lenient(hps_pb2.DescribeRequest.FromString, "hps.v1.DescribeRequest"),
            response_serializer=hps_pb2.DescribeResponse.SerializeToString,
        ),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats,
            request_deserializer=lenient(hps_pb2.StatsRequest.FromString, "hps.v1.StatsRequest"),
            response_serializer=hps_pb2.StatsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # as the generated code does (grpcio >= 1.63): a registered method skips a per-call name lookup
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def device_of(lookup: Any) -> str:
    """Where the lookup path's L1 cache lives, as Describe reports it (``cpu`` or ``cuda:N``)."""
    device = getattr(lookup, "device", None)
    if device is None:
        device = dict(lookup.stats()).get("device")
    return str(device) if device else "cpu"
