"""The Python client (``node_agent.client.Client``) against real agents on loopback: exact vectors,
typed errors carrying the server's message, deadlines, and failover onto the next endpoint."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from node_agent.client import Client
from node_agent.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from node_agent.local.redis_servers import free_port
from node_agent.proto.hps.v1 import hps_pb2
from node_agent.server import EmbeddingServicer, serve
from tests.node_agent.test_grpc import Served, served  # noqa: F401  (fixture)


@pytest.fixture
def client(served: Served) -> Iterator[Client]:  # noqa: F811
    with Client(served.endpoint, timeout=5) as c:
        yield c


def test_lookup_returns_exact_writable_vectors_and_defaults(served: Served, client: Client) -> None:  # noqa: F811
    keys = [1, 4, 7, 1000, 4]
    got = client.lookup("demo", "user", keys)
    assert got.shape == (5, 8) and got.dtype == np.float32
    np.testing.assert_array_equal(got, served.data["user"].expected(keys))
    got[0] += 1  # the caller owns the array
    half = client.lookup("demo", "item", np.array([10, 11], dtype=np.uint32))
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, served.data["item"].expected([10, 11]))


def test_lookup_many_answers_every_table(served: Served, client: Client) -> None:  # noqa: F811
    got = client.lookup_many("demo", {"user": range(0, 30, 3), "item": np.array([1, 2, 3])})
    assert set(got) == {"user", "item"}
    np.testing.assert_array_equal(got["user"], served.data["user"].expected(list(range(0, 30, 3))))
    np.testing.assert_array_equal(got["item"], served.data["item"].expected([1, 2, 3]))
    assert client.lookup("demo", "user", []).shape == (0, 8)


def test_errors_are_typed_and_carry_the_servers_message(client: Client) -> None:
    with pytest.raises(NotFoundError, match="table 'nope' not found in model 'demo'"):
        client.lookup("demo", "nope", [1])
    with pytest.raises(NotFoundError, match="model 'other' not found"):
        client.lookup("other", "user", [1])
    with pytest.raises(ResourceExhaustedError, match="batch of 1001 keys exceeds max_batch_keys=1000"):
        client.lookup("demo", "user", np.arange(1001))
    with pytest.raises(InvalidArgumentError, match="model name is empty"):
        client.lookup("", "user", [1])
    with pytest.raises(InvalidArgumentError, match="integers"):
        client.lookup("demo", "user", [1.5, 2.0])


def test_a_table_name_that_is_not_a_string_or_a_closed_client_is_a_clear_error(served: Served) -> None:  # noqa: F811
    client = Client(served.endpoint)
    with pytest.raises(InvalidArgumentError, match="names must be strings"):
        client.lookup("demo", 5, [1])  # type: ignore[arg-type]
    assert client.lookup_many("demo", {}) == {}
    client.close()
    with pytest.raises(InvalidArgumentError, match="the client is closed"):
        client.lookup("demo", "user", [1])


def test_errors_are_also_grpc_rpc_errors_with_the_status_the_agent_answered(served: Served, client: Client) -> None:  # noqa: F811
    """Code written against the raw stubs (``except grpc.RpcError``, ``e.code()``) works unchanged."""
    for call, code, error in (
        (lambda: client.lookup("demo", "nope", [1]), grpc.StatusCode.NOT_FOUND, NotFoundError),
        (lambda: client.lookup("demo", "user", np.arange(1001)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         ResourceExhaustedError),
        (lambda: client.lookup("", "user", [1]), grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == code and isinstance(raised.value, error)
        assert raised.value.details() == str(raised.value) and type(raised.value).__name__ == error.__name__
        again = pickle.loads(pickle.dumps(raised.value))  # a multiprocessing worker's error crosses over
        assert isinstance(again, error) and again.code() == code and str(again) == str(raised.value)
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead], timeout=2, retries=0) as c, pytest.raises(grpc.RpcError) as unavailable:
        c.lookup("demo", "user", [1])
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE and isinstance(unavailable.value, UnavailableError)


def test_update_rpc_then_lookup_sees_it(client: Client) -> None:
    rows = client.update("demo", "user", [4, 9999], np.full((2, 8), 0.25))
    assert rows == 2
    np.testing.assert_array_equal(client.lookup("demo", "user", [9999, 4]), np.full((2, 8), 0.25, np.float32))
    with pytest.raises(InvalidArgumentError, match="2 rows x dim 8"):
        client.update("demo", "user", [1, 2], np.zeros((2, 3), np.float32))


def test_describe_and_stats(client: Client) -> None:
    info = client.describe("demo")
    assert info.tables["item"].dtype == "float16" and info.tables["user"].default_value == -1.0
    assert info.max_batch_keys == 1000 and info.degraded is False
    client.lookup("demo", "user", [1, 2])
    stats = client.stats("demo")
    assert stats["degraded"] is False and stats["server"]["keys"] == 2


def test_dead_first_endpoint_fails_over_to_the_second(served: Served) -> None:  # noqa: F811
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead, served.endpoint], timeout=2, retries=1) as c:
        np.testing.assert_array_equal(c.lookup("demo", "user", [1]), served.data["user"].expected([1]))
        assert c.describe("demo").endpoint == served.endpoint  # and it stays there
    with Client([dead, served.endpoint], timeout=2, retries=0) as c, pytest.raises(UnavailableError, match=dead):
        c.lookup("demo", "user", [1])


class _SlowServicer(EmbeddingServicer):
    """A real servicer whose Lookup answers only after ``delay`` seconds (a stalled agent)."""

    delay = 1.5

    def Lookup(self, request: hps_pb2.LookupRequest, context: grpc.ServicerContext) -> hps_pb2.LookupResponse:
        time.sleep(self.delay)
        return super().Lookup(request, context)


def test_deadline_exceeded_moves_on_to_the_next_endpoint(served: Served, monkeypatch: Any) -> None:  # noqa: F811
    monkeypatch.setattr("node_agent.server.EmbeddingServicer", _SlowServicer)
    slow = serve(served.lookup, model="demo")
    try:
        with Client([slow.endpoint, served.endpoint], timeout=0.5, retries=1) as c:
            start = time.monotonic()
            np.testing.assert_array_equal(c.lookup("demo", "user", [1]), served.data["user"].expected([1]))
            assert time.monotonic() - start < 1.4  # did not wait for the stalled agent
        with Client([slow.endpoint], timeout=0.3, retries=0) as c, pytest.raises(UnavailableError, match="DEADLINE"):
            c.lookup("demo", "user", [1])
    finally:
        slow.stop(0)


def test_repeated_keys_travel_once_and_come_back_as_separate_rows(served: Served, client: Client) -> None:  # noqa: F811
    rng = np.random.default_rng(2)
    keys = rng.choice(np.array([1, 4, 7, 10, 13, 999], dtype=np.int64), size=500)  # 999 is unknown
    got = client.lookup("demo", "user", keys)
    np.testing.assert_array_equal(got, served.data["user"].expected(keys))
    first, second = np.flatnonzero(keys == keys[0])[:2]
    got[first] += 1  # rows of the same key are copies, not views of one another
    np.testing.assert_array_equal(got[second], served.data["user"].expected(keys[:1])[0])
    # the agent was asked for each distinct key once
    assert client.stats("demo")["server"]["keys"] == len(np.unique(keys))
