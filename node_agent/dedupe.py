"""A batch's distinct keys and its inverse: what every lookup does twice (the client before it sends,
the agent when a caller did not), so it is compiled (``dedupe.c``, built by ``pip install`` where a C
compiler is present) and falls back to ``np.unique`` where the build was unavailable.

Both give exactly ``np.unique(keys, return_inverse=True)``: the distinct keys ascending and, for each
key, the position of its distinct key. The compiled one finds the distinct keys with a hash table and
sorts only those, so it costs O(n + m) instead of a sort of the whole batch: 2-3x less on a lookup's
batch of a few thousand keys. Past ``NATIVE_MAX_KEYS`` keys ``np.unique`` serves (faster there on
random 64-bit keys).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np


def _load() -> Any:
    try:
        return importlib.import_module("node_agent._dedupe").unique_inverse
    except ImportError:  # built without a compiler
        return None


_native: Any = _load()

#: whether the compiled version serves (``False``: ``np.unique``)
NATIVE = _native is not None
#: above this many keys ``np.unique`` serves: with hundreds of thousands of distinct 64-bit keys the
#: radix sort's eight passes over memory cost more than NumPy's sort (``bench/dedupe.py``)
NATIVE_MAX_KEYS = 1 << 17


def unique_inverse(keys: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(unique, inverse)`` of int64 ``keys`` (one-dimensional), as ``np.unique(keys,
    return_inverse=True)``: ``unique[inverse]`` equals ``keys``."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if keys.ndim != 1:
        raise ValueError(f"keys must be one-dimensional; got shape {keys.shape}")
    if _native is None or keys.shape[0] > NATIVE_MAX_KEYS:
        unique, inverse = np.unique(keys, return_inverse=True)
        return unique, inverse.reshape(-1)
    return _unique_inverse_native(keys)


def _unique_inverse_native(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique = np.empty(keys.shape[0], dtype=np.int64)
    inverse = np.empty(keys.shape[0], dtype=np.int64)
    m = _native(keys, unique, inverse)
    return unique[:m], inverse
