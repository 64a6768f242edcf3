"""L2 volatile tier on Redis: standalone, several standalone shards (client-side sharding) or a Redis Cluster.

Layout. A table's rows live in ``partitions`` HASHes named ``hps:{<model>:<table>:<partition>}``, where a
row's partition is ``bucket_of(key, partitions)``; a field is the key's 8 bytes (int64, little-endian),
its value the row's raw little-endian bytes (``dim * itemsize``). The braces are a Redis Cluster hash
tag, so a HASH sits whole on one node and the same names work on standalone Redis. With several
standalone addresses, partition ``p`` lives on shard ``p % len(addresses)``.

Speed. A load writes hundreds of MB, so the per-row cost must not be Python's: commands are packed into
the Redis protocol (RESP) with NumPy structured arrays (fields and values have fixed lengths, so a
``HSET``/``HMGET``/``HDEL`` with thousands of fields is one fixed-size record per field) and sent over
redis-py's connections, pipelined without a transaction: one round trip per window of chunks per
shard. A lookup's HMGET replies are read off the socket and parsed in C (``resp.c``) straight into the
rows of the answer, each row copied once; other replies, and every reply where that module was not
built, are parsed by hiredis.

Failure. Connection errors and timeouts become :class:`UnavailableError` within ``socket_timeout``
(no retries here: the lookup path falls through to L3 and reports itself degraded). A stored value of
the wrong length is never returned: it counts as missing and as an error.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import is_not
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from node_agent.errors import InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.plan import bucket_of
from node_agent.redis_access import RedisAccess, access_of
from node_agent.tiers.arguments import as_keys, as_values
from node_agent.tiers.base import TableLayout

log = logging.getLogger(__name__)

_KEY_BYTES = 8
_CRLF = b"\r\n"
#: request + expected reply bytes sent to one shard before its replies are read: bounds the memory
#: either side holds, while keeping round trips few
_WINDOW_BYTES = 16 << 20
#: a read packs the HMGETs of one shard into one command up to about this many reply bytes
_COMMAND_BYTES = 4 << 20
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
#: bytes a reply header or a field's framing may take beside the row itself (``$<len>\r\n...\r\n``)
_FRAMING_BYTES = 24


def _load_resp() -> Any:
    try:
        feed = importlib.import_module("node_agent.tiers._resp").feed
    except ImportError:  # built without a compiler: hiredis parses the replies
        return None
    # the reader reads redis-py's connection socket (``_sock``) itself; a redis-py that no longer
    # keeps one there gets its replies parsed by hiredis rather than every read failing
    return feed if hasattr(redis.Connection(), "_sock") else None


_feed_rows: Any = _load_resp()


def _field_records(fields: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """The RESP arguments ``f1 [v1] f2 [v2] ...`` as one structured array, a fixed-size record per
    field: ``fields`` is ``(m,)`` int64 little-endian, ``values`` (optional) ``(m, dim)`` little-endian.
    Packing costs a few vectorised copies whatever the number of fields, and a slice of the records
    is the arguments of a slice of the fields, so one packing serves every command of a batch."""
    m = len(fields)
    field_head = b"$%d\r\n" % _KEY_BYTES
    parts: list[tuple[str, str]] = [("fh", f"V{len(field_head)}"), ("f", f"V{_KEY_BYTES}")]
    if values is None:
        parts.append(("t", "V2"))
    else:
        row_bytes = values.shape[1] * values.dtype.itemsize
        value_head = b"\r\n$%d\r\n" % row_bytes
        parts += [("vh", f"V{len(value_head)}"), ("v", f"V{row_bytes}"), ("t", "V2")]
    records = np.empty(m, dtype=np.dtype(parts))
    records["fh"] = np.frombuffer(field_head, dtype=f"V{len(field_head)}")[0]
    records["f"] = np.ascontiguousarray(fields, dtype="<i8").view(f"V{_KEY_BYTES}")
    if values is not None:
        records["vh"] = np.frombuffer(value_head, dtype=f"V{len(value_head)}")[0]
        records["v"] = np.ascontiguousarray(values).view(f"V{row_bytes}").reshape(m)
    records["t"] = np.frombuffer(_CRLF, dtype="V2")[0]
    return records


def _resp_command(command: bytes, hash_key: bytes, records: np.ndarray, *, with_values: bool) -> list[Any]:
    """``command hash_key <records>`` in RESP, as buffers for ``sendall`` (``records`` from
    :func:`_field_records`, not copied)."""
    argc = 2 + len(records) * (2 if with_values else 1)
    head = b"*%d\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (argc, len(command), command, len(hash_key), hash_key)
    return [head, records.view(np.uint8).data]


def _resp_fields(command: bytes, hash_key: bytes, fields: np.ndarray, values: np.ndarray | None) -> list[Any]:
    """``command hash_key f1 [v1] f2 [v2] ...`` in RESP, as buffers for ``sendall``."""
    return _resp_command(command, hash_key, _field_records(fields, values), with_values=values is not None)


def _resp_args(*args: bytes) -> list[Any]:
    """A short command (``HLEN key``) in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return [b"".join(out)]


#: reads one connection's replies (to the reply slots given) itself, instead of hiredis
_Reader = Callable[[Any, Sequence[int]], None]


@dataclass
class _Command:
    """One packed command for connection pool ``target``; ``cost`` approximates request + reply bytes."""

    target: int
    buffers: list[Any]
    cost: int
    #: commands packed back to back in ``buffers``, each answered by one reply
    replies: int = 1


class RedisTier:
    """Rows of several tables in Redis HASHes; see the module docstring for the layout."""

    name = "redis"

    def __init__(
        self,
        layouts: Iterable[TableLayout],
        *,
        addresses: Sequence[str],
        access: RedisAccess | None = None,
        cluster: bool = False,
        partitions: int = 64,
        chunk_keys: int = 4096,
        socket_timeout: float = 1.0,
        model: str = "",
    ) -> None:
        if not addresses:
            raise InvalidArgumentError("RedisTier needs at least one address (HOST:PORT)")
        if partitions < 1 or chunk_keys < 1:
            raise InvalidArgumentError(
                f"partitions and chunk_keys must be at least 1, got {partitions} and {chunk_keys}"
            )
        self._layouts = {layout.name: layout for layout in layouts}
        self._partitions = partitions
        self._chunk_keys = chunk_keys
        self._model = model
        self._cluster_mode = cluster
        self._lock = threading.Lock()
        self._hits = self._misses = self._errors = 0
        self._hash_keys = {
            name: [b"hps:{%s:%s:%d}" % (model.encode(), name.encode(), p) for p in range(partitions)]
            for name in self._layouts
        }
        # what follows an HMGET's argument count, per partition: the same for every read of it
        self._hmget_heads = {
            name: [b"$5\r\nHMGET\r\n$%d\r\n%s\r\n" % (len(hk), hk) for hk in hash_keys]
            for name, hash_keys in self._hash_keys.items()
        }
        hosts = [_split_address(a) for a in addresses]
        # no retries: a dead shard must surface as UnavailableError within the socket timeout
        connection_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        self._pools: list[redis.ConnectionPool] = []
        self._cluster: RedisCluster | None = None
        if cluster:
            try:
                # RedisCluster takes the retry policy itself and gives its nodes none
                self._cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts],
                                             **connection_options, **access_of(access).client_options())  # fmt: skip
            except (redis.RedisError, OSError) as exc:
                raise UnavailableError(f"Redis Cluster at {','.join(addresses)}: {exc}") from None
        else:
            pool_options = {**connection_options, **access_of(access).pool_options()}
            self._pools = [redis.ConnectionPool(host=h, port=p, **pool_options) for h, p in hosts]

    # -- Tier ----------------------------------------------------------------------------------

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        layout = self._layout(table)
        keys = as_keys(keys)
        n = len(keys)
        values = np.zeros((n, layout.dim), dtype=layout.dtype)
        found = np.zeros(n, dtype=bool)
        if n == 0:
            return values, found
        # one packing for the whole batch: the keys in partition order, each HMGET a slice of it
        order, spans = self._spans(table, keys)
        records = _field_records(keys[order], None)
        packed = records.view(np.uint8).data.cast("B")
        size = records.dtype.itemsize
        heads = self._hmget_heads[table]
        reply_cost = layout.row_bytes + 16
        sent_order: list[int] = []  # which span each reply answers, in the order replies come

        def commands() -> Iterator[_Command]:
            # the HMGETs of one shard go back to back in one command: a lookup's 64 partitions cost
            # one buffer and one send per shard, not 64 command objects
            sent_order.clear()
            by_target: dict[int, list[int]] = {}
            for index, (p, hk, _, _) in enumerate(spans):
                by_target.setdefault(self._target(hk, p), []).append(index)
            for target, members in by_target.items():
                buffers: list[Any] = []
                cost = 0
                for position, index in enumerate(members):
                    p, _, lo, hi = spans[index]
                    buffers += (b"*%d\r\n" % (2 + hi - lo), heads[p], packed[lo * size : hi * size])
                    cost += (hi - lo) * reply_cost
                    sent_order.append(index)
                    if cost >= _COMMAND_BYTES or position == len(members) - 1:
                        yield _Command(target, buffers, cost, replies=len(buffers) // 3)
                        buffers, cost = [], 0

        # the replies straight into the rows when every command goes out in one window (a lookup's
        # misses always do): nothing else is then on the wire to be read past
        if _feed_rows is not None and n * reply_cost < _WINDOW_BYTES:
            rows = values.view(np.uint8).reshape(n, layout.row_bytes)
            found_bytes = found.view(np.uint8)
            malformed = 0

            def read_rows(connection: Any, slots: Sequence[int]) -> None:
                nonlocal malformed
                # every reply of `slots` answers one span: its fields are the keys order[lo:hi]. One
                # connection answering every span was sent them in span order (commands() keeps it)
                if len(slots) == len(spans):
                    dest = order
                else:
                    dest = np.concatenate([order[lo:hi] for _, _, lo, hi in (spans[sent_order[s]] for s in slots)])
                malformed += _read_rows(connection, len(slots), dest, rows, found_bytes, layout.row_bytes)

            def fresh_commands() -> Iterator[_Command]:
                nonlocal malformed
                # a retry (a cluster slot that moved) starts again from nothing found
                found[:] = False
                malformed = 0
                return commands()

            self._run(fresh_commands, read=read_rows)
            if layout.dtype.newbyteorder("<") != layout.dtype:
                values.byteswap(inplace=True)  # the rows are little-endian on the wire
            hits = int(found.sum())
        else:
            hits, malformed = self._assemble(self._run(commands), spans, sent_order, order, values, found, layout)
        with self._lock:
            self._hits += hits
            self._misses += n - hits
            self._errors += malformed
        if malformed:
            log.warning("redis: %d stored rows of table %r have the wrong length; served as missing",
                        malformed, table)  # fmt: skip
        return values, found

    @staticmethod
    def _assemble(answers: list[Any], spans: Sequence[tuple[int, bytes, int, int]], sent_order: Sequence[int],
                  order: np.ndarray, values: np.ndarray, found: np.ndarray, layout: TableLayout) -> tuple[int, int]:  # fmt: skip
        """Puts hiredis's parsed replies (``answers``, in the order sent) into ``values``/``found``;
        returns the rows found and the rows of the wrong length (treated as missing)."""
        n = len(order)
        replies: list[Any] = [None] * len(spans)
        for index, reply in zip(sent_order, answers, strict=True):
            replies[index] = reply
        # the replies in span order answer the keys in `order`
        flat = list(chain.from_iterable(replies))
        present = np.fromiter(map(is_not, flat, repeat(None)), dtype=bool, count=n)
        blobs = flat if present.all() else [v for v in flat if v is not None]
        malformed = 0
        if blobs:
            lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
            good = lengths == layout.row_bytes
            if not good.all():
                # never a wrong vector: a value of the wrong length is treated as missing
                malformed = int((~good).sum())
                blobs = [b for b, ok in zip(blobs, good.tolist(), strict=True) if ok]
                present[np.flatnonzero(present)[~good]] = False
        if blobs:
            wire = layout.dtype.newbyteorder("<")
            rows = np.frombuffer(b"".join(blobs), dtype=wire).reshape(-1, layout.dim)
            at = order[present]
            values[at] = rows
            found[at] = True
        return len(blobs), malformed

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        layout = self._layout(table)
        keys = as_keys(keys)
        values = as_values(layout, values, len(keys))
        if len(keys) == 0:
            return
        wire = layout.dtype.newbyteorder("<")

        def commands() -> Iterator[_Command]:
            for p, hk, idx in self._chunks(table, keys):
                rows = np.ascontiguousarray(values[idx], dtype=wire)
                buffers = _resp_fields(b"HSET", hk, keys[idx].astype("<i8"), rows)
                yield _Command(self._target(hk, p), buffers, sum(len(b) for b in buffers))

        self._run(commands)

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        self._layout(table)
        if keys is not None:
            evicted = as_keys(keys)
            chunks = list(self._chunks(table, evicted))
            self._run(
                lambda: (
                    _Command(
                        self._target(hk, p), _resp_fields(b"HDEL", hk, evicted[idx].astype("<i8"), None), 16
                    )
                    for p, hk, idx in chunks
                )
            )
            return
        # the whole table: every HASH of it on every node, whatever partition count wrote them
        pattern = "hps:{%s:%s:*}" % (_GLOB_SPECIALS.sub(r"\\\1", self._model),  # noqa: UP031
                                     _GLOB_SPECIALS.sub(r"\\\1", table))  # fmt: skip
        try:
            for client in self._node_clients():
                # one UNLINK per HASH: on a cluster node, several keys in one command must share a slot
                pipe = client.pipeline(transaction=False)
                for name in client.scan_iter(match=pattern, count=1000):
                    pipe.unlink(name)
                pipe.execute()
        except redis.RedisError as exc:
            self._count_error()
            raise UnavailableError(f"redis: evicting table {table!r}: {exc}") from None

    def count(self, table: str) -> int:
        self._layout(table)
        hash_keys = self._hash_keys[table]
        replies = self._run(
            lambda: (
                _Command(self._target(hk, p), _resp_args(b"HLEN", hk), 16) for p, hk in enumerate(hash_keys)
            )
        )
        return sum(int(n) for n in replies)

    def stats(self) -> Mapping[str, int | float | str]:
        with self._lock:
            return {
                "tier": self.name,
                "mode": "cluster" if self._cluster_mode else f"shards={len(self._pools)}",
                "partitions": self._partitions,
                "hits": self._hits,
                "misses": self._misses,
                "errors": self._errors,
            }

    def close(self) -> None:
        for pool in self._pools:
            pool.disconnect()
        if self._cluster is not None:
            self._cluster.close()

    # -- routing and transport -----------------------------------------------------------------

    def _layout(self, table: str) -> TableLayout:
        try:
            return self._layouts[table]
        except KeyError:
            raise NotFoundError(f"table {table!r} is not held by the redis tier") from None

    def _spans(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, list[tuple[int, bytes, int, int]]]:
        """``order`` (keys grouped by partition; stable, so a key given twice keeps its order) and the
        ``(partition, hash key, lo, hi)`` spans of ``order`` that make one command each: at most
        ``chunk_keys`` keys, all of one partition."""
        partition = bucket_of(keys, self._partitions)
        order = np.argsort(partition, kind="stable")
        counts = np.bincount(partition, minlength=self._partitions)
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        hash_keys = self._hash_keys[table]
        spans = [
            (p, hash_keys[p], start, min(start + self._chunk_keys, bounds[p + 1]))
            for p in np.flatnonzero(counts).tolist()  # a lookup's few hundred keys miss some partitions
            for start in range(bounds[p], bounds[p + 1], self._chunk_keys)
        ]
        return order, spans

    def _chunks(self, table: str, keys: np.ndarray) -> Iterator[tuple[int, bytes, np.ndarray]]:
        """``(partition, hash key, indices into keys)`` per command, as :meth:`_spans` cuts them."""
        order, spans = self._spans(table, keys)
        for p, hash_key, lo, hi in spans:
            yield p, hash_key, order[lo:hi]

    def _target(self, hash_key: bytes, partition: int) -> int:
        """Index of the connection pool serving ``hash_key`` (of ``partition``)."""
        if self._cluster is None:
            return partition % len(self._pools)
        try:
            node = self._cluster.get_node_from_key(hash_key)
            pool = self._cluster.get_redis_connection(node).connection_pool
        except (redis.RedisError, OSError) as exc:
            raise UnavailableError(f"Redis Cluster: no node for {hash_key!r}: {exc}") from None
        with self._lock:  # lookups, loads and updates share the tier across threads
            for i, known in enumerate(self._pools):
                if known is pool:
                    return i
            self._pools.append(pool)
            return len(self._pools) - 1

    def _node_clients(self) -> list[redis.Redis]:
        if self._cluster is None:
            return [redis.Redis(connection_pool=pool) for pool in self._pools]
        return [self._cluster.get_redis_connection(node) for node in self._cluster.get_primaries()]

    def _run(self, make_commands: Callable[[], Iterable[_Command]], read: _Reader | None = None) -> list[Any]:
        """Sends the commands ``make_commands`` yields, pipelined, and returns their replies in order
        (``read``: reads each connection's replies itself, and the list holds ``None`` for them).

        On a cluster, a ``MOVED``/``ASK`` reply means a slot moved since we last looked: the slot map is
        refreshed and the commands re-made (re-routed) and sent once more."""
        try:
            return self._run_once(make_commands(), read)
        except redis.ResponseError as exc:
            if not (self._cluster is not None and str(exc).startswith(("MOVED", "ASK"))):
                self._count_error()
                raise UnavailableError(f"redis: {exc}") from None
        try:
            self._cluster.nodes_manager.initialize()
            return self._run_once(make_commands(), read)
        except (redis.RedisError, OSError) as exc:
            self._count_error()
            raise UnavailableError(f"Redis Cluster: {exc}") from None

    def _run_once(self, commands: Iterable[_Command], read: _Reader | None = None) -> list[Any]:
        """Windows of about ``_WINDOW_BYTES``: a window goes out to every shard at once (shards work in
        parallel), and the previous window's replies are read only after, so Redis executes one window
        while this process packs the next; at most two windows are in flight."""
        replies: list[Any] = []
        connections: dict[int, Any] = {}
        unread: list[tuple[int, int]] = []
        try:
            window: list[_Command] = []
            budget = 0
            for command in commands:
                window.append(command)
                budget += command.cost
                if budget >= _WINDOW_BYTES:
                    sent = self._send(window, replies, connections)
                    self._read(unread, replies, connections, read)
                    unread, window, budget = sent, [], 0
            sent = self._send(window, replies, connections)
            self._read(unread, replies, connections, read)
            self._read(sent, replies, connections, read)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._drop(connections)
            self._count_error()
            raise UnavailableError(f"redis: {exc}") from None
        except BaseException:
            # replies may be left unread on the wire: those connections cannot be reused
            self._drop(connections)
            raise
        for target, connection in connections.items():
            self._pools[target].release(connection)
        return replies

    def _send(
        self, window: Sequence[_Command], replies: list[Any], connections: dict[int, Any]
    ) -> list[tuple[int, int]]:
        """Sends ``window`` (one ``sendall`` per shard); returns ``(target, reply slot)`` to read, in order."""
        by_target: dict[int, list[Any]] = {}
        slots: list[tuple[int, int]] = []
        for command in window:
            by_target.setdefault(command.target, []).extend(command.buffers)
            for _ in range(command.replies):
                slots.append((command.target, len(replies)))
                replies.append(None)
        for target, buffers in by_target.items():
            if target not in connections:
                connections[target] = self._pools[target].get_connection()
            # one sendall per shard: a syscall per small command would cost more than the copy
            connections[target].send_packed_command([b"".join(buffers)], check_health=False)
        return slots

    @staticmethod
    def _read(slots: Sequence[tuple[int, int]], replies: list[Any], connections: Mapping[int, Any],
              read: _Reader | None = None) -> None:  # fmt: skip
        if read is None:
            for target, slot in slots:
                replies[slot] = connections[target].read_response()
            return
        by_target: dict[int, list[int]] = {}
        for target, slot in slots:
            by_target.setdefault(target, []).append(slot)
        for target, own in by_target.items():
            read(connections[target], own)

    def _drop(self, connections: Mapping[int, Any]) -> None:
        for target, connection in connections.items():
            connection.disconnect()
            self._pools[target].release(connection)

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1


def _read_rows(connection: Any, replies: int, dest: np.ndarray, rows: np.ndarray, found: np.ndarray,
               row_bytes: int) -> int:  # fmt: skip
    """Reads ``replies`` HMGET replies off ``connection``'s socket into ``rows``/``found`` (the k-th field
    answered is row ``dest[k]``; see ``resp.c``); returns the rows of the wrong length. An error reply
    raises :class:`redis.ResponseError` with Redis's words, a closed or silent socket
    :class:`redis.ConnectionError` / :class:`redis.TimeoutError`: the caller then drops the connection."""
    sock = getattr(connection, "_sock", None)
    if sock is None:
        raise redis.ConnectionError("the connection to Redis is closed")
    state = np.array([0, replies, -1, 0, 0], dtype=np.int64)
    buffer = bytearray(len(dest) * (row_bytes + _FRAMING_BYTES) + replies * _FRAMING_BYTES + 4096)
    filled = 0
    while state[1] > 0:
        if filled == len(buffer):  # a reply longer than asked for (rows of the wrong length): make room
            buffer.extend(bytes(len(buffer)))
        with memoryview(buffer) as view:
            try:
                got = sock.recv_into(view[filled:])
            except TimeoutError:
                raise redis.TimeoutError("Timeout reading from Redis") from None
        if got == 0:
            raise redis.ConnectionError("Redis closed the connection mid-reply")
        filled += got
        try:
            error = _feed_rows(buffer, filled, state, dest, rows, found, row_bytes)
        except ValueError as exc:
            raise redis.ConnectionError(f"Redis answered something else than rows: {exc}") from None
        if error is not None:
            raise redis.ResponseError(error.decode("utf-8", "replace"))
    if state[3] != len(dest):
        raise redis.ConnectionError(f"Redis answered {int(state[3])} fields for {len(dest)} asked")
    return int(state[4])


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgumentError(f"expected a Redis address HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
