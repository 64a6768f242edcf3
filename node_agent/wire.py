"""Packs keys and vectors into the wire format of ``hps.v1`` (packed little-endian bytes) and back,
checking every buffer so a malformed one becomes an :class:`InvalidArgumentError` naming the problem.

Shared by the gRPC server, the client and the Redis Stream of online updates, so all three agree on
one encoding. Decoding is a zero-copy view (``np.frombuffer``); encoding is one ``tobytes`` copy. The
Lookup answer, the one large message on the hot path, is written and read here directly in protobuf's
wire format, so its vectors are copied once per side rather than three times.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from node_agent.errors import InvalidArgumentError
from node_agent.proto.hps.v1 import hps_pb2

KEY_WIRE_DTYPE = np.dtype("<i8")

#: table dtype name (as in the EmbeddingModel) → little-endian NumPy dtype on the wire
VECTOR_WIRE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

_DTYPE_TO_ENUM: dict[str, hps_pb2.Dtype] = {"float32": hps_pb2.FLOAT32, "float16": hps_pb2.FLOAT16}
_ENUM_TO_DTYPE: dict[int, str] = {v: k for k, v in _DTYPE_TO_ENUM.items()}
_ACCEPTED_KEY_DTYPES = (hps_pb2.KEY_DTYPE_UNSPECIFIED, hps_pb2.INT64)

#: gRPC's 4 MiB default would refuse a 65536-key lookup of dim 128 long before our own limit
#: (``max_batch_keys``) could name the problem, so messages are bounded only by protobuf's 2 GiB.
GRPC_MESSAGE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


def dtype_to_enum(dtype: str | np.dtype) -> hps_pb2.Dtype:
    """``"float32"`` / ``np.float16`` → the proto's ``Dtype`` value."""
    name = np.dtype(dtype).name
    try:
        return _DTYPE_TO_ENUM[name]
    except KeyError:
        raise InvalidArgumentError(f"vectors must be float32 or float16, got {name}") from None


def enum_to_dtype(value: int, *, where: str = "dtype") -> str:
    """The proto's ``Dtype`` value → ``"float32"`` / ``"float16"``; anything else is invalid."""
    try:
        return _ENUM_TO_DTYPE[value]
    except KeyError:
        raise InvalidArgumentError(
            f"{where}: unsupported vector dtype {_enum_name(hps_pb2.Dtype, value)}; use FLOAT32 or FLOAT16"
        ) from None


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def as_keys(keys: Any) -> np.ndarray:
    """Any sequence or array of integers → a contiguous 1-D little-endian ``int64`` array.

    Floats, strings and integers beyond int64 are rejected rather than silently rounded or wrapped
    (the tiers store ``int64`` keys, as HugeCTR's ``long long``).
    """
    try:
        arr = np.asarray(keys)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgumentError(f"keys must be 64-bit integers: {exc}") from None
    if arr.ndim != 1:
        if arr.ndim == 0:
            arr = arr.reshape(1)
        else:
            raise InvalidArgumentError(f"keys must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=KEY_WIRE_DTYPE)
    if arr.dtype.kind == "O":
        try:
            arr = arr.astype(np.int64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"keys must be 64-bit integers: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"keys must be integers, got {arr.dtype}")
    if arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError("keys must fit in int64 (at most 2**63 - 1)")
    return np.ascontiguousarray(arr.astype(KEY_WIRE_DTYPE, copy=False))


def pack_keys(keys: Any) -> bytes:
    return as_keys(keys).tobytes()


def unpack_keys(buffer: bytes, key_dtype: int = hps_pb2.KEY_DTYPE_UNSPECIFIED, *, where: str = "keys") -> np.ndarray:
    """A keys buffer → a read-only ``int64`` view on it (no copy)."""
    if key_dtype not in _ACCEPTED_KEY_DTYPES:
        raise InvalidArgumentError(
            f"{where}: unsupported key_dtype {_enum_name(hps_pb2.KeyDtype, key_dtype)}; only INT64 keys are served"
        )
    if len(buffer) % KEY_WIRE_DTYPE.itemsize:
        raise InvalidArgumentError(
            f"{where}: buffer of {len(buffer)} bytes is not a whole number of 8-byte little-endian int64 keys"
        )
    return np.frombuffer(buffer, dtype=KEY_WIRE_DTYPE)


def count_keys(buffer: bytes) -> int:
    """Keys a buffer holds, without decoding it (for the batch limit, checked before any work)."""
    return len(buffer) // KEY_WIRE_DTYPE.itemsize


def pack_vectors(vectors: np.ndarray, dtype: str) -> bytes:
    """``(n, dim)`` vectors → row-major little-endian bytes of ``dtype`` (converted if needed)."""
    wire = VECTOR_WIRE_DTYPES[dtype]
    return np.ascontiguousarray(vectors).astype(wire, copy=False).tobytes()


def unpack_vectors(buffer: bytes, *, dtype: str, rows: int, dim: int, where: str = "vectors") -> np.ndarray:
    """Row-major bytes → a read-only ``(rows, dim)`` view; the size must match exactly."""
    wire = VECTOR_WIRE_DTYPES[dtype]
    expected = rows * dim * wire.itemsize
    if len(buffer) != expected:
        raise InvalidArgumentError(
            f"{where}: buffer of {len(buffer)} bytes does not hold {rows} rows x dim {dim} of {dtype} "
            f"({expected} bytes)"
        )
    return np.frombuffer(buffer, dtype=wire).reshape(rows, dim)


def as_vectors(vectors: Any, *, rows: int, dim: int | None = None) -> np.ndarray:
    """User vectors → a ``(rows, dim)`` float32/float16 array (other float types become float32)."""
    arr = np.asarray(vectors)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgumentError(f"vectors must be numbers, got {arr.dtype}")
    if arr.dtype.name not in VECTOR_WIRE_DTYPES:
        arr = arr.astype(np.float32)
    if arr.ndim == 1 and rows == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise InvalidArgumentError(f"vectors must have shape ({rows}, dim) for {rows} keys, got {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InvalidArgumentError(f"vectors have dim {arr.shape[1]}, the table has dim {dim}")
    return arr


def to_table_dtype(vectors: np.ndarray, dtype: str, *, where: str = "vectors") -> np.ndarray:
    """``vectors`` in a table's ``dtype``. A value that is not a number (NaN, ±inf: what a diverged
    training step writes) or that the dtype cannot hold (float32 beyond float16's ±65504) is an
    :class:`InvalidArgumentError` naming it, not a vector every lookup of the key would then serve."""
    target = np.dtype(dtype)
    _refuse_any(~np.isfinite(vectors), vectors, f"{where}: {{}} value(s) that are not finite numbers")
    out = vectors.astype(target, copy=False)
    if target.itemsize < vectors.dtype.itemsize:  # every value was finite: one that is not now overflowed
        _refuse_any(~np.isfinite(out), vectors,
                    f"{where}: {{}} value(s) beyond {target.name}'s range (±{float(np.finfo(target).max):g})")  # fmt: skip
    return out


def _refuse_any(bad: np.ndarray, vectors: np.ndarray, what: str) -> None:
    """An :class:`InvalidArgumentError` saying ``what`` (its ``{}`` the count) and the first such value."""
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise InvalidArgumentError(f"{what.format(int(bad.sum()))}, the first {float(vectors[row, col]):g} at row "
                                   f"{row}, column {col}")  # fmt: skip


def parse_keys_text(text: str) -> np.ndarray:
    """``"1,2, 3"`` (a CLI argument) → int64 keys; an empty entry (``1,,2``) is an error, not skipped."""
    parts: Sequence[str] = [p.strip() for p in text.split(",")] if text.strip() else []
    empty = [i + 1 for i, p in enumerate(parts) if not p]
    if empty:
        raise InvalidArgumentError(f"--keys must be comma-separated integers: entry {empty[0]} of {len(parts)} is empty")
    try:
        return as_keys([int(p, 0) for p in parts])
    except ValueError as exc:
        raise InvalidArgumentError(f"--keys must be comma-separated integers: {exc}") from None


# -- LookupResponse without copies -------------------------------------------------------------------
#
# A Lookup answer is a few small fields around one large vectors buffer. Building it as a protobuf
# message costs three copies of that buffer on the server (``tobytes``, the field assignment, the
# serialisation) and two on the client (parsing, reading the field). The functions below write and
# read the same bytes (protobuf's wire format for ``hps.v1.LookupResponse``, fields in number order,
# zero values omitted as proto3 does) with one copy each side: any protobuf library reads what
# :func:`encode_lookup_response` writes, and :func:`decode_lookup_response` reads what any writes.

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class TableVectors:
    """One table's answer in a Lookup: ``count`` rows of ``dim`` values of ``dtype`` (a ``Dtype``
    value). ``vectors`` is a C-contiguous little-endian array on the server side and a read-only
    ``(count, dim)`` view on the received message on the client side."""

    table: str
    dim: int
    dtype: int
    count: int
    vectors: np.ndarray | None


class PackedLookupResponse:
    """A ``hps.v1.LookupResponse`` held as arrays; serialises like the protobuf message would."""

    def __init__(self, tables: Sequence[TableVectors]) -> None:
        self.tables = list(tables)

    # named as protobuf's, so the one gRPC serialiser handles this and a protobuf-built response alike
    def SerializeToString(self) -> bytes:
        return encode_lookup_response(self.tables)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


def encode_lookup_response(tables: Sequence[TableVectors]) -> bytes:
    """The wire bytes of a ``LookupResponse``; each table's vectors are copied once, into the result."""
    parts: list[Any] = []
    for entry in tables:
        name = entry.table.encode()
        head = bytearray()
        if name:
            head += _tag(1, _WIRE_LEN) + _varint(len(name)) + name
        if entry.dim:
            head += _tag(2, _WIRE_VARINT) + _varint(entry.dim)
        if entry.dtype:
            head += _tag(3, _WIRE_VARINT) + _varint(entry.dtype)
        body: Any = b""
        if entry.vectors is not None and entry.vectors.size:
            # a flat byte view of the array: bytes.join copies it straight into the message
            body = np.ascontiguousarray(entry.vectors).data.cast("B")
            head += _tag(4, _WIRE_LEN) + _varint(body.nbytes)
        tail = _tag(5, _WIRE_VARINT) + _varint(entry.count) if entry.count else b""
        size = len(head) + len(body) + len(tail)
        parts += [_tag(1, _WIRE_LEN) + _varint(size) + bytes(head), body, tail]
    return b"".join(parts)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidArgumentError("LookupResponse: truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of each field of a message: an int for varints and fixed
    widths, a memoryview slice (no copy) for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: Any
        if wire_type == _WIRE_VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _WIRE_LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise InvalidArgumentError("LookupResponse: a field runs past the end of the message")
            value, pos = data[pos : pos + size], pos + size
        elif wire_type in (_WIRE_I64, _WIRE_I32):
            width = 8 if wire_type == _WIRE_I64 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        else:
            raise InvalidArgumentError(f"LookupResponse: unsupported wire type {wire_type}")
        yield number, wire_type, value


def decode_lookup_response(data: bytes) -> PackedLookupResponse:
    """Reads a ``LookupResponse`` without copying its vectors: each entry's ``vectors`` is a read-only
    view on ``data`` (checked against ``count x dim`` of ``dtype``); unknown fields are skipped."""
    tables = []
    for number, wire_type, value in _fields(memoryview(data)):
        if number != 1 or wire_type != _WIRE_LEN:
            continue
        table, dim, dtype, count, raw = "", 0, 0, 0, b""
        for sub, sub_type, sub_value in _fields(value):
            if sub == 1 and sub_type == _WIRE_LEN:
                table = bytes(sub_value).decode()
            elif sub == 2 and sub_type == _WIRE_VARINT:
                dim = sub_value
            elif sub == 3 and sub_type == _WIRE_VARINT:
                dtype = sub_value
            elif sub == 4 and sub_type == _WIRE_LEN:
                raw = sub_value
            elif sub == 5 and sub_type == _WIRE_VARINT:
                count = sub_value
        name = enum_to_dtype(dtype, where=f"response for {table}")
        vectors = unpack_vectors(raw, dtype=name, rows=count, dim=dim, where=f"vectors of {table}")
        tables.append(TableVectors(table, dim, dtype, count, vectors))
    return PackedLookupResponse(tables)
