"""kmock's ``KubernetesEmulator`` extended to the API semantics the operator relies on.

kmock (kopf's own test companion) stores objects as plain JSON and merges patches naively. The
operator's scenario tests need more of the real API server, so this module fills these gaps, each
in :class:`HpsKubernetesEmulator`:

1. ``metadata.resourceVersion`` (one cluster-wide counter, bumped only when an object really
   changes), ``metadata.uid``, ``metadata.creationTimestamp``, and ``metadata.namespace`` taken
   from the request's URL on create; ``metadata.generateName`` on create.
2. ``metadata.generation``: 1 on create, bumped when anything outside ``metadata`` and ``status``
   changes (as the API server does for custom resources and for workloads).
3. A no-op write (the patch changes nothing) bumps nothing and sends no watch event.
4. The ``status`` subresource: ``PATCH …/status`` changes only ``status``; writes to the main
   resource ignore ``status``; ``GET …/status`` serves the object. ``status`` sent on create is
   dropped for custom resources with a status subresource.
5. The ``scale`` subresource of custom resources (``GET``/``PATCH …/scale``) as an
   ``autoscaling/v1`` ``Scale``, mapped through the CRD's ``specReplicasPath``,
   ``statusReplicasPath`` and ``labelSelectorPath``.
6. Server-side apply (``PATCH`` with ``application/apply-patch+yaml``): requires a
   ``fieldManager``, creates an absent object, otherwise merges. There is no field ownership: the
   merge is the emulator's naive one (maps merged, lists replaced, ``null`` removes a key).
7. JSON merge patch and strategic merge patch are both applied as JSON merge patch; JSON patch
   (``application/json-patch+json``) is applied as such.
8. ``409 AlreadyExists`` on creating an existing object, ``404`` on patching an absent one,
   ``409 Conflict`` on a write whose ``metadata.resourceVersion`` is stale, and ``422`` when a JSON
   patch's ``test`` fails (kopf's optimistic concurrency on ``resourceVersion`` relies on it).
9. Garbage collection of dependents: deleting an object deletes every object whose
   ``ownerReferences`` name its uid (background cascading, recursively), as the real garbage
   collector eventually does.
10. ``labelSelector`` (equality-based: ``k=v``, ``k!=v``, ``k``) on list requests.
11. Registering a CRD (:meth:`HpsKubernetesEmulator.register_crd`) declares its resource for
    discovery with its kind, scope, short names and subresources; the built-in resources come
    from kmock's bundled discovery data.
12. Every request is recorded as ``(method, path) → (group, resource[/subresource], verb)``
    (:attr:`HpsKubernetesEmulator.api_calls`), so tests can check the operator's RBAC.

Gaps left open, on purpose: there is no kubelet or controller (pods never start: tests patch a
StatefulSet's ``status`` to simulate readiness), watch requests ignore ``resourceVersion`` (each
watch replays every object as ``ADDED``; kopf copes), the namespace-listing bug remains (run kopf
cluster-wide), and no admission or schema validation happens (tests validate manifests with
``kubernetes-validate`` instead).
"""

from __future__ import annotations

import copy
import datetime
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
from kmock import KubernetesEmulator, KubernetesError, KubernetesObjectNotFoundError, resource
from kmock._internal import dicts, rendering

APPLY_PATCH = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True, order=True)
class ApiCall:
    """One request the emulator served, in RBAC terms (``group`` "" is the core API)."""

    group: str
    resource: str
    verb: str
    method: str
    path: str
    user_agent: str = ""


@dataclass(frozen=True)
class ScaleMapping:
    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None


def _dig(obj: Mapping[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.lstrip(".").split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.lstrip(".").split(".")
    result: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        result = {part: result}
    return result


def _matches_selector(labels: Mapping[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _verb(request: rendering.Request) -> str:
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    if method == "DELETE" and not request.name:
        return "deletecollection"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method.lower())


@attrs.define(kw_only=True)
class HpsKubernetesEmulator(KubernetesEmulator):
    """kmock's emulator with the API semantics listed in this module's docstring."""

    api_calls: list[ApiCall] = attrs.field(factory=list, init=False)
    _resource_version: int = attrs.field(default=0, init=False)
    _status_subresources: set[resource] = attrs.field(factory=set, init=False)
    _custom_resources: set[resource] = attrs.field(factory=set, init=False)
    _scales: dict[resource, ScaleMapping] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for res in self.resources:
            if "status" in self.resources[res].subresources:
                self._status_subresources.add(res)

    # -- set-up ---------------------------------------------------------------------------------

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Declares every served version of a CustomResourceDefinition for discovery."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            res = resource(spec["group"], version["name"], names["plural"])
            subresources = version.get("subresources") or {}
            self.resources[res] = self.ResourceInfo(
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(subresources),
            )
            self._custom_resources.add(res)
            if "status" in subresources:
                self._status_subresources.add(res)
            if "scale" in subresources:
                scale = subresources["scale"]
                self._scales[res] = ScaleMapping(
                    scale["specReplicasPath"], scale["statusReplicasPath"], scale.get("labelSelectorPath")
                )

    async def seed(self, res: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Stores ``obj`` as if created through the API, ``status`` included (what a kubelet or a
        controller would have written), and notifies watchers."""
        parsed = resource(res)
        meta = obj.get("metadata", {})
        async with self._lock:
            stored = self._store_new(parsed, meta.get("namespace"), dict(obj), keep_status=True)
            await self._buses[parsed].put({"type": "ADDED", "object": stored})
        return stored

    async def patch_object(self, res: str, namespace: str | None, name: str, patch: Mapping[str, Any]) -> None:
        """Merges ``patch`` into a stored object, ``status`` included (a controller's write)."""
        parsed = resource(res)
        async with self._lock:
            await self._write_patch(parsed, namespace, name, dict(patch), allow_status=True, allow_rest=True)

    async def delete_object(self, res: str, namespace: str | None, name: str) -> None:
        """Deletes an object as ``kubectl delete`` would (dependents are garbage-collected)."""
        async with self._lock:
            await self._delete(resource(res), namespace, name)

    def get_object(self, res: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (resource(res), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def list_objects(self, res: str) -> list[dict[str, Any]]:
        parsed = resource(res)
        return [
            copy.deepcopy(obj.raw)
            for (r, _, _), obj in list(self._objects.items())
            if r == parsed and not obj.deleted
        ]

    # -- request handling -----------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is not None and res.plural is not None:
            plural = f"{res.plural}/{request.subresource}" if request.subresource else res.plural
            agent = request.headers.get("User-Agent", "")
            call = ApiCall(res.group or "", plural, _verb(request), request.method.value, request.url.path, agent)
            self.api_calls.append(call)
        if res is None or res.plural is None:
            return await super()._handle(request)  # discovery: served by kmock

        method = request.method.value
        if request.subresource == "scale" and res in self._scales:
            return await self._serve_scale(request, res)
        if method == "GET" and request.subresource == "status" and request.name:
            obj = self.get_object(str(res), request.namespace, request.name)
            if obj is None:
                raise KubernetesObjectNotFoundError()
            return aiohttp.web.json_response(obj)
        if method == "POST" and not request.name:
            return await self._serve_post(request, res)
        if method in ("PATCH", "PUT") and request.name:
            return await self._serve_write(request, res)
        if method == "DELETE" and request.name:
            async with self._lock:
                deleted = await self._delete(res, request.namespace, request.name)
            return aiohttp.web.json_response(deleted)
        if method == "GET" and not request.name and request.params.get("watch") not in ("true", "1"):
            return aiohttp.web.json_response(self._list(request, res))
        return await super()._handle(request)

    def _list(self, request: rendering.Request, res: resource) -> dict[str, Any]:
        if not any(r == res for r in self._get_resources()):
            raise KubernetesError(404, "NotFound", f"the server could not find the resource {res}")
        selector = request.params.get("labelSelector", "")
        items = [
            copy.deepcopy(obj.raw)
            for (r, ns, _), obj in list(self._objects.items())
            if r == res
            and not obj.deleted
            and (request.namespace is None or ns == request.namespace)
            and _matches_selector(obj.raw.get("metadata", {}).get("labels") or {}, selector)
        ]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._resource_version)},
                "items": items}  # fmt: skip

    async def _serve_post(self, request: rendering.Request, res: resource) -> aiohttp.web.StreamResponse:
        body = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            namespace = request.namespace or body.get("metadata", {}).get("namespace")
            stored = self._store_new(res, namespace, body, keep_status=res not in self._custom_resources)
            await self._buses[res].put({"type": "ADDED", "object": stored})
        return aiohttp.web.json_response(stored, status=201)

    async def _serve_write(self, request: rendering.Request, res: resource) -> aiohttp.web.StreamResponse:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        body = request.data
        if request.method.value == "PUT":
            return await self._serve_replace(request, res, body)
        async with self._lock:
            key = (res, request.namespace, request.name or "")
            absent = key not in self._objects or self._objects[key].deleted
            if content_type == APPLY_PATCH:
                if not request.params.get("fieldManager"):
                    raise KubernetesError(400, "BadRequest", "fieldManager is required for apply patch")
                if absent:
                    stored = self._store_new(res, request.namespace, dict(body), keep_status=False)
                    await self._buses[res].put({"type": "ADDED", "object": stored})
                    return aiohttp.web.json_response(stored, status=201)
            if absent:
                raise KubernetesObjectNotFoundError()
            is_status = request.subresource == "status"
            has_status = res in self._status_subresources
            patched = await self._write_patch(
                res, request.namespace, request.name or "", body,
                allow_status=is_status or not has_status, allow_rest=not is_status,
                json_patch=content_type == JSON_PATCH,
            )  # fmt: skip
        return aiohttp.web.json_response(patched)

    async def _serve_replace(self, request: rendering.Request, res: resource, body: Any) -> aiohttp.web.StreamResponse:
        async with self._lock:
            key = (res, request.namespace, request.name or "")
            if key not in self._objects or self._objects[key].deleted:
                raise KubernetesObjectNotFoundError()
            current = self._objects[key].raw
            replacement = copy.deepcopy(dict(body))
            if request.subresource == "status":
                replacement = {**copy.deepcopy(current), "status": replacement.get("status")}
            elif res in self._status_subresources:
                replacement["status"] = copy.deepcopy(current.get("status"))
            meta = replacement.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if field in current["metadata"]:
                    meta[field] = current["metadata"][field]
            self._check_version(meta.get("resourceVersion"), current)
            stored = await self._commit(res, key, current, replacement)
        return aiohttp.web.json_response(stored)

    async def _serve_scale(self, request: rendering.Request, res: resource) -> aiohttp.web.StreamResponse:
        mapping = self._scales[res]
        async with self._lock:
            key = (res, request.namespace, request.name or "")
            if key not in self._objects or self._objects[key].deleted:
                raise KubernetesObjectNotFoundError()
            if request.method.value in ("PATCH", "PUT"):
                replicas = (request.data or {}).get("spec", {}).get("replicas")
                if replicas is not None:
                    patch = _nested(mapping.spec_replicas_path, int(replicas))
                    await self._write_patch(res, request.namespace, request.name or "", patch,
                                            allow_status=False, allow_rest=True)  # fmt: skip
            obj = self._objects[key].raw
        meta = obj["metadata"]
        scale_status: dict[str, Any] = {"replicas": _dig(obj, mapping.status_replicas_path) or 0}
        if mapping.label_selector_path and _dig(obj, mapping.label_selector_path):
            scale_status["selector"] = _dig(obj, mapping.label_selector_path)
        return aiohttp.web.json_response({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
            "spec": {"replicas": _dig(obj, mapping.spec_replicas_path) or 0},
            "status": scale_status,
        })  # fmt: skip

    # -- state changes (callers hold the lock) --------------------------------------------------

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _store_new(self, res: resource, namespace: str | None, body: dict[str, Any], *,
                   keep_status: bool) -> dict[str, Any]:  # fmt: skip
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        name = meta.get("name")
        if not name:
            raise KubernetesError(422, "Invalid", "metadata.name: Required value")
        info = self.resources[res] if res in self.resources else None  # noqa: SIM401 (typed lookup)
        namespaced = info.namespaced if info is not None and info.namespaced is not None else namespace is not None
        if namespaced:
            namespace = namespace or "default"
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        key = (res, namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            raise KubernetesError(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
        if not keep_status and res in self._status_subresources:
            obj.pop("status", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_version()
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        return copy.deepcopy(obj)

    @staticmethod
    def _check_version(sent: Any, current: Mapping[str, Any]) -> None:
        if sent and str(sent) != current["metadata"].get("resourceVersion"):
            raise KubernetesError(409, "Conflict", "the object has been modified; please apply your changes "
                                                   "to the latest version and try again")  # fmt: skip

    async def _write_patch(self, res: resource, namespace: str | None, name: str, patch: Any, *,
                           allow_status: bool, allow_rest: bool, json_patch: bool = False) -> dict[str, Any]:  # fmt: skip
        key = (res, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise KubernetesObjectNotFoundError()
        current = self._objects[key].raw
        if json_patch:
            try:
                updated = dict(dicts.json_patch_dict(copy.deepcopy(current), list(patch)))
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise KubernetesError(422, "Invalid", f"the JSON patch does not apply: {exc}") from None
            if not allow_status:
                updated["status"] = copy.deepcopy(current.get("status"))
        else:
            patch = dict(patch or {})
            self._check_version((patch.get("metadata") or {}).get("resourceVersion"), current)
            if not allow_status:
                patch.pop("status", None)
            if not allow_rest:
                patch = {"status": patch.get("status")} if "status" in patch else {}
            if isinstance(patch.get("metadata"), dict):
                patch["metadata"] = {k: v for k, v in patch["metadata"].items() if k != "resourceVersion"}
            updated = dict(dicts.merge_patch_dict(copy.deepcopy(current), patch))
        if updated.get("status") is None:
            updated.pop("status", None)
        return await self._commit(res, key, current, updated)

    async def _commit(self, res: resource, key: Any, current: dict[str, Any], updated: dict[str, Any]) -> dict[str, Any]:
        def body_of(obj: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

        def without_version(obj: Mapping[str, Any]) -> dict[str, Any]:
            meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
            return {**obj, "metadata": meta}

        if without_version(updated) == without_version(current):
            return copy.deepcopy(current)  # a no-op write changes nothing, not even resourceVersion
        meta = updated.setdefault("metadata", {})
        if body_of(updated) != body_of(current):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_version()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects[key].delete()
            await self._buses[res].put({"type": "DELETED", "object": copy.deepcopy(updated)})
            await self._collect_dependents(meta.get("uid"))
            return copy.deepcopy(updated)
        self._objects[key].history.append(updated)
        await self._buses[res].put({"type": "MODIFIED", "object": copy.deepcopy(updated)})
        return copy.deepcopy(updated)

    async def _delete(self, res: resource, namespace: str | None, name: str) -> dict[str, Any]:
        key = (res, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise KubernetesObjectNotFoundError()
        current = self._objects[key].raw
        meta = current.get("metadata", {})
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return copy.deepcopy(current)
            now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            updated = copy.deepcopy(current)
            updated["metadata"]["deletionTimestamp"] = now
            return await self._commit(res, key, current, updated)
        self._objects[key].delete()
        await self._buses[res].put({"type": "DELETED", "object": copy.deepcopy(current)})
        await self._collect_dependents(meta.get("uid"))
        return copy.deepcopy(current)

    async def _collect_dependents(self, owner_uid: str | None) -> None:
        if not owner_uid:
            return
        for (res, namespace, name), obj in list(self._objects.items()):
            if obj.deleted:
                continue
            owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in owners):
                await self._delete(res, namespace, name)
