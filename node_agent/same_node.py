"""The same-node path: lookups for inference processes on the agent's own node, over a Unix socket,
the vectors written by the agent straight into shared memory the client handed over.

HPS runs inside the inference process; our clients reach an agent over gRPC, whose Python transport
costs ~0.5 ms a call and copies the answer (0.5 MiB for 2,000 rows of dim 64) several times. Here a
call is one small message each way on an ``AF_UNIX``/``SOCK_SEQPACKET`` socket (message boundaries
kept, file descriptors passed), and the rows cross once, into the client's buffer.

Protocol (all integers little-endian). A connection starts with HELLO, which carries the client's
shared buffer as a file descriptor (a ``memfd``, passed with ``SCM_RIGHTS``: no path names a buffer,
so a client can only ever hand the agent memory it owns, and the agent writes nowhere else). The
buffer must be sealed against shrinking (``F_SEAL_SHRINK``): a client that truncated it under the
agent's mapping would otherwise crash the agent with SIGBUS at its next write. Then
each LOOKUP names a table, where its keys sit in the buffer and where the rows go; the agent checks
every offset against the buffer before touching it, copies the keys out, looks them up through the
same :class:`~node_agent.server.EmbeddingServicer` checks, limits and counters as gRPC Lookup, writes
the rows, and answers with their count, or with a status (gRPC's numbering) and a message. Errors are
the typed errors of :mod:`node_agent.errors` on both sides.

TCP gRPC stays the general path (other nodes, health, reflection); this is an addition for co-located
callers, started with ``hps agent --same-node-socket PATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from node_agent import wire
from node_agent.dedupe import unique_inverse
from node_agent.errors import (
    HpsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

if TYPE_CHECKING:
    from node_agent.server import EmbeddingServicer

log = logging.getLogger(__name__)

MAGIC = b"HPS1"
OP_HELLO, OP_LOOKUP = 1, 2
#: magic, op, name lengths (model, table), request id, keys offset, key count, rows offset, rows capacity
REQUEST = struct.Struct("<4sHHHQQQQQ")
#: magic, status, dtype (the proto's Dtype), request id, rows, dim, message length
RESPONSE = struct.Struct("<4sHHQQII")
#: the longest request: a header and two names the servicer would reject long before this
MAX_REQUEST_BYTES = 4096
#: sun_path holds 108 bytes on Linux, the terminating NUL included
MAX_SOCKET_PATH_BYTES = 107
#: connected clients at most (each holds a thread); more are turned away
MAX_CLIENTS = 256

# gRPC's status numbers, so the two transports report failures alike; OUT_OF_RANGE is this protocol's
# own: the rows did not fit the room the client reserved, and the answer's `rows` says how many bytes
# they need (the client retries once with a buffer that large)
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, OUT_OF_RANGE, INTERNAL, UNAVAILABLE = 0, 3, 5, 8, 11, 13, 14
_ERROR_OF_STATUS: dict[int, type[HpsError]] = {
    INVALID_ARGUMENT: InvalidArgumentError,
    NOT_FOUND: NotFoundError,
    RESOURCE_EXHAUSTED: ResourceExhaustedError,
    UNAVAILABLE: UnavailableError,
}
_KEY = np.dtype("<i8")
#: each status number as gRPC's StatusCode: the errors raised are also grpc.RpcError, as Client's are
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _failure(kind: type[HpsError], status: int, message: str) -> HpsError:
    """``kind(message)`` that is also a :class:`grpc.RpcError` answering ``status``, as the gRPC client raises."""
    from node_agent.client import rpc_failure

    return rpc_failure(kind, _STATUS_CODES.get(status, grpc.StatusCode.UNKNOWN), message, message)


def _unavailable(message: str) -> HpsError:
    return _failure(UnavailableError, UNAVAILABLE, message)


def _status_of(error: HpsError) -> int:
    from node_agent.server import status_of

    return int(status_of(error).value[0])


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise InvalidArgumentError(
            f"same-node socket path {str(path)!r} is {len(os.fsencode(path))} bytes; a Unix socket path "
            f"holds at most {MAX_SOCKET_PATH_BYTES}: choose a shorter one"
        )


# -- the agent's side ----------------------------------------------------------------------------


class SameNodeServer:
    """Serves Lookup on a Unix socket at ``path`` for ``servicer``, one thread per connected client.

    :meth:`start` binds (replacing a stale socket file, refusing any other file) and returns; :meth:`stop`
    closes the socket and every connection and removes the file. The socket file is made ``0o660``:
    who may connect is who may read the model, as with the gRPC port, decided by the directory it is in.
    """

    def __init__(self, servicer: EmbeddingServicer, path: str | Path) -> None:
        self.servicer = servicer
        self.path = Path(path)
        _check_socket_path(self.path)
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> SameNodeServer:
        if self.path.is_socket():
            self.path.unlink()  # left by an agent that did not stop cleanly
        elif self.path.exists():
            raise InvalidArgumentError(f"same-node socket path {self.path} exists and is not a socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o660)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise UnavailableError(f"cannot listen on the same-node socket {self.path}: {exc}") from None
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept, name="same-node-accept", daemon=True)
        self._accepter.start()
        log.info("serving same-node lookups on %s", self.path)
        return self

    def stop(self) -> None:
        """Closes the socket and every client connection, waits for their threads, removes the file."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in [self._accepter, *self._threads]:
            if thread is not None:
                thread.join(timeout=5.0)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()

    def _accept(self) -> None:
        """Accepts clients until :meth:`stop` closes the listening socket."""
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if self._stopping.is_set() or len(self._connections) >= MAX_CLIENTS:
                    if not self._stopping.is_set():
                        log.warning("same-node socket %s: %d clients connected already; turning one away",
                                    self.path, MAX_CLIENTS)  # fmt: skip
                    connection.close()
                    continue
                self._connections.add(connection)
                thread = threading.Thread(target=self._serve, args=(connection,), name="same-node", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        """Answers one client's requests in order until it hangs up (or :meth:`stop`)."""
        shared: mmap.mmap | None = None
        try:
            while True:
                try:
                    message, ancillary, flags, _ = connection.recvmsg(MAX_REQUEST_BYTES, socket.CMSG_SPACE(4))
                except OSError:
                    return
                if not message:
                    return
                fds = _received_fds(ancillary)
                try:
                    if flags & socket.MSG_TRUNC:
                        raise InvalidArgumentError(f"same-node request longer than {MAX_REQUEST_BYTES} bytes")
                    reply, handed = self._answer(message, fds, shared)
                    if handed is not None:
                        _close_buffer(shared)
                        shared = handed
                except _TooSmall as exc:
                    reply = _response(_request_id(message), status=OUT_OF_RANGE, rows=exc.needed, message=str(exc))
                except HpsError as exc:
                    reply = _response(_request_id(message), status=_status_of(exc), message=str(exc))
                except Exception as exc:  # a bug here must cost the caller one call, not the agent
                    log.exception("same-node request failed")
                    reply = _response(_request_id(message), status=INTERNAL, message=f"internal error: {exc}")
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                try:
                    connection.sendall(reply)
                except OSError:
                    return
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()
            _close_buffer(shared)

    def _answer(self, message: bytes, fds: list[int], shared: mmap.mmap | None) -> tuple[bytes, mmap.mmap | None]:
        """The reply to one request, and the client's buffer when the request handed one over."""
        if len(message) < REQUEST.size:
            raise InvalidArgumentError(f"same-node request of {len(message)} bytes is shorter than its header")
        magic, op, model_len, table_len, request_id, keys_at, count, rows_at, capacity = REQUEST.unpack_from(message)
        if magic != MAGIC:
            raise InvalidArgumentError("same-node request does not start with the protocol's magic (HPS1)")
        if len(message) != REQUEST.size + model_len + table_len:
            raise InvalidArgumentError("same-node request: the names' lengths do not match the message")
        if op == OP_HELLO:
            if len(fds) != 1:
                raise InvalidArgumentError("same-node HELLO must carry exactly one buffer file descriptor")
            try:
                sealed = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            except OSError:
                sealed = 0  # not a memfd: it cannot be sealed
            if not sealed:
                raise InvalidArgumentError("same-node HELLO: the buffer must be a memfd sealed with F_SEAL_SHRINK")
            size = os.fstat(fds[0]).st_size
            if capacity < 1 or capacity > size:
                raise InvalidArgumentError(f"same-node HELLO: a buffer of {size} bytes cannot hold {capacity}")
            return _response(request_id), mmap.mmap(fds[0], capacity, flags=mmap.MAP_SHARED)
        if op != OP_LOOKUP:
            raise InvalidArgumentError(f"same-node request: unknown operation {op}")
        if shared is None:
            raise InvalidArgumentError("same-node LOOKUP before HELLO: no buffer to read keys from")
        names = message[REQUEST.size :]
        try:
            model, table = names[:model_len].decode(), names[model_len:].decode()
        except UnicodeDecodeError:
            raise InvalidArgumentError("same-node request: model and table names must be UTF-8") from None
        size = len(shared)
        if keys_at + count * _KEY.itemsize > size or rows_at + capacity > size:
            raise InvalidArgumentError(
                f"same-node request: keys at {keys_at} (+{count * _KEY.itemsize}) or rows at {rows_at} "
                f"(+{capacity}) run past the {size}-byte buffer"
            )
        # copied out: the client owns the buffer, and a lookup must not see its keys change underneath
        keys = np.frombuffer(shared, dtype=_KEY, count=count, offset=keys_at).astype(np.int64)
        spec, rows = self.servicer.lookup_table(model, table, keys, via="same_node")
        wire_dtype = wire.VECTOR_WIRE_DTYPES[spec.dtype]
        needed = rows.shape[0] * spec.dim * wire_dtype.itemsize
        if needed > capacity:
            raise _TooSmall(needed, capacity)
        out = np.frombuffer(shared, dtype=wire_dtype, count=rows.size, offset=rows_at)
        out[:] = rows.reshape(-1)
        del out  # a view left on the buffer would keep it from being closed
        dtype = int(wire.dtype_to_enum(spec.dtype))
        return _response(request_id, rows=rows.shape[0], dim=spec.dim, dtype=dtype), None


class _TooSmall(Exception):
    """The rows need more room than the client reserved: answered OUT_OF_RANGE with the size needed."""

    def __init__(self, needed: int, capacity: int) -> None:
        super().__init__(f"the rows need {needed} bytes; the client reserved {capacity}")
        self.needed = needed


def _close_buffer(buffer: mmap.mmap | None) -> None:
    if buffer is not None:
        with contextlib.suppress(BufferError, ValueError):
            buffer.close()


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _request_id(message: bytes) -> int:
    return int(REQUEST.unpack_from(message)[4]) if len(message) >= REQUEST.size else 0


def _response(request_id: int, *, status: int = OK, rows: int = 0, dim: int = 0, dtype: int = 0,
              message: str = "") -> bytes:  # fmt: skip
    text = message.encode()[: MAX_REQUEST_BYTES - RESPONSE.size]
    return RESPONSE.pack(MAGIC, status, dtype, request_id, rows, dim, len(text)) + text


# -- the client's side ---------------------------------------------------------------------------


class _Lane:
    """One connection and the shared buffer it handed over: one call at a time."""

    def __init__(self, path: str, *, buffer_bytes: int, timeout: float) -> None:
        self.size = buffer_bytes
        self._next_id = 1
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self._poller = select.poll()  # made once: asked before every call that reuses the connection
        self._poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.buffer: mmap.mmap | None = None
        fd = os.memfd_create("hps-same-node", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, buffer_bytes)
            # the agent maps it too: it must not shrink (nor be resealed) under that mapping
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            self.buffer = mmap.mmap(fd, buffer_bytes, flags=mmap.MAP_SHARED)
            self.sock.connect(path)
            self._call(OP_HELLO, capacity=buffer_bytes, fds=[fd])
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)

    def _call(self, op: int, *, names: tuple[bytes, bytes] = (b"", b""), keys_at: int = 0, count: int = 0,
              rows_at: int = 0, capacity: int = 0, fds: list[int] | None = None) -> tuple[int, int, int]:  # fmt: skip
        """Sends one request and reads its answer: ``(dtype, rows, dim)``; a failure status raises its
        typed error (``OUT_OF_RANGE`` as :class:`_TooSmall`)."""
        request_id = self._next_id
        self._next_id += 1
        model, table = names
        request = REQUEST.pack(MAGIC, op, len(model), len(table), request_id, keys_at, count, rows_at, capacity)
        request += model + table
        if fds:
            self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.sendall(request)
        reply = self.sock.recv(MAX_REQUEST_BYTES)
        if len(reply) < RESPONSE.size:
            raise _unavailable("the agent closed the same-node connection")
        magic, status, dtype, answered, rows, dim, text_len = RESPONSE.unpack_from(reply)
        if magic != MAGIC or answered != request_id:
            raise _unavailable("the same-node connection is out of step (a reply to another request)")
        if status != OK:
            message = reply[RESPONSE.size : RESPONSE.size + text_len].decode(errors="replace")
            if status == OUT_OF_RANGE:
                raise _TooSmall(rows, capacity)
            raise _failure(_ERROR_OF_STATUS.get(status, HpsError), status, message)
        return dtype, rows, dim

    def lookup(self, model: bytes, table: bytes, keys: np.ndarray) -> np.ndarray:
        """Rows of distinct ``keys``: a read-only view on the shared buffer, valid until the next call."""
        assert self.buffer is not None
        rows_at = -(-keys.size * _KEY.itemsize // 64) * 64  # rows start on a cache line
        np.frombuffer(self.buffer, dtype=_KEY, count=keys.size)[:] = keys
        dtype, rows, dim = self._call(OP_LOOKUP, names=(model, table), count=keys.size, rows_at=rows_at,
                                      capacity=self.size - rows_at)  # fmt: skip
        wire_dtype = wire.VECTOR_WIRE_DTYPES[wire.enum_to_dtype(dtype, where="same-node answer")]
        view = np.frombuffer(self.buffer, dtype=wire_dtype, count=rows * dim, offset=rows_at)
        return view.reshape(rows, dim)

    def idle_and_open(self) -> bool:
        """Nothing to read on an idle connection (a look without waiting): an agent that stopped left an
        end of file here, and any bytes would be out of step."""
        # poll, not a non-blocking recv: a socket with a timeout waits that long before any recv
        try:
            return not self._poller.poll(0)
        except OSError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        _close_buffer(self.buffer)


class SameNodeClient:
    """Lookups through an agent's same-node socket: :class:`~node_agent.client.Client`'s ``lookup`` and
    ``lookup_many`` contract (NumPy ``(len(keys), dim)`` arrays the caller owns, typed errors).

    Thread-safe: each concurrent caller gets a connection and buffer of its own (a lane), kept for the
    next call. A lane's buffer holds ``buffer_bytes``; a batch that needs more gets a lane with a
    larger one. A call that fails on the transport drops its lane.
    """

    def __init__(self, path: str | Path, *, timeout: float = 5.0, buffer_bytes: int = 8 << 20) -> None:
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout}")
        self.path = str(path)
        _check_socket_path(Path(self.path))
        self.timeout = timeout
        self.buffer_bytes = max(1 << 16, int(buffer_bytes))
        self._idle: queue.LifoQueue[_Lane] = queue.LifoQueue()
        self._row_bytes: dict[tuple[str, str], int] = {}
        self._closed = False

    def lookup(self, model: str, table: str, keys: Any) -> np.ndarray:
        """Vectors of ``keys`` in ``table``: ``(len(keys), dim)`` in the table's dtype; keys the model does
        not hold get the table's ``defaultValue``."""
        return self.lookup_many(model, {table: keys})[table]

    def lookup_many(self, model: str, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{table: keys}`` → ``{table: (len(keys), dim)}``; keys go out deduplicated, as with gRPC. Each
        table is one request here, so the agent's batch limit applies to each table's distinct keys (over
        gRPC, to the tables of one call together)."""
        model_name = model.encode()
        for table in batch:
            if REQUEST.size + len(model_name) + len(table.encode()) > MAX_REQUEST_BYTES:
                raise InvalidArgumentError(
                    f"model and table names must fit in {MAX_REQUEST_BYTES - REQUEST.size} bytes together"
                )
        out: dict[str, np.ndarray] = {}
        for table, keys in batch.items():
            unique, inverse = unique_inverse(wire.as_keys(keys))
            # the rows' room is what this table's rows took last time (a guess the agent corrects)
            need = unique.size * _KEY.itemsize + 64 + unique.size * self._row_bytes.get((model, table), 0)
            for attempt in range(2):
                try:
                    with self._lane(need) as lane:
                        rows = lane.lookup(model_name, table.encode(), unique)
                        # the one copy: out of the shared buffer (the next call reuses it), a row per key asked
                        out[table] = rows.take(inverse, axis=0).astype(rows.dtype.newbyteorder("="),
                                                                                    copy=False)  # fmt: skip
                        if unique.size:
                            self._row_bytes[(model, table)] = rows.shape[1] * rows.dtype.itemsize
                    break
                except _TooSmall as exc:
                    if attempt:
                        raise _unavailable(f"same-node socket {self.path}: {exc}") from None
                    need = unique.size * _KEY.itemsize + 64 + exc.needed
        return out

    @contextlib.contextmanager
    def _lane(self, need: int) -> Any:
        if self._closed:
            raise InvalidArgumentError("the same-node client is closed")
        lane: _Lane | None = None
        with contextlib.suppress(queue.Empty):
            lane = self._idle.get_nowait()
        if lane is not None and (lane.size < need or not lane.idle_and_open()):
            # too small, or closed by the agent while idle (it restarted): a fresh connection instead
            lane.close()
            lane = None
        if lane is None:
            size = max(self.buffer_bytes, 1 << max(0, (need - 1).bit_length()))
            try:
                lane = _Lane(self.path, buffer_bytes=size, timeout=self.timeout)
            except OSError as exc:
                raise _unavailable(f"same-node socket {self.path}: {exc}") from None
        try:
            yield lane
        except (OSError, UnavailableError) as exc:
            lane.close()  # out of step, or the agent is gone: a later call connects afresh
            if isinstance(exc, UnavailableError):
                raise
            raise _unavailable(f"same-node socket {self.path}: {exc}") from None
        except BaseException:
            self._idle.put(lane)  # an answered error (NOT_FOUND, too small, ...): the lane is in step
            raise
        else:
            self._idle.put(lane)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def __enter__(self) -> SameNodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
