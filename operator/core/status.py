"""The EmbeddingModel's status, computed purely from the spec, the plan, what the children report, the
rollout and the error (if any) of this round, per the Kubernetes API conventions.

Conditions (metav1.Condition shape; ``lastTransitionTime`` moves only when ``status`` changes):

- **Ready**: every desired replica has a ready agent pod in each partition clients route to, the
  tables are loaded, and (in cluster mode) the Redis Cluster formed. False with the error's reason
  (``InvalidSpec`` naming the field, ``InsufficientGPUMemory`` with needed and available bytes, ...)
  when the spec cannot be served.
- **Placed**: a plan exists for the spec (False ``InsufficientGPUMemory`` when none fits).
- **Loaded**: the tables are in the tiers (the loader Job for Redis; agents fill their own tiers).
- **Progressing**: a plan rollout, a scale or a load is under way.
- **Degraded**: serving, but not fully: the Redis Cluster bootstrap Job failed, the Redis StatefulSet
  is not ready (lookups fall back to L1/L3), the loader Job failed, a partition has no ready pod, or
  replicas that served stopped being ready. The reason names the first of these; the message lists
  every one. A model that serves nothing at all is not Degraded but not Ready.

A failed ``<model>-redis-bootstrap`` Job (``spec.volatileStore.redis.cluster``) is its own cause,
``RedisClusterBootstrapFailed``, because nothing else shows it: the Redis pods' readiness probe is a
PING, which a node that never joined a cluster answers, while every data command gets CLUSTERDOWN.
So the shared tier does not exist: the loader cannot fill it and online updates (a Redis Stream in
it) cannot be published, and lookups only answer from L1/L3. It makes Degraded True (first reason,
being the likely cause of a failed load too) and Ready False with that reason, ahead of the loader's
state; Loaded still reports the loader alone. The Job does not retry once failed: deleting it makes
the operator render it again, and it exits at once when the cluster has formed meanwhile.

The helpers ``statefulset_*`` and ``job_state`` turn observed objects into the plain facts used here,
so the handler stays a thin observer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hps_operator.core.render import PARTITION_LABEL, endpoint
from hps_operator.core.rollout import Phase, Rollout, format_time
from hps_operator.core.scheduling import SchedulingWait

from node_agent.errors import HpsError, InsufficientGPUMemoryError, InvalidSpecError
from node_agent.plan import Plan
from node_agent.spec import ModelSpec

CONDITION_TYPES = ("Ready", "Placed", "Loaded", "Progressing", "Degraded")
COMPONENT_LABEL = "app.kubernetes.io/component"
#: the component label of the Job that forms the Redis Cluster (``<model>-redis-bootstrap``)
BOOTSTRAP = "redis-bootstrap"
BOOTSTRAP_FAILED = "RedisClusterBootstrapFailed"
#: Degraded's reason until the model is Ready for the first time
NOT_YET_READY = "NotYetReady"


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    *,
    type: str,
    status: bool | str,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime | str,
) -> list[dict[str, Any]]:
    """A copy of ``conditions`` with ``type`` set. ``lastTransitionTime`` keeps its old value unless
    ``status`` changes (reason and message may change without a transition). Order is kept; a new
    type is appended."""
    text = {True: "True", False: "False"}[status] if isinstance(status, bool) else status
    if text not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    stamp = now if isinstance(now, str) else format_time(now)
    result = [dict(c) for c in conditions or ()]
    for i, old in enumerate(result):
        if old.get("type") == type:
            since = old.get("lastTransitionTime") if old.get("status") == text else None
            result[i] = _condition(type, text, reason, message, observed_generation, since or stamp)
            return result
    result.append(_condition(type, text, reason, message, observed_generation, stamp))
    return result


def _condition(
    type: str, status: str, reason: str, message: str, generation: int | None, since: str
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type), None)


# ---------------------------------------------------------------------------------------------
# what the children report


@dataclass(frozen=True)
class AgentObservation:
    """One partition's agent StatefulSet, as observed."""

    partition: int
    #: pods that exist (``status.replicas``)
    replicas: int
    #: pods passing their readiness probe (``status.readyReplicas``)
    ready_replicas: int
    #: the controller has seen the latest spec and every wanted pod exists on the current template,
    #: ready or not (a scale or a template change is no longer under way)
    updated: bool


@dataclass(frozen=True)
class ChildrenObservation:
    """What the handler saw of the model's children this round.

    ``redis_ready``: ``None`` when the model has no Redis. ``load``: ``"NotNeeded"`` (agents load
    their own tiers), ``"Running"``, ``"Succeeded"``, ``"Failed"`` or ``None`` (no loader Job seen
    yet); ``load_message`` says why a load failed. ``redis_bootstrap``: the Redis Cluster bootstrap
    Job's state, the same words as ``load`` (``"NotNeeded"`` without cluster mode, ``None`` when the
    Job is not seen yet); ``redis_bootstrap_message`` says why it failed."""

    agents: tuple[AgentObservation, ...] = ()
    redis_ready: bool | None = None
    load: str | None = None
    load_message: str = ""
    redis_bootstrap: str | None = "NotNeeded"
    redis_bootstrap_message: str = ""
    #: the name of the bootstrap Job seen (it carries a hash of its spec)
    redis_bootstrap_job: str = ""
    #: agent pods the scheduler could not place (None: none)
    scheduling: SchedulingWait | None = None


def statefulset_updated(sts: Mapping[str, Any]) -> bool:
    """The controller has acted on the latest spec: every wanted pod exists and runs the current
    template (whether it is ready is :func:`statefulset_rolled_out`'s question)."""
    spec = sts.get("spec") or {}
    status = sts.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    generation = (sts.get("metadata") or {}).get("generation")
    return (
        (generation is None or status.get("observedGeneration") == generation)
        and int(status.get("replicas", 0)) == wanted
        and int(status.get("updatedReplicas", wanted)) == wanted
        and status.get("updateRevision", status.get("currentRevision")) == status.get("currentRevision")
    )


def statefulset_rolled_out(sts: Mapping[str, Any]) -> bool:
    """The controller has acted on the latest spec and every wanted pod runs it and is ready."""
    wanted = int((sts.get("spec") or {}).get("replicas", 1))
    return statefulset_updated(sts) and int((sts.get("status") or {}).get("readyReplicas", 0)) == wanted


def agent_observation(sts: Mapping[str, Any]) -> AgentObservation:
    """An agent StatefulSet (as read from the API) → its :class:`AgentObservation`."""
    labels = (sts.get("metadata") or {}).get("labels") or {}
    status = sts.get("status") or {}
    return AgentObservation(
        partition=int(labels[PARTITION_LABEL]),
        replicas=int(status.get("replicas", 0)),
        ready_replicas=int(status.get("readyReplicas", 0)),
        updated=statefulset_updated(sts),
    )


def job_state(job: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """A Job → ``("Succeeded" | "Failed" | "Running" | None, message)`` from its conditions."""
    if job is None:
        return None, ""
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "Succeeded", ""
        if condition.get("type") == "Failed":
            return "Failed", str(condition.get("message") or condition.get("reason") or "the Job failed")
    return "Running", ""


def redis_ready(sts: Mapping[str, Any] | None) -> bool:
    """Every Redis pod is ready (a missing StatefulSet is not)."""
    if sts is None:
        return False
    wanted = int((sts.get("spec") or {}).get("replicas", 1))
    return int((sts.get("status") or {}).get("readyReplicas", 0)) >= wanted


def _component(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL, ""))


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return str(obj.get("kind")), str((obj.get("metadata") or {}).get("name"))


def observe_children(
    live: Sequence[Mapping[str, Any]], *, desired: Sequence[Mapping[str, Any]] | None = None
) -> ChildrenObservation:
    """The model's live children (as read from the API) → a :class:`ChildrenObservation`.

    With ``desired`` (the manifests rendered this round) Redis, its bootstrap Job and the loader are
    the ones rendered: none rendered means the model has no Redis (``redis_ready`` None), no Redis
    Cluster (``redis_bootstrap`` "NotNeeded") or loads nothing centrally (``load`` "NotNeeded"), and a
    stale loader Job of an older spec does not count. Without it (the spec could not be rendered)
    what is live is reported as it is."""
    by_key = {_key(c): c for c in live}
    agents = tuple(
        agent_observation(c)
        for c in live
        if c.get("kind") == "StatefulSet" and _component(c) == "agent"
        and PARTITION_LABEL in ((c.get("metadata") or {}).get("labels") or {})
    )  # fmt: skip
    if desired is not None:
        redis = [
            by_key.get(_key(m))
            for m in desired
            if m.get("kind") == "StatefulSet" and _component(m) == "redis"
        ]
        loaders = [
            by_key.get(_key(m)) for m in desired if m.get("kind") == "Job" and _component(m) == "loader"
        ]
        bootstraps = [
            by_key.get(_key(m)) for m in desired if m.get("kind") == "Job" and _component(m) == BOOTSTRAP
        ]
        redis_state = redis_ready(redis[0]) if redis else None
        bootstrap, bootstrap_message = job_state(bootstraps[0]) if bootstraps else ("NotNeeded", "")
        load, message = job_state(loaders[0]) if loaders else ("NotNeeded", "")
        bootstrap_job = next(
            (str(m["metadata"]["name"]) for m in desired if m.get("kind") == "Job" and _component(m) == BOOTSTRAP), ""
        )
        return ChildrenObservation(agents, redis_state, load, message, bootstrap, bootstrap_message, bootstrap_job)
    redis_sets = [c for c in live if c.get("kind") == "StatefulSet" and _component(c) == "redis"]
    load, message = _worst_job(live, "loader", none=(None, ""))
    bootstrap, bootstrap_message = _worst_job(live, BOOTSTRAP, none=("NotNeeded", ""))
    return ChildrenObservation(
        agents,
        redis_ready(redis_sets[0]) if redis_sets else None,
        load,
        message,
        bootstrap,
        bootstrap_message,
    )


def _worst_job(
    live: Sequence[Mapping[str, Any]], component: str, *, none: tuple[str | None, str]
) -> tuple[str | None, str]:
    """The state of the live Jobs of ``component``, failure first (``none`` when there are none)."""
    states = [job_state(c) for c in live if c.get("kind") == "Job" and _component(c) == component]
    return next(
        ((s, m) for wanted in ("Failed", "Running", "Succeeded") for s, m in states if s == wanted), none
    )


# ---------------------------------------------------------------------------------------------
# the whole status


def replica_selector(name: str) -> str:
    """The scale subresource's label selector: partition 0's agent pods, exactly one pod per
    replica whatever the partition count, so an HPA's Pods metric averages over replicas (a
    selector of every pod of the model would count Redis, the loader and every partition, and the
    HPA would multiply its desired replicas by that pod count)."""
    return f"app.kubernetes.io/instance={name},{COMPONENT_LABEL}=agent,{PARTITION_LABEL}=0"  # as DESIGN.md writes it


def replica_counts(agents: Iterable[AgentObservation], partitions: int) -> tuple[int, int]:
    """``(replicas, readyReplicas)``: a replica is one pod in *every* partition, so each is the
    least over the partitions (a partition without an agent set counts 0)."""
    if partitions <= 0:
        return 0, 0
    existing, ready = _per_partition(agents)
    return (
        min(existing.get(p, 0) for p in range(partitions)),
        min(ready.get(p, 0) for p in range(partitions)),
    )


def _per_partition(agents: Iterable[AgentObservation]) -> tuple[dict[int, int], dict[int, int]]:
    """Pods and ready pods of each partition. During a rollout a partition can have two agent sets
    (the active plan's and the target's): it has as many replicas as its most complete set."""
    existing: dict[int, int] = {}
    ready: dict[int, int] = {}
    for a in agents:
        existing[a.partition] = max(existing.get(a.partition, 0), a.replicas)
        ready[a.partition] = max(ready.get(a.partition, 0), a.ready_replicas)
    return existing, ready


def error_reason(error: HpsError) -> str:
    """CamelCase condition reason of an error: ``InvalidSpecError`` → ``InvalidSpec``."""
    name = type(error).__name__
    return name.removesuffix("Error") or name


def error_message(error: HpsError) -> str:
    if isinstance(error, InvalidSpecError):
        return f"{error.field}: {error.detail}"
    if isinstance(error, InsufficientGPUMemoryError):
        # the error's own words, with the sizes also in GiB (said once: the condition is read by people)
        detail = f"; {error.detail}" if error.detail else ""
        return (
            f"insufficient GPU memory: needs {error.needed} bytes ({_gib(error.needed)}) of GPU cache, "
            f"{error.available} bytes ({_gib(error.available)}) available{detail} (what is available follows "
            "spec.cache.memoryPerGPU, spec.gpusPerPod and spec.partitions, and the nodes' GPUs)"
        )
    return str(error)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def placement_status(plan: Plan) -> dict[str, Any]:
    metrics = plan.metrics
    return {
        "version": plan.version,
        "strategy": plan.strategy,
        "partitions": plan.partitions,
        "gpusPerPod": plan.gpus_per_pod,
        "bucketCount": plan.bucket_count,
        "imbalance": round(metrics.imbalance, 6),
        "memoryImbalance": round(metrics.memory_imbalance, 6),
        "totalBytes": metrics.total_bytes,
        "movedBytes": metrics.moved_bytes,
        "movementLowerBound": metrics.movement_lower_bound,
    }


def compute_status(
    *,
    name: str,
    generation: int | None,
    model: ModelSpec | None,
    plan: Plan | None,
    observed: ChildrenObservation,
    rollout: Rollout,
    now: datetime | str,
    error: HpsError | None = None,
    active_plan: Plan | None = None,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole ``status`` of an EmbeddingModel.

    ``model`` is ``None`` when the spec did not parse (then ``error`` says why); ``plan`` is the
    target plan, or the plan still served when the new spec could not be placed; ``active_plan`` the
    plan clients route by during a rollout; ``previous`` the current status (its conditions keep
    their transition times, and what cannot be recomputed from an invalid spec is kept)."""
    previous = previous or {}
    conditions: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or ()]

    def put(type: str, status: bool | str, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions,
            type=type,
            status=status,
            reason=reason,
            message=message,
            observed_generation=generation,
            now=now,
        )

    routed = active_plan if rollout.phase is Phase.WARMING and active_plan is not None else plan
    if routed is not None:
        partitions = routed.partitions
    else:  # no plan this round (invalid spec): count what is still serving
        partitions = int((previous.get("placement") or {}).get("partitions") or len(observed.agents))
    replicas, ready = replica_counts(observed.agents, partitions)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": replica_selector(name),
        "rebalance": rollout.to_status(),
    }
    if generation is None:
        del status["observedGeneration"]

    if model is None:
        # the spec is unreadable: say why and keep what was known of the deployment still serving
        for key in ("tableCount", "endpoint", "placement"):
            if key in previous:
                status[key] = previous[key]
        reason = error_reason(error) if error else "InvalidSpec"
        message = error_message(error) if error else "the spec could not be read"
        put("Ready", False, reason, message)
        for type in CONDITION_TYPES:  # a new model reports every condition from its first round on
            if get_condition(conditions, type) is None:
                put(type, "Unknown", reason, "the spec could not be read")
        status["conditions"] = _sorted_conditions(conditions)
        return status

    status["tableCount"] = len(model.tables)
    status["endpoint"] = endpoint(model)
    if plan is not None:
        status["placement"] = placement_status(plan)

    # Placed
    if isinstance(error, InsufficientGPUMemoryError):
        put("Placed", False, error_reason(error), error_message(error))
    elif plan is None:
        put("Placed", False, "Pending", "no placement plan yet")
    else:
        put(
            "Placed",
            True,
            "Placed",
            f"plan version {plan.version}: {plan.strategy}, {plan.partitions} partition(s) x "
            f"{plan.gpus_per_pod} GPU(s), imbalance {plan.metrics.imbalance:.3f}",
        )

    # Loaded
    load = observed.load
    if load in ("Succeeded", "NotNeeded"):
        put(
            "Loaded",
            True,
            "Loaded" if load == "Succeeded" else "LoadedByAgents",
            "the tables are in the shared Redis tier"
            if load == "Succeeded"
            else "each agent loads its own tiers before it reports ready",
        )
    elif load == "Failed":
        put("Loaded", False, "LoadFailed", observed.load_message or "the loader Job failed")
    elif load == "Running":
        put("Loaded", False, "Loading", "the loader Job is loading the tables")
    else:
        put("Loaded", False, "Pending", "the loader has not started")

    # Degraded: serving, but not fully
    desired = model.replicas
    all_updated = all(a.updated for a in observed.agents)
    serving = any(a.ready_replicas > 0 for a in observed.agents)
    issues: list[tuple[str, str]] = []
    bootstrap_failed = observed.redis_bootstrap == "Failed"
    if bootstrap_failed:
        issues.append((BOOTSTRAP_FAILED, _bootstrap_failure(
            observed.redis_bootstrap_job or f"{name}-redis-bootstrap", observed.redis_bootstrap_message)))
    if observed.redis_ready is False:
        issues.append(
            (
                "VolatileStoreUnavailable",
                "the Redis StatefulSet is not ready: lookups are answered from the GPU cache and the "
                "persistent store",
            )
        )
    if load == "Failed":
        issues.append(("LoadFailed", f"the loader Job failed: {observed.load_message or 'no message'}"))
    _, ready_by_partition = _per_partition(observed.agents)
    partitions_down = [p for p in range(partitions) if ready_by_partition.get(p, 0) == 0]
    if partitions_down and serving and rollout.phase is Phase.IDLE:
        issues.append(
            (
                "PartitionUnavailable",
                f"partition(s) {', '.join(map(str, partitions_down))} have no ready agent: lookups of "
                "their shards fail",
            )
        )
    elif (
        0 < ready < desired == replicas
        and all_updated
        and rollout.phase is Phase.IDLE
        and not _still_scaling(previous, ready)
    ):
        issues.append(("ReplicasUnavailable", f"{ready}/{desired} replicas ready"))
    # A model coming up for the first time is Progressing, not Degraded: its Redis and agents start in
    # any order, so a part not ready yet is no news. Once it has been Ready (the Degraded condition has
    # left NOT_YET_READY), a part that stops serving degrades it. A failed Job degrades it at once.
    fully_ready = (
        error is None and plan is not None and 0 < desired <= ready
        and load in ("Succeeded", "NotNeeded") and not bootstrap_failed and observed.redis_ready is not False
    )  # fmt: skip
    before = get_condition(previous.get("conditions"), "Degraded")
    has_served = fully_ready or (before is not None and before.get("reason") != NOT_YET_READY)
    if not has_served:
        issues = [(reason, message) for reason, message in issues if reason in (BOOTSTRAP_FAILED, "LoadFailed")]
    if serving and issues:
        put("Degraded", True, issues[0][0], "; ".join(message for _, message in issues))
    elif not has_served:
        put("Degraded", False, NOT_YET_READY, "the model has not been Ready yet: Progressing says what it waits for")
    else:
        put("Degraded", False, "AsExpected", "every tier answers" if serving else "nothing serves yet")
    replicas_degraded = any(reason == "ReplicasUnavailable" for reason, _ in issues)

    # Progressing
    waiting = observed.scheduling
    if waiting is not None:
        reason = "WaitingForGPUs" if waiting.for_gpus else "Unschedulable"
        rebalancing = (f"plan version {rollout.active_version} -> {rollout.target_version} ({rollout.phase}); "
                       if rollout.phase is not Phase.IDLE else "")  # fmt: skip
        put("Progressing", True, reason, f"{rebalancing}{waiting.describe()}")
    elif rollout.phase is not Phase.IDLE:
        put(
            "Progressing",
            True,
            "Rebalancing",
            f"plan version {rollout.active_version} -> {rollout.target_version}: {rollout.phase}",
        )
    elif replicas != desired or not all_updated or (ready < desired and not replicas_degraded):
        put("Progressing", True, "Scaling", f"{ready}/{desired} replicas ready")
    elif load == "Running":
        put("Progressing", True, "Loading", "the loader Job is loading the tables")
    elif replicas_degraded:
        put("Progressing", False, "Stalled", f"{ready}/{desired} replicas ready; see Degraded")
    else:
        put("Progressing", False, "Complete", f"{ready}/{desired} replicas ready")

    # Ready
    if error is not None:
        still = f"; still serving plan version {plan.version}" if plan is not None and ready > 0 else ""
        put("Ready", False, error_reason(error), error_message(error) + still)
    elif plan is None:
        put("Ready", False, "Pending", "no placement plan yet")
    elif desired == 0:
        put("Ready", False, "ScaledToZero", "spec.replicas is 0")
    elif bootstrap_failed:
        put("Ready", False, BOOTSTRAP_FAILED, _bootstrap_failure(observed.redis_bootstrap_job or f"{name}-redis-bootstrap", observed.redis_bootstrap_message))
    elif load not in ("Succeeded", "NotNeeded"):
        put(
            "Ready",
            False,
            "LoadFailed" if load == "Failed" else "Loading",
            observed.load_message or "the tables are not loaded yet",
        )
    elif ready < desired:
        wait = f"; {observed.scheduling.describe()}" if observed.scheduling is not None else ""
        put("Ready", False, "ReplicasNotReady", f"{ready}/{desired} replicas ready{wait}")
    else:
        put(
            "Ready",
            True,
            "Ready",
            f"{ready}/{desired} replicas ready at plan version {rollout.routing_version or plan.version}",
        )

    status["conditions"] = _sorted_conditions(conditions)
    return status


APPLY_FAILED = "ApplyFailed"


def with_apply_failures(
    status: Mapping[str, Any], failures: Sequence[str], *, previous: Mapping[str, Any], now: datetime | str
) -> dict[str, Any]:
    """``status`` after the API server refused some children (``failures``, one line each naming the
    child and the server's answer): ``Progressing`` is False with reason ``ApplyFailed``, and the
    rollout stays where ``previous`` had it, as what it was to move on to was not written."""
    result = dict(status)
    if "rebalance" in previous:
        result["rebalance"] = previous["rebalance"]
    generation = status.get("observedGeneration")
    result["conditions"] = _sorted_conditions(set_condition(
        status.get("conditions"), type="Progressing", status=False, reason=APPLY_FAILED,
        message="the API server refused: " + "; ".join(failures),
        observed_generation=int(generation) if generation is not None else None, now=now,
    ))  # fmt: skip
    return result


def _bootstrap_failure(job: str, message: str) -> str:
    return (
        f"the Redis Cluster bootstrap Job {job} failed ({message or 'no message'}): the "
        "cluster never formed, so the Redis tier holds no table and takes no update; lookups are "
        "answered from the GPU cache and the persistent store. Delete the Job to retry"
    )


def _still_scaling(previous: Mapping[str, Any], ready: int) -> bool:
    """Replicas not ready yet after a scale-up are progress, not degradation, as long as none of the
    ready ones is lost: the round before said Scaling and no more replicas were ready then."""
    progressing = get_condition(previous.get("conditions"), "Progressing") or {}
    degraded = get_condition(previous.get("conditions"), "Degraded") or {}
    return (
        progressing.get("status") == "True"
        and progressing.get("reason") == "Scaling"
        and degraded.get("status") != "True"
        and ready >= int(previous.get("readyReplicas") or 0)
    )


def _sorted_conditions(conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In CONDITION_TYPES order (then any others), so an unchanged status compares equal."""
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(conditions, key=lambda c: order.get(str(c.get("type")), len(order)))
