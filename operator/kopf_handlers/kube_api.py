"""A thin, synchronous JSON client for the few Kubernetes API calls the operator's handlers make.

It rides on the official ``kubernetes`` package for connection set-up (in-cluster service account or
kubeconfig, TLS, token refresh) and speaks plain dicts, because the core renders plain manifests.
Children are written with server-side apply under one field manager (``hps-operator``). Handlers run
in kopf's thread pool, so blocking calls here never stall kopf's event loop.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
import kubernetes.client
import kubernetes.config

from node_agent.errors import UnavailableError

FIELD_MANAGER = "hps-operator"
#: who restarts pods (:meth:`KubeApi.restart_pods`): not FIELD_MANAGER, whose applies would drop the mark
RESTART_MANAGER = "hps-operator-restart"
#: who sets an agent set's replicas alone (``KubeApi.scale``), while the rest of the model waits
SCALE_MANAGER = "hps-operator-scale"
#: the pod template annotation a restart writes (the time it was asked)
RESTARTED_AT_ANNOTATION = "hps.dev/restartedAt"


@dataclass(frozen=True)
class KindInfo:
    plural: str
    namespaced: bool


#: the kinds the operator reads or writes: (apiVersion, kind) → URL plural and scope
KINDS: dict[tuple[str, str], KindInfo] = {
    ("v1", "ConfigMap"): KindInfo("configmaps", True),
    ("v1", "Secret"): KindInfo("secrets", True),
    ("v1", "Service"): KindInfo("services", True),
    ("v1", "Node"): KindInfo("nodes", False),
    ("v1", "Pod"): KindInfo("pods", True),
    ("v1", "Event"): KindInfo("events", True),
    ("apps/v1", "StatefulSet"): KindInfo("statefulsets", True),
    ("apps/v1", "Deployment"): KindInfo("deployments", True),
    ("batch/v1", "Job"): KindInfo("jobs", True),
    ("policy/v1", "PodDisruptionBudget"): KindInfo("poddisruptionbudgets", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): KindInfo("horizontalpodautoscalers", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): KindInfo("networkpolicies", True),
    ("hps.dev/v1alpha1", "EmbeddingModel"): KindInfo("embeddingmodels", True),
    ("coordination.k8s.io/v1", "Lease"): KindInfo("leases", True),
    ("v1", "ServiceAccount"): KindInfo("serviceaccounts", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): KindInfo("clusterrolebindings", False),
    ("cert-manager.io/v1", "Certificate"): KindInfo("certificates", True),
}


class KubeApiError(UnavailableError):
    """The API server answered a request with an error status."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


def resource_path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:  # fmt: skip
    """``/apis/apps/v1/namespaces/ns/statefulsets/name`` for a kind the operator knows."""
    info = KINDS[(api_version, kind)]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = prefix
    if info.namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{info.plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeApi:
    """Plain-dict CRUD against one API server."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, field_manager: str = FIELD_MANAGER,
                 user_agent: str = FIELD_MANAGER) -> None:  # fmt: skip
        self._client = api_client
        self._config = api_client.configuration
        self.field_manager = field_manager
        #: names this process in the API server's audit log (an operator replica: its pod's name)
        self.user_agent = user_agent

    @classmethod
    def from_environment(cls, *, user_agent: str = FIELD_MANAGER) -> KubeApi:
        """In a pod: its service account; elsewhere: the kubeconfig (``$KUBECONFIG`` or ``~/.kube``)."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            # read $KUBECONFIG now: the kubernetes package reads it once, at import
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                               client_configuration=config)  # fmt: skip
        return cls(kubernetes.client.ApiClient(config), user_agent=user_agent)

    def connection_info(self) -> kopf.ConnectionInfo:
        """The same credentials for kopf's own watches and patches (its login handler returns this)."""
        config = self._config
        if config.refresh_api_key_hook is not None:
            config.refresh_api_key_hook(config)
        header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
        scheme, _, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=config.host,
            ca_path=config.ssl_ca_cert,
            insecure=not config.verify_ssl,
            scheme=scheme or ("Bearer" if token else None),
            token=token or None,
            certificate_path=config.cert_file,
            private_key_path=config.key_file,
        )

    def close(self) -> None:
        self._client.close()

    # -- requests -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                 body: Any = None, content_type: str = "application/json") -> Any:  # fmt: skip
        url = self._config.host.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "Content-Type": content_type, "User-Agent": self.user_agent}
        if self._config.refresh_api_key_hook is not None:
            self._config.refresh_api_key_hook(self._config)
        token = self._config.get_api_key_with_prefix("BearerToken") or self._config.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            headers["Authorization"] = token if " " in token else f"Bearer {token}"
        try:
            response = self._client.rest_client.request(method, url, headers=headers, body=body,
                                                        _request_timeout=30)  # fmt: skip
            data = response.read()
        except Exception as exc:  # urllib3 raises many kinds; all mean "the API is not reachable"
            raise UnavailableError(f"{method} {path}: {exc}") from exc
        if response.status >= 400:
            try:
                message = json.loads(data).get("message", "")
            except (ValueError, AttributeError):
                message = data[:200].decode(errors="replace") if isinstance(data, bytes) else str(data)
            raise KubeApiError(response.status, method, path, message)
        return json.loads(data) if data else None

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._request("GET", resource_path(api_version, kind, namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def get_raw(self, path: str, *, query: Mapping[str, str] | None = None) -> Any:
        """A GET of any path (an aggregated API's, such as custom metrics); None on 404."""
        try:
            return self._request("GET", path, query=query)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        query = {key: value for key, value in (("labelSelector", label_selector), ("fieldSelector", field_selector))
                 if value} or None  # fmt: skip
        result = self._request("GET", resource_path(api_version, kind, namespace), query=query)
        items: list[dict[str, Any]] = list(result.get("items") or [])
        for item in items:  # list items carry no apiVersion/kind on the wire
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply of a whole manifest (creates it when absent); conflicts are forced, as
        the operator is the one owner of its children."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        result: dict[str, Any] = self._request(
            "PATCH", path, query={"fieldManager": self.field_manager, "force": "true"},
            body=dict(manifest), content_type="application/apply-patch+yaml",
        )  # fmt: skip
        return result

    def create(self, manifest: Mapping[str, Any]) -> bool:
        """Creates ``manifest`` unless an object of its name exists: True when created, False when it
        was there (the operator never needs to read it, so it needs no read access)."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        try:
            self._request("POST", path, query={"fieldManager": self.field_manager}, body=dict(manifest))
        except KubeApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def replace(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Updates an object as read (PUT at its ``resourceVersion``): a 409 means someone wrote it
        in between, so read-modify-write never loses a concurrent change."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        result: dict[str, Any] = self._request("PUT", path, query={"fieldManager": self.field_manager},
                                               body=dict(manifest))  # fmt: skip
        return result

    def restart_pods(self, api_version: str, kind: str, namespace: str, name: str, *, at: str) -> dict[str, Any]:
        """Rolls a workload's pods as ``kubectl rollout restart`` does: a pod template annotation, here
        ``hps.dev/restartedAt`` = ``at``, written by a field manager of its own (:data:`RESTART_MANAGER`)
        so that the operator's server-side applies, which do not carry it, leave it in place."""
        path = resource_path(api_version, kind, namespace, name)
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: at}}}}}
        result: dict[str, Any] = self._request("PATCH", path, query={"fieldManager": RESTART_MANAGER}, body=body,
                                               content_type="application/merge-patch+json")  # fmt: skip
        return result

    def scale(self, api_version: str, kind: str, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """Sets a workload's ``spec.replicas`` alone (a merge patch by :data:`SCALE_MANAGER`); the
        operator's next server-side apply of the whole object takes the field back."""
        path = resource_path(api_version, kind, namespace, name)
        result: dict[str, Any] = self._request("PATCH", path, query={"fieldManager": SCALE_MANAGER},
                                               body={"spec": {"replicas": replicas}},
                                               content_type="application/merge-patch+json")  # fmt: skip
        return result

    def patch_status(self, api_version: str, kind: str, namespace: str | None, name: str,
                     status: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
        path = resource_path(api_version, kind, namespace, name, "status")
        result: dict[str, Any] = self._request(
            "PATCH", path, body={"status": dict(status)}, content_type="application/merge-patch+json"
        )
        return result

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str, *,
               propagation: str = "Background") -> bool:  # fmt: skip
        """Deletes an object, with its dependents (``Background``) or leaving them (``Orphan``);
        False if absent."""
        try:
            self._request("DELETE", resource_path(api_version, kind, namespace, name),
                          body={"propagationPolicy": propagation})  # fmt: skip
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def wait_gone(self, api_version: str, kind: str, namespace: str | None, name: str, *,
                  timeout_s: float = 30.0, poll_s: float = 0.2) -> bool:  # fmt: skip
        """Waits until the object no longer exists (its finalizers ran); False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.get(api_version, kind, namespace, name) is None:
                return True
            time.sleep(poll_s)
        return False
