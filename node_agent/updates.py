"""Online updates over a Redis Stream: training publishes ``(table, keys, vectors)`` batches, every node
agent consumes them, writes them through its lookup path (L2/L3, then its own L1) and acknowledges.

HPS's Kafka source drops updates silently when no broker answers; every way an update can be lost
here is either closed or reported (``docs/updates.md`` has the whole list):

- a publish Redis did not take, or took without our being able to confirm the entry, raises
  :class:`UnavailableError`; ``wait_replicas`` also requires replication (``WAIT``);
- an update is acknowledged only after the lookup path applied it, so one that failed stays pending
  and is applied again, after a restart too (XAUTOCLAIM);
- a new consumer group starts where the agent's data stands (a :class:`StreamPosition` read before
  loading, or ``0``: all retained history, re-applied in order — updates are idempotent overwrites);
- an agent keeps its group across restarts (:func:`stable_consumer_identity`);
- entries trimmed (``MAXLEN ~``) before this agent read them are detected from the stream's counters
  (Redis 7: ``entries-added``, the group's ``entries-read``): the consumer turns degraded, clears its
  L1 and logs and counts the gap; it is never silent.

Every agent reads through its *own* consumer group, because each has its own L1 to refresh; the
L2/L3 writes that several agents then repeat are idempotent overwrites.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from node_agent import wire
from node_agent.errors import (
    FailedPreconditionError,
    HpsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from node_agent.redis_access import RedisAccess, access_of

if TYPE_CHECKING:
    from node_agent.lookup import LookupPath
    from node_agent.spec import ModelSpec
    from node_agent.store_writer import SharedStores

log = logging.getLogger(__name__)

#: message layout version, so a consumer can refuse a layout it does not know instead of misreading it
MESSAGE_VERSION = b"1"

#: stream entries kept (``XADD MAXLEN ~``); an agent lagging further behind is told so (a gap)
DEFAULT_MAXLEN = 10_000

#: consumer groups of agents not heard of for this long are deleted (their pending lists would grow)
DEFAULT_STALE_GROUP_IDLE_S = 24 * 3600.0

#: every agent's group is named ``agent:<identity>``; only such groups are ever deleted as stale
AGENT_GROUP_PREFIX = "agent:"

#: file under an agent's state directory holding the random part of its stable identity
IDENTITY_FILE = "hps-agent-id"

#: socket timeout of the Update RPC's own Redis calls (publish, withdraw): a Redis that takes longer
#: to take one entry is as good as unavailable, and the caller's deadline must bound the whole call
COMMIT_REDIS_TIMEOUT_S = 0.5

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError)

#: failures after which the entry may or may not be in the stream, or the slot map is stale: the
#: publisher reconnects (fresh slot map), looks for its entry and sends it at most once more
_PUBLISH_RETRYABLE = (
    *_REDIS_DOWN,
    redis.exceptions.AskError,  # MovedError is a subclass
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
)


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


def unauthenticated(addresses: str | Sequence[str], exc: Exception,
                    access: RedisAccess | None = None) -> UnauthenticatedError:  # fmt: skip
    """Redis's own words for a missing or refused password ("HELLO must be called...", "invalid
    username-password pair") say little to someone running a command: say which it is."""
    where = addresses if isinstance(addresses, str) else ",".join(addresses)
    text = str(exc).lower()
    if "hello must be called" in text or "noauth" in text or "authentication required" in text:
        return UnauthenticatedError(f"Redis at {where} requires a password and none was given")
    user = access.username if access is not None and access.username else "default"
    return UnauthenticatedError(f"Redis at {where} refused user {user} and its password ({exc})")


def permission_denied(addresses: str | Sequence[str], exc: Exception, access: RedisAccess | None,
                      what: str) -> PermissionDeniedError:  # fmt: skip
    """Redis's ``NOPERM`` (its ACL refused the command or the key) as a typed error naming the user."""
    where = addresses if isinstance(addresses, str) else ",".join(addresses)
    user = access.username if access is not None and access.username else "default"
    # a pipeline's error quotes the whole command (an update's bytes): Redis's own words are enough
    reason = str(exc).rsplit("caused error: ", 1)[-1]
    return PermissionDeniedError(f"Redis at {where}: user {user} may not {what} ({reason}); each role has its "
                                 "own ACL user (docs/security.md)")


def connect_stream_redis(
    addresses: str | Sequence[str],
    *,
    access: RedisAccess | None = None,
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
        **access_of(access).client_options(),
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


# -- stream ids and positions -------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_id(entry_id: Any) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a pair that orders like Redis orders stream ids."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _id_before(entry_id: tuple[int, int]) -> str:
    """The largest id smaller than ``entry_id`` (a group set there reads ``entry_id`` next)."""
    ms, seq = entry_id
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{2**64 - 1}" if ms > 0 else "0-0"


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stood at one moment: its last entry id and how many entries it had ever taken.

    Read it (:func:`stream_position`) *before* an agent loads its tables and pass it as the consumer's
    ``start_id``: the group then reads every entry published after the snapshot, and the count lets
    the consumer tell whether any of them were trimmed before it read them."""

    last_id: str
    entries_added: int


def _stream_info(client: redis.Redis | redis.RedisCluster, stream: str) -> dict[str, Any] | None:
    """XINFO STREAM with bytes keys turned to text, or None when the stream does not exist."""
    try:
        info: Any = client.xinfo_stream(stream)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return {_text(k): v for k, v in dict(info).items()}


def read_stream_position(client: redis.Redis | redis.RedisCluster, stream: str) -> StreamPosition:
    """The stream's :class:`StreamPosition` now (``0-0``/0 for a stream that does not exist yet)."""
    info = _stream_info(client, stream)
    if info is None:
        return StreamPosition("0-0", 0)
    return StreamPosition(_text(info["last-generated-id"]), int(info.get("entries-added") or 0))


def stream_position(
    addresses: str | Sequence[str],
    stream: str,
    *,
    access: RedisAccess | None = None,
    cluster: bool = False,
    timeout: float = 2.0,
) -> StreamPosition:
    """:func:`read_stream_position` over a connection of its own; :class:`UnavailableError` when the
    stream's Redis cannot be reached (the caller then falls back to ``start_id="0"``)."""
    client = connect_stream_redis(addresses, access=access, cluster=cluster, timeout=timeout)
    try:
        return read_stream_position(client, stream)
    except redis.RedisError as exc:
        raise UnavailableError(f"position of update stream {stream} unknown: {exc}") from None
    finally:
        with contextlib.suppress(redis.RedisError):
            client.close()


def stable_consumer_identity(
    model: str, partition: int, *, state_dir: str | Path | None = None, instance: str | int | None = None
) -> str:
    """An agent identity that survives restarts, so a restarted agent resumes its own consumer group.

    With ``state_dir`` (the agent's own writable state, e.g. its RocksDB directory) the identity is
    ``<model>-p<partition>-<random id>``, the random id kept in ``state_dir/hps-agent-id`` (made on the
    first call): it follows the data, wherever the agent runs. Without one it is
    ``<model>-p<partition>-<hostname>[-<instance>]``: stable where the host name is (a StatefulSet
    pod), and several agents of one partition on one host must pass distinct ``instance`` values
    (a fixed port, a replica index). A state directory that cannot be written falls back to it."""
    if partition < 0:
        raise InvalidArgumentError(f"partition must not be negative, got {partition}")
    base = f"{model}-p{partition}"
    if state_dir is not None:
        path = Path(state_dir) / IDENTITY_FILE
        try:
            return f"{base}-{_read_or_create_id(path)}"
        except OSError as exc:
            log.warning("agent identity cannot be kept in %s (%s): using the host name", path, exc)
    host = socket.gethostname().split(".")[0] or "host"
    return f"{base}-{host}" + (f"-{instance}" if instance is not None else "")


def _read_or_create_id(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if existing:
            return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = uuid.uuid4().hex[:12]
    try:
        # O_EXCL: of two agents starting on one directory, one writes and both read its id
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path.read_text().strip() or fresh
    with os.fdopen(fd, "w") as out:
        out.write(fresh + "\n")
    return fresh


# -- the producer -------------------------------------------------------------------------------


class NotPublishedError(UnavailableError):
    """A publish that certainly did not add its entry (Redis could not be reached to send it, or
    answered with an error); a plain :class:`UnavailableError` from ``publish`` leaves it open."""


def _never_sent(exc: BaseException) -> bool:
    """redis-py's words for a connection that was never made ("Error 111 connecting to ...",
    "Timeout connecting to server"): the command cannot have reached Redis."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError) and "connecting to" in str(exc)


class UpdatePublisher:
    """Publishes update batches to a model's stream (what a training job runs).

    ``publish`` returns the stream entry id once Redis holds the entry (and, with ``wait_replicas``,
    once that many replicas have it), and raises :class:`UnavailableError` when it cannot say so: the
    caller decides whether to retry, nothing is dropped behind its back.

    ``access``: the Redis user (a producer's: it may append to the stream and nothing else), password and
    TLS; ``password`` alone is the ``default`` user's, over plaintext."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        access: RedisAccess | None = None,
        password: str | None = None,
        cluster: bool = False,
        stream: str | None = None,
        model: str | None = None,
        maxlen: int = DEFAULT_MAXLEN,
        timeout: float = 2.0,
    ) -> None:
        if stream is None and model is None:
            raise InvalidArgumentError("UpdatePublisher needs a stream name or a model name")
        if access is not None and password is not None:
            raise InvalidArgumentError("access carries the password: give it or password, not both")
        if password is not None:
            access = RedisAccess(password=password)
        self.stream = stream or stream_name(str(model))
        self.maxlen = maxlen
        self.retries = 0
        self._addresses = addresses
        self._access = access
        self._cluster = cluster
        self._timeout = timeout
        self._redis: redis.Redis | redis.RedisCluster | None = None
        # tags every entry, so after an ambiguous failure the publisher can tell whether it landed
        self._producer = uuid.uuid4().hex[:16]
        self._sequence = itertools.count()
        self._last_entry = "-"

    def publish(
        self,
        table: str,
        keys: Any,
        vectors: Any,
        dtype: str | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        uid: str | None = None,
    ) -> str:
        """XADDs one batch; ``vectors`` is ``(len(keys), dim)``, sent as ``dtype`` (default: its own
        dtype when float32/float16, else float32). Returns the entry id.

        A failure that leaves the entry's fate unknown (connection lost mid-call, a Cluster ``MOVED``
        or ``TRYAGAIN``) is retried once on a fresh connection and slot map, after checking whether
        the entry landed (so it is never added twice); a second failure raises. With
        ``wait_replicas=N`` Redis ``WAIT``\\s up to ``wait_timeout_ms`` for N replicas to hold the
        entry and raises when fewer did (the entry is then on the master only; publishing it again
        is safe: updates are idempotent overwrites). ``uid`` tags the entry (default: a fresh one), so
        the caller can find or withdraw it when the outcome of this call is unknown."""
        if not table:
            raise InvalidArgumentError("table name is empty")
        if wait_replicas < 0 or wait_timeout_ms < 0:
            raise InvalidArgumentError("wait_replicas and wait_timeout_ms must not be negative")
        k = wire.as_keys(keys)
        v = wire.as_vectors(vectors, rows=int(k.size))
        sent = dtype or v.dtype.name
        if sent not in wire.VECTOR_WIRE_DTYPES:
            raise InvalidArgumentError(f"dtype must be float32 or float16, got {sent!r}")
        tag = (uid or f"{self._producer}-{next(self._sequence)}").encode()
        fields: dict[Any, Any] = {
            b"v": MESSAGE_VERSION,
            b"table": table.encode(),
            b"dtype": sent.encode(),
            b"dim": str(v.shape[1]).encode(),
            b"keys": k.tobytes(),
            b"vectors": wire.pack_vectors(v, sent),
            b"ts": str(time.time_ns()).encode(),
            b"uid": tag,
        }
        try:
            entry, replicas = self._send(fields, wait_replicas, wait_timeout_ms)
        except redis.AuthenticationError as exc:
            raise unauthenticated(self._addresses, exc, self._access) from None
        except redis.exceptions.NoPermissionError as exc:
            raise permission_denied(self._addresses, exc, self._access, f"publish to {self.stream}") from None
        except _PUBLISH_RETRYABLE as first:
            self.retries += 1
            # a connection never made is the caller's to hear about (Redis down: one line per publish
            # would flood the log); a call cut short is worth a warning
            (log.debug if _never_sent(first) else log.warning)(
                "publish to %s failed (%s): reconnecting and retrying once", self.stream, first)
            self._reset()
            try:
                found = self._find(tag)
                if found is None:
                    entry, replicas = self._send(fields, wait_replicas, wait_timeout_ms)
                else:
                    entry, replicas = found, self._wait(wait_replicas, wait_timeout_ms)
            except redis.RedisError as second:
                # both attempts failed to connect: the entry was never sent, so it is certainly not there
                kind = NotPublishedError if _never_sent(first) and _never_sent(second) else UnavailableError
                raise kind(
                    f"update not published to stream {self.stream} (failed twice: {first}; then {second})"
                ) from None
        except redis.RedisError as exc:
            # Redis answered with an error (out of memory, wrong type...): it did not add the entry
            raise NotPublishedError(f"update not published to stream {self.stream}: {exc}") from None
        self._last_entry = entry
        if replicas < wait_replicas:
            raise UnavailableError(
                f"update {entry} is in stream {self.stream} but reached {replicas} of {wait_replicas} "
                f"replicas within {wait_timeout_ms} ms: not durable"
            )
        return entry

    def _client(self) -> redis.Redis | redis.RedisCluster:
        if self._redis is None:
            self._redis = connect_stream_redis(
                self._addresses, access=self._access, cluster=self._cluster, timeout=self._timeout
            )
        return self._redis

    def _node_client(self) -> redis.Redis:
        """The connection to the master holding the stream: XADD and WAIT must share one connection,
        as WAIT counts the replicas that hold *this connection's* writes."""
        client = self._client()
        if isinstance(client, redis.RedisCluster):
            return client.get_redis_connection(client.get_node_from_key(self.stream))
        return client

    def _send(self, fields: Mapping[Any, Any], wait_replicas: int, wait_timeout_ms: int) -> tuple[str, int]:
        try:
            pipe = self._node_client().pipeline(transaction=False)
        except (redis.exceptions.RedisClusterException, UnavailableError) as exc:
            raise redis.ConnectionError(str(exc)) from None
        pipe.xadd(self.stream, dict(fields), maxlen=self.maxlen, approximate=True)
        if wait_replicas:
            pipe.wait(wait_replicas, wait_timeout_ms)
        replies = pipe.execute()
        if not replies or not replies[0]:
            # Redis answered but gave no entry id: nothing says the entry exists
            raise redis.ResponseError(f"XADD to {self.stream} returned no entry id ({replies!r})")
        return _text(replies[0]), int(replies[1]) if wait_replicas else 0

    def _wait(self, wait_replicas: int, wait_timeout_ms: int) -> int:
        if not wait_replicas:
            return 0
        return int(self._node_client().wait(wait_replicas, wait_timeout_ms))

    def _find(self, uid: bytes, *, limit: int = 256) -> str | None:
        """The id of the entry tagged ``uid`` among those newer than the last one this publisher
        confirmed (at most ``limit``), or None: tells a retry whether the first attempt landed."""
        try:
            client = self._node_client()
        except (redis.exceptions.RedisClusterException, UnavailableError) as exc:
            raise redis.ConnectionError(str(exc)) from None
        newest = "+"
        seen = 0
        while seen < limit:
            page: Any = client.xrevrange(self.stream, max=newest, min=self._last_entry, count=64)
            for entry_id, entry_fields in page:
                if entry_fields.get(b"uid") == uid:
                    return _text(entry_id)
            seen += len(page)
            if len(page) < 64:
                return None
            newest = "(" + _text(page[-1][0])
        return None

    def _reset(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException):
                self._redis.close()
            self._redis = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> UpdatePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the consumer -------------------------------------------------------------------------------


class _Rejected(Exception):
    """An entry that can never apply (malformed, wrong dim): acknowledged and counted, not retried."""


# -- coordinating the agents that share stores ---------------------------------------------------
#
# Agents that share a store (Redis; a RocksDB directory on one machine) do not all write it: one agent,
# the store writer (node_agent.store_writer), applies each entry to the shared stores, then raises the
# stream's *applied watermark*. Every other agent refreshes its own L1 with an entry only once the
# watermark has passed it, so a lookup that misses its L1 afterwards reads the new row from the stores,
# never the old one. Three small keys beside the stream, in its hash slot:
#
#   <stream>:applied    the newest entry the shared stores hold (only ever raised)
#   <stream>:claimed    the newest entry the writer has started to apply
#   <stream>:cancelled  uids of entries withdrawn before the writer claimed them (an Update RPC that
#                       could not be applied in time); every agent skips them
#
# Claiming and withdrawing are Lua scripts, so an entry is either withdrawn (applied nowhere, ever) or
# claimed (applied everywhere), never both: that is what lets the Update RPC answer the truth.

_ID_CMP = """
local function idcmp(a, b)
  local am, as = string.match(a, '^(%d+)-?(%d*)$')
  local bm, bs = string.match(b, '^(%d+)-?(%d*)$')
  if as == '' then as = '0' end
  if bs == '' then bs = '0' end
  local function ncmp(x, y)
    if #x ~= #y then return (#x < #y) and -1 or 1 end
    if x == y then return 0 end
    return (x < y) and -1 or 1
  end
  local c = ncmp(am, bm)
  if c ~= 0 then return c end
  return ncmp(as, bs)
end
"""
#: KEYS: claimed, cancelled, applied; ARGV: newest id of the batch, then each entry's uid
#: -> 1 per withdrawn entry, then the applied watermark ('' when there is none)
_CLAIM = _ID_CMP + """
local out = {}
for i = 2, #ARGV do out[i - 1] = redis.call('SISMEMBER', KEYS[2], ARGV[i]) end
local cur = redis.call('GET', KEYS[1])
if (not cur) or idcmp(cur, ARGV[1]) < 0 then redis.call('SET', KEYS[1], ARGV[1]) end
out[#ARGV] = redis.call('GET', KEYS[3]) or ''
return out
"""
#: KEYS: applied; ARGV: id -> raises the watermark to id (never lowers it)
_RAISE = _ID_CMP + """
local cur = redis.call('GET', KEYS[1])
if (not cur) or idcmp(cur, ARGV[1]) < 0 then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('GET', KEYS[1])
"""
#: KEYS: stream, claimed, cancelled, epoch; ARGV: uid, id ('' when unknown), how many newest entries
#: to search, the epoch seen before publishing, '1' to check it -> applied | withdrawn | unknown.
#: A claim recorded in a Redis that lost its data since is gone with it: then nobody can tell
_WITHDRAW = _ID_CMP + """
if ARGV[5] == '1' and (redis.call('GET', KEYS[4]) or '') ~= ARGV[4] then return 'unknown' end
local id = ARGV[2]
if id == '' then
  for _, e in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', tonumber(ARGV[3]))) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'uid' and f[i + 1] == ARGV[1] then id = e[1] end
    end
    if id ~= '' then break end
  end
elseif #redis.call('XRANGE', KEYS[1], id, id) == 0 then
  return 'unknown'
end
local claimed = redis.call('GET', KEYS[2])
if id ~= '' and claimed and idcmp(claimed, id) >= 0 then return 'applied' end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], 86400)
return 'withdrawn'
"""


def coordination_key(stream: str, suffix: str) -> str:
    """A key beside ``stream`` in its Redis Cluster hash slot (its hash tag, or the whole name as one)."""
    start = stream.find("{")
    if start >= 0 and stream.find("}", start + 2) > start:
        return f"{stream}:{suffix}"
    return f"{{{stream}}}:{suffix}"


def _id_max(a: str, b: str) -> str:
    return a if not b or (a and _parse_id(a) >= _parse_id(b)) else b


class UpdateConsumer:
    """Applies a model's update stream to one lookup path, on a background thread.

    Reads with XREADGROUP in ``group`` (one per agent, see the module doc), blocking at most
    ``block_ms`` per read so :meth:`stop` takes effect promptly. Order is kept: an entry that cannot
    be applied now (no durable tier took it) stops the batch, stays pending and is retried, with the
    ones after it, once the tier is back. Entries pending from an earlier run of the same group are
    claimed (XAUTOCLAIM) at start and then every ``claim_interval_s``. An entry older than the newest
    this agent applied is never applied again (a Redis restored from an older file re-delivers them).

    ``shared`` (:class:`~node_agent.store_writer.SharedStores`) names the tiers this agent shares with
    others and decides whether it writes them: the writer applies entries to the stores and raises the
    stream's applied watermark; the others refresh their own L1 once the watermark passed an entry
    (see the comment above ``_ID_CMP``). Without it, every tier of the lookup path is this agent's own.

    Where a *new* group starts: with shared stores, at the applied watermark (the stores hold what came
    before); otherwise ``start_id``: a :class:`StreamPosition` read before the agent loaded its data
    (exact, and gaps before the first read are detected), ``"0"`` (the default: all retained history,
    re-applied in order) or any stream id / ``"$"``. An existing group resumes where it stopped, unless
    ``reset_group`` (the agent rebuilt its own tiers from the sources): then it is moved back to
    ``start_id``. On start, groups of other agents idle longer than ``stale_group_idle_s`` are deleted
    (None: never). Every ``gap_check_interval_s`` the group's counters are compared with the stream's
    to detect entries trimmed before this agent read them, and the stream with what this agent saw of
    it: a stream that went backwards means Redis lost data, reported to ``on_store_regression``.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        lookup: LookupPath,
        stream: str,
        group: str,
        consumer: str | None = None,
        access: RedisAccess | None = None,
        cluster: bool = False,
        start_id: str | StreamPosition = "0",
        reset_group: bool = False,
        shared: SharedStores | None = None,
        on_store_regression: Callable[[str], None] | None = None,
        epoch_key: str | None = None,
        stale_group_idle_s: float | None = DEFAULT_STALE_GROUP_IDLE_S,
        gap_check_interval_s: float = 5.0,
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
        self._access = access
        self._cluster = cluster
        self._start = start_id
        self._reset_pending = reset_group
        self._shared = shared
        self._on_store_regression = on_store_regression
        self._epoch_key = epoch_key
        self._stale_group_idle_s = stale_group_idle_s
        self._gap_check_interval_s = gap_check_interval_s
        self._block_ms = block_ms
        self._batch = batch
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval_s = claim_interval_s
        self._retry_delay_s = retry_delay_s
        self._applied_key = coordination_key(stream, "applied")
        self._claimed_key = coordination_key(stream, "claimed")
        self._cancelled_key = coordination_key(stream, "cancelled")
        self._marker = f"updates-applied:{stream}"
        self._stopping = threading.Event()
        self._caught_up = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis: redis.Redis | redis.RedisCluster | None = None
        self._lock = threading.Lock()
        self._applied = threading.Condition(self._lock)
        self._lags_ms: deque[float] = deque(maxlen=1024)
        self._counters: dict[str, int] = {
            "applied_entries": 0, "applied_keys": 0, "rejected_entries": 0, "skipped_entries": 0,
            "withdrawn_entries": 0, "replayed_entries_skipped": 0, "retries": 0, "claimed_entries": 0,
            "redis_errors": 0, "gaps": 0, "missed_entries": 0, "l1_invalidations": 0,
            "stale_groups_deleted": 0, "store_regressions": 0, "writer_changes": 0,
        }  # fmt: skip
        self._unreachable = False
        self._gap = ""
        self._group_seen = False
        self._gap_check_blind = False
        self._last_error = ""
        self._last_applied_id = ""
        self._watermark = ""
        self._is_writer = shared is None
        #: (exists, last id) of the stream when this agent last looked: a stream that goes backwards
        #: (or vanishes) lost data with its Redis
        self._stream_seen: tuple[bool, str] | None = None
        self._entries_behind: int | None = None
        #: the group's entries-read at the last gap check, and entries read since (see _check_gap)
        self._entries_read_base: int | None = None
        self._reads_since_check = 0
        self._publisher: UpdatePublisher | None = None
        self._publish_lock = threading.Lock()
        #: the Update RPC's own connection (the data generation before publishing, withdrawing)
        self._commit_redis: redis.Redis | redis.RedisCluster | None = None
        #: the stream's newest entry when the group was first set up: applied it, the consumer is caught up
        self._catch_up_to: tuple[int, int] | None = None

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
        if self._shared is not None:
            self._shared.release()
        for client in (self._redis, self._publisher, self._commit_redis):
            if client is not None:
                with contextlib.suppress(redis.RedisError):
                    client.close()

    def wait_caught_up(self, timeout: float) -> bool:
        """Blocks until the consumer has applied everything the stream held when it started (the
        newest entry then, or an empty read), or ``timeout``; True if it did. An agent that replays
        history at start waits here before it reports ready, so it never serves a row the replay is
        about to change. Updates published meanwhile do not hold it back."""
        return self._caught_up.wait(timeout)

    # -- the Update RPC ------------------------------------------------------------------------

    def commit(self, table: str, keys: Any, vectors: Any, *, timeout_s: float) -> str:
        """Applies one update on every agent of the model, through the stream; returns its entry id
        once the stores hold it and this agent serves it. The answer is the truth:

        - returned: the update is in the shared stores and this agent's L1; every other agent serves
          it within the update lag;
        - :class:`UnavailableError` "not applied": it is applied nowhere and never will be (it never
          reached the stream, or it was withdrawn before the store writer claimed it: no writer could
          apply it within ``timeout_s``). Sending it again is safe;
        - :class:`UnavailableError` "outcome unknown": Redis stopped answering between taking the
          entry and telling whether it was applied (an entry it took is applied once it is back).
        """
        uid = f"rpc-{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout_s
        with self._publish_lock:
            generation = self._generation()
            if self._publisher is None:
                # short socket timeouts: the caller's deadline bounds the whole call, retry included
                self._publisher = UpdatePublisher(self._addresses, access=self._access, cluster=self._cluster,
                                                  stream=self.stream, timeout=COMMIT_REDIS_TIMEOUT_S)  # fmt: skip
            publisher = self._publisher
            try:
                entry = publisher.publish(table, keys, vectors, uid=uid)
            except NotPublishedError as exc:
                raise UnavailableError(f"update not applied: {exc}; nothing was changed (sending it again is "
                                       "safe)") from None  # fmt: skip
            except (UnauthenticatedError, PermissionDeniedError) as exc:
                # Redis refused this agent's own user: the caller's credential is not the problem, the
                # agent's set-up is (its RPC must not answer UNAUTHENTICATED for it)
                raise FailedPreconditionError(f"update not applied: this agent cannot publish to the update "
                                              f"stream: {exc}; nothing was changed") from None  # fmt: skip
            except UnavailableError as exc:
                outcome = self._withdraw(uid, "", generation, cause=str(exc))
                if outcome == "unknown":
                    raise self._unknown(str(exc), "") from None
                if outcome != "applied":
                    raise UnavailableError(f"update not applied: {exc}; nothing was changed (sending it again is "
                                           "safe)") from None  # fmt: skip
                entry = ""
        if entry and self._wait_applied(entry, deadline - time.monotonic()):
            return entry
        cause = f"no store writer had applied it after {timeout_s:.1f} s"
        outcome = self._withdraw(uid, entry, generation, cause=cause)
        if outcome == "unknown":
            raise self._unknown(cause, entry)
        if outcome == "withdrawn":
            why = self._last_error or "no agent could write the shared stores"
            raise UnavailableError(
                f"update not applied within {timeout_s:.1f} s ({why}): it was withdrawn and is applied "
                "nowhere; sending it again is safe"
            )
        # the writer claimed it: it is being applied everywhere; give this agent what is left to serve it
        if entry:
            self._wait_applied(entry, deadline - time.monotonic())
        return entry

    def _commit_client(self) -> redis.Redis | redis.RedisCluster:
        if self._commit_redis is None:
            self._commit_redis = connect_stream_redis(self._addresses, access=self._access, cluster=self._cluster,
                                                      timeout=COMMIT_REDIS_TIMEOUT_S)  # fmt: skip
        return self._commit_redis

    def _generation(self) -> str | None:
        """The data generation (epoch) of the stream's Redis before publishing; None when not known."""
        if self._epoch_key is None:
            return None
        try:
            raw = self._commit_client().get(self._epoch_key)
        except redis.RedisError as exc:
            self._commit_redis = None
            raise UnavailableError(f"update not applied: Redis unreachable ({exc}); nothing was changed (sending "
                                   "it again is safe)") from None  # fmt: skip
        return _text(raw) if raw is not None else ""

    def _withdraw(self, uid: str, entry: str, generation: str | None, *, cause: str) -> str:
        """``applied`` when the writer claimed the entry, ``withdrawn`` (now applied nowhere, ever), or
        ``unknown`` when Redis lost data since the entry was published (its claim may have gone with it)."""
        try:
            epoch_key = self._epoch_key if generation is not None and self._epoch_key is not None else None
            outcome = _text(self._commit_client().eval(
                _WITHDRAW, 4, self.stream, self._claimed_key, self._cancelled_key, epoch_key or self._claimed_key,
                uid, entry, 256, generation or "", "1" if epoch_key else "0",
            ))  # fmt: skip
        except (redis.RedisError, UnavailableError) as exc:
            self._commit_redis = None
            raise self._unknown(f"{cause}, and Redis stopped answering ({exc})", entry) from None
        return outcome

    @staticmethod
    def _unknown(cause: str, entry: str) -> UnavailableError:
        where = f"as entry {entry}" if entry else "(if it reached the stream at all)"
        return UnavailableError(
            f"update outcome unknown: {cause}; whether a store writer applied it cannot be told (Redis stopped "
            f"answering, or lost data since it took the entry {where}). Sending it again is safe (updates "
            "overwrite)"
        )

    def _wait_applied(self, entry: str, timeout_s: float) -> bool:
        target = _parse_id(entry)
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._applied:
            while not (self._last_applied_id and _parse_id(self._last_applied_id) >= target):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return False
                self._applied.wait(min(left, 0.1))
        return True

    # -- what Describe/Stats read --------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while the stream's Redis cannot be reached (updates wait; nothing is lost), and for
        good once entries were trimmed before this agent applied them (a gap: some rows of its own
        tiers may be older than the stream's; its L1 was cleared). A restart that reloads clears it."""
        return self._unreachable or bool(self._gap)

    @property
    def reason(self) -> str:
        """Why :attr:`degraded`, in one line ("" when it is not)."""
        if self._gap:
            return f"updates lost: {self._gap}"
        if self._unreachable:
            return f"update stream {self.stream} unreachable, updates wait: {self._last_error}"
        return ""

    @property
    def last_applied_id(self) -> str:
        return self._last_applied_id

    @property
    def is_writer(self) -> bool:
        return self._is_writer

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lags = sorted(self._lags_ms)
            out: dict[str, Any] = dict(self._counters)
        out.update(
            stream=self.stream, group=self.group, degraded=self.degraded, reason=self.reason,
            unreachable=self._unreachable, gap=self._gap, last_error=self._last_error,
            last_applied_id=self._last_applied_id, applied_watermark=self._watermark,
            store_writer=self._is_writer, shared_stores=self._shared is not None,
            entries_behind=self._entries_behind, caught_up=self._caught_up.is_set(),
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
        next_gap_check = 0.0
        while not self._stopping.is_set():
            try:
                if self._redis is None:
                    self._redis = connect_stream_redis(self._addresses, access=self._access, cluster=self._cluster)
                self._poll_role()
                if not group_ready:
                    self._ensure_group()
                    group_ready = True
                    next_gap_check = 0.0
                if time.monotonic() >= next_claim:
                    if self._claim():
                        read_pending = True
                    next_claim = time.monotonic() + self._claim_interval_s
                if time.monotonic() >= next_gap_check:
                    # mid-stream the counters cannot tell yet (see _check_gap): look again soon
                    wait = self._gap_check_interval_s if self._check_gap() else min(self._gap_check_interval_s, 0.5)
                    next_gap_check = time.monotonic() + wait
                if read_pending:
                    entries = self._read("0", block=None)
                    if not entries:
                        read_pending = False
                        continue
                else:
                    entries = self._read(">", block=self._block_ms)
                    if not entries:
                        self._caught_up.set()
                if self._unreachable:
                    log.info("update stream %s reachable again", self.stream)
                self._unreachable = False
                outcome = self._apply_all(entries)
                if outcome == "retry":
                    read_pending = True
                    self._count(retries=1)
                    self._stopping.wait(self._retry_delay_s)
                elif outcome == "wait":
                    read_pending = True  # the writer has not applied them yet: read them again soon
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._group_vanished(exc)
                    group_ready = False
                    read_pending = True
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
        if not self._unreachable:
            log.warning("update stream %s unreachable, updates wait: %s", self.stream, exc)
        self._unreachable = True
        self._last_error = str(exc)
        self._count(redis_errors=1)
        self._stopping.wait(self._retry_delay_s)

    def _group_vanished(self, exc: Exception) -> None:
        """Our group is gone: Redis came back empty (or someone deleted it), taking with it whatever was
        published and not yet read. With shared stores that the writer kept, only the writer can have
        missed something (the others serve what the stores hold once their L1 is dropped)."""
        if not self._group_seen:
            return
        if self._shared is None:
            self._report_gap(-1, f"consumer group {self.group} vanished ({exc})")
            return
        self._invalidate_l1()
        if self._is_writer:
            log.error("update stream %s lost its consumer groups (Redis came back without its data): the "
                      "shared stores hold every entry up to %s; an entry published after that and not yet "
                      "applied is lost", self.stream, self._last_applied_id or "the load")  # fmt: skip
        else:
            log.warning("update stream %s lost its consumer groups (Redis came back without its data): "
                        "recreating this agent's; the store writer repairs Redis", self.stream)  # fmt: skip

    # -- who writes the shared stores ----------------------------------------------------------

    def _poll_role(self) -> bool:
        if self._shared is None:
            return True
        writer = self._shared.poll()
        if writer and not self._is_writer:
            self._count(writer_changes=1)
            self._become_writer()
        elif not writer and self._is_writer:
            self._count(writer_changes=1)
        self._is_writer = writer
        return writer

    def _become_writer(self) -> None:
        """Where the stores stand, from the marker the last writer left in a RocksDB it wrote: entries
        up to it are not applied again, the watermark is raised to it, and a stream that ends before it
        means Redis came back older than the stores (repaired by the probe)."""
        assert self._redis is not None
        persistent = self._shared.persistent if self._shared is not None else None
        marker = persistent.get_meta(self._marker) if persistent is not None and persistent.is_writer else None
        log.info("this agent now writes the shared stores of stream %s (stores hold entries up to %s)",
                 self.stream, marker or "the load")  # fmt: skip
        if not marker:
            return
        with self._applied:
            self._last_applied_id = _id_max(self._last_applied_id, marker)
            self._applied.notify_all()
        self._watermark = _text(self._redis.eval(_RAISE, 1, self._applied_key, marker))
        info = _stream_info(self._redis, self.stream)
        last = _text(info["last-generated-id"]) if info is not None else "0-0"
        if _parse_id(last) < _parse_id(marker):
            self._store_regression(f"Redis came back older than the stores: its update stream {self.stream} "
                                   f"ends at {last}, the stores hold entries up to {marker}")  # fmt: skip

    def _store_regression(self, why: str) -> None:
        self._count(store_regressions=1)
        self._invalidate_l1()
        if self._on_store_regression is not None:
            self._on_store_regression(why)  # logs it, and repairs
        else:
            log.error("%s", why)

    # -- the group: where it starts, and the stale ones ----------------------------------------

    def _start_point(self) -> tuple[str, int | None, bool]:
        """The id a new (or reset) group starts after, its ``entries-read`` when known, and whether it
        is the applied watermark."""
        assert self._redis is not None
        if self._shared is not None and not self._reset_pending:
            watermark = self._redis.get(self._applied_key)
            if watermark:
                # the shared stores hold everything up to the watermark: start right after it
                info = _stream_info(self._redis, self.stream)
                at_end = info is not None and _text(info["last-generated-id"]) == _text(watermark)
                read = int(info.get("entries-added") or 0) if info is not None and at_end else None
                return _text(watermark), read, True
        if isinstance(self._start, StreamPosition):
            return self._start.last_id, self._start.entries_added, False
        if self._start in ("0", "0-0"):
            # "all retained history": what was trimmed before the group existed is not counted as
            # missed (it is older than anything this start point promises)
            info = _stream_info(self._redis, self.stream)
            if info is None:
                return "0", 0, False
            return "0", int(info.get("entries-added") or 0) - int(info.get("length") or 0), False
        return self._start, None, False

    def _ensure_group(self) -> None:
        assert self._redis is not None
        start, entries_read, at_watermark = self._start_point()
        try:
            self._redis.xgroup_create(self.stream, self.group, id=start, mkstream=True, entries_read=entries_read)
            log.info("created consumer group %s on %s (after %s)", self.group, self.stream, start)
            self._entries_read_base, self._reads_since_check = None, 0  # a new group counts afresh
            if at_watermark:
                # this agent's L1 is new (or was just dropped) and the stores hold everything up to
                # the watermark: once it read what the writer wrote there, it serves those entries
                # (an Update RPC waiting on one of them must not wait for the next entry to pass it)
                if self._shared is not None:
                    self._shared.catch_up()
                with self._applied:
                    self._last_applied_id = _id_max(start, self._last_applied_id)
                    self._applied.notify_all()
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            if self._reset_pending:
                self._entries_read_base, self._reads_since_check = None, 0
                self._redis.xgroup_setid(self.stream, self.group, id=start, entries_read=entries_read)
                log.info("moved consumer group %s on %s back to %s: this agent's tiers were rebuilt",
                         self.group, self.stream, start)  # fmt: skip
        self._reset_pending = False  # once per consumer: a reconnect must not rewind again
        self._group_seen = True
        if self._catch_up_to is None:
            info = _stream_info(self._redis, self.stream)
            self._catch_up_to = _parse_id(info["last-generated-id"]) if info is not None else (0, 0)
        if self._stale_group_idle_s is not None:
            self._delete_stale_groups(self._stale_group_idle_s)

    def _delete_stale_groups(self, idle_s: float) -> None:
        """Deletes other agents' groups that hold entries nobody took (pending, or not yet delivered)
        while none of their consumers got an entry for ``idle_s``. Redis before 7.2 counts a
        consumer's idle time from its last *delivery*, so a caught-up group on a quiet stream looks
        idle: it is left alone (it costs nothing; its first undelivered entry starts its clock)."""
        assert self._redis is not None
        info = _stream_info(self._redis, self.stream)
        if info is None:
            return
        newest = _parse_id(info["last-generated-id"])
        groups: Any = self._redis.xinfo_groups(self.stream)
        now_ms = int(time.time() * 1000)
        for raw in groups:
            g = {_text(k): v for k, v in dict(raw).items()}
            name = _text(g["name"])
            if name == self.group or not name.startswith(AGENT_GROUP_PREFIX):
                continue
            delivered = _parse_id(g["last-delivered-id"])
            if not int(g["pending"]) and delivered >= newest:
                continue
            if int(g["consumers"]):
                consumers: Any = self._redis.xinfo_consumers(self.stream, name)
                quiet_ms = min(int({_text(k): v for k, v in dict(c).items()}["idle"]) for c in consumers)
            elif delivered[0]:
                quiet_ms = now_ms - delivered[0]  # the ms part of a stream id is its creation time
            else:
                continue  # created and never read: just starting, maybe; left alone
            if quiet_ms > idle_s * 1000:
                self._redis.xgroup_destroy(self.stream, name)
                self._count(stale_groups_deleted=1)
                log.warning("deleted consumer group %s of %s: no agent read through it for %.1f s "
                            "(its %s pending entries go with it)", name, self.stream, quiet_ms / 1000,
                            g["pending"])  # fmt: skip

    # -- gaps: entries trimmed before this agent applied them ----------------------------------

    def _check_gap(self) -> bool:
        """Compares the group's ``entries-read`` with the stream's ``entries-added``. Exact when the
        group is behind the first retained entry or at the stream's end; False (check again soon)
        when it is in between, where the counters cannot tell a hole from entries still to read.
        Also notices a stream that went backwards since the last look (Redis lost data)."""
        assert self._redis is not None
        info = _stream_info(self._redis, self.stream)
        self._watch_stream(info)
        if info is None:
            return True
        mine = self._group_info()
        if mine is None:
            return True
        self._restore_entries_read(mine)
        lag = mine.get("lag")
        self._entries_behind = int(lag) if lag is not None else None
        if "entries-added" not in info:
            # Redis older than 7.0
            if not self._gap_check_blind:
                log.warning("update stream %s: Redis does not count entries for group %s; entries "
                            "trimmed before this agent reads them cannot be detected", self.stream, self.group)  # fmt: skip
                self._gap_check_blind = True
            return True
        if mine.get("entries-read") is None:
            return True  # a group started mid-stream: Redis counts once it has read on from there
        delivered_text = _text(mine["last-delivered-id"])
        delivered = _parse_id(delivered_text)
        added = int(info["entries-added"])
        length = int(info["length"])
        last = _text(info["last-generated-id"])
        first = info.get("first-entry")
        if added == length:
            # no entry ever left the stream: nothing can have been trimmed before this agent read it.
            # A group at the end that counts fewer was replayed from Redis 7.0's append-only file
            # (see _restore_entries_read): its count is put right
            if delivered >= _parse_id(last) and int(mine["entries-read"]) != added:
                self._redis.xgroup_setid(self.stream, self.group, id=delivered_text, entries_read=added)
                self._entries_read_base = added
            return True
        if length and first is not None and delivered < _parse_id(first[0]):
            # behind the first retained entry: all `length` retained entries are still to read
            resume, read_at_resume = _id_before(_parse_id(first[0])), added - length
        elif delivered >= _parse_id(last):
            resume, read_at_resume = delivered_text, added  # at the end: nothing left to read
        elif not length:
            resume, read_at_resume = last, added  # everything after the group's position was trimmed
        else:
            return False
        missing = read_at_resume - int(mine["entries-read"])
        if missing > 0:
            # Move the group past the hole with its counter made whole, so the hole is reported once,
            # across restarts too. Pending entries stay pending.
            self._redis.xgroup_setid(self.stream, self.group, id=resume, entries_read=read_at_resume)
            self._entries_read_base = read_at_resume
            self._report_gap(missing, f"{missing} entries after {delivered_text} were trimmed before "
                                      "this agent read them")  # fmt: skip
        return True

    def _restore_entries_read(self, mine: dict[str, Any]) -> None:
        """Redis 7.0 logs a group read to its append-only file as ``XCLAIM ... LASTID`` without the
        group's ``entries-read``, so a Redis that restarted from the file counts fewer entries read than
        were: the gap check would report entries as lost that this agent did apply. The consumer counts
        what it read since the last check and puts a smaller count back where it was."""
        assert self._redis is not None
        raw = mine.get("entries-read")
        if self._entries_read_base is not None:
            expected = self._entries_read_base + self._reads_since_check
            if raw is None or int(raw) < expected:
                log.info("update stream %s: group %s came back counting %s entries read, not %d (Redis restarted "
                         "from its append-only file): restoring the count", self.stream, self.group, raw, expected)  # fmt: skip
                self._redis.xgroup_setid(self.stream, self.group, id=_text(mine["last-delivered-id"]),
                                         entries_read=expected)  # fmt: skip
                mine["entries-read"] = raw = expected
        self._entries_read_base = int(raw) if raw is not None else None
        self._reads_since_check = 0

    def _watch_stream(self, info: Mapping[str, Any] | None) -> None:
        """A stream that vanished, or whose newest id went backwards, since this agent last looked lost
        data with its Redis: reported once per such step."""
        now = (info is not None, _text(info["last-generated-id"]) if info is not None else "0-0")
        before, self._stream_seen = self._stream_seen, now
        if before is None or not before[0] or _parse_id(now[1]) >= _parse_id(before[1]):
            return
        if not now[0] or _parse_id(now[1]) == (0, 0):
            self._store_regression(f"update stream {self.stream} vanished (Redis came back without its data); "
                                   f"it ended at {before[1]}")  # fmt: skip
        else:
            self._store_regression(f"update stream {self.stream} went back from {before[1]} to {now[1]} "
                                   "(Redis came back older)")  # fmt: skip

    def _group_info(self) -> dict[str, Any] | None:
        assert self._redis is not None
        groups: Any = self._redis.xinfo_groups(self.stream)
        for g in groups:
            fields = {_text(k): v for k, v in dict(g).items()}
            if _text(fields["name"]) == self.group:
                return fields
        return None

    def _report_gap(self, missing: int, why: str) -> None:
        """Never silent: counts, logs at ERROR, turns degraded and clears L1 (L2/L3 are shared or
        durable and were written by the agents that did read the entries)."""
        self._count(gaps=1, missed_entries=max(missing, 0))
        self._gap = why
        log.error("UPDATES LOST for this agent on stream %s (group %s): %s; its L1 is cleared and it "
                  "reports degraded", self.stream, self.group, why)  # fmt: skip
        self._invalidate_l1()

    def _invalidate_l1(self) -> None:
        self._lookup.invalidate_l1()
        self._count(l1_invalidations=1)

    # -- reading and applying ------------------------------------------------------------------

    def _claim(self) -> bool:
        """XAUTOCLAIMs entries of this group left idle by another consumer name (an earlier run)."""
        assert self._redis is not None
        start = "0-0"
        claimed = 0
        vanished = 0
        for _ in range(100):  # bounded: 100 pages of `batch` entries per claim round
            reply = self._redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self._claim_idle_ms,
                start_id=start, count=self._batch,
            )  # fmt: skip
            # [next cursor, claimed entries, ids deleted from the stream (Redis drops them from the PEL)]
            start_raw, entries = reply[0], reply[1]
            claimed += len(entries)
            vanished += len(reply[2]) if len(reply) > 2 else 0
            start = _text(start_raw)
            if start == "0-0":
                break
        if vanished:
            self._report_gap(vanished, f"{vanished} pending entries were trimmed before they were applied")
        if claimed:
            log.info("claimed %d pending update entries of group %s", claimed, self.group)
            self._count(claimed_entries=claimed)
        return claimed > 0

    def _read(self, start: str, *, block: int | None) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
        """XREADGROUP; in a pending read, an entry trimmed from the stream meanwhile comes back with
        no fields: it is kept here (with empty fields) so that :meth:`_apply_all` reports it."""
        assert self._redis is not None
        reply: Any = self._redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self._batch, block=block)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 shape
            entries = [(eid, fields or {}) for batch in reply.values() for eid, fields in batch[0]]
        else:
            entries = [(eid, fields or {}) for _, batch in reply for eid, fields in batch]
        if start == ">":
            self._reads_since_check += len(entries)  # what Redis adds to the group's entries-read
        return entries

    def _apply_all(self, entries: list[tuple[bytes, Mapping[bytes, bytes]]]) -> str:
        """Applies entries in order, acknowledging what was applied: ``done``; ``retry`` when one must
        wait for a tier; ``wait`` when the store writer has not applied the rest yet."""
        assert self._redis is not None
        if not entries:
            return "done"
        withdrawn: list[bool]
        held = (0, 0)  # entries up to this id are in the shared stores already
        if self._is_writer:
            # claim the batch: from here it cannot be withdrawn (see _WITHDRAW)
            uids = [_text(f.get(b"uid", b"")) or _text(eid) for eid, f in entries]
            reply: Any = self._redis.eval(_CLAIM, 3, self._claimed_key, self._cancelled_key, self._applied_key,
                                          _text(entries[-1][0]), *uids)  # fmt: skip
            withdrawn, applicable = [bool(int(f)) for f in reply[:-1]], len(entries)
            if reply[-1] and self._shared is not None:
                held = _parse_id(reply[-1])
        else:
            withdrawn, applicable = self._await_writer(entries)
            if applicable and self._shared is not None:
                self._shared.catch_up()  # so a miss after the L1 refresh reads what the writer wrote
        acked: list[bytes] = []
        trimmed = 0
        outcome = "done" if applicable == len(entries) else "wait"
        for (entry_id, fields), gone in zip(entries[:applicable], withdrawn[:applicable], strict=True):
            if not fields:  # pending, and trimmed from the stream before it was applied
                trimmed += 1
                acked.append(entry_id)
                continue
            keys = -1
            if gone:
                self._count(withdrawn_entries=1)
            elif self._last_applied_id and _parse_id(entry_id) <= _parse_id(self._last_applied_id):
                self._count(replayed_entries_skipped=1)  # re-delivered by a Redis that went back in time
            else:
                try:
                    if self._shared is not None and self._is_writer and _parse_id(entry_id) <= held:
                        with self._shared.writes_held_back():
                            keys = self._apply(fields)
                    else:
                        keys = self._apply(fields)
                except UnavailableError as exc:
                    self._last_error = f"entry {entry_id.decode()}: {exc}"
                    log.warning("update %s not applied yet, will retry: %s", entry_id.decode(), exc)
                    outcome = "retry"
                    break
                except _Rejected as exc:
                    self._count(rejected_entries=1)
                    log.error("update %s rejected (acknowledged, not retried): %s", entry_id.decode(), exc)
                except NotFoundError as exc:
                    self._count(skipped_entries=1)  # a table this agent does not serve
                    log.debug("update %s skipped: %s", entry_id.decode(), exc)
            acked.append(entry_id)
            if keys >= 0:
                self._count(applied_entries=1, applied_keys=keys)
                sent = fields.get(b"ts")
                if sent:
                    with self._lock:
                        self._lags_ms.append((time.time_ns() - int(sent)) / 1e6)
        self._acknowledge(acked)
        if trimmed:
            self._report_gap(trimmed, f"{trimmed} pending entries were trimmed before they were applied")
        return outcome

    def _await_writer(self, entries: list[tuple[bytes, Mapping[bytes, bytes]]]) -> tuple[list[bool], int]:
        """Waits (up to ``block_ms``) for the store writer to apply ``entries``; returns which of them were
        withdrawn and how many, from the first, the shared stores now hold. Becoming the writer meanwhile
        (the old one is gone) ends the wait: this agent applies them itself."""
        assert self._redis is not None
        uids = [_text(f.get(b"uid", b"")) or _text(eid) for eid, f in entries]
        deadline = time.monotonic() + self._block_ms / 1000
        pause = 0.001
        while True:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self._applied_key)
            pipe.smismember(self._cancelled_key, uids)
            raw_watermark, flags = pipe.execute()
            watermark = _text(raw_watermark) if raw_watermark else "0-0"
            self._watermark = watermark if raw_watermark else ""
            held = sum(1 for eid, _ in entries if _parse_id(eid) <= _parse_id(watermark))
            if held == len(entries) or time.monotonic() >= deadline or self._stopping.is_set():
                return [bool(int(f)) for f in flags], held
            if self._poll_role():
                return [bool(int(f)) for f in flags], held  # the rest: applied by this agent next round
            if held:
                return [bool(int(f)) for f in flags], held
            self._stopping.wait(pause)
            pause = min(pause * 2, 0.01)

    def _acknowledge(self, acked: list[bytes]) -> None:
        """XACKs what was applied; the writer first records the newest in the stores it writes (its
        RocksDB, then the watermark), so nothing is acknowledged that the stores do not show."""
        assert self._redis is not None
        if not acked:
            return
        newest = _text(acked[-1])
        if self._shared is not None and self._is_writer:
            persistent = self._shared.persistent
            if persistent is not None and persistent.is_writer:
                persistent.put_meta(self._marker, _id_max(newest, self._last_applied_id))
            self._watermark = _text(self._redis.eval(_RAISE, 1, self._applied_key, newest))
        self._redis.xack(self.stream, self.group, *acked)
        with self._applied:
            self._last_applied_id = _id_max(newest, self._last_applied_id)
            self._applied.notify_all()
        if self._catch_up_to is not None and _parse_id(self._last_applied_id) >= self._catch_up_to:
            self._caught_up.set()

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
                self._lookup.update(table, keys, wire.to_table_dtype(vectors, spec.dtype, where=f"vectors of {table}"))
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
