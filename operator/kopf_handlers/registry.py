"""Wires the operator's kopf handlers into a registry: which events trigger a reconcile, and how kopf
logs in. Every handler is a few lines that end in :func:`embedding_model.reconcile_model`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import kopf
from hps_operator.core.reconcile import INSTANCE_LABEL, Options
from hps_operator.kopf_handlers.embedding_model import CHILD_KINDS, MODEL_API_VERSION, reconcile_model
from hps_operator.kopf_handlers.kube_api import KINDS, KubeApi, KubeApiError
from hps_operator.metrics import OperatorMetrics

from node_agent.spec import API_GROUP, API_VERSION, KIND

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
PLURAL = KINDS[(MODEL_API_VERSION, KIND)].plural


@dataclass(frozen=True)
class OperatorConfig:
    options: Options
    #: seconds between drift checks of each model (a deleted child is also noticed by its event)
    resync_seconds: float = 60.0
    #: serve Prometheus metrics on this port from start-up to clean-up (None: no endpoint; 0: any free port)
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"
    #: what the handlers record; read ``metrics.port`` for the port actually bound
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)


def build_registry(config: OperatorConfig, *, api: KubeApi | None = None) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator. ``api`` defaults to the in-cluster service
    account or the kubeconfig, and kopf logs in with the same credentials."""
    registry = kopf.OperatorRegistry()
    state: dict[str, KubeApi] = {}

    def kube() -> KubeApi:
        if "api" not in state:
            state["api"] = api or KubeApi.from_environment()
        return state["api"]

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube().connection_info()

    @kopf.on.startup(registry=registry)
    def serve_metrics(logger: kopf.Logger, **_: Any) -> None:
        if config.metrics_port is not None:
            port = config.metrics.serve(config.metrics_port, config.metrics_address)
            logger.info("serving Prometheus metrics on %s:%d/metrics", config.metrics_address, port)

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        config.metrics.stop()
        if "api" in state and api is None:
            state.pop("api").close()

    def reconcile(body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        reconcile_model(kube(), body, options=config.options, logger=logger, metrics=config.metrics)

    @kopf.on.resume(API_GROUP, API_VERSION, PLURAL, registry=registry, id="resumed")
    @kopf.on.create(API_GROUP, API_VERSION, PLURAL, registry=registry, id="created")
    @kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec", registry=registry, id="updated")
    def model_changed(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        reconcile(body, logger)

    @kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=config.resync_seconds, registry=registry)
    def resync(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        """Drift and rollout progress: a child changed behind our back, or a phase's wait is over."""
        reconcile(body, logger)

    def child_changed(body: kopf.Body, event: kopf.RawEvent, logger: kopf.Logger, **_: Any) -> None:
        """A child was deleted, or a workload's status moved: reconcile its owner now."""
        owner = next((ref for ref in body.metadata.get("ownerReferences") or []
                      if ref.get("kind") == KIND and ref.get("apiVersion") == MODEL_API_VERSION), None)  # fmt: skip
        if owner is None or not body.metadata.namespace:
            return
        if event["type"] not in ("DELETED", "MODIFIED", None):
            return
        model = {"metadata": {"namespace": body.metadata.namespace, "name": owner["name"]}}
        try:
            reconcile_model(kube(), model, options=config.options, logger=logger, metrics=config.metrics)
        except KubeApiError as exc:
            logger.warning("reconciling %s after a child's event failed: %s", owner["name"], exc)

    labels: dict[str, Any] = {MANAGED_BY_LABEL: "hps-operator", INSTANCE_LABEL: kopf.PRESENT}
    for api_version, kind in CHILD_KINDS:
        group, _, version = api_version.rpartition("/")
        kopf.on.event(group, version, KINDS[(api_version, kind)].plural, labels=labels,
                      registry=registry, id=f"child-{kind.lower()}")(child_changed)  # fmt: skip
    return registry


def configure(settings: kopf.OperatorSettings) -> None:
    """Settings every deployment wants: events and status under our own names, and no scanning.

    Scanning off: kopf neither watches CustomResourceDefinitions nor lists namespaces, so the operator
    needs no cluster-wide read of either (least privilege). It discovers its resources once at start
    (API discovery, open to every authenticated client); a CRD installed later is served after a
    restart, and ``--namespace`` takes exact names, not globs."""
    settings.scanning.disabled = True
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.WARNING  # our own events are posted explicitly
