"""Prometheus metrics of a node agent, read at scrape time from what the agent already counts, so
the lookup path does no extra work for them.

``hps_lookup_requests_total`` is what autoscaling reads: the operator's HPA asks for
``hps_lookup_requests_per_second``, which prometheus-adapter derives as its rate (docs/operations.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector


class StatsSnapshot(Protocol):
    """What the collector reads: the same snapshot the Stats RPC answers with."""

    def snapshot(self) -> Mapping[str, Any]: ...


class AgentCollector(Collector):
    """Turns one :meth:`StatsSnapshot.snapshot` into Prometheus families on every scrape."""

    def __init__(self, source: StatsSnapshot, *, partition: int) -> None:
        self._source = source
        self._partition = str(partition)

    def collect(self) -> Iterator[Metric]:
        stats = self._source.snapshot()
        base = {"model": str(stats["model"]), "partition": self._partition}
        server: Mapping[str, int] = stats.get("server", {})

        def family(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str,
                   extra: tuple[str, ...] = ()) -> Any:  # fmt: skip
            return kind(name, doc, labels=[*base, *extra])

        requests = family(CounterMetricFamily, "hps_lookup_requests", "Lookup RPCs answered")
        requests.add_metric(list(base.values()), server.get("lookups", 0))
        yield requests
        keys = family(CounterMetricFamily, "hps_lookup_keys", "keys asked for by answered Lookup RPCs")
        keys.add_metric(list(base.values()), server.get("keys", 0))
        yield keys
        errors = family(CounterMetricFamily, "hps_rpc_errors", "RPCs refused, by gRPC status code", ("code",))
        for name, value in sorted(server.items()):
            if name.startswith("errors."):
                errors.add_metric([*base.values(), name.removeprefix("errors.")], value)
        yield errors
        degraded = family(GaugeMetricFamily, "hps_agent_degraded", "1 while a tier or the update stream is down")
        degraded.add_metric(list(base.values()), 1.0 if stats.get("degraded") else 0.0)
        yield degraded
        yield from self._l1_families(base, stats.get("lookup", {}).get("tables", {}))
        updates: Mapping[str, Any] = stats.get("updates", {})
        if updates:
            applied = family(CounterMetricFamily, "hps_updates_applied", "update stream entries applied")
            applied.add_metric(list(base.values()), updates.get("applied_entries", 0))
            yield applied
            # what the update-lag alert reads: how late the last update reached this agent's lookups
            lag = family(GaugeMetricFamily, "hps_update_lag_seconds",
                         "time from the publication of the last update applied to its being visible here")  # fmt: skip
            lag.add_metric(list(base.values()), float(updates.get("lag_ms_last") or 0.0) / 1000.0)
            yield lag
            behind = updates.get("entries_behind")
            if behind is not None:
                pending = family(GaugeMetricFamily, "hps_updates_behind", "update stream entries not yet read")
                pending.add_metric(list(base.values()), float(behind))
                yield pending

    def _l1_families(self, base: Mapping[str, str], tables: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        labels = [*base, "table"]
        hits = CounterMetricFamily("hps_l1_hits", "L1 cache hits (distinct keys)", labels=labels)
        misses = CounterMetricFamily("hps_l1_misses", "L1 cache misses (distinct keys)", labels=labels)
        rows = GaugeMetricFamily("hps_l1_rows", "rows the L1 cache holds", labels=labels)
        capacity = GaugeMetricFamily("hps_l1_capacity_rows", "rows the L1 cache can hold", labels=labels)
        for table, entry in sorted(tables.items()):
            values = [*base.values(), table]
            hits.add_metric(values, entry.get("hits", 0))
            misses.add_metric(values, entry.get("misses", 0))
            rows.add_metric(values, entry.get("size", 0))
            capacity.add_metric(values, entry.get("capacity_rows", 0))
        yield from (hits, misses, rows, capacity)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """``/metrics`` over HTTP on its own thread, and ``/healthz`` (200 while ``healthy()`` says so,
    else 503): what a pod's probes read when its gRPC port speaks TLS, which the kubelet's gRPC probe
    cannot. :meth:`stop` ends it."""

    def __init__(self, source: StatsSnapshot, *, partition: int, host: str, port: int,
                 healthy: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(source, partition=partition))
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok = healthy() if healthy is not None else True
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"serving\n" if ok else b"not serving\n"]
            return metrics(environ, start_response)

        self._server: WSGIServer = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
