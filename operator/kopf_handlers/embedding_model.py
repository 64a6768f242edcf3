"""One reconcile of one EmbeddingModel: observe the cluster, let the pure core decide, apply, report.

Every trigger (create, update, resume, the drift timer, a child's event) ends here, so "what does the
operator do on scale-up" is :func:`hps_operator.core.reconcile.reconcile`, one hop away.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf
from hps_operator.core import reconcile as core
from hps_operator.core.live_diff import quantity_value
from hps_operator.core.partition_scaling import HitRateReading
from hps_operator.core.render.meta import MANAGED_BY
from hps_operator.core.render.security import OWNER_NAMESPACE_LABEL, OWNER_UID_LABEL
from hps_operator.core.status import APPLY_FAILED, COMPONENT_LABEL, with_apply_failures
from hps_operator.kopf_handlers.kube_api import KINDS, KubeApi, KubeApiError
from hps_operator.metrics import OperatorMetrics

from node_agent.errors import UnavailableError
from node_agent.redis_acl import ROLES
from node_agent.spec import API_GROUP, API_VERSION, KIND

MODEL_API_VERSION = f"{API_GROUP}/{API_VERSION}"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
#: a model's agent Certificate (``spec.security.tls.issuerRef``): its kind exists only where cert-manager
#: is installed, so it is listed (a missing kind lists as nothing) but not watched
CERTIFICATE = ("cert-manager.io/v1", "Certificate")
#: the model's ClusterRoleBinding for TokenReview: cluster-scoped, found by its owner-uid label
CLUSTER_ROLE_BINDING = ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")
#: the kinds a model's children come in (what drift detection lists and watches). Secrets are not
#: among them: the operator creates its Secrets once and never reads Secrets (least privilege).
CHILD_KINDS = tuple(
    key
    for key, info in KINDS.items()
    if info.namespaced
    and key != CERTIFICATE
    and key[1] not in ("Event", "EmbeddingModel", "Deployment", "Secret", "Lease", "Pod")
)
#: the custom metrics the partition autoscaler reads (the rates of the agents' hps_l1_{hits,misses}_total)
HIT_METRICS = ("hps_l1_hits_per_second", "hps_l1_misses_per_second")
#: how long a replaced StatefulSet may take to go (the garbage collector orphans its pods first)
REPLACE_TIMEOUT_S = 30.0

_locks_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}


def model_lock(namespace: str, name: str) -> threading.Lock:
    """One reconcile at a time per model: the timer, child events and spec changes all race for it."""
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(api: KubeApi, model: Mapping[str, Any]) -> core.Observed:
    """Reads what the core needs: the nodes and the model's children (server-side label-selected).

    The Redis password is a fresh random one each round: it is used only when the Secret does not
    exist yet (``Decision.create``), so the operator never reads a Secret back."""
    meta = model["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
    selector = f"{core.INSTANCE_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
    children = [
        child
        for api_version, kind in CHILD_KINDS
        for child in api.list(api_version, kind, namespace, label_selector=selector)
        if any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])
    ]
    children += _optional_children(api, namespace, selector, uid)
    agent_pods = api.list("v1", "Pod", namespace, label_selector=f"{selector},{COMPONENT_LABEL}=agent")
    node_pods = None
    if any(_unschedulable(pod) for pod in agent_pods):
        # only while agents wait for GPUs: what runs on the nodes tells how many GPUs are free
        node_pods = api.list("v1", "Pod", field_selector="status.phase!=Succeeded,status.phase!=Failed")
    return core.Observed(
        model=model,
        nodes=api.list("v1", "Node"),
        children=children,
        redis_password=secrets.token_urlsafe(24),
        redis_user_passwords={role: secrets.token_urlsafe(24) for role in ROLES},
        now=now_rfc3339(),
        agent_pods=agent_pods,
        node_pods=node_pods,
        hit_rate=_hit_rate(api, model, f"{selector},{COMPONENT_LABEL}=agent"),
    )


def _optional_children(api: KubeApi, namespace: str, selector: str, uid: str | None) -> list[dict[str, Any]]:
    """The model's Certificate (none where cert-manager is not installed) and its cluster-scoped
    TokenReview binding (labelled with the model's uid, as it cannot be owned by it)."""
    found: list[dict[str, Any]] = []
    try:
        found += [c for c in api.list(*CERTIFICATE, namespace, label_selector=selector)
                  if any(ref.get("uid") == uid for ref in c["metadata"].get("ownerReferences") or [])]  # fmt: skip
    except KubeApiError as exc:
        if exc.status != 404:  # 404: no cert-manager, so no Certificate of ours either
            raise
    if uid:
        try:
            found += api.list(*CLUSTER_ROLE_BINDING, label_selector=f"{selector},{OWNER_UID_LABEL}={uid}")
        except KubeApiError as exc:
            # 403: the chart was installed with rbac.tokenReview off; a model asking for auth is told so
            # by the refused apply of its binding, every other model needs none
            if exc.status != 403:
                raise
    return found


def delete_cluster_bindings(api: KubeApi, *, keep: Callable[[str, str, str], bool],
                            logger: logging.Logger | logging.LoggerAdapter[Any], uid: str | None = None) -> int:  # fmt: skip
    """Deletes the models' ClusterRoleBindings whose model is gone: ``keep(namespace, name, uid)`` says
    whether a model still is; ``uid`` lists only that model's. The garbage collector cannot (a
    cluster-scoped object has no namespaced owner), so the operator does it when a model is deleted
    and, for deletions it missed, at start."""
    deleted = 0
    owner = f"{OWNER_UID_LABEL}={uid}" if uid else OWNER_UID_LABEL
    for binding in api.list(*CLUSTER_ROLE_BINDING, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY},{owner}"):
        meta = binding["metadata"]
        found = meta.get("labels") or {}
        namespace, name = found.get(OWNER_NAMESPACE_LABEL, ""), found.get(core.INSTANCE_LABEL, "")
        if not keep(namespace, name, found.get(OWNER_UID_LABEL, "")) and api.delete(*CLUSTER_ROLE_BINDING, None,
                                                                                   meta["name"]):  # fmt: skip
            logger.info("deleted ClusterRoleBinding %s: its model %s/%s is gone", meta["name"], namespace, name)
            deleted += 1
    return deleted


def model_exists(api: KubeApi, namespace: str, name: str, uid: str) -> bool:
    """The model ``namespace/name`` exists with ``uid`` and is not being deleted."""
    if not namespace or not name:
        return False
    live = api.get(MODEL_API_VERSION, KIND, namespace, name)
    return live is not None and live["metadata"].get("uid") == uid and not live["metadata"].get("deletionTimestamp")


def _hit_rate(api: KubeApi, model: Mapping[str, Any], selector: str) -> HitRateReading | None:
    """The model's L1 hits and misses per second from the custom metrics API (prometheus-adapter
    serves the agents' counters as rates), only for a model that autoscales its partitions; None
    when the API does not serve them (the autoscaler then decides nothing)."""
    if not ((model.get("spec") or {}).get("autoscaling") or {}).get("partitions"):
        return None
    namespace = model["metadata"]["namespace"]
    rates: list[float] = []
    for metric in HIT_METRICS:
        try:
            found = api.get_raw(f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/pods/*/{metric}",
                                query={"labelSelector": selector})  # fmt: skip
        except (KubeApiError, UnavailableError):
            return None
        items = (found or {}).get("items") or []
        if not items:
            return None
        rates.append(sum(float(quantity_value(i.get("value")) or 0) for i in items))
    return HitRateReading(hits_per_s=rates[0], misses_per_s=rates[1])


def _unschedulable(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"
               for c in (pod.get("status") or {}).get("conditions") or ())  # fmt: skip


def reconcile_model(api: KubeApi, model: Mapping[str, Any], *, options: core.Options,
                    logger: logging.Logger | logging.LoggerAdapter[Any],
                    metrics: OperatorMetrics | None = None,
                    on_locked: Callable[[], None] | None = None) -> core.Decision:  # fmt: skip
    """Observe → decide → apply → report, for one model. Writes nothing when nothing differs.
    ``on_locked`` runs once this call holds the model's lock, before it reads anything."""
    meta = model["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with model_lock(namespace, name):
        if on_locked is not None:
            on_locked()
        started = time.monotonic()
        try:
            decision, spec = _reconcile_locked(api, namespace, name, options=options, logger=logger)
        except Exception:
            if metrics is not None:
                metrics.observe_reconcile("Error", time.monotonic() - started)
            raise
        if metrics is not None:
            if decision.status:
                metrics.observe_reconcile(decision.outcome, time.monotonic() - started)
                metrics.observe_model(namespace, name, spec=spec, status=decision.status)
            else:  # the model is gone or going
                metrics.forget_model(namespace, name)
        return decision


def _reconcile_locked(api: KubeApi, namespace: str, name: str, *, options: core.Options,
                      logger: logging.Logger | logging.LoggerAdapter[Any]) -> tuple[core.Decision, Mapping[str, Any]]:  # fmt: skip
    """The decision, and the live spec it was made for."""
    # the body kopf hands over can be a few events old: decide on the live object
    live = api.get(MODEL_API_VERSION, KIND, namespace, name)
    if live is None or live["metadata"].get("deletionTimestamp"):
        return core.Decision((), (), {}, ()), {}
    decision = core.reconcile(observe(api, live), options)
    carried: list[core.EventNote] = []
    try:
        failures = carry_out(api, decision, logger=logger, notes=carried)
    except NamespaceTerminating as exc:
        # the namespace controller is deleting everything in it, the model too: recreating its
        # children, reporting or posting Events there can only be refused again
        logger.info("not reconciling %s/%s: %s", namespace, name, exc)
        return core.Decision((), (), {}, ()), {}
    status = decision.status
    if failures:
        status = with_apply_failures(status, failures, previous=live.get("status") or {}, now=now_rfc3339())
    patch = status_patch(live.get("status") or {}, status)
    if patch:
        api.patch_status(MODEL_API_VERSION, KIND, namespace, name, patch)
    notes = [*decision.events, *carried]
    if failures:
        notes.append(core.EventNote("Warning", APPLY_FAILED, "the API server refused: " + "; ".join(failures)))
    for note in notes:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, live)), type=note.type, reason=note.reason, message=note.message
        )
    if decision.apply or decision.delete:
        logger.info("applied %d, deleted %d children", len(decision.apply), len(decision.delete))
    return dataclasses.replace(decision, status=status), live.get("spec") or {}


class NamespaceTerminating(KubeApiError):
    """A write refused because the model's namespace is being deleted."""


def _raise_if_terminating(exc: KubeApiError, what: str) -> None:
    if exc.status == 403 and "because it is being terminated" in str(exc):
        raise NamespaceTerminating(exc.status, "write", what, "its namespace is being deleted") from exc


def carry_out(api: KubeApi, decision: core.Decision, *, logger: logging.Logger | logging.LoggerAdapter[Any],
              notes: list[core.EventNote] | None = None) -> list[str]:  # fmt: skip
    """Writes the decision's children one by one: a child the API server refuses is reported (the
    returned lines name each and the server's answer) and the others are still written. A
    StatefulSet refused as unchangeable (422) is replaced once: deleted with its pods orphaned (to be
    adopted) and created anew. (A Job's name carries its spec's hash, so it is never updated.) A write
    refused because the namespace is being deleted stops the rest (:class:`NamespaceTerminating`). A
    Secret found missing and made anew restarts ``decision.restart_on_create`` and adds an Event to
    ``notes``."""
    failures: list[str] = []

    def attempt(what: str, write: Callable[..., object], *args: Any, **kwargs: Any) -> bool:
        try:
            write(*args, **kwargs)
        except KubeApiError as exc:
            _raise_if_terminating(exc, what)
            logger.warning("%s: %s", what, exc)
            failures.append(f"{what}: HTTP {exc.status}: {exc}")
            return False
        return True

    made: list[str] = []  # Secrets found missing and made anew, with new passwords

    def create(manifest: Mapping[str, Any]) -> None:
        if api.create(manifest):
            made.append(_what(manifest))

    for manifest in decision.create:
        key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"],
               manifest["metadata"]["ownerReferences"][0]["uid"])  # fmt: skip
        if time.monotonic() - _created.get(key, -CREATE_RECHECK_S) >= CREATE_RECHECK_S and attempt(
            _what(manifest), create, manifest
        ):
            _created[key] = time.monotonic()
    if made and decision.restart_on_create:
        # the running pods hold the old passwords, pods started from now on the new ones: restart all
        message = (f"{', '.join(made)} missing, made anew with new passwords: restarting "
                   f"{', '.join(f'{ref.kind}/{ref.name}' for ref in decision.restart_on_create)}")  # fmt: skip
        logger.warning("%s", message)
        if notes is not None:
            notes.append(core.EventNote("Warning", CREDENTIALS_RECREATED, message))
        at = now_rfc3339()
        for ref in decision.restart_on_create:
            attempt(f"restarting {ref.kind}/{ref.name}", api.restart_pods, ref.api_version, ref.kind,
                    ref.namespace, ref.name, at=at)  # fmt: skip
    for ref in decision.replace:
        attempt(f"{ref.kind}/{ref.name}", _replace, api, ref)
    for manifest in decision.apply:
        try:
            api.apply(manifest)
        except KubeApiError as exc:
            _raise_if_terminating(exc, _what(manifest))
            if exc.status == 422 and manifest["kind"] == "StatefulSet":
                logger.info("%s cannot be updated in place (%s): replacing it", _what(manifest), exc)
                ref = core.ChildRef(manifest["apiVersion"], manifest["kind"], manifest["metadata"]["namespace"],
                                    manifest["metadata"]["name"])  # fmt: skip
                attempt(_what(manifest), _replace, api, ref, then_apply=manifest)
            else:
                logger.warning("%s: %s", _what(manifest), exc)
                failures.append(f"{_what(manifest)}: HTTP {exc.status}: {exc}")
    for ref in decision.delete:
        attempt(f"deleting {ref.kind}/{ref.name}", api.delete, ref.api_version, ref.kind, ref.namespace, ref.name)
    for ref, replicas in decision.scale:
        attempt(f"scaling {ref.kind}/{ref.name} to {replicas}", api.scale, ref.api_version, ref.kind, ref.namespace,
                ref.name, replicas)  # fmt: skip
    return failures


def _replace(api: KubeApi, ref: core.ChildRef, *, then_apply: Mapping[str, Any] | None = None) -> None:
    """Deletes a StatefulSet so that it can be created anew (``then_apply``), leaving its pods (and
    their volumes) running for the new one to adopt."""
    api.delete(ref.api_version, ref.kind, ref.namespace, ref.name, propagation="Orphan")
    if not api.wait_gone(ref.api_version, ref.kind, ref.namespace, ref.name, timeout_s=REPLACE_TIMEOUT_S):
        raise KubeApiError(409, "DELETE", f"{ref.kind}/{ref.name}",
                           f"still there {REPLACE_TIMEOUT_S:.0f}s after its deletion; retried next round")  # fmt: skip
    if then_apply is not None:
        api.apply(then_apply)


def _what(manifest: Mapping[str, Any]) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


#: the Event of a Secret made anew (someone deleted it) and the restarts it took
CREDENTIALS_RECREATED = "CredentialsRecreated"

#: Secrets this process created or found (namespace, name, owner uid) → when: not posted again for
#: CREATE_RECHECK_S, after which a Secret someone deleted is created anew
_created: dict[tuple[str, str, str], float] = {}
CREATE_RECHECK_S = 300.0


def status_patch(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch turning ``live`` into ``desired``: changed keys, and ``None`` for keys
    ``desired`` no longer has (a merge patch keeps what it does not mention, so ``status.rebalance``
    would otherwise keep its ``fromVersion`` after a rollout). Empty when nothing differs."""
    patch: dict[str, Any] = {key: None for key in live if key not in desired}
    for key, value in desired.items():
        old = live.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            inner = status_patch(old, value)
            if inner:
                patch[key] = inner
        elif key not in live or old != value:
            patch[key] = value
    return patch
