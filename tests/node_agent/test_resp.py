"""The compiled reader of a lookup's HMGET replies (``node_agent/tiers/resp.c``), against replies built
here byte by byte: every row lands in its place whatever way the bytes arrive, nulls and rows of the
wrong length are missing (never a wrong vector), an error reply stops the read with Redis's words, and
anything that is not an HMGET reply is refused."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from node_agent.tiers import redis_tier

feed = redis_tier._feed_rows
pytestmark = pytest.mark.skipif(feed is None, reason="the compiled reply reader was not built (no C compiler)")

ROW = 12  # bytes a row


def _reply(fields: list[bytes | None], *, resp3_nulls: bool = False) -> bytes:
    out = [b"*%d\r\n" % len(fields)]
    for value in fields:
        if value is None:
            out.append(b"_\r\n" if resp3_nulls else b"$-1\r\n")
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(out)


def _random_replies(rng: np.random.Generator, rows: int) -> tuple[bytes, int, np.ndarray, np.ndarray, np.ndarray, int]:
    """Replies answering the rows in a random order: (bytes, replies, dest, expected rows, found, malformed)."""
    dest = rng.permutation(rows).astype(np.int64)
    expected = np.zeros((rows, ROW), dtype=np.uint8)
    found = np.zeros(rows, dtype=bool)
    malformed = 0
    values: list[bytes | None] = []
    for row in dest.tolist():
        kind = rng.choice(["row", "row", "row", "null", "short", "long"])
        if kind == "row":
            value = rng.integers(0, 256, ROW, dtype=np.uint8).tobytes()
            # rows may hold CR, LF and digits: only lengths frame a bulk string
            value = b"\r\n" + value[2:] if rng.random() < 0.2 else value
            expected[row] = np.frombuffer(value, dtype=np.uint8)
            found[row] = True
            values.append(value)
        elif kind == "null":
            values.append(None)
        else:
            values.append(b"x" * (ROW - 3 if kind == "short" else ROW + 5))
            malformed += 1
    cuts = sorted(rng.choice(np.arange(1, rows), size=min(rows - 1, int(rng.integers(0, 5))), replace=False).tolist())
    bounds = [0, *cuts, rows]
    replies = [_reply(values[a:b], resp3_nulls=bool(rng.random() < 0.5)) for a, b in pairwise(bounds)]
    return b"".join(replies), len(replies), dest, expected, found, malformed


def _read(data: bytes, replies: int, dest: np.ndarray, rows: int, chunks: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """Feeds ``data`` as a socket would deliver it, in pieces of ``chunks`` bytes; returns the rows,
    found, state and the last answer of feed."""
    out = np.zeros((rows, ROW), dtype=np.uint8)
    found = np.zeros(rows, dtype=np.uint8)
    state = np.array([0, replies, -1, 0, 0], dtype=np.int64)
    buffer = bytearray(len(data))
    filled = 0
    answer: object = None
    for size in chunks:
        buffer[filled : filled + size] = data[filled : filled + size]
        filled += size
        answer = feed(buffer, filled, state, dest, out, found, ROW)
        if answer is not None:
            break
    return out, found, state, answer


def test_rows_land_in_place_however_the_bytes_arrive() -> None:
    rng = np.random.default_rng(3)
    for case in range(200):
        rows = int(rng.integers(1, 40))
        data, replies, dest, expected, want_found, malformed = _random_replies(rng, rows)
        if case % 4 == 0:
            chunks = [1] * len(data)  # a byte at a time: every cut
        else:
            sizes = rng.integers(1, 64, len(data))
            edges = np.minimum(np.cumsum(sizes), len(data))
            chunks = np.diff(np.concatenate([[0], np.unique(edges)])).tolist()
        out, found, state, answer = _read(data, replies, dest, rows, chunks)
        assert answer is None
        assert state.tolist() == [len(data), 0, -1, rows, malformed]
        np.testing.assert_array_equal(found.astype(bool), want_found)
        np.testing.assert_array_equal(out, expected)  # misses stay as they were (zeros)


def test_an_error_reply_stops_the_read_with_redis_words() -> None:
    first = _reply([b"a" * ROW, None])
    data = first + b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n" + _reply([b"b" * ROW])
    dest = np.array([0, 1, 2], dtype=np.int64)
    _, found, _, answer = _read(data, 3, dest, 3, [len(data)])
    assert answer == b"WRONGTYPE Operation against a key holding the wrong kind of value"
    assert found.tolist() == [1, 0, 0]
    # an error cut in two is read once whole
    _, found, _, answer = _read(data, 3, dest, 3, [len(first) + 5, len(data) - len(first) - 5])
    assert answer is not None and answer.startswith(b"WRONGTYPE")


def test_an_empty_reply_and_a_reply_ending_the_buffer_are_finished() -> None:
    data = _reply([]) + _reply([b"c" * ROW])
    _, found, state, answer = _read(data, 2, np.array([0], dtype=np.int64), 1, [len(data)])
    assert answer is None and state[1] == 0 and found.tolist() == [1]


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"+OK\r\n", "expected an array"),
        (b"*x\r\n", "bad array header"),
        (b"*-1\r\n", "bad array header"),
        (b"*1\r\n:5\r\n", "expected a bulk string or null"),
        (b"*1\r\n$-2\r\n", "bad bulk header"),
        (b"*1\r\n$3\r\nabcXY", "without its CRLF"),
        (b"*1\r\n_\rX", "bad null"),
        (b"*2\r\n$-1\r\n$-1\r\n", "more fields than asked"),
    ],
)
def test_what_is_not_an_hmget_reply_is_refused(data: bytes, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        _read(data, 1, np.array([0], dtype=np.int64), 1, [len(data)])


def test_a_destination_outside_the_rows_is_refused() -> None:
    data = _reply([b"d" * ROW])
    with pytest.raises(ValueError, match="outside"):
        _read(data, 1, np.array([5], dtype=np.int64), 1, [len(data)])


def test_the_compiled_reader_serves_where_it_was_built() -> None:
    """Where the module was built, the tier uses it: a redis-py that stopped keeping its socket in
    ``Connection._sock`` would silently fall back to hiredis, and this says so instead."""
    import importlib

    importlib.import_module("node_agent.tiers._resp")  # built (the module-level skip said so otherwise)
    assert redis_tier._load_resp() is not None, "redis-py's Connection has no _sock: the reader is not used"
