"""The operator's Prometheus metrics: how its reconciles go and what each EmbeddingModel reports.

One :class:`OperatorMetrics` per operator holds its own registry (so two operators in one process, as
in tests, never share series) and serves it over HTTP (``/metrics``) on the port the chart names in
``HPS_OPERATOR_METRICS_PORT``. Per-model series are dropped when the model is deleted.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Idle", "Warming", "Switching", "Draining")
CONDITIONS = ("Ready", "Placed", "Loaded", "Progressing", "Degraded")
_MODEL = ("namespace", "model")


class OperatorMetrics:
    """Counters and gauges the handler updates after each reconcile; thread-safe (kopf runs sync
    handlers in a thread pool)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("hps_operator_reconciles", "Reconciles of EmbeddingModels by result "
                                  "(Reconciled, InvalidSpec, InsufficientGPUMemory, Error).", ["result"], registry=r)  # fmt: skip
        self.duration = Histogram("hps_operator_reconcile_duration_seconds", "Time one reconcile took, "
                                  "reading the cluster and writing to it included.", registry=r,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))  # fmt: skip
        self.leader = Gauge("hps_operator_leader", "1 while this replica reconciles (it holds the leader Lease, "
                            "or runs without leader election), 0 while it waits to take over.", registry=r)  # fmt: skip
        self.plan_version = Gauge(
            "hps_model_plan_version", "Version of the newest placement plan.", _MODEL, registry=r
        )
        self.imbalance = Gauge("hps_model_plan_imbalance", "Max over mean expected lookup load per GPU of the "
                               "newest plan.", _MODEL, registry=r)  # fmt: skip
        self.moved_bytes = Gauge("hps_model_plan_moved_bytes", "Bytes the newest plan moved against the one "
                                 "before it.", _MODEL, registry=r)  # fmt: skip
        self.rollout_phase = Gauge("hps_model_rollout_phase", "1 for the phase the plan rollout is in "
                                   "(Idle, Warming, Switching, Draining), 0 for the others.", [*_MODEL, "phase"],
                                   registry=r)  # fmt: skip
        self.replicas = Gauge("hps_model_replicas", "Replicas whose every partition has an agent pod.", _MODEL,
                              registry=r)  # fmt: skip
        self.ready_replicas = Gauge("hps_model_ready_replicas", "Replicas whose every partition has a ready "
                                    "agent pod.", _MODEL, registry=r)  # fmt: skip
        self.desired_replicas = Gauge("hps_model_desired_replicas", "spec.replicas.", _MODEL, registry=r)
        self.condition = Gauge("hps_model_condition", "1 when the condition is True, 0 otherwise.",
                               [*_MODEL, "condition"], registry=r)  # fmt: skip
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- recording --------------------------------------------------------------------------------

    def observe_reconcile(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result=result).inc()
        self.duration.observe(seconds)

    def observe_model(
        self, namespace: str, name: str, *, spec: Mapping[str, Any], status: Mapping[str, Any]
    ) -> None:
        """Sets the model's gauges from the status the operator just computed."""
        placement = status.get("placement") or {}
        if "version" in placement:
            self.plan_version.labels(namespace, name).set(placement["version"])
            self.imbalance.labels(namespace, name).set(placement.get("imbalance", 1.0))
            self.moved_bytes.labels(namespace, name).set(placement.get("movedBytes", 0))
        phase = (status.get("rebalance") or {}).get("phase", "Idle")
        for known in PHASES:
            self.rollout_phase.labels(namespace, name, known).set(1 if known == phase else 0)
        self.replicas.labels(namespace, name).set(status.get("replicas", 0))
        self.ready_replicas.labels(namespace, name).set(status.get("readyReplicas", 0))
        desired = spec.get("replicas")
        if isinstance(desired, int) and not isinstance(desired, bool):
            self.desired_replicas.labels(namespace, name).set(desired)
        by_type = {c.get("type"): c.get("status") for c in status.get("conditions") or ()}
        for condition in CONDITIONS:
            self.condition.labels(namespace, name, condition).set(
                1 if by_type.get(condition) == "True" else 0
            )

    def forget_model(self, namespace: str, name: str) -> None:
        """Drops a deleted model's series, so dashboards do not show it forever."""
        for gauge in (self.plan_version, self.imbalance, self.moved_bytes, self.replicas, self.ready_replicas,
                      self.desired_replicas):  # fmt: skip
            _remove(gauge, namespace, name)
        for phase in PHASES:
            _remove(self.rollout_phase, namespace, name, phase)
        for condition in CONDITIONS:
            _remove(self.condition, namespace, name, condition)

    # -- serving ----------------------------------------------------------------------------------

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Serves ``/metrics`` on ``address:port`` (``port`` 0 picks a free one) in a daemon thread
        until :meth:`stop`; returns the port."""
        with self._lock:
            if self._server is None:
                self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
                self.port = int(self._server.server_port)
            return int(self.port or 0)

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                if self._thread is not None:
                    self._thread.join(timeout=5)
            self._server, self._thread, self.port = None, None, None


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set for this model
        gauge.remove(*labels)
