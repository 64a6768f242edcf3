"""The gRPC edge (``node_agent.server``) over a real loopback socket: exact vectors, every bad input's
status code and message, Describe/Stats, the health service and reflection.

Raw stubs are used on purpose, so malformed buffers the client would never send reach the server.
The lookup path and its tiers are the real ones; the builders here are shared with the client,
update and agent tests."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from node_agent import wire
from node_agent.errors import InvalidArgumentError, UnavailableError
from node_agent.lookup import LookupPath, build_lookup_path
from node_agent.proto.hps.v1 import hps_pb2, hps_pb2_grpc
from node_agent.server import SERVICE_NAME, RunningServer, serve
from node_agent.spec import ModelSpec, load_model_file
from node_agent.tiers.base import TableLayout, Tier
from node_agent.tiers.hashmap import HashMapTier

MODEL_YAML = """\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {name: demo}
spec:
  tables:
  - {name: user, rows: 64, dim: 8, dtype: float32, defaultValue: -1.0, source: user}
  - {name: item, rows: 32, dim: 4, dtype: float16, defaultValue: 0.5, source: item}
  cache: {memoryPerGPU: 1Mi}
  volatileStore: {type: hashmap}
  persistentStore: {type: none}
  agent: {maxBatchKeys: 1000}
"""


@dataclass(frozen=True)
class TableData:
    keys: np.ndarray
    vectors: np.ndarray
    default: float

    def expected(self, keys: Any) -> np.ndarray:
        """What a lookup of ``keys`` must return: the row of each known key, else the default."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.full((len(keys), self.vectors.shape[1]), self.default, dtype=self.vectors.dtype)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        known = self.keys[pos] == keys
        out[known] = self.vectors[pos[known]]
        return out


def write_model(directory: Path, text: str = MODEL_YAML, seed: int = 7) -> tuple[Path, dict[str, TableData]]:
    """The test model's YAML plus each table's source (``keys.npy`` + ``vectors.npy``), with sparse
    keys (3k + 1) so that a row's key is not its index."""
    rng = np.random.default_rng(seed)
    path = directory / "model.yaml"
    path.write_text(text)
    model = load_model_file(path)
    data: dict[str, TableData] = {}
    for table in model.tables:
        keys = np.arange(table.rows, dtype=np.int64) * 3 + 1
        vectors = rng.standard_normal((table.rows, table.dim)).astype(table.dtype)
        source = directory / (table.source or table.name)
        source.mkdir(exist_ok=True)
        np.save(source / "keys.npy", keys)
        np.save(source / "vectors.npy", vectors)
        data[table.name] = TableData(keys, vectors, table.default_value)
    return path, data


def fill(tier: Tier, data: dict[str, TableData]) -> None:
    for name, table in data.items():
        tier.insert(name, table.keys, table.vectors)


def layouts(model: ModelSpec) -> list[TableLayout]:
    return [TableLayout.of(t) for t in model.tables]


@dataclass
class Served:
    model: ModelSpec
    data: dict[str, TableData]
    lookup: LookupPath
    server: RunningServer

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The demo model in an in-process hash map behind a real lookup path and gRPC server."""
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    tier = HashMapTier(layouts(model))
    fill(tier, data)
    lookup = build_lookup_path(model, volatile=tier, persistent=None, device="cpu")
    server = serve(lookup, model=model.name, max_batch_keys=model.agent.max_batch_keys)
    yield Served(model, data, lookup, server)
    server.stop(0)
    lookup.close()


@pytest.fixture
def stub(served: Served) -> Iterator[hps_pb2_grpc.EmbeddingServiceStub]:
    with grpc.insecure_channel(served.endpoint) as channel:
        yield hps_pb2_grpc.EmbeddingServiceStub(channel)


def lookup_request(model: str, *tables: tuple[str, Any]) -> hps_pb2.LookupRequest:
    request = hps_pb2.LookupRequest(model=model)
    for table, keys in tables:
        raw = keys if isinstance(keys, bytes) else np.asarray(keys, dtype="<i8").tobytes()
        request.tables.add(table=table, keys=raw)
    return request


def rpc_error(call: Any, request: Any) -> Any:
    """The error a call raises: a ``grpc.RpcError`` that is also a ``grpc.Call`` (``code()``, ``details()``)."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    return info.value


def vectors_of(entry: hps_pb2.TableVectors) -> np.ndarray:
    dtype = {hps_pb2.FLOAT32: "<f4", hps_pb2.FLOAT16: "<f2"}[entry.dtype]
    return np.frombuffer(entry.vectors, dtype=dtype).reshape(entry.count, entry.dim)


# -- lookups -------------------------------------------------------------------------------------


def test_lookup_returns_each_keys_row_and_the_default_for_unknown_keys(served: Served, stub: Any) -> None:
    user = served.data["user"]
    keys = np.array([1, 4, 2, 190, 1, -5, 4], dtype=np.int64)  # 2, 190, -5 unknown; 1 and 4 repeated
    response = stub.Lookup(lookup_request("demo", ("user", keys)), timeout=5)
    (entry,) = response.tables
    assert (entry.table, entry.dim, entry.dtype, entry.count) == ("user", 8, hps_pb2.FLOAT32, 7)
    got = vectors_of(entry)
    np.testing.assert_array_equal(got, user.expected(keys))
    assert np.all(got[2] == -1.0) and np.all(got[5] == -1.0)


def test_float16_table_comes_back_as_float16(served: Served, stub: Any) -> None:
    item = served.data["item"]
    keys = np.array([7, 94, 8, 1], dtype=np.int64)
    (entry,) = stub.Lookup(lookup_request("demo", ("item", keys)), timeout=5).tables
    assert entry.dtype == hps_pb2.FLOAT16
    assert len(entry.vectors) == 4 * 4 * 2
    np.testing.assert_array_equal(vectors_of(entry), item.expected(keys))
    assert np.all(vectors_of(entry)[2] == np.float16(0.5))


def test_several_tables_answer_in_request_order_even_the_same_table_twice(served: Served, stub: Any) -> None:
    request = lookup_request("demo", ("item", [1, 4]), ("user", [10, 11]), ("item", [7]), ("user", []))
    response = stub.Lookup(request, timeout=5)
    assert [t.table for t in response.tables] == ["item", "user", "item", "user"]
    np.testing.assert_array_equal(vectors_of(response.tables[0]), served.data["item"].expected([1, 4]))
    np.testing.assert_array_equal(vectors_of(response.tables[1]), served.data["user"].expected([10, 11]))
    np.testing.assert_array_equal(vectors_of(response.tables[2]), served.data["item"].expected([7]))
    assert response.tables[3].count == 0 and response.tables[3].vectors == b""


# -- bad input: status code and a message naming the problem ----------------------------------


def test_keys_buffer_not_a_multiple_of_8_is_invalid_argument(stub: Any) -> None:
    error = rpc_error(stub.Lookup, lookup_request("demo", ("user", b"\x01" * 12)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 bytes" in error.details() and "int64" in error.details() and "user" in error.details()


def test_key_dtype_other_than_int64_is_invalid_argument(stub: Any) -> None:
    request = hps_pb2.LookupRequest(model="demo")
    request.tables.add(table="user", keys=np.arange(4, dtype="<i4").tobytes(), key_dtype=hps_pb2.INT32)
    error = rpc_error(stub.Lookup, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key_dtype INT32" in error.details() and "INT64" in error.details()


@pytest.mark.parametrize(
    ("model", "table", "code", "words"),
    [
        ("", "user", grpc.StatusCode.INVALID_ARGUMENT, ["model name is empty"]),
        ("nope", "user", grpc.StatusCode.NOT_FOUND, ["'nope'", "demo"]),
        ("demo", "", grpc.StatusCode.INVALID_ARGUMENT, ["table name is empty"]),
        ("demo", "nope", grpc.StatusCode.NOT_FOUND, ["'nope'", "item, user"]),
    ],
)
def test_empty_or_unknown_model_and_table(stub: Any, model: str, table: str, code: grpc.StatusCode,
                                          words: list[str]) -> None:  # fmt: skip
    error = rpc_error(stub.Lookup, lookup_request(model, (table, [1, 2])))
    assert error.code() == code
    for word in words:
        assert word in error.details()


@pytest.mark.parametrize("which", ["model", "table"])
def test_a_name_over_253_characters_is_invalid_argument_naming_the_limit_not_echoed(stub: Any, which: str) -> None:
    """A 16 KiB name used to come back RESOURCE_EXHAUSTED: the server echoed it whole into the error,
    which gRPC carries in a header too small for it."""
    long = "x" * 16384
    model, table = (long, "user") if which == "model" else ("demo", long)
    for call, request in (
        (stub.Lookup, lookup_request(model, (table, [1]))),
        (stub.Update, hps_pb2.UpdateRequest(model=model, table=table, keys=np.array([1], "<i8").tobytes(),
                                            vectors=np.zeros((1, 8), "<f4").tobytes())),
        (stub.Describe, hps_pb2.DescribeRequest(model=model)),
    ):
        if which == "table" and call is stub.Describe:
            continue
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "16384 characters" in error.details() and "at most 253" in error.details()
        assert len(error.details()) < 200
    assert stub.Lookup(lookup_request("demo", ("user", [1])), timeout=5).tables[0].count == 1


def test_undecodable_requests_are_invalid_argument_with_one_log_line_not_a_traceback_each(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rng = np.random.default_rng(3)
    with grpc.insecure_channel(served.endpoint) as channel:
        for method in ("Lookup", "Update", "Describe", "Stats"):
            raw = channel.unary_unary(f"/{SERVICE_NAME}/{method}")  # bytes in, bytes out: nothing checks them
            for _ in range(85):
                garbage = bytes([0xFF, 0xFF]) + rng.bytes(int(rng.integers(1, 64)))
                with pytest.raises(grpc.RpcError) as info:
                    raw(garbage, timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"not a valid hps.v1.{method}Request" in info.value.details()
        ok = hps_pb2_grpc.EmbeddingServiceStub(channel).Lookup(lookup_request("demo", ("user", [1])), timeout=5)
        assert ok.tables[0].count == 1
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a bad request"
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert 1 <= len(lines) <= 2  # rate-limited: one now, the next one at most every 10 s


def test_batch_over_max_batch_keys_is_resource_exhausted_naming_the_limit(stub: Any) -> None:
    request = lookup_request("demo", ("user", np.arange(600)), ("item", np.arange(401)))
    error = rpc_error(stub.Lookup, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "batch of 1001 keys exceeds max_batch_keys=1000"
    ok = stub.Lookup(lookup_request("demo", ("user", np.arange(600)), ("item", np.arange(400))), timeout=5)
    assert [t.count for t in ok.tables] == [600, 400]


def test_update_with_a_vectors_buffer_of_the_wrong_size_is_invalid_argument(stub: Any) -> None:
    request = hps_pb2.UpdateRequest(
        model="demo", table="user", keys=np.array([1, 4], dtype="<i8").tobytes(),
        vectors=np.zeros((2, 7), dtype="<f4").tobytes(), dtype=hps_pb2.FLOAT32,
    )  # fmt: skip
    error = rpc_error(stub.Update, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "56 bytes" in error.details() and "2 rows x dim 8" in error.details()


def test_update_with_an_unknown_vector_dtype_is_invalid_argument(stub: Any) -> None:
    request = hps_pb2.UpdateRequest(
        model="demo", table="user", keys=np.array([1], dtype="<i8").tobytes(),
        vectors=np.zeros((1, 8), dtype="<f8").tobytes(), dtype=9,  # type: ignore[arg-type]
    )  # fmt: skip
    error = rpc_error(stub.Update, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype 9" in error.details() and "FLOAT32" in error.details()


# -- updates, Describe, Stats -----------------------------------------------------------------


def test_update_is_visible_to_the_next_lookup_converting_the_dtype(served: Served, stub: Any) -> None:
    keys = np.array([4, 500], dtype=np.int64)  # one known key, one new
    new = np.array([[2.5] * 4, [-3.0] * 4], dtype=np.float32)  # float32 sent to a float16 table
    reply = stub.Update(hps_pb2.UpdateRequest(model="demo", table="item", keys=keys.astype("<i8").tobytes(),
                                              vectors=new.tobytes(), dtype=hps_pb2.FLOAT32), timeout=5)  # fmt: skip
    assert reply.updated == 2
    (entry,) = stub.Lookup(lookup_request("demo", ("item", [500, 4, 7])), timeout=5).tables
    got = vectors_of(entry)
    np.testing.assert_array_equal(got[:2], new[[1, 0]].astype(np.float16))
    np.testing.assert_array_equal(got[2], served.data["item"].expected([7])[0])


def test_describe_reports_tables_limits_and_device(stub: Any) -> None:
    info = stub.Describe(hps_pb2.DescribeRequest(model="demo"), timeout=5)
    assert info.model == "demo" and info.max_batch_keys == 1000 and info.device == "cpu"
    assert not info.degraded and info.partition == 0
    tables = {t.name: (t.rows, t.dim, t.dtype, t.default_value) for t in info.tables}
    assert tables == {"user": (64, 8, hps_pb2.FLOAT32, -1.0), "item": (32, 4, hps_pb2.FLOAT16, 0.5)}
    assert rpc_error(stub.Describe, hps_pb2.DescribeRequest(model="other")).code() == grpc.StatusCode.NOT_FOUND


def test_stats_count_lookups_keys_and_errors(stub: Any) -> None:
    stub.Lookup(lookup_request("demo", ("user", [1, 2, 3]), ("item", [1])), timeout=5)
    rpc_error(stub.Lookup, lookup_request("demo", ("nope", [1])))
    reply = stub.Stats(hps_pb2.StatsRequest(model="demo"), timeout=5)
    stats = json.loads(reply.stats_json)
    assert reply.model == "demo" and reply.degraded is False
    assert stats["server"]["lookups"] == 1 and stats["server"]["keys"] == 4
    assert stats["server"]["errors.not_found"] == 1
    assert isinstance(stats["lookup"], dict)


# -- health and reflection ---------------------------------------------------------------------


def test_a_port_already_served_is_refused_not_shared(served: Served) -> None:
    """gRPC binds with SO_REUSEPORT unless told not to: a second agent on the same port would share it
    and answer a share of the callers from its own, other tables. It must fail to bind instead."""
    with pytest.raises(UnavailableError, match=f"cannot listen on 127.0.0.1:{served.server.port}"):
        serve(served.lookup, model=served.model.name, port=served.server.port)
    with pytest.raises(InvalidArgumentError, match="port must be 0"):
        serve(served.lookup, model=served.model.name, port=70000)


def test_health_service_answers_serving_until_stopped(served: Served) -> None:
    with grpc.insecure_channel(served.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        served.server.set_serving(False)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_is_off_unless_asked_and_then_lists_the_embedding_service(served: Served) -> None:
    # off: reflection would list every service to anyone who reaches the port
    with grpc.insecure_channel(served.endpoint) as channel, pytest.raises(grpc.RpcError) as refused:
        list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    server = serve(served.lookup, model=served.model.name, reflection=True)
    try:
        with grpc.insecure_channel(server.endpoint) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert "hps.v1.EmbeddingService" in set(database.get_services())
            assert "grpc.health.v1.Health" in set(database.get_services())
            service = database.FindFileContainingSymbol("hps.v1.EmbeddingService")
            assert service.package == "hps.v1"
    finally:
        server.stop(0)


# -- the Lookup answer's wire bytes ------------------------------------------------------------


def _protobuf_response(entries: list[wire.TableVectors]) -> hps_pb2.LookupResponse:
    response = hps_pb2.LookupResponse()
    for e in entries:
        out = response.tables.add(table=e.table, dim=e.dim, dtype=e.dtype, count=e.count)
        if e.vectors is not None and e.vectors.size:
            out.vectors = e.vectors.tobytes()
    return response


def test_packed_lookup_answer_is_byte_for_byte_the_protobuf_message() -> None:
    rng = np.random.default_rng(5)
    entries = [
        wire.TableVectors("user", 8, hps_pb2.FLOAT32, 300, rng.standard_normal((300, 8)).astype("<f4")),
        wire.TableVectors("item", 4, hps_pb2.FLOAT16, 0, None),
        wire.TableVectors("ü" * 200, 3, hps_pb2.FLOAT16, 2, rng.standard_normal((2, 3)).astype("<f2")),
    ]
    data = wire.encode_lookup_response(entries)
    assert data == _protobuf_response(entries).SerializeToString()
    decoded = wire.decode_lookup_response(data)
    assert [(t.table, t.dim, t.dtype, t.count) for t in decoded.tables] == [
        (e.table, e.dim, e.dtype, e.count) for e in entries
    ]
    np.testing.assert_array_equal(decoded.tables[0].vectors, entries[0].vectors)
    assert decoded.tables[1].vectors is not None and decoded.tables[1].vectors.shape == (0, 4)
    np.testing.assert_array_equal(decoded.tables[2].vectors, entries[2].vectors)


def test_decoding_skips_fields_it_does_not_know_and_rejects_broken_messages() -> None:
    vectors = np.arange(6, dtype="<f4").reshape(2, 3)
    known = _protobuf_response([wire.TableVectors("t", 3, hps_pb2.FLOAT32, 2, vectors)]).SerializeToString()
    # a newer server's extra fields: a varint (field 9), a fixed64 (10), a fixed32 (11), a string (12)
    extra = bytes([9 << 3 | 0, 0x96, 0x01, 10 << 3 | 1, *range(8), 11 << 3 | 5, *range(4), 12 << 3 | 2, 2, 65, 66])
    (entry,) = wire.decode_lookup_response(extra + known + extra).tables
    np.testing.assert_array_equal(entry.vectors, vectors)

    with pytest.raises(InvalidArgumentError, match="past the end"):
        wire.decode_lookup_response(known[:-5])
    short = _protobuf_response([wire.TableVectors("t", 3, hps_pb2.FLOAT32, 3, vectors)]).SerializeToString()
    with pytest.raises(InvalidArgumentError, match="does not hold 3 rows"):
        wire.decode_lookup_response(short)
