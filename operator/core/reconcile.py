"""The operator's "observe → decide" step: what an EmbeddingModel and the cluster look like now → which
children to apply or delete, the status to report, and the events to post. Pure: no I/O, no clock.

The plan ConfigMap the renderer writes (``<model>-plan``) is the record of placement: ``plan.json``
is the newest plan (the planner's ``previous`` next time) and ``routing.json`` the one clients route
by. A change of ``gpusPerPod`` or ``partitions`` makes a new plan version and rolls it out
make-before-break, one phase per reconcile once the cluster has caught up:

``Warming``   agents serve the union of the old and the new plan; routing stays on the old one;
``Switching`` (once every agent workload is ready) routing flips to the new plan;
``Draining``  (``drain_seconds`` later, so clients have re-read the plan) agents serve the new plan
              alone and workloads the new plan does not need are deleted;
``Idle``      (once they are ready again).

``replicas`` makes no plan: it only scales the agent workloads. The rollout phase lives in
``status.rebalance``; the plan being left is kept in the plan ConfigMap (``rollout-from.json``) so a
restarted operator resumes where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hps_operator.core.planner import plan_placement
from hps_operator.core.render import PLAN_KEY, ROUTING_KEY, plan_configmap_name, render_children
from hps_operator.core.topology import Topology

from node_agent.errors import InsufficientGPUMemoryError, InvalidSpecError
from node_agent.plan import Plan
from node_agent.spec import ModelSpec, parse_model

APPLIED_HASH_ANNOTATION = "hps.dev/applied-hash"
ROLLOUT_FROM_KEY = "rollout-from.json"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by NVIDIA's GPU feature discovery
CONDITION_TYPES = ("Ready", "Placed", "Loaded", "Progressing", "Degraded")


@dataclass(frozen=True)
class Observed:
    """What the handler read from the API for one EmbeddingModel."""

    model: Mapping[str, Any]
    nodes: Sequence[Mapping[str, Any]]
    #: every object labelled ``app.kubernetes.io/instance=<model>`` that the model owns
    children: Sequence[Mapping[str, Any]]
    #: the Redis AUTH password: the one in the live Secret, or a fresh one the handler generated
    redis_password: str
    #: current time, RFC 3339 (conditions' lastTransitionTime, drain timing)
    now: str


@dataclass(frozen=True)
class Options:
    #: the agent image when ``spec.agent.image`` is empty
    image: str
    #: seconds between the routing switch and dropping the old plan's shards
    drain_seconds: float = 30.0


@dataclass(frozen=True, order=True)
class ChildRef:
    api_version: str
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class EventNote:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    #: manifests that differ from (or are missing in) the cluster, sorted by (kind, name)
    apply: tuple[dict[str, Any], ...]
    delete: tuple[ChildRef, ...]
    #: the whole status to report (the handler writes it only when it differs)
    status: dict[str, Any]
    events: tuple[EventNote, ...]


@dataclass(frozen=True)
class _Rollout:
    phase: str  # Idle | Warming | Switching | Draining
    target: Plan
    active: Plan | None = None  # the plan being left (Warming, Switching)
    switched_at: str | None = None


# ---------------------------------------------------------------------------------------------
# entry point


def reconcile(observed: Observed, options: Options) -> Decision:
    """Decides the next step for one EmbeddingModel (see the module docstring)."""
    old_status = dict(observed.model.get("status") or {})
    try:
        model = parse_model(observed.model)
        return _reconcile_valid(model, observed, options, old_status)
    except InvalidSpecError as exc:
        status = _base_status(observed, old_status, ready=_ready_replicas(observed.children))
        _set(status, observed.now, "Ready", "False", "InvalidSpec", str(exc))
        return Decision((), (), status, (EventNote("Warning", "InvalidSpec", str(exc)),))


def _reconcile_valid(model: ModelSpec, observed: Observed, options: Options,
                     old_status: dict[str, Any]) -> Decision:  # fmt: skip
    events: list[EventNote] = []
    children = _index(observed.children)
    plan_cm = next((c for c in observed.children
                    if c.get("kind") == "ConfigMap" and c["metadata"]["name"] == plan_configmap_name(model)), None)  # fmt: skip
    stored = _load_plans(plan_cm)
    previous = stored.get(PLAN_KEY)
    try:
        planned = _plan(model, observed.nodes, previous)
    except InsufficientGPUMemoryError as exc:
        # the running deployment keeps serving: no child is touched, the plan stays
        status = _base_status(observed, old_status, ready=_ready_replicas(observed.children))
        _set(status, observed.now, "Placed", "False", "InsufficientGPUMemory", str(exc))
        return Decision((), (), status, (EventNote("Warning", "InsufficientGPUMemory", str(exc)),))

    rollout = _current_rollout(old_status, stored, previous)
    if rollout is None:
        rollout = _Rollout("Idle", dataclasses.replace(planned, version=1))
        events.append(EventNote("Normal", "Placed", f"plan v1: {_plan_summary(rollout.target)}"))
    elif not _same_placement(planned, rollout.target):
        new = dataclasses.replace(planned, version=rollout.target.version + 1)
        # clients keep routing by what they route by now while the new owners warm up
        routing = stored.get(ROUTING_KEY) or rollout.target
        rollout = _Rollout("Warming", new, active=routing)
        events.append(EventNote("Normal", "RebalanceStarted",
                                f"plan v{routing.version} → v{new.version}: {_plan_summary(new)}"))  # fmt: skip

    desired = _render(model, observed, options, rollout)
    advanced = _advance(rollout, desired, children, observed.now, options)
    if advanced != rollout:
        events.append(_phase_event(rollout, advanced))
        rollout = advanced
        desired = _render(model, observed, options, rollout)

    desired_refs = {_ref(m) for m in desired}
    apply = tuple(m for m in desired if _needs_apply(m, children.get(_ref(m))))
    delete = tuple(sorted(ref for ref in children if ref not in desired_refs))
    ready = _ready_replicas([children[r] for r in desired_refs if r in children])
    status = _base_status(observed, old_status, ready=ready)
    target = rollout.target
    status["placement"] = {"version": target.version, "imbalance": round(target.metrics.imbalance, 6),
                           "movedBytes": target.metrics.moved_bytes}  # fmt: skip
    status["rebalance"] = _rebalance_status(rollout)
    _serving_conditions(status, observed.now, rollout)
    if apply and not events:
        events.append(EventNote("Normal", "Applied",
                                ", ".join(f"{m['kind']}/{m['metadata']['name']}" for m in apply)))  # fmt: skip
    return Decision(apply, delete, status, tuple(events))


# ---------------------------------------------------------------------------------------------
# placement


def gpu_capacity(model: ModelSpec, nodes: Sequence[Mapping[str, Any]]) -> tuple[int | None, int]:
    """``(smallest GPU memory in bytes among nodes that fit a pod — None when no such node says —,
    number of GPU nodes)``. A node fits a pod when it can allocate ``gpusPerPod`` GPUs."""
    gpu_nodes = [n for n in nodes if _allocatable_gpus(model, n) > 0]
    memories = [
        int(str(_labels(n)[GPU_MEMORY_LABEL])) * 2**20
        for n in gpu_nodes
        if _allocatable_gpus(model, n) >= model.gpus_per_pod and str(_labels(n).get(GPU_MEMORY_LABEL, "")).isdigit()
    ]
    return (min(memories) if memories else None), len(gpu_nodes)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata", {}).get("labels") or {}


def _allocatable_gpus(model: ModelSpec, node: Mapping[str, Any]) -> int:
    value = str(((node.get("status") or {}).get("allocatable") or {}).get(model.agent.gpu_resource_name, "0"))
    return int(value) if value.isdigit() else 0


def _plan(model: ModelSpec, nodes: Sequence[Mapping[str, Any]], previous: Plan | None) -> Plan:
    """Plans against the GPUs the cluster reports: the cache budget of a GPU is the spec's
    ``memoryPerGPU`` capped by the smallest GPU among the nodes that fit a pod. Without GPU nodes
    (a CPU-only cluster: agents cache in host memory) the spec's budget stands."""
    gpu_memory, gpu_nodes = gpu_capacity(model, nodes)
    if gpu_nodes and not any(_allocatable_gpus(model, n) >= model.gpus_per_pod for n in nodes):
        raise InsufficientGPUMemoryError(
            model.total_bytes, 0, f"no node can allocate {model.gpus_per_pod} {model.agent.gpu_resource_name}"
        )
    budget = model.cache.memory_per_gpu if gpu_memory is None else min(model.cache.memory_per_gpu, gpu_memory)
    return plan_placement(model, Topology.from_model(model, gpu_memory=budget), previous)


def _same_placement(a: Plan, b: Plan) -> bool:
    return (a.partitions, a.gpus_per_pod, a.bucket_count, sorted(a.assignments)) == (
        b.partitions, b.gpus_per_pod, b.bucket_count, sorted(b.assignments))  # fmt: skip


def _plan_summary(plan: Plan) -> str:
    return (f"{plan.partitions} partition(s) x {plan.gpus_per_pod} GPU(s), imbalance "
            f"{plan.metrics.imbalance:.3f}, moved {plan.metrics.moved_bytes} bytes")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# rollout


def _load_plans(plan_cm: Mapping[str, Any] | None) -> dict[str, Plan]:
    plans: dict[str, Plan] = {}
    for key in (PLAN_KEY, ROUTING_KEY, ROLLOUT_FROM_KEY):
        text = ((plan_cm or {}).get("data") or {}).get(key)
        if text:
            try:
                plans[key] = Plan.from_json(text)
            except (ValueError, KeyError, TypeError):
                continue  # a hand-edited or truncated plan is replanned, not trusted
    return plans


def _current_rollout(old_status: Mapping[str, Any], stored: Mapping[str, Plan], previous: Plan | None) -> _Rollout | None:
    if previous is None:
        return None
    rebalance = old_status.get("rebalance") or {}
    phase = str(rebalance.get("phase", "Idle")) if rebalance.get("state") == "Rebalancing" else "Idle"
    if int(rebalance.get("toVersion", previous.version)) != previous.version:
        phase = "Idle"  # the status lags the ConfigMap (a lost status write): trust the ConfigMap
    active = stored.get(ROLLOUT_FROM_KEY)
    if phase in ("Warming", "Switching") and active is None:
        phase = "Draining"  # the plan being left is gone: finish onto the target
    return _Rollout(phase, previous, active if phase in ("Warming", "Switching") else None,
                    rebalance.get("switchedAt"))  # fmt: skip


def _render(model: ModelSpec, observed: Observed, options: Options, rollout: _Rollout) -> list[dict[str, Any]]:
    meta = observed.model["metadata"]
    owner = {"apiVersion": observed.model.get("apiVersion", "hps.dev/v1alpha1"),
             "kind": observed.model.get("kind", "EmbeddingModel"), "name": meta["name"], "uid": meta.get("uid", "")}  # fmt: skip
    manifests = render_children(model, rollout.target, owner=owner, image=options.image,
                                redis_password=observed.redis_password, active_plan=rollout.active,
                                phase=rollout.phase)  # fmt: skip
    result = []
    for m in manifests:
        m = copy.deepcopy(m)
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == plan_configmap_name(model) and rollout.active:
            m["data"][ROLLOUT_FROM_KEY] = rollout.active.to_json()
        result.append(_with_hash(m))
    return result


def _is_agent_workload(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("kind") == "StatefulSet" and _labels(manifest).get(COMPONENT_LABEL) == "agent"


def _workloads_ready(desired: Sequence[Mapping[str, Any]], children: Mapping[ChildRef, Mapping[str, Any]]) -> bool:
    """Whether every desired agent workload runs its desired version with all replicas ready."""
    for m in desired:
        if not _is_agent_workload(m):
            continue
        live = children.get(_ref(m))
        if live is None or _needs_apply(m, live):
            return False
        status = live.get("status") or {}
        if int(status.get("observedGeneration", 0)) < int(live["metadata"].get("generation", 0)):
            return False
        want = int(m["spec"].get("replicas", 1))
        if int(status.get("readyReplicas", 0)) < want or int(status.get("updatedReplicas", want)) < want:
            return False
    return True


def _advance(rollout: _Rollout, desired: Sequence[Mapping[str, Any]], children: Mapping[ChildRef, Mapping[str, Any]],
             now: str, options: Options) -> _Rollout:  # fmt: skip
    if rollout.phase == "Warming" and _workloads_ready(desired, children):
        return _Rollout("Switching", rollout.target, rollout.active, now)
    if rollout.phase == "Switching":
        switched = _parse_time(rollout.switched_at or now)
        if (_parse_time(now) - switched).total_seconds() >= options.drain_seconds:
            return _Rollout("Draining", rollout.target, None, rollout.switched_at)
    if rollout.phase == "Draining" and _workloads_ready(desired, children):
        return _Rollout("Idle", rollout.target)
    return rollout


def _phase_event(before: _Rollout, after: _Rollout) -> EventNote:
    version = after.target.version
    messages = {
        "Switching": ("RoutingSwitched", f"new owners are warm; clients now route by plan v{version}"),
        "Draining": ("Draining", f"dropping shards that plan v{version} moved away"),
        "Idle": ("RebalanceCompleted", f"serving plan v{version}"),
    }
    reason, message = messages.get(after.phase, (after.phase, f"plan v{version}"))
    return EventNote("Normal", reason, message)


def _rebalance_status(rollout: _Rollout) -> dict[str, Any]:
    if rollout.phase == "Idle":
        return {"state": "Idle", "version": rollout.target.version}
    result: dict[str, Any] = {"state": "Rebalancing", "phase": rollout.phase, "toVersion": rollout.target.version}
    if rollout.active is not None:
        result["fromVersion"] = rollout.active.version
    if rollout.switched_at:
        result["switchedAt"] = rollout.switched_at
    return result


def _ready_replicas(children: Sequence[Mapping[str, Any]]) -> int:
    """Replicas that serve: a replica needs every partition, so the fewest ready over the agents."""
    agents = [c for c in children if _is_agent_workload(c)]
    if not agents:
        return 0
    return min(int((c.get("status") or {}).get("readyReplicas", 0)) for c in agents)


# ---------------------------------------------------------------------------------------------
# diffing


def _ref(manifest: Mapping[str, Any]) -> ChildRef:
    meta = manifest["metadata"]
    return ChildRef(manifest["apiVersion"], manifest["kind"], meta.get("namespace", ""), meta["name"])


def _index(children: Sequence[Mapping[str, Any]]) -> dict[ChildRef, Mapping[str, Any]]:
    return {_ref(c): c for c in children}


def _with_hash(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Stamps the manifest's own hash on it, so a changed field that the renderer dropped (which a
    subset comparison cannot see) still triggers an apply."""
    m = copy.deepcopy(dict(manifest))
    annotations = m["metadata"].setdefault("annotations", {})
    annotations.pop(APPLIED_HASH_ANNOTATION, None)
    digest = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    annotations[APPLIED_HASH_ANNOTATION] = digest
    return m


def _needs_apply(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    if live is None:
        return True
    if (live["metadata"].get("annotations") or {}).get(APPLIED_HASH_ANNOTATION) != desired["metadata"][
        "annotations"
    ][APPLIED_HASH_ANNOTATION]:
        return True
    # the same manifest was applied; re-apply only where someone changed it since (drift)
    return not _contains(live, {k: v for k, v in desired.items() if k not in ("stringData", "status")})


def _contains(live: Any, desired: Any) -> bool:
    """Whether every field of ``desired`` is in ``live`` with the same value (the API server adds
    defaults, so extra fields in ``live`` are fine)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(k in live and _contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(
            _contains(a, b) for a, b in zip(live, desired, strict=True))  # fmt: skip
    return bool(live == desired)


# ---------------------------------------------------------------------------------------------
# status


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _set(status: dict[str, Any], now: str, type_: str, value: str, reason: str, message: str) -> None:
    """Sets one metav1.Condition; lastTransitionTime moves only when the status value changes."""
    conditions = status.setdefault("conditions", [])
    for c in conditions:
        if c["type"] == type_:
            if c["status"] != value:
                c["lastTransitionTime"] = now
            c.update(status=value, reason=reason, message=message)
            c["observedGeneration"] = status.get("observedGeneration", 0)
            return
    conditions.append({"type": type_, "status": value, "reason": reason, "message": message,
                       "lastTransitionTime": now, "observedGeneration": status.get("observedGeneration", 0)})  # fmt: skip


def _base_status(observed: Observed, old: Mapping[str, Any], *, ready: int) -> dict[str, Any]:
    """The status fields that do not depend on a placement; placement and rebalance carry over."""
    meta = observed.model["metadata"]
    replicas = (observed.model.get("spec") or {}).get("replicas", 1)
    status: dict[str, Any] = {
        "observedGeneration": int(meta.get("generation", 0)),
        "conditions": [dict(c) for c in old.get("conditions") or [] if c.get("type") in CONDITION_TYPES],
        "replicas": replicas if isinstance(replicas, int) and not isinstance(replicas, bool) else 0,
        "readyReplicas": ready,
        "selector": f"{INSTANCE_LABEL}={meta['name']}",
    }
    for key in ("placement", "rebalance"):
        if key in old:
            status[key] = copy.deepcopy(old[key])
    for c in status["conditions"]:
        c["observedGeneration"] = status["observedGeneration"]
    for type_ in CONDITION_TYPES:  # every condition is reported from the first reconcile on
        if not any(c["type"] == type_ for c in status["conditions"]):
            _set(status, observed.now, type_, "False" if type_ == "Degraded" else "Unknown", "Pending", "")
    return status


def _serving_conditions(status: dict[str, Any], now: str, rollout: _Rollout) -> None:
    want, ready = status["replicas"], status["readyReplicas"]
    version = rollout.target.version
    _set(status, now, "Placed", "True", "Placed", f"plan v{version}: {_plan_summary(rollout.target)}")
    loaded = ready > 0 or want == 0
    _set(status, now, "Loaded", "True" if loaded else "False", "TablesLoaded" if loaded else "Loading",
         f"{ready}/{want} replicas have loaded their shards")  # fmt: skip
    if rollout.phase != "Idle":
        source = f"v{rollout.active.version} → " if rollout.active else ""
        _set(status, now, "Progressing", "True", "Rebalancing", f"plan {source}v{version}: {rollout.phase}")
    elif ready != want:
        _set(status, now, "Progressing", "True", "Scaling", f"{ready}/{want} replicas ready")
    else:
        _set(status, now, "Progressing", "False", "Idle", f"serving plan v{version}")
    degraded = 0 < ready < want and rollout.phase == "Idle"
    _set(status, now, "Degraded", "True" if degraded else "False",
         "ReplicasUnavailable" if degraded else "AsExpected", f"{ready}/{want} replicas ready")  # fmt: skip
    ok = ready >= want
    _set(status, now, "Ready", "True" if ok else "False", "Serving" if ok else "ReplicasNotReady",
         f"{ready}/{want} replicas ready")  # fmt: skip
