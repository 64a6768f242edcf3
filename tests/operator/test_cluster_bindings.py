"""A model's TokenReview ClusterRoleBinding, the one child the garbage collector cannot delete (a
cluster-scoped object has no namespaced owner): which ones the operator deletes, and what it does
where the chart was installed with ``rbac.tokenReview: false`` (every request about bindings is a 403).

The API server is a small in-memory stand-in answering the three calls these functions make (list by
label, get, delete); the whole path against a real API server is in ``e2e/test_cluster_operator.py``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from hps_operator.kopf_handlers.embedding_model import (
    CERTIFICATE,
    CLUSTER_ROLE_BINDING,
    _optional_children,
    delete_cluster_bindings,
    model_exists,
)
from hps_operator.kopf_handlers.kube_api import KubeApiError

LOG = logging.getLogger("test")


def binding(namespace: str, model: str, uid: str) -> dict[str, Any]:
    return {"metadata": {"name": f"hps-operator:{namespace}:{model}:tokenreview", "labels": {
        "app.kubernetes.io/managed-by": "hps-operator", "app.kubernetes.io/instance": model,
        "hps.dev/owner-namespace": namespace, "hps.dev/owner-uid": uid}}}  # fmt: skip


class Api:
    """Bindings and models in memory; ``forbidden`` kinds answer 403, ``missing`` kinds 404."""

    def __init__(self, bindings: list[dict[str, Any]], models: dict[tuple[str, str], str],
                 forbidden: tuple[tuple[str, str], ...] = (), missing: tuple[tuple[str, str], ...] = ()) -> None:  # fmt: skip
        self.bindings = {b["metadata"]["name"]: b for b in bindings}
        self.models = models
        self.forbidden = forbidden
        self.missing = missing
        self.deleted: list[str] = []

    def _check(self, api_version: str, kind: str) -> None:
        if (api_version, kind) in self.forbidden:
            raise KubeApiError(403, "GET", kind, "forbidden")
        if (api_version, kind) in self.missing:
            raise KubeApiError(404, "GET", kind, "the server could not find the requested resource")

    def list(self, api_version: str, kind: str, namespace: str | None = None, *,
             label_selector: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        self._check(api_version, kind)
        if (api_version, kind) != CLUSTER_ROLE_BINDING:
            return []
        wanted = [term.partition("=") for term in (label_selector or "").split(",") if term]
        return [b for b in self.bindings.values()
                if all(key in b["metadata"]["labels"] and (not eq or b["metadata"]["labels"][key] == value)
                       for key, eq, value in wanted)]  # fmt: skip

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        uid = self.models.get((namespace or "", name))
        return None if uid is None else {"metadata": {"name": name, "uid": uid}}

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        self._check(api_version, kind)
        self.deleted.append(name)
        return self.bindings.pop(name, None) is not None


def test_only_the_bindings_of_models_that_are_gone_are_deleted() -> None:
    api = Api([binding("a", "kept", "u1"), binding("a", "gone", "u2"), binding("b", "kept", "u3-old")],
              models={("a", "kept"): "u1", ("b", "kept"): "u3-new"})  # fmt: skip
    keep = lambda ns, name, uid: model_exists(api, ns, name, uid)  # type: ignore[arg-type]  # noqa: E731
    assert delete_cluster_bindings(api, keep=keep, logger=LOG) == 2  # type: ignore[arg-type]
    # a model deleted and created again under the same name is a new model: the old binding goes
    assert sorted(api.deleted) == ["hps-operator:a:gone:tokenreview", "hps-operator:b:kept:tokenreview"]
    assert list(api.bindings) == ["hps-operator:a:kept:tokenreview"]


def test_a_deleted_models_binding_goes_and_no_other() -> None:
    api = Api([binding("a", "m", "u1"), binding("a", "other", "u2"), binding("b", "m", "u3")], models={})
    assert delete_cluster_bindings(api, keep=lambda *_: False, logger=LOG, uid="u1") == 1  # type: ignore[arg-type]
    assert api.deleted == ["hps-operator:a:m:tokenreview"]


def test_a_model_finds_its_own_binding_and_no_other() -> None:
    api = Api([binding("a", "m", "u1"), binding("a", "other", "u2")], models={})
    found = _optional_children(api, "a", "app.kubernetes.io/instance=m", "u1")  # type: ignore[arg-type]
    assert [f["metadata"]["name"] for f in found] == ["hps-operator:a:m:tokenreview"]


def test_without_the_binding_permission_or_cert_manager_a_model_still_reconciles() -> None:
    """``rbac.tokenReview: false`` (403 on bindings) and no cert-manager (404 on Certificates): the
    model's optional children are none, not an error that would stop every reconcile."""
    api = Api([binding("a", "m", "u1")], models={}, forbidden=(CLUSTER_ROLE_BINDING,), missing=(CERTIFICATE,))
    assert _optional_children(api, "a", "app.kubernetes.io/instance=m", "u1") == []  # type: ignore[arg-type]


def test_other_refusals_are_not_hidden() -> None:
    api = Api([], models={}, forbidden=(CERTIFICATE,))
    with pytest.raises(KubeApiError) as refused:
        _optional_children(api, "a", "app.kubernetes.io/instance=m", "u1")  # type: ignore[arg-type]
    assert refused.value.status == 403


class Writes:
    """Records writes; every write into ``terminating`` is refused as the API server refuses it."""

    def __init__(self, terminating: str | None = None) -> None:
        self.terminating = terminating
        self.done: list[str] = []

    def _write(self, method: str, manifest: dict[str, Any]) -> None:
        meta = manifest["metadata"]
        if meta["namespace"] == self.terminating:
            raise KubeApiError(403, method, meta["name"], f'{manifest["kind"].lower()}s "{meta["name"]}" is forbidden: '
                               f"unable to create new content in namespace {self.terminating} because it is being "
                               "terminated")  # fmt: skip
        self.done.append(f"{manifest['kind']}/{meta['name']}")

    def apply(self, manifest: dict[str, Any]) -> None:
        self._write("PATCH", manifest)

    def create(self, manifest: dict[str, Any]) -> None:
        self._write("POST", manifest)


def child(kind: str, name: str, namespace: str) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace,
                                       "ownerReferences": [{"uid": f"uid-{namespace}"}]}}  # fmt: skip


def test_a_namespace_being_deleted_stops_the_writes_instead_of_reporting_each_refusal() -> None:
    """The namespace controller deletes a model's children and the model: the operator, seeing its
    first write refused for that reason, stops (no write can succeed, no Event can be posted there)
    rather than trying every child and reporting ApplyFailed."""
    from hps_operator.core.reconcile import Decision
    from hps_operator.kopf_handlers.embedding_model import NamespaceTerminating, carry_out

    decision = Decision(apply=(child("ConfigMap", "m-plan", "gone"), child("StatefulSet", "m-redis", "gone")),
                        delete=(), status={}, events=(), create=(child("Secret", "m-redis-users", "gone"),))  # fmt: skip
    api = Writes(terminating="gone")
    with pytest.raises(NamespaceTerminating):
        carry_out(api, decision, logger=LOG)  # type: ignore[arg-type]
    assert api.done == []
    # elsewhere a refusal is reported and the other children are still written
    decision = Decision(apply=(child("ConfigMap", "m-plan", "live"),), delete=(), status={}, events=())
    assert carry_out(Writes(), decision, logger=LOG) == []  # type: ignore[arg-type]


class Creates:
    """Answers create as the API server does: True when the object was made, False when it was there;
    records restarts."""

    def __init__(self, missing: set[str]) -> None:
        self.missing = missing
        self.restarted: list[tuple[str, str, str]] = []

    def create(self, manifest: dict[str, Any]) -> bool:
        return manifest["metadata"]["name"] in self.missing

    def restart_pods(self, api_version: str, kind: str, namespace: str, name: str, *, at: str) -> None:
        assert at.endswith("Z")
        self.restarted.append((kind, namespace, name))


def test_a_deleted_password_secret_made_anew_restarts_redis_and_the_agents() -> None:
    """A Secret the operator creates again (someone deleted it) holds new passwords that only pods
    started afterwards get: every StatefulSet reading them is restarted, so Redis and the agents
    agree again; a Secret found in place restarts nothing."""
    from hps_operator.core.reconcile import ChildRef, Decision
    from hps_operator.kopf_handlers.embedding_model import carry_out

    running = tuple(ChildRef("apps/v1", "StatefulSet", "rotated", name) for name in ("m-p0-g0", "m-redis"))
    decision = Decision(apply=(), delete=(), status={}, events=(), restart_on_create=running,
                        create=(child("Secret", "m-redis", "rotated"), child("Secret", "m-redis-users", "rotated")))  # fmt: skip
    api = Creates(missing={"m-redis-users"})
    notes: list[Any] = []
    assert carry_out(api, decision, logger=LOG, notes=notes) == []  # type: ignore[arg-type]
    assert api.restarted == [("StatefulSet", "rotated", "m-p0-g0"), ("StatefulSet", "rotated", "m-redis")]
    (note,) = notes
    assert (note.type, note.reason) == ("Warning", "CredentialsRecreated")
    assert "Secret/m-redis-users missing, made anew" in note.message and "StatefulSet/m-redis" in note.message
    # both Secrets in place (another namespace: the handler remembers what it created for a while)
    decision = dataclasses.replace(decision, create=(child("Secret", "m-redis", "kept"),),
                                   restart_on_create=tuple(dataclasses.replace(r, namespace="kept") for r in running))  # fmt: skip
    api = Creates(missing=set())
    notes = []
    assert carry_out(api, decision, logger=LOG, notes=notes) == []  # type: ignore[arg-type]
    assert api.restarted == [] and notes == []
