"""Online updates over a Redis Stream: training publishes ``(table, keys, vectors)`` batches, every node
agent consumes them, writes them through its lookup path (L2/L3, then its own L1) and acknowledges.

Two promises HPS's Kafka source does not keep: a publish that Redis did not take raises
:class:`UnavailableError` (never a silent drop), and an update is acknowledged only after the lookup
path has applied it, so one that failed stays pending and is applied again (XAUTOCLAIM after a
restart). Every agent reads through its *own* consumer group, because each has its own L1 to
refresh; the L2/L3 writes that several agents then repeat are idempotent overwrites.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from node_agent import wire
from node_agent.errors import HpsError, InvalidArgumentError, NotFoundError, UnavailableError

if TYPE_CHECKING:
    from node_agent.lookup import LookupPath
    from node_agent.spec import ModelSpec

log = logging.getLogger(__name__)

#: message layout version, so a consumer can refuse a layout it does not know instead of misreading it
MESSAGE_VERSION = b"1"

#: stream entries kept (``XADD MAXLEN ~``); an agent lagging further behind than this misses entries
DEFAULT_MAXLEN = 10_000

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError)


def stream_name(model: ModelSpec | str) -> str:
    """The model's update stream: ``spec.updates.stream`` or ``hps:{<model>}:updates``.

    The braces are a Redis Cluster hash tag: the stream lands in the slot of the model's name."""
    if isinstance(model, str):
        return f"hps:{{{model}}}:updates"
    return model.updates.stream or f"hps:{{{model.name}}}:updates"


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgumentError(f"Redis address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def connect_stream_redis(
    addresses: str | Sequence[str],
    *,
    password: str | None = None,
    cluster: bool = False,
    timeout: float = 2.0,
) -> redis.Redis | redis.RedisCluster:
    """A client for the Redis holding the stream. Without a cluster the stream lives on the *first*
    address (the others are client-side shards of the volatile tier); with one, on its slot's master.

    Retries are cut to one immediate reconnect so an unreachable Redis is reported in about
    ``timeout`` seconds rather than after redis-py's default back-off."""
    if isinstance(addresses, str):
        addresses = [a for a in addresses.split(",") if a.strip()]
    if not addresses:
        raise InvalidArgumentError("no Redis address given for the update stream")
    nodes = [_split_address(a) for a in addresses]
    retry = Retry(NoBackoff(), 1, (redis.ConnectionError, redis.TimeoutError))
    common: dict[str, Any] = {
        "password": password,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
    }
    if cluster:
        try:
            return redis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **common)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise UnavailableError(f"Redis Cluster {','.join(addresses)} unreachable: {exc}") from None
    host, port = nodes[0]
    return redis.Redis(host=host, port=port, **common)


class UpdatePublisher:
    """Publishes update batches to a model's stream (what a training job runs).

    ``publish`` returns the stream entry id once Redis holds the entry, and raises
    :class:`UnavailableError` when it cannot: the caller decides whether to retry, nothing is dropped
    behind its back."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        password: str | None = None,
        cluster: bool = False,
        stream: str | None = None,
        model: str | None = None,
        maxlen: int = DEFAULT_MAXLEN,
        timeout: float = 2.0,
    ) -> None:
        if stream is None and model is None:
            raise InvalidArgumentError("UpdatePublisher needs a stream name or a model name")
        self.stream = stream or stream_name(str(model))
        self.maxlen = maxlen
        self._addresses = addresses
        self._password = password
        self._cluster = cluster
        self._timeout = timeout
        self._redis: redis.Redis | redis.RedisCluster | None = None

    def publish(self, table: str, keys: Any, vectors: Any, dtype: str | None = None) -> str:
        """XADDs one batch; ``vectors`` is ``(len(keys), dim)``, sent as ``dtype`` (default: its own
        dtype when float32/float16, else float32). Returns the entry id."""
        if not table:
            raise InvalidArgumentError("table name is empty")
        k = wire.as_keys(keys)
        v = wire.as_vectors(vectors, rows=int(k.size))
        sent = dtype or v.dtype.name
        if sent not in wire.VECTOR_WIRE_DTYPES:
            raise InvalidArgumentError(f"dtype must be float32 or float16, got {sent!r}")
        fields: dict[Any, Any] = {
            b"v": MESSAGE_VERSION,
            b"table": table.encode(),
            b"dtype": sent.encode(),
            b"dim": str(v.shape[1]).encode(),
            b"keys": k.tobytes(),
            b"vectors": wire.pack_vectors(v, sent),
            b"ts": str(time.time_ns()).encode(),
        }
        try:
            if self._redis is None:
                self._redis = connect_stream_redis(
                    self._addresses, password=self._password, cluster=self._cluster, timeout=self._timeout
                )
            entry = self._redis.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        except _REDIS_DOWN as exc:
            raise UnavailableError(f"update not published: Redis for stream {self.stream} unreachable: {exc}") from None
        except redis.RedisError as exc:
            raise UnavailableError(f"update not published to stream {self.stream}: {exc}") from None
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError):
                self._redis.close()
            self._redis = None

    def __enter__(self) -> UpdatePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Rejected(Exception):
    """An entry that can never apply (malformed, wrong dim): acknowledged and counted, not retried."""


class UpdateConsumer:
    """Applies a model's update stream to one lookup path, on a background thread.

    Reads with XREADGROUP in ``group`` (one per agent, see the module doc), blocking at most
    ``block_ms`` per read so :meth:`stop` takes effect promptly. Order is kept: an entry that cannot
    be applied now (no durable tier took it) stops the batch, stays pending and is retried, with the
    ones after it, once the tier is back. Entries pending from an earlier run of the same group are
    claimed (XAUTOCLAIM) at start and then every ``claim_interval_s``.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        lookup: LookupPath,
        stream: str,
        group: str,
        consumer: str | None = None,
        password: str | None = None,
        cluster: bool = False,
        start_id: str = "$",
        block_ms: int = 200,
        batch: int = 64,
        claim_idle_ms: int = 10_000,
        claim_interval_s: float = 5.0,
        retry_delay_s: float = 0.5,
    ) -> None:
        self.stream = stream
        self.group = group
        self.consumer = consumer or group
        self._lookup = lookup
        self._addresses = addresses
        self._password = password
        self._cluster = cluster
        self._start_id = start_id
        self._block_ms = block_ms
        self._batch = batch
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval_s = claim_interval_s
        self._retry_delay_s = retry_delay_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis: redis.Redis | redis.RedisCluster | None = None
        self._lock = threading.Lock()
        self._lags_ms: deque[float] = deque(maxlen=1024)
        self._counters: dict[str, int] = {
            "applied_entries": 0, "applied_keys": 0, "rejected_entries": 0, "skipped_entries": 0,
            "retries": 0, "claimed_entries": 0, "redis_errors": 0,
        }  # fmt: skip
        self._degraded = False
        self._last_error = ""
        self._last_applied_id = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> UpdateConsumer:
        """Starts the consumer thread (once); returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"hps-updates-{self.group}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Asks the thread to end after its current read (at most ``block_ms``) and waits for it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError):
                self._redis.close()

    # -- what Describe/Stats read --------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while the stream's Redis cannot be reached (updates wait; nothing is lost)."""
        return self._degraded

    @property
    def last_applied_id(self) -> str:
        return self._last_applied_id

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lags = sorted(self._lags_ms)
            out: dict[str, Any] = dict(self._counters)
        out.update(
            stream=self.stream, group=self.group, degraded=self._degraded, last_error=self._last_error,
            last_applied_id=self._last_applied_id,
            lag_ms_p50=lags[len(lags) // 2] if lags else None,
            lag_ms_p99=lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else None,
            lag_ms_last=self._lags_ms[-1] if self._lags_ms else None,
        )  # fmt: skip
        return out

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Runs until :meth:`stop`; Redis outages are waited out (degraded), never fatal."""
        group_ready = False
        read_pending = True  # first drain what an earlier run of this group left unacknowledged
        next_claim = 0.0
        while not self._stopping.is_set():
            try:
                if self._redis is None:
                    self._redis = connect_stream_redis(self._addresses, password=self._password, cluster=self._cluster)
                if not group_ready:
                    self._ensure_group()
                    group_ready = True
                if time.monotonic() >= next_claim:
                    if self._claim():
                        read_pending = True
                    next_claim = time.monotonic() + self._claim_interval_s
                if read_pending:
                    entries = self._read("0", block=None)
                    if not entries:
                        read_pending = False
                        continue
                else:
                    entries = self._read(">", block=self._block_ms)
                if self._degraded:
                    log.info("update stream %s reachable again", self.stream)
                self._degraded = False
                if not self._apply_all(entries):
                    read_pending = True
                    self._count(retries=1)
                    self._stopping.wait(self._retry_delay_s)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis restarted empty or someone deleted the group
                    group_ready = False
                    continue
                self._fail(exc)
            except (*_REDIS_DOWN, UnavailableError) as exc:
                group_ready = False
                read_pending = True
                self._fail(exc)
            except Exception as exc:  # a bug must not end the thread silently: log it and go on
                log.exception("update consumer of %s failed", self.stream)
                read_pending = True
                self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if not self._degraded:
            log.warning("update stream %s unreachable, updates wait: %s", self.stream, exc)
        self._degraded = True
        self._last_error = str(exc)
        self._count(redis_errors=1)
        self._stopping.wait(self._retry_delay_s)

    def _ensure_group(self) -> None:
        assert self._redis is not None
        try:
            self._redis.xgroup_create(self.stream, self.group, id=self._start_id, mkstream=True)
            log.info("created consumer group %s on %s (from %s)", self.group, self.stream, self._start_id)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _claim(self) -> bool:
        """XAUTOCLAIMs entries of this group left idle by another consumer name (an earlier run)."""
        assert self._redis is not None
        start = "0-0"
        claimed = 0
        for _ in range(100):  # bounded: 100 pages of `batch` entries per claim round
            reply = self._redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self._claim_idle_ms,
                start_id=start, count=self._batch,
            )  # fmt: skip
            # [next cursor, claimed entries, deleted ids]; redis-py drops the cursor with JUSTID
            start_raw, entries = reply[0], reply[1]
            claimed += len(entries)
            start = start_raw.decode() if isinstance(start_raw, bytes) else str(start_raw)
            if start == "0-0":
                break
        if claimed:
            log.info("claimed %d pending update entries of group %s", claimed, self.group)
            self._count(claimed_entries=claimed)
        return claimed > 0

    def _read(self, start: str, *, block: int | None) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
        assert self._redis is not None
        reply: Any = self._redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self._batch, block=block)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 shape
            return [(eid, fields) for batch in reply.values() for eid, fields in batch[0] if fields]
        # In a pending read, an entry trimmed from the stream meanwhile comes back with no fields.
        return [(eid, fields) for _, batch in reply for eid, fields in batch if fields]

    def _apply_all(self, entries: list[tuple[bytes, Mapping[bytes, bytes]]]) -> bool:
        """Applies entries in order, acknowledging each; False when one must wait for a retry."""
        assert self._redis is not None
        for entry_id, fields in entries:
            try:
                keys = self._apply(fields)
            except UnavailableError as exc:
                self._last_error = f"entry {entry_id.decode()}: {exc}"
                log.warning("update %s not applied yet, will retry: %s", entry_id.decode(), exc)
                return False
            except _Rejected as exc:
                self._count(rejected_entries=1)
                log.error("update %s rejected (acknowledged, not retried): %s", entry_id.decode(), exc)
                keys = -1
            except NotFoundError as exc:
                self._count(skipped_entries=1)  # a table this agent does not serve
                log.debug("update %s skipped: %s", entry_id.decode(), exc)
                keys = -1
            self._redis.xack(self.stream, self.group, entry_id)
            self._last_applied_id = entry_id.decode()
            if keys >= 0:
                self._count(applied_entries=1, applied_keys=keys)
                sent = fields.get(b"ts")
                if sent:
                    with self._lock:
                        self._lags_ms.append((time.time_ns() - int(sent)) / 1e6)
        return True

    def _apply(self, fields: Mapping[bytes, bytes]) -> int:
        try:
            if fields.get(b"v", MESSAGE_VERSION) != MESSAGE_VERSION:
                raise _Rejected(f"unknown message layout version {fields.get(b'v')!r}")
            table = fields[b"table"].decode()
            dtype = fields[b"dtype"].decode()
            dim = int(fields[b"dim"])
            if dtype not in wire.VECTOR_WIRE_DTYPES:
                raise _Rejected(f"unsupported dtype {dtype!r}")
            keys = wire.unpack_keys(fields[b"keys"], where=f"keys of {table}")
            vectors = wire.unpack_vectors(fields[b"vectors"], dtype=dtype, rows=int(keys.size), dim=dim)
        except (KeyError, ValueError, UnicodeDecodeError, InvalidArgumentError) as exc:
            raise _Rejected(f"malformed entry: {exc}") from None
        spec = self._lookup.tables().get(table)
        if spec is None:
            raise NotFoundError(f"table {table!r} is not served here")
        if spec.dim != dim:
            raise _Rejected(f"table {table} has dim {spec.dim}, the update has dim {dim}")
        if keys.size:
            try:
                self._lookup.update(table, keys, vectors.astype(np.dtype(spec.dtype), copy=False))
            except (InvalidArgumentError, NotFoundError) as exc:
                raise _Rejected(str(exc)) from None
            except HpsError as exc:
                if isinstance(exc, UnavailableError):
                    raise
                raise _Rejected(str(exc)) from None
        return int(keys.size)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                self._counters[name] += n
