"""Wires the operator's kopf handlers into a registry: which events trigger a reconcile, and how kopf
logs in. Every handler is a few lines that end in :func:`embedding_model.reconcile_model`."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
from hps_operator.core.reconcile import INSTANCE_LABEL, Options
from hps_operator.core.render.meta import MANAGED_BY
from hps_operator.kopf_handlers.embedding_model import (
    CHILD_KINDS,
    MODEL_API_VERSION,
    delete_cluster_bindings,
    model_exists,
    model_lock,
    reconcile_model,
)
from hps_operator.kopf_handlers.kube_api import KINDS, KubeApi, KubeApiError
from hps_operator.metrics import OperatorMetrics

from node_agent.errors import UnavailableError
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
    #: where the metrics endpoint listens (loopback unless told: the chart gives the pod's IP)
    metrics_address: str = "127.0.0.1"
    #: what the handlers record; read ``metrics.port`` for the port actually bound
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    #: the User-Agent of the handlers' requests (names this replica in the API server's audit log)
    user_agent: str = "hps-operator"


def build_registry(config: OperatorConfig, *, api: KubeApi | None = None) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator. ``api`` defaults to the in-cluster service
    account or the kubeconfig, and kopf logs in with the same credentials."""
    registry = kopf.OperatorRegistry()
    state: dict[str, KubeApi] = {}

    def kube() -> KubeApi:
        if "api" not in state:
            state["api"] = api or KubeApi.from_environment(user_agent=config.user_agent)
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

    @kopf.on.startup(registry=registry)
    def sweep_cluster_bindings(logger: kopf.Logger, **_: Any) -> None:
        """The TokenReview bindings of models deleted while no operator ran (see ``model_deleted``)."""

        def still_there(namespace: str, name: str, uid: str) -> bool:
            try:
                return model_exists(kube(), namespace, name, uid)
            except (KubeApiError, UnavailableError):
                return True  # unknown (another operator's namespace, an API hiccup): keep it

        try:
            delete_cluster_bindings(kube(), keep=still_there, logger=logger)
        except KubeApiError as exc:
            if exc.status == 403:  # the chart's rbac.tokenReview is off: the operator makes no binding
                logger.info("not sweeping ClusterRoleBindings: not permitted (the chart's rbac.tokenReview is off)")
            else:
                logger.warning("could not look for the ClusterRoleBindings of deleted models: %s", exc)
        except UnavailableError as exc:
            logger.warning("could not look for the ClusterRoleBindings of deleted models: %s", exc)

    @kopf.on.delete(API_GROUP, API_VERSION, PLURAL, registry=registry, id="deleted", optional=True)
    def model_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        """A model's ClusterRoleBinding goes with it (the garbage collector takes the rest, owned).
        Never fails: a deletion must not wait on it, and the next start sweeps what was left. It takes
        the model's lock first: a reconcile that began before the deletion could otherwise apply the
        binding again after it was deleted (later ones see the deletion and write nothing)."""
        uid = str(body.metadata.uid or "")
        if not uid:
            return
        try:
            with model_lock(str(body.metadata.namespace), str(body.metadata.name)):
                delete_cluster_bindings(kube(), keep=lambda *_: False, logger=logger, uid=uid)
        except KubeApiError as exc:
            if exc.status != 403:  # 403: the chart's rbac.tokenReview is off, so there is no binding
                logger.warning("could not delete the model's ClusterRoleBinding (retried at the next start): %s", exc)
        except UnavailableError as exc:
            logger.warning("could not delete the model's ClusterRoleBinding (retried at the next start): %s", exc)

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

    pending = PendingReconciles()

    def child_changed(body: kopf.Body, event: kopf.RawEvent, logger: kopf.Logger, **_: Any) -> None:
        """A child was deleted, or a workload's status moved: reconcile its owner now.

        The initial listing (event type None, at start and after a relist) is no change: the model's
        own resume handler reconciles it once. Events that arrive while a reconcile of the same
        model waits for its turn join that one instead of queueing one reconcile each."""
        owner = next((ref for ref in body.metadata.get("ownerReferences") or []
                      if ref.get("kind") == KIND and ref.get("apiVersion") == MODEL_API_VERSION), None)  # fmt: skip
        if owner is None or not body.metadata.namespace or event["type"] not in ("DELETED", "MODIFIED"):
            return
        reconcile_child_owner(body.metadata.namespace, owner["name"], logger)

    @kopf.index(API_GROUP, API_VERSION, PLURAL, registry=registry, id="models_by_key")
    def models_by_key(body: kopf.Body, **_: Any) -> dict[tuple[str, str], bool]:
        """Every model this operator serves (what a node change may concern)."""
        return {(str(body.metadata.namespace), str(body.metadata.name)): True}

    nodes_seen: dict[str, str] = {}

    @kopf.on.event("", "v1", "nodes", registry=registry)
    def node_changed(body: kopf.Body, event: kopf.RawEvent, logger: kopf.Logger, **kwargs: Any) -> None:
        """A node joined, left, or changed what scheduling reads (labels, taints, allocatable GPUs,
        cordon): reconcile the models, each of which re-plans only if its own GPU budget moved.
        Heartbeats and condition updates change none of that and are ignored, as is the initial
        listing (every model is reconciled at start anyway)."""
        name = body.metadata.name or ""
        if event["type"] == "DELETED":
            changed = nodes_seen.pop(name, None) is not None
        else:
            fingerprint = node_fingerprint(body)
            changed = nodes_seen.get(name) not in (None, fingerprint) or (
                name not in nodes_seen and event["type"] == "ADDED")  # fmt: skip
            nodes_seen[name] = fingerprint
        if not changed:
            return
        models: kopf.Index[tuple[str, str], bool] = kwargs["models_by_key"]  # kopf passes indices by name
        logger.info("node %s %s: reconciling %d model(s)", name, str(event["type"]).lower(), len(models))
        for namespace, model_name in list(models):
            reconcile_child_owner(namespace, model_name, logger)

    def reconcile_child_owner(namespace: str, name: str, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        key = (namespace, name)
        if not pending.claim(key):
            return  # a reconcile of this model is already waiting: it will read this change
        model = {"metadata": {"namespace": namespace, "name": name}}
        try:
            # once the reconcile holds the lock, a new event needs a new reconcile
            reconcile_model(kube(), model, options=config.options, logger=logger, metrics=config.metrics,
                            on_locked=lambda: pending.release(key))  # fmt: skip
        except KubeApiError as exc:
            logger.warning("reconciling %s/%s after an event failed: %s", namespace, name, exc)
        finally:
            pending.release(key)

    labels: dict[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, INSTANCE_LABEL: kopf.PRESENT}
    for api_version, kind in CHILD_KINDS:
        group, _, version = api_version.rpartition("/")
        kopf.on.event(group, version, KINDS[(api_version, kind)].plural, labels=labels,
                      registry=registry, id=f"child-{kind.lower()}")(child_changed)  # fmt: skip
    return registry


def node_fingerprint(node: kopf.Body) -> str:
    """What of a node scheduling and GPU budgets read: labels, taints, cordon, allocatable."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    return json.dumps([dict(node.metadata.labels), spec.get("taints") or [], bool(spec.get("unschedulable")),
                       status.get("allocatable") or {}], sort_keys=True)  # fmt: skip


class PendingReconciles:
    """The models with a child-triggered reconcile waiting for the model's lock (thread-safe)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._keys: set[tuple[str, str]] = set()

    def claim(self, key: tuple[str, str]) -> bool:
        """True when no reconcile of ``key`` was waiting (the caller now runs one)."""
        with self._guard:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release(self, key: tuple[str, str]) -> None:
        with self._guard:
            self._keys.discard(key)


class CompactDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled-configuration annotation, with ``spec.tables`` kept as a digest.

    kopf stores the spec it last handled in an annotation to tell what changed. All annotations of an
    object share 256 KiB, and a model of a few thousand tables has a larger spec: the annotation
    patch would be refused and the model never handled. A change of any table still changes the
    digest, so ``on.update`` fires as before; handlers read the live spec, never this copy."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        spec = essence.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("tables"), list):
            text = json.dumps(spec["tables"], sort_keys=True, separators=(",", ":"))
            spec["tables"] = {"count": len(spec["tables"]), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        return essence


def configure(settings: kopf.OperatorSettings) -> None:
    """Settings every deployment wants: events and status under our own names, and no scanning.

    Children are watched with a server-side label selector, and kopf's record of the last handled
    spec keeps the tables as a digest (:class:`CompactDiffBaseStorage`).

    Scanning off: kopf neither watches CustomResourceDefinitions nor lists namespaces, so the operator
    needs no cluster-wide read of either (least privilege). It discovers its resources once at start
    (API discovery, open to every authenticated client); a CRD installed later is served after a
    restart, and ``--namespace`` takes exact names, not globs."""
    settings.scanning.disabled = True
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = CompactDiffBaseStorage(prefix=API_GROUP)
    # children are watched server-side filtered: only what this operator manages streams in, never
    # every Secret or ConfigMap of the cluster
    for api_version, kind in CHILD_KINDS:
        group, _, version = api_version.rpartition("/")
        settings.watching.label_selectors[group, version, KINDS[(api_version, kind)].plural] = (
            f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        )
    settings.posting.level = logging.WARNING  # our own events are posted explicitly
    # A model's deletion waits for its resync timer to exit. The timer is sync (a reconcile in a worker
    # thread, under a second): wait a few seconds for it to return, then look again every second.
    # kopf's defaults (no wait, then a look every 60 s) kept a deleted model, finalizer and all, for a
    # minute whenever its timer happened to be running when it was deleted.
    settings.background.instant_exit_timeout = 5.0
    settings.background.cancellation_polling = 1.0
