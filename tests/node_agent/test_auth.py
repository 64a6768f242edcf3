"""Who may call the agent (``node_agent.auth`` at the gRPC edge), over real loopback sockets: Update
without a credential or with a bad one is refused and writes nothing, and the refusals are counted in
the agent's Prometheus metrics; reads need a credential only when restricted; the health service
stays open. Kubernetes tokens go through TokenReview, answered here by a small HTTPS server that
implements the endpoint, a stand-in for the API server (none runs in these fast tests; the e2e
scenarios verify against the real one)."""

from __future__ import annotations

import json
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node_agent.auth import (
    AuthOptions,
    Identity,
    KubernetesAPI,
    Principals,
    RpcGuard,
    SharedToken,
    TokenReview,
    identity_of_review,
)
from node_agent.client import Client
from node_agent.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from node_agent.local.certificates import LocalCertificates, ensure_local_certificates
from node_agent.lookup import LookupPath, build_lookup_path
from node_agent.metrics import MetricsServer
from node_agent.proto.hps.v1 import hps_pb2, hps_pb2_grpc
from node_agent.server import RunningServer, serve
from node_agent.spec import load_model_file
from node_agent.tiers.hashmap import HashMapTier
from tests.node_agent.test_grpc import TableData, fill, layouts, write_model

TOKEN = "test-update-token"
ROW = np.full((1, 8), 3.25, np.float32)


@dataclass
class Served:
    data: dict[str, TableData]
    lookup: LookupPath
    servers: list[RunningServer] = field(default_factory=list)

    def serve(self, guard: RpcGuard) -> RunningServer:
        server = serve(self.lookup, model="demo", guard=guard)
        self.servers.append(server)
        return server

    def row(self, key: int) -> np.ndarray:
        """What the lookup path serves for ``key``, asked in process (no credential involved)."""
        return self.lookup.lookup("user", np.array([key], dtype=np.int64))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    path, data = write_model(tmp_path)
    model = load_model_file(path)
    tier = HashMapTier(layouts(model))
    fill(tier, data)
    lookup = build_lookup_path(model, volatile=tier, persistent=None, device="cpu")
    out = Served(data, lookup)
    yield out
    for server in out.servers:
        server.stop(0)
    lookup.close()


def update_request(key: int) -> hps_pb2.UpdateRequest:
    return hps_pb2.UpdateRequest(model="demo", table="user", keys=np.array([key], np.int64).tobytes(),
                                 key_dtype=hps_pb2.INT64, vectors=ROW.tobytes(), dtype=hps_pb2.FLOAT32)  # fmt: skip


def call_update(endpoint: str, key: int, token: str | None = None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    with grpc.insecure_channel(endpoint) as channel:
        try:
            hps_pb2_grpc.EmbeddingServiceStub(channel).Update(
                update_request(key), timeout=5, metadata=metadata
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def scrape(server: RunningServer) -> str:
    metrics = MetricsServer(server.servicer, partition=0, host="127.0.0.1", port=0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    finally:
        metrics.stop()


def test_update_without_a_credential_or_with_a_bad_one_is_refused_writes_nothing_and_is_counted(
    served: Served,
) -> None:
    server = served.serve(RpcGuard([SharedToken(value=TOKEN)]))
    before = served.row(4)
    assert call_update(server.endpoint, 4) == grpc.StatusCode.UNAUTHENTICATED
    assert call_update(server.endpoint, 4, token="not-the-token") == grpc.StatusCode.UNAUTHENTICATED
    np.testing.assert_array_equal(served.row(4), before)  # nothing written
    with (
        Client(server.endpoint, retries=0) as client,
        pytest.raises(UnauthenticatedError, match=r"Update needs a credential.*\(this client sent none\)"),
    ):
        client.update("demo", "user", [4], ROW)
    np.testing.assert_array_equal(served.row(4), before)
    text = scrape(server)
    assert 'hps_rpc_errors_total{code="unauthenticated",model="demo",partition="0"} 3.0' in text
    with Client(server.endpoint, token=TOKEN) as client:  # the right token writes
        assert client.update("demo", "user", [4], ROW) == 1
    np.testing.assert_array_equal(served.row(4), ROW)
    assert server.servicer.snapshot()["auth"]["refused"] == {"unauthenticated": 3}


def test_a_bad_credential_is_refused_before_the_request_is_looked_at(served: Served) -> None:
    """An unauthenticated caller learns nothing: not whether the model or table exists."""
    server = served.serve(RpcGuard([SharedToken(value=TOKEN)]))
    with grpc.insecure_channel(server.endpoint) as channel, pytest.raises(grpc.RpcError) as refused:
        hps_pb2_grpc.EmbeddingServiceStub(channel).Update(
            hps_pb2.UpdateRequest(model="secret-model"), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "secret-model" not in (refused.value.details() or "")


def test_an_agent_with_no_credential_source_refuses_every_update_naming_the_flags(served: Served) -> None:
    server = served.serve(AuthOptions().guard())  # what hps agent runs with when given no --auth-* flag
    with (
        Client(server.endpoint, token=TOKEN, retries=0) as client,
        pytest.raises(
            UnauthenticatedError, match="--auth-token-file, --auth-token-env or --auth-tokenreview"
        ),
    ):
        client.update("demo", "user", [4], ROW)
        keys = [1, 4]
        np.testing.assert_array_equal(client.lookup("demo", "user", keys), served.data["user"].expected(keys))


def test_reads_need_a_credential_only_when_restricted_and_health_stays_open(served: Served) -> None:
    server = served.serve(RpcGuard([SharedToken(value=TOKEN)], readers=Principals()))
    with Client(server.endpoint, retries=0) as anonymous:
        for read in (lambda: anonymous.lookup("demo", "user", [1]), lambda: anonymous.describe("demo"),
                     lambda: anonymous.stats("demo")):  # fmt: skip
            with pytest.raises(UnauthenticatedError, match="needs a credential"):
                read()
    with grpc.insecure_channel(server.endpoint) as channel:  # kubelet's probes send no credential
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with Client(server.endpoint, token=TOKEN) as client:
        np.testing.assert_array_equal(client.lookup("demo", "user", [1]), served.data["user"].expected([1]))
    open_reads = served.serve(RpcGuard([SharedToken(value=TOKEN)]))
    with Client(open_reads.endpoint) as anonymous:
        assert anonymous.describe("demo").model == "demo"


def test_a_shared_token_file_is_read_again_when_rotated(served: Served, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    server = served.serve(RpcGuard([SharedToken(file=token_file)]))
    assert call_update(server.endpoint, 4, token="first-token") == grpc.StatusCode.OK
    partial = tmp_path / "token.new"
    partial.write_text("second-token\n")
    partial.replace(token_file)
    assert call_update(server.endpoint, 4, token="first-token") == grpc.StatusCode.UNAUTHENTICATED
    assert call_update(server.endpoint, 4, token="second-token") == grpc.StatusCode.OK


def test_the_client_reads_a_rotated_token_file_too(served: Served, tmp_path: Path, monkeypatch: Any) -> None:
    server = served.serve(RpcGuard([SharedToken(value="second-token")]))
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with (
        Client(server.endpoint, token_file=token_file, retries=0) as client,
        pytest.raises(UnauthenticatedError, match="not valid here"),
    ):
        client.update("demo", "user", [4], ROW)
        partial = tmp_path / "token.new"
        partial.write_text("second-token\n")
        partial.replace(token_file)
        monkeypatch.setattr("node_agent.client.time.monotonic", lambda: 1e12)  # past the client's 1 s look
        assert client.update("demo", "user", [4], ROW) == 1


# -- TokenReview -------------------------------------------------------------------------------

AGENT_SA_TOKEN = "the-agents-own-service-account-token"


@dataclass
class FakeAPIServer:
    """A small HTTPS server answering ``POST /apis/authentication.k8s.io/v1/tokenreviews`` from a table
    of known tokens, as the API server does: a stand-in (see the module doc), recording each review."""

    certs: LocalCertificates
    users: dict[str, tuple[str, list[str], list[str]]]  # token -> (username, groups, audiences)
    status: int = 201
    reviews: list[dict[str, Any]] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.reviews.append(body)
                fake.callers.append(self.headers.get("Authorization", ""))
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews" or fake.status != 201:
                    self.send_response(fake.status if fake.status != 201 else 404)
                    self.end_headers()
                    self.wfile.write(b'{"kind":"Status","message":"tokenreviews is forbidden"}')
                    return
                known = fake.users.get(body["spec"]["token"])
                wanted = body["spec"].get("audiences") or ["https://kubernetes.default.svc"]
                status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
                if known is not None and set(known[2]) & set(wanted):
                    status = {"authenticated": True, "user": {"username": known[0], "groups": known[1]},
                              "audiences": sorted(set(known[2]) & set(wanted))}  # fmt: skip
                answer = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                          "spec": body["spec"], "status": status}  # fmt: skip
                payload = json.dumps(answer).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certs.cert_file, self.certs.key_file)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


TRAINER = "system:serviceaccount:ml:trainer"
FRONTEND = "system:serviceaccount:web:frontend"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeAPIServer, KubernetesAPI]]:
    certs = ensure_local_certificates(tmp_path / "api-ca")
    fake = FakeAPIServer(certs, {
        "trainer-token": (TRAINER, ["system:serviceaccounts", "system:serviceaccounts:ml"], ["hps.dev"]),
        "frontend-token": (FRONTEND, ["system:serviceaccounts", "system:serviceaccounts:web"], ["hps.dev"]),
        "other-audience-token": (TRAINER, ["system:serviceaccounts:ml"], ["vault"]),
    })  # fmt: skip
    url = fake.start()
    sa_token = tmp_path / "sa-token"
    sa_token.write_text(AGENT_SA_TOKEN + "\n")
    yield fake, KubernetesAPI(url, sa_token, certs.ca_file)
    fake.stop()


def test_tokenreview_lets_the_listed_writers_write_and_refuses_the_rest(
    served: Served, api: tuple[FakeAPIServer, KubernetesAPI]
) -> None:
    fake, kube = api
    guard = AuthOptions(tokenreview=kube, audiences=("hps.dev",), writers=Principals.parse(TRAINER)).guard()
    server = served.serve(guard)
    before = served.row(10)
    assert call_update(server.endpoint, 10, token="frontend-token") == grpc.StatusCode.PERMISSION_DENIED
    assert call_update(server.endpoint, 10, token="made-up-token") == grpc.StatusCode.UNAUTHENTICATED
    assert call_update(server.endpoint, 10, token="other-audience-token") == grpc.StatusCode.UNAUTHENTICATED
    np.testing.assert_array_equal(served.row(10), before)
    with (
        Client(server.endpoint, token="frontend-token", retries=0) as client,
        pytest.raises(PermissionDeniedError, match=f"{FRONTEND} may not call Update on model demo"),
    ):
        client.update("demo", "user", [10], ROW)
    with Client(server.endpoint, token="trainer-token") as client:
        assert client.update("demo", "user", [10], ROW) == 1
        assert client.update("demo", "user", [13], ROW) == 1  # the same token again: answered from the cache
    np.testing.assert_array_equal(served.row(10), ROW)
    # each review carried the agent's own token and asked for the audience; the trainer's token once
    assert set(fake.callers) == {f"Bearer {AGENT_SA_TOKEN}"}
    assert all(r["spec"]["audiences"] == ["hps.dev"] for r in fake.reviews)
    assert [r["spec"]["token"] for r in fake.reviews].count("trainer-token") == 1
    text = scrape(server)
    assert 'hps_rpc_errors_total{code="permission_denied",model="demo",partition="0"} 2.0' in text
    assert 'hps_rpc_errors_total{code="unauthenticated",model="demo",partition="0"} 2.0' in text


def test_tokenreview_writers_by_group_and_readers_when_reads_are_restricted(
    served: Served, api: tuple[FakeAPIServer, KubernetesAPI]
) -> None:
    _, kube = api
    guard = AuthOptions(tokenreview=kube, audiences=("hps.dev",),
                        writers=Principals.parse("group:system:serviceaccounts:ml"),
                        readers=Principals.parse(FRONTEND, flag="--auth-readers")).guard()  # fmt: skip
    server = served.serve(guard)
    assert call_update(server.endpoint, 10, token="trainer-token") == grpc.StatusCode.OK
    with Client(server.endpoint, token="frontend-token", retries=0) as reader:
        np.testing.assert_array_equal(reader.lookup("demo", "user", [10]), ROW)  # a reader reads
        with pytest.raises(PermissionDeniedError):
            reader.update("demo", "user", [10], ROW)  # and does not write
    with Client(server.endpoint, token="trainer-token") as writer:
        assert writer.describe("demo").model == "demo"  # writers read too


def test_an_api_server_that_cannot_answer_is_unavailable_never_a_pass(
    served: Served, api: tuple[FakeAPIServer, KubernetesAPI], tmp_path: Path
) -> None:
    fake, kube = api
    fake.status = 403  # the agent's service account may not create tokenreviews
    server = served.serve(AuthOptions(tokenreview=kube, writers=Principals.parse(TRAINER)).guard())
    before = served.row(10)
    with (
        Client(server.endpoint, token="trainer-token", retries=0) as client,
        pytest.raises(UnavailableError, match=r"HTTP 403.*ClusterRole system:auth-delegator"),
    ):
        client.update("demo", "user", [10], ROW)
    gone = KubernetesAPI("https://127.0.0.1:1", kube.token_file, kube.ca_file)
    nobody = served.serve(AuthOptions(tokenreview=gone, writers=Principals.parse(TRAINER)).guard())
    with (
        Client(nobody.endpoint, token="trainer-token", retries=0) as client,
        pytest.raises(UnavailableError, match=r"TokenReview at https://127\.0\.0\.1:1 failed"),
    ):
        client.update("demo", "user", [10], ROW)
    np.testing.assert_array_equal(served.row(10), before)


def test_tokenreview_caches_by_digest_and_forgets_refusals_sooner(
    api: tuple[FakeAPIServer, KubernetesAPI],
) -> None:
    fake, kube = api
    now = [0.0]
    review = TokenReview(
        kube, audiences=("hps.dev",), cache_s=60.0, negative_cache_s=5.0, clock=lambda: now[0]
    )
    assert review.authenticate("trainer-token") == Identity(TRAINER, ("system:serviceaccounts",
                                                                       "system:serviceaccounts:ml"))  # fmt: skip
    assert review.authenticate("nope") is None
    now[0] = 30.0
    review.authenticate("trainer-token")
    review.authenticate("nope")  # asked again: a refusal is kept 5 s only
    now[0] = 61.0
    review.authenticate("trainer-token")
    assert [r["spec"]["token"] for r in fake.reviews] == ["trainer-token", "nope", "nope", "trainer-token"]


def test_a_review_must_name_an_audience_asked_for() -> None:
    answer = {"status": {"authenticated": True, "user": {"username": TRAINER}, "audiences": []}}
    assert identity_of_review(answer, audiences=("hps.dev",)) is None  # an API server ignoring audiences
    assert identity_of_review(answer) == Identity(TRAINER)
    assert identity_of_review({"status": {"authenticated": False}}) is None


def test_writers_and_options_that_cannot_work_are_errors_naming_the_flag() -> None:
    with pytest.raises(InvalidArgumentError, match="--auth-writers: 'system:serviceaccount:ml' is not"):
        Principals.parse("system:serviceaccount:ml")
    with pytest.raises(InvalidArgumentError, match="--no-auth contradicts"):
        AuthOptions(token="t", no_auth=True).guard()
    with pytest.raises(InvalidArgumentError, match="--auth-reads needs a way to check credentials"):
        AuthOptions(readers=Principals()).guard()
    with pytest.raises(InvalidArgumentError, match="--auth-audience needs --auth-tokenreview"):
        AuthOptions(token="t", audiences=("hps.dev",)).guard()
    with pytest.raises(InvalidArgumentError, match="holds spaces"):
        SharedToken(value="two words")


def test_no_auth_opens_writes_only(served: Served) -> None:
    server = served.serve(AuthOptions(no_auth=True).guard())
    assert call_update(server.endpoint, 4) == grpc.StatusCode.OK
    np.testing.assert_array_equal(served.row(4), ROW)
