"""Seeded sequences of cache operations, and a step-by-step comparison of two caches that must behave
identically: the array version against the compiled kernel here, CuPy against NumPy on a GPU
(``tests/gpu``). After every step the two must have answered the same and hold the same state arrays
(slot keys, owners, stamps, frequencies, vectors, sketch, clock) and counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from node_agent.array_backend import to_host
from node_agent.cache import SetAssociativeCache

INT64 = np.iinfo(np.int64)
#: keys at the edges of int64 and around zero: the hash works on their two's-complement bits
EXTREME_KEYS = np.array([INT64.min, INT64.min + 1, -(2**62), -1, 0, 1, 2**62, INT64.max - 1, INT64.max],
                        dtype=np.int64)  # fmt: skip
#: each operation and how often it comes (clears are rare: a cleared cache has nothing left to compare)
OPERATIONS = {"query": 6, "query_sorted": 6, "insert": 6, "insert_cached": 2, "update": 2, "invalidate": 2,
              "clear_table": 1, "clear": 1}  # fmt: skip
_OPS = list(OPERATIONS)
_WEIGHTS = np.array(list(OPERATIONS.values()), dtype=np.float64) / sum(OPERATIONS.values())
SCENARIOS = ("zipf", "full-hit", "full-miss", "duplicates")


@dataclass(frozen=True)
class Step:
    """One operation: ``op`` on ``keys`` (and ``values``) of table ``table_id``."""

    op: str
    keys: np.ndarray
    values: np.ndarray | None
    table_id: int


def _draw_keys(rng: np.random.Generator, scenario: str, step: int, batch: int, key_space: int) -> np.ndarray:
    if scenario == "full-hit":
        return rng.integers(0, 16, batch)  # 16 distinct keys: every one fits after the first step
    if scenario == "full-miss":
        return np.arange(step * batch, (step + 1) * batch)  # never seen before
    if scenario == "duplicates":
        return rng.choice(rng.integers(0, key_space, max(1, batch // 10)), batch)
    keys = (rng.zipf(1.2, batch) - 1) % key_space  # a Zipf head, a long tail
    keys = keys * 7919 - key_space  # spread over negative and positive keys
    if step % 3 == 0:  # and some keys at the edges of int64
        keys[: len(EXTREME_KEYS)] = EXTREME_KEYS[: len(keys)]
    return keys


def steps(
    rng: np.random.Generator,
    *,
    count: int,
    scenario: str = "zipf",
    tables: int = 1,
    dim: int = 8,
    dtype: Any = np.float32,
    batch: int = 256,
    key_space: int = 4096,
    cached: Callable[[int], np.ndarray] | None = None,
) -> Iterator[Step]:
    """``count`` seeded steps; ``cached(table_id)`` (the keys a cache holds now) feeds the
    ``insert_cached`` operation, which overwrites rows that are already cached."""
    for step in range(count):
        op = str(rng.choice(_OPS, p=_WEIGHTS)) if step else "insert"
        table_id = int(rng.integers(0, tables))
        size = int(rng.integers(1, batch + 1))
        if op == "insert_cached" and cached is not None:
            held = cached(table_id)
            keys = rng.choice(held, min(size, len(held))) if len(held) else np.empty(0, dtype=np.int64)
        else:
            keys = _draw_keys(rng, scenario, step, size, key_space)
        keys = np.asarray(keys, dtype=np.int64)
        if op == "query_sorted":
            keys = np.unique(keys)
        values = None
        if op in ("insert", "insert_cached", "update"):
            values = (rng.standard_normal((len(keys), dim)) * 8).astype(dtype)
        yield Step(op, keys, values, table_id)


def apply(cache: SetAssociativeCache, step: Step, convert: Callable[[np.ndarray], Any] = lambda a: a) -> Any:
    """Runs ``step`` on ``cache`` (inputs passed through ``convert``: ``cupy.asarray`` for a GPU
    cache); returns what the operation answered, on the host."""
    keys = convert(step.keys)
    if step.op in ("query", "query_sorted"):
        values, hit = cache.query(keys, table_id=step.table_id, sorted_unique=step.op == "query_sorted")
        return to_host(values), to_host(hit)
    if step.op in ("insert", "insert_cached"):
        return cache.insert(keys, convert(step.values), table_id=step.table_id)
    if step.op == "update":
        return cache.update(keys, convert(step.values), table_id=step.table_id)
    if step.op == "invalidate":
        return cache.invalidate(keys, table_id=step.table_id)
    if step.op == "clear_table":
        return cache.clear(table_id=step.table_id)
    return cache.clear()


COUNTERS = ("hits", "misses", "inserts", "evictions", "size")


def assert_same_state(reference: SetAssociativeCache, candidate: SetAssociativeCache, where: str) -> None:
    want, got = reference.state(), candidate.state()
    assert want.keys() == got.keys(), where
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{where}: state array {name!r}")
    for counter in COUNTERS:
        assert getattr(candidate, counter) == getattr(reference, counter), f"{where}: counter {counter}"


def run_side_by_side(
    reference: SetAssociativeCache,
    candidate: SetAssociativeCache,
    sequence: Iterator[Step] | list[Step],
    *,
    convert: Callable[[np.ndarray], Any] = lambda a: a,
) -> int:
    """Applies each step to both caches, comparing answers and then every state array; returns the
    number of steps run."""
    done = 0
    for index, step in enumerate(sequence):
        where = f"step {index} ({step.op}, {len(step.keys)} keys, table {step.table_id})"
        want = apply(reference, step)
        got = apply(candidate, step, convert)
        if isinstance(want, tuple):
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"{where}: hit mask")
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"{where}: rows")
        else:
            assert got == want, f"{where}: answered {got!r}, expected {want!r}"
        assert_same_state(reference, candidate, where)
        done += 1
    return done
