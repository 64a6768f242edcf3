"""The operator's "observe → decide" step: what an EmbeddingModel and the cluster look like now → which
children to apply or delete, the status to report, and the events to post. Pure: no I/O, no clock.

It composes the other pure parts and adds none of their logic: the planner places, ``rollout.advance``
moves the make-before-break rollout one step, ``render.render_children`` builds the manifests for the
rollout's phase, and ``status.compute_status`` writes the whole status (``status.rebalance`` is
``Rollout.to_status()``, one shape, the CRD's).

The plan ConfigMap the renderer writes (``<model>-plan``) is the record of placement: ``plan.json``
is the newest plan (the planner's ``previous`` next time) and ``routing.json`` the one clients route
by; during Warming and Switching ``rollout-from.json`` keeps the plan being left, so a restarted
operator resumes where it was. ``replicas`` makes no plan: it only scales the agent workloads.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hps_operator.core.live_diff import contains, needs_apply, with_hash
from hps_operator.core.partition_scaling import HitRateReading, scale_partitions
from hps_operator.core.planner import plan_placement
from hps_operator.core.render import (
    MAX_CONFIGMAP_BYTES,
    PLAN_KEY,
    PLAN_VERSION_LABEL,
    ROUTING_KEY,
    agent_config_name,
    check_renderable,
    configmap_bytes,
    plan_configmap_name,
    render_children,
)
from hps_operator.core.rollout import (
    DEFAULT_SWITCH_GRACE_S,
    Action,
    Phase,
    Rollout,
    RolloutObservation,
    advance,
)
from hps_operator.core.scheduling import gpu_capacity, scheduling_wait
from hps_operator.core.status import (
    COMPONENT_LABEL,
    compute_status,
    get_condition,
    observe_children,
    statefulset_rolled_out,
)
from hps_operator.core.topology import Topology

from node_agent.errors import HpsError, InsufficientGPUMemoryError, InvalidSpecError
from node_agent.plan import Plan
from node_agent.spec import ModelSpec, parse_model

ROLLOUT_FROM_KEY = "rollout-from.json"
INSTANCE_LABEL = "app.kubernetes.io/instance"

#: ``Decision.outcome`` values (the operator's reconcile metric counts them)
RECONCILED = "Reconciled"
INVALID_SPEC = "InvalidSpec"
INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
OBJECT_TOO_LARGE = "ObjectTooLarge"
#: the StatefulSet fields the API server refuses to change
STATEFULSET_IMMUTABLE = ("selector", "serviceName", "podManagementPolicy", "volumeClaimTemplates")


@dataclass(frozen=True)
class Observed:
    """What the handler read from the API for one EmbeddingModel."""

    model: Mapping[str, Any]
    nodes: Sequence[Mapping[str, Any]]
    #: every object labelled ``app.kubernetes.io/instance=<model>`` that the model owns
    children: Sequence[Mapping[str, Any]]
    #: a fresh random Redis password, used only if the model's Secret does not exist yet (the operator
    #: never reads a Secret back)
    redis_password: str
    #: current time, RFC 3339 (conditions' lastTransitionTime, rollout timing)
    now: str
    #: the model's agent pods (to tell pods the scheduler cannot place)
    agent_pods: Sequence[Mapping[str, Any]] = ()
    #: the cluster's running pods, read only while agent pods wait for GPUs (to count free GPUs)
    node_pods: Sequence[Mapping[str, Any]] | None = None
    #: the agents' L1 hits and misses per second, for ``spec.autoscaling.partitions`` (None: unknown)
    hit_rate: HitRateReading | None = None
    #: fresh random passwords of the Redis ACL users (role → password), used as ``redis_password``
    #: (empty: derived from it)
    redis_user_passwords: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    #: the agent image when ``spec.agent.image`` is empty
    image: str
    #: seconds between the routing switch and dropping the old plan's shards (clients re-read routing)
    drain_seconds: float = DEFAULT_SWITCH_GRACE_S
    #: ``imagePullPolicy`` of the agent and loader containers; None leaves Kubernetes' default
    image_pull_policy: str | None = None
    #: the partition autoscaler's windows, overridden (``elasticity.PartitionAutoscaling`` fields)
    partition_tunables: Mapping[str, float] = dataclasses.field(default_factory=dict)


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


class ObjectTooLargeError(HpsError):
    """A child would exceed what the API server stores (a ConfigMap's 1 MiB)."""


@dataclass(frozen=True)
class Decision:
    """What the handler carries out, in this order: ``create``, ``replace``, ``apply``, ``delete``,
    ``scale``; then it writes ``status`` and posts ``events``. Each child is written on its own, so one the API
    server refuses does not stop the others (the handler reports it, see
    ``status.with_apply_failures``)."""

    #: manifests that differ from (or are missing in) the cluster, sorted by (kind, name)
    apply: tuple[dict[str, Any], ...]
    delete: tuple[ChildRef, ...]
    #: the whole status to report (the handler writes it only when it differs)
    status: dict[str, Any]
    events: tuple[EventNote, ...]
    #: RECONCILED, INVALID_SPEC, INSUFFICIENT_GPU_MEMORY or OBJECT_TOO_LARGE
    outcome: str = RECONCILED
    #: created when absent and never read back or updated: the Redis password Secret (the operator
    #: needs no read access to Secrets; pods read the password from it by reference)
    create: tuple[dict[str, Any], ...] = ()
    #: the StatefulSets already running whose pods read those Secrets' passwords at start: a Secret
    #: that ``create`` finds missing (someone deleted it) is made with new passwords, which only pods
    #: started afterwards get, so these are restarted then, all of them (Redis and the agents must
    #: agree on the passwords)
    restart_on_create: tuple[ChildRef, ...] = ()
    #: StatefulSets whose immutable fields (selector, serviceName, podManagementPolicy,
    #: volumeClaimTemplates) change: deleted with their pods orphaned, then applied anew, when the
    #: new StatefulSet adopts the running pods and rolls them
    replace: tuple[ChildRef, ...] = ()
    #: agent StatefulSets whose replica count alone is to change (``(ref, replicas)``), when nothing else
    #: of the model may be applied: a spec that cannot be placed leaves the deployment as it runs, but
    #: ``kubectl scale`` and the HPA still size it
    scale: tuple[tuple[ChildRef, int], ...] = ()


# ---------------------------------------------------------------------------------------------
# entry point


def reconcile(observed: Observed, options: Options) -> Decision:
    """Decides the next step for one EmbeddingModel (see the module docstring)."""
    old_status = dict(observed.model.get("status") or {})
    rollout = _rollout_from_status(old_status)
    try:
        model = parse_model(observed.model)
        check_renderable(model)
    except InvalidSpecError as exc:
        # nothing is touched: the running deployment keeps serving the last valid spec
        status = _status(observed, old_status, model=None, plan=None, rollout=rollout, error=exc)
        return Decision((), (), status, tuple(_condition_events(old_status, status)), INVALID_SPEC)
    return _reconcile_valid(model, observed, options, old_status, rollout)


def _reconcile_valid(model: ModelSpec, observed: Observed, options: Options, old_status: dict[str, Any],
                     rollout: Rollout) -> Decision:  # fmt: skip
    children = _index(observed.children)
    stored = _load_plans(_plan_configmap(model, observed.children))
    if PLAN_KEY not in stored:
        # deleted or made unreadable: what the agents read still says which plans they serve
        stored = _recovered_plans(model, observed.children, rollout) or stored
    previous = stored.get(PLAN_KEY)
    scaling = scale_partitions(
        model, routed_partitions=previous.partitions if previous is not None else max(1, model.partitions),
        reading=observed.hit_rate, now=_parse_time(observed.now).timestamp(), previous_status=old_status,
        may_decide=rollout.phase is Phase.IDLE and previous is not None, tunables=options.partition_tunables,
    )  # fmt: skip
    if scaling is not None:
        # the operator's count, not the spec's (see partition_scaling)
        model = dataclasses.replace(model, partitions=scaling.partitions)
    try:
        planned = _plan(model, observed.nodes, previous)
    except InsufficientGPUMemoryError as exc:
        # the running deployment keeps serving: no child is touched, the plan stays
        status = _status(observed, old_status, model=model, plan=previous, rollout=rollout, error=exc,
                         active_plan=_plan_of(stored, rollout.active_version))  # fmt: skip
        _keep_autoscaling(status, old_status)
        return Decision((), (), status, tuple(_condition_events(old_status, status)), INSUFFICIENT_GPU_MEMORY,
                        scale=_rescaled(children, model.replicas))  # fmt: skip

    if previous is None:
        # The first plan, or the ConfigMap and the agents' config were both deleted. The planner is
        # deterministic, so a spec never rebalanced gives the same plan again: it keeps the version the
        # status reports, and a rollout whose plans are lost finishes onto it.
        version = rollout.target_version or 1
        target = dataclasses.replace(planned, version=version)
        if rollout.target_version is not None:
            rollout = Rollout(Phase.IDLE, version, version, rollout.since)
    else:
        if rollout.target_version != previous.version:
            # the status lags the ConfigMap (a lost status write): the ConfigMap is the record
            rollout = Rollout(Phase.IDLE, previous.version, previous.version, rollout.since)
        same = _same_placement(planned, previous)
        target = previous if same else dataclasses.replace(planned, version=previous.version + 1)
    plans: dict[int | None, Plan] = {**{p.version: p for p in stored.values()}, target.version: target}

    agents_ready = False
    if rollout.phase is not Phase.IDLE and rollout.target_version == target.version:
        leaving = plans.get(rollout.active_version)
        current = _render(model, observed, options, target, leaving, rollout.phase)
        agents_ready = _agents_rolled_out(current, children, leaving, target)
    advanced, actions = advance(
        rollout,
        RolloutObservation(
            desired_version=target.version, agents_ready=agents_ready, now=_parse_time(observed.now)
        ),
        switch_grace_s=options.drain_seconds,
    )
    active = (
        plans.get(advanced.active_version) if advanced.phase in (Phase.WARMING, Phase.SWITCHING) else None
    )
    if advanced.phase in (Phase.WARMING, Phase.SWITCHING) and active is None:
        # the plan being left is gone (the ConfigMap was replaced): nothing can serve it, finish onto the target
        advanced, actions = dataclasses.replace(advanced, phase=Phase.DRAINING), (Action.DROP_OLD_SHARDS,)

    desired = _render(model, observed, options, target, active, advanced.phase)
    too_large = [
        f"ConfigMap/{m['metadata']['name']} would hold {configmap_bytes(m)} bytes"
        for m in desired
        if m["kind"] == "ConfigMap" and configmap_bytes(m) > MAX_CONFIGMAP_BYTES
    ]
    if too_large:
        # nothing is written: the API server would refuse it, and the deployment keeps serving
        error = ObjectTooLargeError(
            f"{'; '.join(too_large)}, over the API server's {MAX_CONFIGMAP_BYTES} bytes: fewer tables or "
            "GPUs per model, or a larger spec.placement.bucketCount granularity, would shrink the plan"
        )
        status = _status(observed, old_status, model=model, plan=previous, rollout=rollout, error=error,
                         active_plan=_plan_of(stored, rollout.active_version))  # fmt: skip
        _keep_autoscaling(status, old_status)
        return Decision((), (), status, tuple(_condition_events(old_status, status)), OBJECT_TOO_LARGE)
    desired_refs = {_ref(m) for m in desired}
    create = tuple(m for m in desired if m["kind"] == "Secret")
    apply = tuple(m for m in desired if m["kind"] != "Secret" and needs_apply(m, children.get(_ref(m)))
                  and not _kept_while_left(m, children.get(_ref(m)), active, target))  # fmt: skip
    replace = tuple(_ref(m) for m in apply if _immutable_fields_change(m, children.get(_ref(m))))
    delete = tuple(sorted(ref for ref in children if ref not in desired_refs))
    status = _status(observed, old_status, model=model, plan=target, rollout=advanced, active_plan=active,
                     desired=desired)  # fmt: skip

    if scaling is not None:
        status["autoscaling"] = scaling.status
    events = [_action_event(action, rollout, advanced, target) for action in actions]
    if scaling is not None and scaling.changed:
        reason = "PartitionsWidened" if scaling.action == "widen" else "PartitionsNarrowed"
        events.insert(0, EventNote("Normal", reason, f"to {scaling.partitions} partitions: {scaling.reason}"))
    steady = not actions and old_status.get("observedGeneration") == status.get("observedGeneration")
    if steady and (apply or delete):
        # the spec and the plan did not move: what differs was changed or deleted behind our back
        missing = [m for m in apply if _ref(m) not in children]
        changed = [m for m in apply if _ref(m) in children]
        if missing:
            events.append(
                EventNote("Warning", "ChildRecreated", f"recreated what was missing: {_names(missing)}")
            )
        if changed:
            events.append(
                EventNote("Warning", "DriftCorrected", f"re-applied what was changed: {_names(changed)}")
            )
    elif (apply or delete) and not events:
        summary = [f"applied {_names(apply)}"] if apply else []
        summary += [f"deleted {', '.join(f'{r.kind}/{r.name}' for r in delete)}"] if delete else []
        events.append(EventNote("Normal", "Applied", "; ".join(summary)))
    events += _condition_events(old_status, status)
    restart_on_create = tuple(sorted(ref for ref in children if ref.kind == "StatefulSet")) if create else ()
    return Decision(apply, delete, status, tuple(events), create=create, replace=replace,
                    restart_on_create=restart_on_create)  # fmt: skip


def _rescaled(children: Mapping[ChildRef, Mapping[str, Any]], replicas: int) -> tuple[tuple[ChildRef, int], ...]:
    """The running agent sets whose replica count is not ``replicas`` (the scale subresource's value):
    replicas never need a plan, so a spec change that cannot be placed does not stop them."""
    return tuple(
        (ref, replicas)
        for ref, live in sorted(children.items())
        if _is_agent_workload(live) and (live.get("spec") or {}).get("replicas") != replicas
    )


def _keep_autoscaling(status: dict[str, Any], old_status: Mapping[str, Any]) -> None:
    """A round that plans nothing keeps what the partition autoscaler knew."""
    if "autoscaling" in old_status:
        status["autoscaling"] = old_status["autoscaling"]


def _immutable_fields_change(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """A live StatefulSet cannot take ``desired`` as an update (the API server answers 422)."""
    if live is None or desired.get("kind") != "StatefulSet":
        return False
    want, have = desired.get("spec") or {}, live.get("spec") or {}
    for field in STATEFULSET_IMMUTABLE:
        if field == "volumeClaimTemplates":
            if not contains(have.get(field) or [], want.get(field) or []):
                return True
        elif field in want and not contains(have.get(field), want[field]):
            return True
    return False


def _status(observed: Observed, old_status: Mapping[str, Any], *, model: ModelSpec | None, plan: Plan | None,
            rollout: Rollout, error: HpsError | None = None,
            active_plan: Plan | None = None, desired: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    meta = observed.model["metadata"]
    generation = meta.get("generation")
    children = observe_children(observed.children, desired=desired)
    if model is not None:
        wait = scheduling_wait(model, observed.agent_pods, observed.nodes, observed.node_pods)
        children = dataclasses.replace(children, scheduling=wait)
    return compute_status(
        name=meta["name"],
        generation=int(generation) if generation is not None else None,
        model=model,
        plan=plan,
        observed=children,
        rollout=rollout,
        now=observed.now,
        error=error,
        active_plan=active_plan,
        previous=old_status,
    )


def _rollout_from_status(status: Mapping[str, Any]) -> Rollout:
    try:
        return Rollout.from_status(status.get("rebalance"))
    except (ValueError, TypeError):
        return Rollout()  # a hand-edited status: the plan ConfigMap decides (see _reconcile_valid)


# ---------------------------------------------------------------------------------------------
# placement


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata", {}).get("labels") or {}


def _plan(model: ModelSpec, nodes: Sequence[Mapping[str, Any]], previous: Plan | None) -> Plan:
    """Plans against the GPUs of the nodes the model's agents can schedule on (its nodeSelector,
    tolerations and required node affinity): the cache budget of a GPU is the spec's
    ``memoryPerGPU`` capped by the smallest such GPU. Without GPU nodes it can use (a CPU-only
    cluster: agents cache in host memory) the spec's budget stands."""
    capacity = gpu_capacity(model, nodes)
    if capacity.gpu_nodes and not capacity.pod_nodes:
        raise InsufficientGPUMemoryError(
            model.total_bytes, 0, f"no node the agents can run on can allocate {model.gpus_per_pod} "
            f"{model.agent.gpu_resource_name}",
        )  # fmt: skip
    memory = capacity.gpu_memory_bytes
    budget = model.cache.memory_per_gpu if memory is None else min(model.cache.memory_per_gpu, memory)
    return plan_placement(model, Topology.from_model(model, gpu_memory=budget), previous)


def _same_placement(a: Plan, b: Plan) -> bool:
    return (a.partitions, a.gpus_per_pod, a.bucket_count, sorted(a.assignments)) == (
        b.partitions, b.gpus_per_pod, b.bucket_count, sorted(b.assignments))  # fmt: skip


def _plan_summary(plan: Plan) -> str:
    metrics = plan.metrics
    return (f"{plan.strategy}, {plan.partitions} partition(s) x {plan.gpus_per_pod} GPU(s), imbalance "
            f"{metrics.imbalance:.3f}, moves {metrics.moved_bytes} bytes (lower bound "
            f"{metrics.movement_lower_bound})")  # fmt: skip


def _plan_configmap(model: ModelSpec, children: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    name = plan_configmap_name(model)
    return next((c for c in children if c.get("kind") == "ConfigMap" and c["metadata"]["name"] == name), None)


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


def _recovered_plans(model: ModelSpec, children: Sequence[Mapping[str, Any]], rollout: Rollout) -> dict[str, Plan]:
    """The plans a lost ``<model>-plan`` held, put together again from ``<model>-config``, which keeps
    each agent set's share of its plan (``p<N>-<hash>.json``: partition N's assignments and the whole
    plan's version, shape and metrics). A plan comes back only whole (a share of every partition): the
    one the status names as the target, and the one a rollout is leaving. Planning afresh instead
    would give a plan reached through rebalances a different placement under the same version, and
    replace its serving agents at once. Empty when nothing whole is found."""
    name = agent_config_name(model)
    config = next((c for c in children if c.get("kind") == "ConfigMap" and c["metadata"]["name"] == name), None)
    shares: dict[int, dict[int, Plan]] = {}
    for key, text in ((config or {}).get("data") or {}).items():
        found = _SHARE_KEY.fullmatch(key)
        if found is None:
            continue
        try:
            share = Plan.from_json(text)
        except (ValueError, KeyError, TypeError):
            continue
        shares.setdefault(share.version, {})[int(found.group(1))] = share
    whole = {
        version: dataclasses.replace(
            by_partition[0], assignments=tuple(a for p in sorted(by_partition) for a in by_partition[p].assignments)
        )
        for version, by_partition in shares.items()
        if set(by_partition) == set(range(by_partition[min(by_partition)].partitions))
    }  # fmt: skip
    if not whole:
        return {}
    target = whole.get(rollout.target_version) if rollout.target_version is not None else None
    target = target or whole[max(whole)]
    recovered = {PLAN_KEY: target}
    leaving = whole.get(rollout.active_version) if rollout.active_version is not None else None
    if leaving is not None and leaving.version != target.version:
        recovered[ROLLOUT_FROM_KEY] = leaving
    return recovered


#: a key of ``<model>-config`` holding one agent set's share of a plan (``partition_plan_key``)
_SHARE_KEY = re.compile(r"p(\d+)-[0-9a-z]+\.json")


def _plan_of(stored: Mapping[str, Plan], version: int | None) -> Plan | None:
    return next((p for p in stored.values() if p.version == version), None)


# ---------------------------------------------------------------------------------------------
# rendering and the rollout's view of the agents


def _render(model: ModelSpec, observed: Observed, options: Options, target: Plan, active: Plan | None,
            phase: Phase) -> list[dict[str, Any]]:  # fmt: skip
    meta = observed.model["metadata"]
    owner = {"apiVersion": observed.model.get("apiVersion", "hps.dev/v1alpha1"),
             "kind": observed.model.get("kind", "EmbeddingModel"), "name": meta["name"], "uid": meta.get("uid", "")}  # fmt: skip
    manifests = render_children(model, target, owner=owner, image=options.image,
                                redis_password=observed.redis_password,
                                redis_user_passwords=observed.redis_user_passwords or None, active_plan=active, phase=phase,
                                image_pull_policy=options.image_pull_policy)  # fmt: skip
    result = []
    for m in manifests:
        m = copy.deepcopy(m)
        if (
            m["kind"] == "ConfigMap"
            and m["metadata"]["name"] == plan_configmap_name(model)
            and active is not None
        ):
            m["data"][ROLLOUT_FROM_KEY] = active.to_json()
        result.append(with_hash(m))
    return result


def _kept_while_left(manifest: Mapping[str, Any], live: Mapping[str, Any] | None, active: Plan | None,
                     target: Plan) -> bool:  # fmt: skip
    """An agent set of the plan being left (Warming, Switching: ``active`` is not ``None``) keeps serving
    as it runs. The spec change that made the new plan may change its pod template too (the model
    file's hash, its resources), and applying that would restart its pods while clients still route to
    them, before the new owners serve. It is dropped, unchanged, once the rollout drains; one that is
    gone is made again."""
    return (
        active is not None
        and active.version != target.version
        and live is not None
        and _is_agent_workload(manifest)
        and (manifest["metadata"].get("annotations") or {}).get(PLAN_VERSION_LABEL) == str(active.version)
    )


def _is_agent_workload(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("kind") == "StatefulSet" and _labels(manifest).get(COMPONENT_LABEL) == "agent"


def _agents_rolled_out(desired: Sequence[Mapping[str, Any]], children: Mapping[ChildRef, Mapping[str, Any]],
                       leaving: Plan | None, target: Plan) -> bool:  # fmt: skip
    """Every agent StatefulSet rendered for the current phase runs that manifest (nothing left to
    apply; the plan being left runs as it was, see :func:`_kept_while_left`) and the controller
    reports all its pods updated and ready."""
    for m in desired:
        if not _is_agent_workload(m):
            continue
        live = children.get(_ref(m))
        if live is None or not statefulset_rolled_out(live):
            return False
        if needs_apply(m, live) and not _kept_while_left(m, live, leaving, target):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# events


def _action_event(action: Action, before: Rollout, after: Rollout, target: Plan) -> EventNote:
    version = after.target_version
    if action is Action.ACTIVATE and before.active_version is None:
        return EventNote("Normal", "PlanCreated", f"plan v{version}: {_plan_summary(target)}")
    if action is Action.ACTIVATE:
        return EventNote("Normal", "RebalanceCompleted", f"serving plan v{version} alone")
    if action is Action.WARM_NEW_OWNERS:
        return EventNote("Normal", "RebalanceStarted",
                         f"plan v{after.active_version} -> v{version}: {_plan_summary(target)}; "
                         f"warming the new owners while clients route by v{after.active_version}")  # fmt: skip
    if action is Action.SWITCH_ROUTING:
        return EventNote(
            "Normal", "RoutingSwitched", f"new owners are warm; clients now route by plan v{version}"
        )
    return EventNote("Normal", "DrainingOldShards", f"dropping the shards plan v{version} moved away")


def _condition_events(old_status: Mapping[str, Any], status: Mapping[str, Any]) -> list[EventNote]:
    """Events for condition changes a user acts on, posted once per change (not every round)."""
    events: list[EventNote] = []

    def changed(type_: str) -> tuple[Mapping[str, Any], bool]:
        new = get_condition(status.get("conditions"), type_) or {}
        old = get_condition(old_status.get("conditions"), type_) or {}
        return new, any(new.get(k) != old.get(k) for k in ("status", "reason", "message"))

    ready, ready_changed = changed("Ready")
    if ready_changed and ready.get("status") == "False" and ready.get("reason") in (INVALID_SPEC, OBJECT_TOO_LARGE):
        events.append(EventNote("Warning", str(ready.get("reason")), str(ready.get("message"))))
    placed, placed_changed = changed("Placed")
    if placed_changed and placed.get("status") == "False" and placed.get("reason") == INSUFFICIENT_GPU_MEMORY:
        events.append(EventNote("Warning", INSUFFICIENT_GPU_MEMORY, str(placed.get("message"))))
    degraded, degraded_changed = changed("Degraded")
    old_degraded = get_condition(old_status.get("conditions"), "Degraded") or {}
    if degraded_changed and degraded.get("status") == "True":
        events.append(EventNote("Warning", str(degraded.get("reason")), str(degraded.get("message"))))
    elif degraded_changed and old_degraded.get("status") == "True":
        events.append(EventNote("Normal", "Recovered", f"no longer degraded ({old_degraded.get('reason')})"))
    return events


def _names(manifests: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{m['kind']}/{m['metadata']['name']}" for m in manifests)


# ---------------------------------------------------------------------------------------------
# diffing


def _ref(manifest: Mapping[str, Any]) -> ChildRef:
    meta = manifest["metadata"]
    return ChildRef(manifest["apiVersion"], manifest["kind"], meta.get("namespace", ""), meta["name"])


def _index(children: Sequence[Mapping[str, Any]]) -> dict[ChildRef, Mapping[str, Any]]:
    return {_ref(c): c for c in children}


def _parse_time(text: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
