"""One reconcile of one EmbeddingModel: observe the cluster, let the pure core decide, apply, report.

Every trigger (create, update, resume, the drift timer, a child's event) ends here, so "what does the
operator do on scale-up" is :func:`hps_operator.core.reconcile.reconcile`, one hop away.
"""

from __future__ import annotations

import base64
import datetime
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf
from hps_operator.core import reconcile as core
from hps_operator.core.render import REDIS_PASSWORD_KEY, redis_secret_name
from hps_operator.kopf_handlers.kube_api import KINDS, KubeApi
from hps_operator.metrics import OperatorMetrics

from node_agent.errors import InvalidSpecError
from node_agent.spec import API_GROUP, API_VERSION, KIND, parse_model

MODEL_API_VERSION = f"{API_GROUP}/{API_VERSION}"
#: the kinds a model's children come in (what drift detection lists)
CHILD_KINDS = tuple(
    key
    for key, info in KINDS.items()
    if info.namespaced and key[1] not in ("Event", "EmbeddingModel", "Deployment")
)

_locks_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}


def model_lock(namespace: str, name: str) -> threading.Lock:
    """One reconcile at a time per model: the timer, child events and spec changes all race for it."""
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(api: KubeApi, model: Mapping[str, Any]) -> core.Observed:
    """Reads what the core needs: the nodes, the model's children, the Redis password."""
    meta = model["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
    selector = f"{core.INSTANCE_LABEL}={name}"
    children = [
        child
        for api_version, kind in CHILD_KINDS
        for child in api.list(api_version, kind, namespace, label_selector=selector)
        if any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])
    ]
    return core.Observed(
        model=model,
        nodes=api.list("v1", "Node"),
        children=children,
        redis_password=_redis_password(api, model, children),
        now=now_rfc3339(),
    )


def _redis_password(api: KubeApi, model: Mapping[str, Any], children: list[dict[str, Any]]) -> str:
    """The password in the live Secret (ours, or the user's ``passwordSecret``); a fresh one when
    there is none yet, which the Secret we render then keeps."""
    try:
        secret_name = redis_secret_name(parse_model(model))
    except InvalidSpecError:
        return ""  # nothing is rendered for an invalid spec
    secret = next(
        (c for c in children if c["kind"] == "Secret" and c["metadata"]["name"] == secret_name), None
    )
    if secret is None:
        secret = api.get("v1", "Secret", model["metadata"]["namespace"], secret_name)
    encoded = ((secret or {}).get("data") or {}).get(REDIS_PASSWORD_KEY)
    if encoded:
        return base64.b64decode(encoded).decode()
    return secrets.token_urlsafe(24)


def reconcile_model(api: KubeApi, model: Mapping[str, Any], *, options: core.Options,
                    logger: logging.Logger | logging.LoggerAdapter[Any],
                    metrics: OperatorMetrics | None = None) -> core.Decision:  # fmt: skip
    """Observe → decide → apply → report, for one model. Writes nothing when nothing differs."""
    meta = model["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with model_lock(namespace, name):
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
    for manifest in decision.apply:
        api.apply(manifest)
    for ref in decision.delete:
        api.delete(ref.api_version, ref.kind, ref.namespace, ref.name)
    patch = status_patch(live.get("status") or {}, decision.status)
    if patch:
        api.patch_status(MODEL_API_VERSION, KIND, namespace, name, patch)
    for note in decision.events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, live)), type=note.type, reason=note.reason, message=note.message
        )
    if decision.apply or decision.delete:
        logger.info("applied %d, deleted %d children", len(decision.apply), len(decision.delete))
    return decision, live.get("spec") or {}


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
