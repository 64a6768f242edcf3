"""Checks and normalises the key and value arrays every tier is handed, so each tier sees one shape."""

from __future__ import annotations

import numpy as np

from node_agent.errors import InvalidArgumentError
from node_agent.tiers.base import TableLayout


def as_keys(keys: np.ndarray) -> np.ndarray:
    """``keys`` as a contiguous 1-D ``int64`` array; any other integer type is converted."""
    array = np.asarray(keys)
    if array.ndim != 1:
        raise InvalidArgumentError(f"keys must be a 1-D array, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise InvalidArgumentError(f"keys must be integers (int64), got {array.dtype}")
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError("keys must fit in int64")
    return np.ascontiguousarray(array, dtype=np.int64)


def as_values(layout: TableLayout, values: np.ndarray, rows: int) -> np.ndarray:
    """``values`` as a contiguous ``(rows, dim)`` array in the table's dtype.

    A floating array of another precision is cast (the loader hands float32 rows to a float16
    table); anything else, or a shape that does not match, is an :class:`InvalidArgumentError`."""
    array = np.asarray(values)
    if array.shape != (rows, layout.dim):
        raise InvalidArgumentError(
            f"table {layout.name!r}: values must have shape ({rows}, {layout.dim}), got {array.shape}"
        )
    if array.dtype.kind != "f":
        raise InvalidArgumentError(f"table {layout.name!r}: values must be floating point, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=layout.dtype)
