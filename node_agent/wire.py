"""Packs keys and vectors into the wire format of ``hps.v1`` (packed little-endian bytes) and back,
checking every buffer so a malformed one becomes an :class:`InvalidArgumentError` naming the problem.

Shared by the gRPC server, the client and the Redis Stream of online updates, so all three agree on
one encoding. Decoding is a zero-copy view (``np.frombuffer``); encoding is one ``tobytes`` copy.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def parse_keys_text(text: str) -> np.ndarray:
    """``"1,2, 3"`` (a CLI argument) → int64 keys."""
    parts: Sequence[str] = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return as_keys([int(p, 0) for p in parts])
    except ValueError as exc:
        raise InvalidArgumentError(f"--keys must be comma-separated integers: {exc}") from None
