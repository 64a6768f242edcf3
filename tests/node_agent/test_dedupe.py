"""The compiled deduplication gives exactly ``np.unique(keys, return_inverse=True)``, and the lookup
paths that use it answer a batch with repeats row for row."""

from __future__ import annotations

import numpy as np
import pytest

from node_agent import dedupe
from node_agent.dedupe import unique_inverse

INT64_MIN, INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    cases = [
        np.array([], dtype=np.int64),
        np.array([5], dtype=np.int64),
        np.array([3, 3, 3, 3], dtype=np.int64),
        np.array([-1, INT64_MAX, INT64_MIN, 0, -1, INT64_MIN], dtype=np.int64),
        np.arange(1000, dtype=np.int64)[::-1].copy(),  # distinct, descending
        rng.integers(INT64_MIN, INT64_MAX, 20_000, dtype=np.int64),  # every byte varies
        rng.integers(0, 1 << 20, dedupe.NATIVE_MAX_KEYS + 1, dtype=np.int64),  # np.unique's turn
        rng.integers(0, 16, 5_000, dtype=np.int64),  # few distinct keys, one varying byte
        rng.integers(-3, 3, 9, dtype=np.int64),
        # Zipf-like: the shape of a recommendation batch (many repeats of a few hot keys)
        np.minimum(rng.zipf(1.2, 4096), 1 << 40).astype(np.int64) * 7919 - (1 << 30),
    ]
    for _ in range(100):
        n = int(rng.integers(1, 3000))
        span = int(rng.choice([4, 1 << 12, 1 << 24, 1 << 40, 1 << 62]))
        cases.append(rng.integers(-span, span, n, dtype=np.int64))
    return cases


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy"])
def test_same_as_numpy_unique(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if native and not dedupe.NATIVE:
        pytest.skip("the compiled deduplication was not built (no C compiler)")
    if not native:
        monkeypatch.setattr(dedupe, "_native", None)
    for keys in _cases():
        unique, inverse = unique_inverse(keys)
        want_unique, want_inverse = np.unique(keys, return_inverse=True)
        np.testing.assert_array_equal(unique, want_unique)
        np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))
        assert unique.dtype == np.int64 and inverse.dtype == np.int64
        np.testing.assert_array_equal(unique[inverse], keys)


def test_takes_what_callers_pass() -> None:
    """Lists, other integer dtypes and non-contiguous views are keys too; a 2-D array is refused."""
    unique, inverse = unique_inverse([4, 2, 4])
    assert unique.tolist() == [2, 4] and inverse.tolist() == [1, 0, 1]
    strided = np.arange(10, dtype=np.int32)[::-2]
    unique, inverse = unique_inverse(strided)
    np.testing.assert_array_equal(unique[inverse], strided)
    with pytest.raises(ValueError, match="one-dimensional"):
        unique_inverse(np.zeros((2, 2), dtype=np.int64))
