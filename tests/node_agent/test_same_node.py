"""The same-node path (``node_agent.same_node``) over a real Unix socket and real shared memory: the
same rows and typed errors as gRPC, buffers that grow, many callers at once, malformed requests that
cost only themselves, an agent that goes away, and an agent started with ``same_node_socket``."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from node_agent.agent import Agent, AgentOptions
from node_agent.client import Client
from node_agent.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from node_agent.lookup import build_lookup_path
from node_agent.same_node import (
    MAGIC,
    OP_HELLO,
    OP_LOOKUP,
    REQUEST,
    RESPONSE,
    SameNodeClient,
    SameNodeServer,
)
from node_agent.server import RunningServer, serve
from node_agent.spec import load_model_file
from node_agent.tiers.hashmap import HashMapTier
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[RunningServer, SameNodeServer, dict[str, TableData]]]:
    """The demo model (a float32 and a float16 table, sparse keys) behind a real lookup path with an
    L1, served over TCP gRPC and over a same-node socket at once."""
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    tier = HashMapTier(layouts(model))
    fill(tier, data)
    lookup = build_lookup_path(model, volatile=tier, persistent=None, device="cpu")
    server = serve(lookup, model=model.name, max_batch_keys=model.agent.max_batch_keys)
    near = SameNodeServer(server.servicer, tmp_path / "agent.sock").start()
    yield server, near, data
    near.stop()
    server.stop(0)
    lookup.close()


def test_same_rows_as_grpc_for_repeated_and_unknown_keys_in_both_dtypes(agent: tuple) -> None:
    server, near, data = agent
    rng = np.random.default_rng(3)
    with SameNodeClient(near.path) as same_node, Client(server.endpoint) as grpc_client:
        for _ in range(5):  # cold, then answered from L1
            user = np.concatenate([rng.choice(data["user"].keys, 50), [0, -9, 2**62], data["user"].keys[:3]])
            item = rng.choice(data["item"].keys, 20)
            got = same_node.lookup_many("demo", {"user": user, "item": item})
            want = grpc_client.lookup_many("demo", {"user": user, "item": item})
            for table, keys in (("user", user), ("item", item)):
                np.testing.assert_array_equal(got[table], data[table].expected(keys))
                np.testing.assert_array_equal(got[table], want[table])
                assert got[table].dtype == data[table].vectors.dtype and got[table].flags.writeable
        assert same_node.lookup("demo", "user", []).shape == (0, 8)
    counters = server.servicer.snapshot()["server"]
    assert counters["lookups.same_node"] == 11  # two tables five times, and the empty one


def test_errors_are_the_typed_errors_of_grpc_and_the_connection_stays_usable(agent: tuple) -> None:
    _, near, data = agent
    with SameNodeClient(near.path) as client:
        with pytest.raises(NotFoundError, match="model 'nope' not found"):
            client.lookup("nope", "user", [1])
        with pytest.raises(NotFoundError, match="table 'ghost' not found"):
            client.lookup("demo", "ghost", [1])
        with pytest.raises(ResourceExhaustedError, match="max_batch_keys=1000"):
            client.lookup("demo", "user", np.arange(1001))
        with pytest.raises(InvalidArgumentError, match="keys must be integers"):
            client.lookup("demo", "user", [1.5])
        np.testing.assert_array_equal(client.lookup("demo", "user", [1, 4]), data["user"].expected([1, 4]))
        assert client._idle.qsize() == 1  # every answered error kept the one connection
        # and each is a grpc.RpcError with the status gRPC would answer, as the gRPC client's are
        for call, code in ((lambda: client.lookup("nope", "user", [1]), grpc.StatusCode.NOT_FOUND),
                           (lambda: client.lookup("demo", "user", np.arange(1001)), grpc.StatusCode.RESOURCE_EXHAUSTED),
                           (lambda: client.lookup("demo", "", [1]), grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == code and raised.value.details() == str(raised.value)


def test_an_agent_that_restarts_is_reached_again_without_a_failed_call(tmp_path: Path, agent: tuple) -> None:
    """Idle connections to the agent that stopped are found closed and replaced before they are used:
    after the agent is back, the next calls from every thread that had a connection answer."""
    _, near, data = agent
    client = SameNodeClient(near.path, timeout=2.0)
    with ThreadPoolExecutor(4) as pool:  # four connections, all idle afterwards
        list(pool.map(lambda _: client.lookup("demo", "user", [1]), range(16)))
    assert client._idle.qsize() >= 2
    near.stop()
    again = SameNodeServer(near.servicer, near.path).start()
    try:
        for _ in range(6):
            np.testing.assert_array_equal(client.lookup("demo", "user", [1, 4]), data["user"].expected([1, 4]))
    finally:
        client.close()
        again.stop()


def test_a_buffer_too_small_for_the_rows_grows_and_the_call_still_answers(agent: tuple) -> None:
    _, near, data = agent
    with SameNodeClient(near.path, buffer_bytes=1) as client:  # raised to the 64 KiB minimum
        keys = np.tile(data["user"].keys, 3)  # 64 distinct rows of 32 bytes: fits
        np.testing.assert_array_equal(client.lookup("demo", "user", keys), data["user"].expected(keys))
        big = np.arange(-4000, 4000)  # 8000 distinct keys x 32 bytes: 256 KiB of rows
        near.servicer._max_batch_keys = 10_000
        np.testing.assert_array_equal(client.lookup("demo", "user", big), data["user"].expected(big))
        lane = client._idle.get_nowait()
        assert lane.size >= 8000 * 8 + 8000 * 32
        lane.close()


def test_many_callers_at_once_each_get_their_own_rows(agent: tuple) -> None:
    _, near, data = agent
    failures: list[BaseException] = []
    with SameNodeClient(near.path) as client:

        def caller(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(40):
                    keys = rng.choice(data["user"].keys, int(rng.integers(1, 200)))
                    np.testing.assert_array_equal(client.lookup("demo", "user", keys), data["user"].expected(keys))
            except BaseException as exc:  # surfaced after the join
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures, failures[0]
        assert client._idle.qsize() >= 2  # callers overlapped, each on a connection of its own


def raw_request(sock: socket.socket, request: bytes, fds: list[int] | None = None) -> tuple[int, str]:
    if fds:
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        sock.sendall(request)
    reply = sock.recv(4096)
    _, status, _, _, _, _, length = RESPONSE.unpack_from(reply)
    return status, reply[RESPONSE.size : RESPONSE.size + length].decode()


def test_malformed_requests_get_invalid_argument_and_other_clients_are_served(agent: tuple) -> None:
    _, near, data = agent
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(near.path))
        lookup = REQUEST.pack(MAGIC, OP_LOOKUP, 4, 4, 1, 0, 2, 64, 4096) + b"demouser"
        assert raw_request(sock, lookup) == (3, "same-node LOOKUP before HELLO: no buffer to read keys from")
        assert raw_request(sock, b"GET / HTTP/1.1\r\n\r\n")[0] == 3
        assert "magic" in raw_request(sock, b"XXXX" + lookup[4:])[1]
        assert "lengths" in raw_request(sock, lookup[:-2])[1]
        assert "exactly one buffer" in raw_request(sock, REQUEST.pack(MAGIC, OP_HELLO, 0, 0, 2, 0, 0, 0, 4096))[1]
        fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 4096)
            hello = REQUEST.pack(MAGIC, OP_HELLO, 0, 0, 3, 0, 0, 0, 4096)
            # a buffer the client could still shrink under the agent's mapping is refused
            assert "sealed with F_SEAL_SHRINK" in raw_request(sock, hello, [fd])[1]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            assert raw_request(sock, hello, [fd]) == (0, "")
            with pytest.raises(PermissionError):  # and the seal holds: the mapping cannot lose its pages
                os.ftruncate(fd, 0)
            past = REQUEST.pack(MAGIC, OP_LOOKUP, 4, 4, 4, 4000, 100, 64, 100) + b"demouser"
            status, message = raw_request(sock, past)
            assert status == 3 and "run past the 4096-byte buffer" in message
        finally:
            os.close(fd)
        # the bad client cost nothing to anyone else
        with SameNodeClient(near.path) as client:
            np.testing.assert_array_equal(client.lookup("demo", "user", [1]), data["user"].expected([1]))


def test_an_agent_that_goes_away_is_unavailable_within_the_timeout(tmp_path: Path, agent: tuple) -> None:
    _, near, data = agent
    client = SameNodeClient(near.path, timeout=2.0)
    np.testing.assert_array_equal(client.lookup("demo", "user", [1]), data["user"].expected([1]))
    near.stop()
    assert not near.path.exists()
    with pytest.raises(UnavailableError, match="same-node"):
        client.lookup("demo", "user", [1])
    with pytest.raises(UnavailableError, match="same-node"):  # and a fresh connection is refused
        client.lookup("demo", "user", [1])
    client.close()


def test_socket_paths_that_cannot_work_are_refused_with_the_reason(tmp_path: Path, agent: tuple) -> None:
    server, _, _ = agent
    with pytest.raises(InvalidArgumentError, match="at most 107"):
        SameNodeServer(server.servicer, tmp_path / ("x" * 120))
    regular = tmp_path / "a-file"
    regular.write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="exists and is not a socket"):
        SameNodeServer(server.servicer, regular).start()
    assert regular.read_text() == "keep me"
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as old:
        old.bind(str(stale))  # what an agent that was killed leaves behind
    replaced = SameNodeServer(server.servicer, stale).start()
    try:
        with SameNodeClient(stale) as client:
            assert client.lookup("demo", "item", [1]).shape == (1, 4)
    finally:
        replaced.stop()


def test_an_agent_started_with_a_same_node_socket_serves_it_and_removes_it(tmp_path: Path) -> None:
    path, data = write_model(tmp_path)
    socket_path = tmp_path / "agent.sock"
    ready = tmp_path / "agent.ready"
    agent = Agent(AgentOptions(model_file=path, port=0, load=True, device="cpu", ready_file=ready,
                               same_node_socket=socket_path))  # fmt: skip
    agent.start()
    try:
        assert json.loads(ready.read_text())["sameNodeSocket"] == str(socket_path)
        with SameNodeClient(socket_path) as client:
            keys = data["item"].keys[::-1]
            np.testing.assert_array_equal(client.lookup("demo", "item", keys), data["item"].expected(keys))
    finally:
        agent.stop()
    assert not socket_path.exists()
