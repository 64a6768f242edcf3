"""A test-only ``custom.metrics.k8s.io/v1beta2`` server, registered with the real API server's aggregation
layer (an APIService), so the real HPA controller reads per-pod lookup rates through the same API it
reads from prometheus-adapter in a cluster.

This is a stand-in for Prometheus and prometheus-adapter. Both build from the Go module proxy, but
building them (about 15 minutes on two cores) would push the test suite past its time budget, and
under kwok the agent pods run no process whose ``/metrics`` Prometheus could scrape. The chart ships
the real adapter rule (``charts/hps-operator/monitoring/``), which derives
``hps_lookup_requests_per_second`` as the rate of the agents' ``hps_lookup_requests_total``.

What it answers is what a load balancer in front of the model would produce: the test sets a
model's total lookup rate, and every partition sees every request batch (a lookup touches each
partition that owns some of its keys), spread over that partition's ready pods. So each agent pod's
rate is ``total / ready pods of its partition``, whatever the partition count.
"""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from e2e.control_plane import ControlPlane, free_port

GROUP_VERSION = "custom.metrics.k8s.io/v1beta2"
METRIC = "hps_lookup_requests_per_second"
#: the L1 rates the operator's partition autoscaler reads, as the adapter serves them
HIT_METRICS = ("hps_l1_hits_per_second", "hps_l1_misses_per_second")
SERVICE = "hps-test-custom-metrics"


class CustomMetrics:
    """The server, its per-model loads (``set_load``), and its APIService."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.loads: dict[tuple[str, str], float] = {}
        self.hit_rates: dict[tuple[str, str], tuple[float, float]] = {}
        self.requests = 0
        self._lock = threading.Lock()

    def set_load(self, namespace: str, model: str, per_second: float) -> None:
        with self._lock:
            self.loads[(namespace, model)] = per_second

    def set_l1(self, namespace: str, model: str, hits_per_s: float, misses_per_s: float) -> None:
        """The model's L1 hits and misses per second, summed over its agent pods."""
        with self._lock:
            self.hit_rates[(namespace, model)] = (hits_per_s, misses_per_s)

    def load(self, namespace: str, model: str) -> float:
        with self._lock:
            return self.loads.get((namespace, model), 0.0)

    # -- what the aggregator proxies here ------------------------------------------------------

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        if parts == ["apis", *GROUP_VERSION.split("/")]:
            return 200, {
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION,
                "resources": [{"name": f"pods/{m}", "singularName": "", "namespaced": True,
                               "kind": "MetricValueList", "verbs": ["get"]} for m in (METRIC, *HIT_METRICS)],
            }  # fmt: skip
        # /apis/custom.metrics.k8s.io/v1beta2/namespaces/NS/pods/NAME|*/METRIC
        if len(parts) == 8 and parts[3] == "namespaces" and parts[5] == "pods" and parts[7] in (METRIC, *HIT_METRICS):
            self.requests += 1
            namespace, name = parts[4], parts[6]
            selector = (query.get("labelSelector") or [""])[0]
            return 200, self._values(namespace, name, selector, parts[7])
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                     "message": f"no metric at {path}"}  # fmt: skip

    def _values(self, namespace: str, name: str, selector: str, metric: str = METRIC) -> dict[str, Any]:
        query = urllib.parse.urlencode({"labelSelector": selector}) if selector else ""
        pods = (self.plane.request("GET", f"/api/v1/namespaces/{namespace}/pods?{query}") or {}).get("items", [])
        if name != "*":
            pods = [p for p in pods if p["metadata"]["name"] == name]
        every = (self.plane.request("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector="
                                    + urllib.parse.quote("app.kubernetes.io/component=agent")) or {}).get("items", [])  # fmt: skip
        ready_by_partition: dict[tuple[str, str], int] = {}
        for pod in every:
            if _ready(pod):
                key = _partition(pod)
                ready_by_partition[key] = ready_by_partition.get(key, 0) + 1
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        items = []
        ready_pods = [pod for pod in pods if _ready(pod)]
        for pod in ready_pods:
            model, _ = key = _partition(pod)
            if metric == METRIC:
                rate = self.load(namespace, model) / max(1, ready_by_partition.get(key, 1))
            else:  # the model's L1 rates, spread evenly over the pods asked about
                with self._lock:
                    pair = self.hit_rates.get((namespace, model))
                if pair is None:
                    continue
                rate = pair[HIT_METRICS.index(metric)] / len(ready_pods)
            items.append({
                "describedObject": {"kind": "Pod", "namespace": namespace, "name": pod["metadata"]["name"],
                                    "apiVersion": "/v1"},
                "metric": {"name": metric},
                "timestamp": now,
                "windowSeconds": 60,
                "value": f"{round(rate * 1000)}m",
            })  # fmt: skip
        return {"kind": "MetricValueList", "apiVersion": GROUP_VERSION, "metadata": {}, "items": items}

    # -- serving and registering ---------------------------------------------------------------

    @contextmanager
    def serving(self) -> Iterator[CustomMetrics]:
        """Serves on a free loopback port and registers the APIService; undone on exit."""
        port = free_port()
        cert, key = self.plane.issue_server_cert("custom-metrics", "DNS:localhost,IP:127.0.0.1")
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                code, body = metrics.answer(url.path, urllib.parse.parse_qs(url.query))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, name="custom-metrics", daemon=True)
        thread.start()
        # the aggregator reaches it through an ExternalName Service (no kube-proxy runs here)
        self.plane.request("POST", "/api/v1/namespaces/default/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE},
            "spec": {"type": "ExternalName", "externalName": "localhost",
                     "ports": [{"name": "https", "port": port, "protocol": "TCP"}]},
        })  # fmt: skip
        api_service = {
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": f"v1beta2.{GROUP_VERSION.split('/')[0]}"},
            "spec": {"group": GROUP_VERSION.split("/")[0], "version": "v1beta2", "insecureSkipTLSVerify": True,
                     "service": {"namespace": "default", "name": SERVICE, "port": port},
                     "groupPriorityMinimum": 100, "versionPriority": 100},
        }  # fmt: skip
        self.plane.request("POST", "/apis/apiregistration.k8s.io/v1/apiservices", api_service)
        try:
            yield self
        finally:
            self.plane.request("DELETE", f"/apis/apiregistration.k8s.io/v1/apiservices/{api_service['metadata']['name']}")
            self.plane.request("DELETE", f"/api/v1/namespaces/default/services/{SERVICE}")
            server.shutdown()
            server.server_close()


def _ready(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions") or []
    )


def _partition(pod: dict[str, Any]) -> tuple[str, str]:
    labels = pod["metadata"].get("labels") or {}
    return labels.get("app.kubernetes.io/instance", ""), labels.get("hps.dev/partition", "")
