"""The pure status logic: conditions keep their transition time unless their status changes, and the
whole status says what a user must know (ready replicas, why it is not ready, naming the field or
the bytes needed and available, Redis down as Degraded) in the shape the CRD declares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from hps_operator.core.rollout import Phase, Rollout
from hps_operator.core.status import (
    AgentObservation,
    ChildrenObservation,
    agent_observation,
    compute_status,
    error_message,
    job_state,
    observe_children,
    replica_counts,
    set_condition,
    statefulset_rolled_out,
    statefulset_updated,
)

from node_agent.errors import InsufficientGPUMemoryError, InvalidSpecError
from node_agent.plan import Assignment, Plan, PlanMetrics
from node_agent.spec import ModelSpec, parse_model
from tests.operator.crd_schema import openapi_schema

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def model(**spec: Any) -> ModelSpec:
    base = {"tables": [{"name": "a", "rows": 10, "dim": 4}, {"name": "b", "rows": 20, "dim": 4}], "replicas": 2,
            "partitions": 2}  # fmt: skip
    return parse_model({"metadata": {"name": "dlrm"}, "spec": {**base, **spec}})


def plan(version: int = 7, partitions: int = 2) -> Plan:
    assignments = tuple(Assignment(t, p, 0, (0, 1), 80) for p, t in zip(range(partitions), "ab", strict=False))
    return Plan(version, 1, partitions, 1, "table", assignments, PlanMetrics(1.02, 1.0, 240, 120, 100), "dlrm")


def healthy(ready: int = 2, partitions: int = 2) -> ChildrenObservation:
    return ChildrenObservation(
        agents=tuple(AgentObservation(p, 2, ready, True) for p in range(partitions)), redis_ready=True, load="Succeeded"
    )


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def status_schema_errors(status: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(openapi_schema()["properties"]["status"])
    return [e.message for e in validator.iter_errors(status)]


# ---------------------------------------------------------------------------------------------
# set_condition


def test_set_condition_moves_the_transition_time_only_on_a_status_change() -> None:
    first = set_condition([], type="Ready", status=False, reason="Loading", message="m", observed_generation=1, now=T0)
    assert first == [{"type": "Ready", "status": "False", "reason": "Loading", "message": "m",
                      "lastTransitionTime": "2025-01-01T12:00:00Z", "observedGeneration": 1}]  # fmt: skip
    same = set_condition(first, type="Ready", status="False", reason="ReplicasNotReady", message="1/2",
                         observed_generation=2, now=T1)  # fmt: skip
    assert same[0]["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("ReplicasNotReady", 2)
    flipped = set_condition(same, type="Ready", status=True, reason="Ready", message="2/2",
                            observed_generation=2, now=T1)  # fmt: skip
    assert flipped[0]["lastTransitionTime"] == "2025-01-01T12:05:00Z"
    assert first[0]["reason"] == "Loading"  # the input is not modified


def test_set_condition_keeps_other_conditions_and_appends_new_ones() -> None:
    start = set_condition([], type="Placed", status=True, reason="Placed", message="", observed_generation=1, now=T0)
    both = set_condition(start, type="Ready", status=True, reason="Ready", message="", observed_generation=1, now=T1)
    assert [c["type"] for c in both] == ["Placed", "Ready"]
    assert both[0] == start[0]
    with pytest.raises(ValueError, match="True, False or Unknown"):
        set_condition([], type="Ready", status="yes", reason="R", message="", observed_generation=1, now=T0)


# ---------------------------------------------------------------------------------------------
# compute_status


def test_a_healthy_model_is_ready() -> None:
    status = compute_status(name="dlrm", generation=3, model=model(), plan=plan(), observed=healthy(),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    assert conditions(status) == {
        "Ready": ("True", "Ready"), "Placed": ("True", "Placed"), "Loaded": ("True", "Loaded"),
        "Progressing": ("False", "Complete"), "Degraded": ("False", "AsExpected"),
    }  # fmt: skip
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Placed", "Loaded", "Progressing", "Degraded"]
    assert status["observedGeneration"] == 3
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["selector"] == "app.kubernetes.io/instance=dlrm,app.kubernetes.io/component=agent,hps.dev/partition=0"
    assert status["tableCount"] == 2
    assert status["placement"]["version"] == 7 and status["placement"]["movedBytes"] == 120
    assert status["placement"]["imbalance"] == 1.02
    assert status["rebalance"] == {"state": "Idle", "phase": "Idle", "toVersion": 7}
    assert status["endpoint"] == "dlrm-agent.default.svc:50051"
    assert status_schema_errors(status) == []


def test_a_replica_needs_a_ready_pod_in_every_partition() -> None:
    agents = (AgentObservation(0, 3, 3, True), AgentObservation(1, 3, 1, True))
    assert replica_counts(agents, 2) == (3, 1)
    assert replica_counts(agents, 3) == (0, 0)  # partition 2 has no StatefulSet yet
    all_ready = (AgentObservation(0, 3, 3, True), AgentObservation(1, 3, 3, True))
    served = compute_status(name="dlrm", generation=1, model=model(replicas=3), plan=plan(),
                            observed=ChildrenObservation(agents=all_ready, redis_ready=True, load="Succeeded"),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    status = compute_status(name="dlrm", generation=1, model=model(replicas=3), plan=plan(),
                            observed=ChildrenObservation(agents=agents, redis_ready=True, load="Succeeded"),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0, previous=served)  # fmt: skip
    assert conditions(status)["Ready"] == ("False", "ReplicasNotReady")
    assert conditions(status)["Degraded"] == ("True", "ReplicasUnavailable")


def test_a_model_coming_up_is_progressing_not_degraded() -> None:
    """Redis and the agents start in any order: until the model has been Ready once, a part not
    ready yet is progress (no Warning), and from then on a part that stops serving degrades it."""
    agents = (AgentObservation(0, 1, 1, True), AgentObservation(1, 1, 1, True))
    coming = compute_status(name="dlrm", generation=1, model=model(replicas=1), plan=plan(),
                            observed=ChildrenObservation(agents=agents, redis_ready=False, load="Running"),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    assert conditions(coming)["Degraded"] == ("False", "NotYetReady")
    assert conditions(coming)["Progressing"] == ("True", "Loading")
    up = compute_status(name="dlrm", generation=1, model=model(replicas=1), plan=plan(),
                        observed=ChildrenObservation(agents=agents, redis_ready=True, load="Succeeded"),
                        rollout=Rollout(Phase.IDLE, 7, 7), now=T1, previous=coming)  # fmt: skip
    assert conditions(up)["Ready"] == ("True", "Ready") and conditions(up)["Degraded"] == ("False", "AsExpected")
    down = compute_status(name="dlrm", generation=1, model=model(replicas=1), plan=plan(),
                          observed=ChildrenObservation(agents=agents, redis_ready=False, load="Succeeded"),
                          rollout=Rollout(Phase.IDLE, 7, 7), now=T1, previous=up)  # fmt: skip
    assert conditions(down)["Degraded"] == ("True", "VolatileStoreUnavailable")


def test_an_invalid_spec_names_the_field_and_keeps_what_is_served() -> None:
    good = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=healthy(),
                          rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    error = InvalidSpecError("spec.tables[1].dim", "must be at most 16384, got 20000")
    bad = compute_status(name="dlrm", generation=2, model=None, plan=None, observed=healthy(),
                         rollout=Rollout(Phase.IDLE, 7, 7), now=T1, error=error, previous=good)  # fmt: skip
    ready = next(c for c in bad["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"] == "spec.tables[1].dim: must be at most 16384, got 20000"
    assert ready["lastTransitionTime"] == "2025-01-01T12:05:00Z" and bad["observedGeneration"] == 2
    assert bad["placement"] == good["placement"] and bad["tableCount"] == 2
    assert bad["readyReplicas"] == 2  # the running deployment is still counted
    assert status_schema_errors(bad) == []


def test_an_unplaceable_spec_says_what_it_needs_and_keeps_serving() -> None:
    error = InsufficientGPUMemoryError(needed=64 * 2**30, available=16 * 2**30)
    status = compute_status(name="dlrm", generation=4, model=model(gpusPerPod=1), plan=plan(), observed=healthy(),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0, error=error)  # fmt: skip
    placed = next(c for c in status["conditions"] if c["type"] == "Placed")
    assert (placed["status"], placed["reason"]) == ("False", "InsufficientGPUMemory")
    assert str(64 * 2**30) in placed["message"] and str(16 * 2**30) in placed["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InsufficientGPUMemory" and "still serving plan version 7" in ready["message"]
    assert status["placement"]["version"] == 7  # the old plan, untouched


def served() -> dict[str, Any]:
    """The status of a model that has been Ready."""
    return compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=healthy(),
                          rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip


def test_redis_down_is_degraded_not_unready() -> None:
    observed = ChildrenObservation(agents=healthy().agents, redis_ready=False, load="Succeeded")
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=observed,
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0, previous=served())  # fmt: skip
    assert conditions(status)["Degraded"] == ("True", "VolatileStoreUnavailable")
    assert conditions(status)["Ready"] == ("True", "Ready")


@pytest.mark.parametrize(
    ("load", "loaded", "ready"),
    [
        ("Running", ("False", "Loading"), ("False", "Loading")),
        ("Failed", ("False", "LoadFailed"), ("False", "LoadFailed")),
        (None, ("False", "Pending"), ("False", "Loading")),
        ("NotNeeded", ("True", "LoadedByAgents"), ("True", "Ready")),
    ],
)
def test_loading(load: str | None, loaded: tuple[str, str], ready: tuple[str, str]) -> None:
    observed = ChildrenObservation(agents=healthy().agents, redis_ready=True, load=load, load_message="")
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=observed,
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    assert conditions(status)["Loaded"] == loaded
    assert conditions(status)["Ready"] == ready


def test_a_rebalance_is_progressing_and_counts_the_partitions_clients_route_to() -> None:
    # target has 3 partitions, p2 is still warming: clients route by the active 2-partition plan
    agents = (*healthy().agents, AgentObservation(2, 2, 0, False))
    rollout = Rollout(Phase.WARMING, 7, 8, "2025-01-01T12:00:00Z")
    status = compute_status(name="dlrm", generation=5, model=model(), plan=plan(8, 3),
                            observed=ChildrenObservation(agents=agents, redis_ready=True, load="Succeeded"),
                            rollout=rollout, active_plan=plan(7, 2), now=T0)  # fmt: skip
    assert conditions(status)["Progressing"] == ("True", "Rebalancing")
    assert conditions(status)["Ready"] == ("True", "Ready")
    assert status["rebalance"] == {"state": "Rebalancing", "phase": "Warming", "fromVersion": 7, "toVersion": 8,
                                   "since": "2025-01-01T12:00:00Z"}  # fmt: skip
    assert status["placement"]["version"] == 8
    assert status_schema_errors(status) == []


def test_scaled_to_zero_is_not_ready() -> None:
    status = compute_status(name="dlrm", generation=1, model=model(replicas=0), plan=plan(),
                            observed=healthy(ready=0), rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    assert conditions(status)["Ready"] == ("False", "ScaledToZero")


def test_an_unchanged_world_gives_an_identical_status() -> None:
    """So the handler writes nothing on a no-op round."""
    args: dict[str, Any] = dict(name="dlrm", generation=3, model=model(), plan=plan(), observed=healthy(),
                                rollout=Rollout(Phase.IDLE, 7, 7))  # fmt: skip
    first = compute_status(**args, now=T0)
    assert compute_status(**args, now=T1, previous=first) == first


# ---------------------------------------------------------------------------------------------
# reading the children


def test_reading_statefulsets_and_jobs() -> None:
    sts: dict[str, Any] = {
        "metadata": {"generation": 4, "labels": {"hps.dev/partition": "1"}},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 4, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
                   "currentRevision": "r2", "updateRevision": "r2"},
    }  # fmt: skip
    assert statefulset_rolled_out(sts)
    assert agent_observation(sts) == AgentObservation(1, 2, 2, True)
    rolling = {**sts, "status": {**sts["status"], "updatedReplicas": 1, "updateRevision": "r3"}}
    assert not statefulset_rolled_out(rolling) and not statefulset_updated(rolling)
    crashed = {**sts, "status": {**sts["status"], "readyReplicas": 1}}  # on the template, one pod not ready
    assert statefulset_updated(crashed) and not statefulset_rolled_out(crashed)
    stale = {**sts, "metadata": {**sts["metadata"], "generation": 5}}
    assert not statefulset_rolled_out(stale)

    assert job_state(None) == (None, "")
    assert job_state({"status": {"active": 1}}) == ("Running", "")
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == ("Succeeded", "")
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}}
    assert job_state(failed) == ("Failed", "BackoffLimitExceeded")


def child(kind: str, name: str, component: str, status: dict[str, Any], **labels: str) -> dict[str, Any]:
    meta = {"name": name, "generation": 1, "labels": {"app.kubernetes.io/component": component, **labels}}
    return {"kind": kind, "metadata": meta, "spec": {"replicas": 2} if kind == "StatefulSet" else {},
            "status": status}  # fmt: skip


def test_observe_children_reads_agents_redis_and_the_rendered_loader() -> None:
    ready = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    live = [
        child("StatefulSet", "dlrm-agent-p0", "agent", ready, **{"hps.dev/partition": "0"}),
        child("StatefulSet", "dlrm-redis", "redis", {**ready, "readyReplicas": 1}),
        child("Job", "dlrm-load-old", "loader", {"conditions": [{"type": "Failed", "status": "True", "message": "x"}]}),
        child("Job", "dlrm-load-new", "loader", {"active": 1}),
    ]
    desired = [{"kind": k, "metadata": {"name": n, "labels": {"app.kubernetes.io/component": c}}}
               for k, n, c in (("StatefulSet", "dlrm-redis", "redis"), ("Job", "dlrm-load-new", "loader"))]  # fmt: skip
    seen = observe_children(live, desired=desired)
    assert seen.agents == (AgentObservation(0, 2, 2, True),)
    assert seen.redis_ready is False and seen.load == "Running"  # the stale Job of an older spec is ignored
    assert observe_children(live, desired=[]) == ChildrenObservation(seen.agents, None, "NotNeeded", "")
    assert observe_children(live).load == "Failed"  # nothing rendered: what is live is reported


def test_a_partition_without_a_ready_pod_is_degraded_and_nothing_serving_is_not() -> None:
    agents = (AgentObservation(0, 2, 2, True), AgentObservation(1, 2, 0, True))
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(),
                            observed=ChildrenObservation(agents=agents, redis_ready=True, load="Succeeded"),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0, previous=served())  # fmt: skip
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PartitionUnavailable")
    assert "partition(s) 1" in degraded["message"]

    down = ChildrenObservation(agents=healthy(ready=0).agents, redis_ready=False, load="Succeeded")
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=down,
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0, previous=served())  # fmt: skip
    assert conditions(status)["Degraded"] == ("False", "AsExpected")
    assert conditions(status)["Ready"] == ("False", "ReplicasNotReady")


def test_every_cause_is_listed_and_the_first_names_the_reason() -> None:
    observed = ChildrenObservation(agents=healthy().agents, redis_ready=False, load="Failed",
                                   load_message="/models/dlrm/user_id/vectors.npy: no such file")  # fmt: skip
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=observed,
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0, previous=served())  # fmt: skip
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "VolatileStoreUnavailable"
    assert "Redis" in degraded["message"] and "vectors.npy" in degraded["message"]


# ---------------------------------------------------------------------------------------------
# the Redis Cluster bootstrap Job


def bootstrap_failed(load: str = "Succeeded", load_message: str = "") -> ChildrenObservation:
    """Redis pods answer PING (ready) but the Job that forms the cluster gave up."""
    return ChildrenObservation(agents=healthy().agents, redis_ready=True, load=load, load_message=load_message,
                               redis_bootstrap="Failed", redis_bootstrap_message="BackoffLimitExceeded")  # fmt: skip


def test_a_failed_redis_cluster_bootstrap_is_degraded_and_not_ready() -> None:
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=bootstrap_failed(),
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    found = conditions(status)
    assert found["Degraded"] == ("True", "RedisClusterBootstrapFailed")
    assert found["Ready"] == ("False", "RedisClusterBootstrapFailed")
    assert found["Loaded"] == ("True", "Loaded")  # the loader's own report is kept
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "dlrm-redis-bootstrap" in degraded["message"] and "BackoffLimitExceeded" in degraded["message"]
    assert status_schema_errors(status) == []


def test_a_failed_bootstrap_is_named_before_the_load_it_broke() -> None:
    observed = bootstrap_failed(load="Failed", load_message="CLUSTERDOWN Hash slot not served")
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=observed,
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    found = conditions(status)
    assert found["Ready"] == ("False", "RedisClusterBootstrapFailed")
    assert found["Loaded"] == ("False", "LoadFailed")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "RedisClusterBootstrapFailed" and "CLUSTERDOWN" in degraded["message"]


@pytest.mark.parametrize("bootstrap", ["Running", "Succeeded", "NotNeeded", None])
def test_a_bootstrap_that_has_not_failed_changes_nothing(bootstrap: str | None) -> None:
    observed = ChildrenObservation(agents=healthy().agents, redis_ready=True, load="Succeeded",
                                   redis_bootstrap=bootstrap)  # fmt: skip
    status = compute_status(name="dlrm", generation=1, model=model(), plan=plan(), observed=observed,
                            rollout=Rollout(Phase.IDLE, 7, 7), now=T0)  # fmt: skip
    assert conditions(status)["Ready"] == ("True", "Ready")
    assert conditions(status)["Degraded"] == ("False", "AsExpected")


def test_observe_children_reads_the_rendered_bootstrap_job() -> None:
    failed = {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}
    live = [child("Job", "dlrm-redis-bootstrap", "redis-bootstrap", failed),
            child("Job", "dlrm-load", "loader", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})]  # fmt: skip
    desired = [{"kind": "Job", "metadata": {"name": n, "labels": {"app.kubernetes.io/component": c}}}
               for n, c in (("dlrm-redis-bootstrap", "redis-bootstrap"), ("dlrm-load", "loader"))]  # fmt: skip
    seen = observe_children(live, desired=desired)
    assert (seen.redis_bootstrap, seen.redis_bootstrap_message) == ("Failed", "BackoffLimitExceeded")
    assert seen.load == "Succeeded"
    assert observe_children([], desired=desired).redis_bootstrap is None  # rendered, not created yet
    assert observe_children(live, desired=desired[1:]).redis_bootstrap == "NotNeeded"  # no cluster mode
    assert observe_children(live).redis_bootstrap == "Failed"  # nothing rendered: what is live


def test_an_unplaceable_model_says_once_what_it_needs_and_what_it_has() -> None:
    message = error_message(InsufficientGPUMemoryError(3 * 2**30, 2**30, "2 partition(s) x 1 GPU(s) x 512 MiB"))
    assert message == (
        "insufficient GPU memory: needs 3221225472 bytes (3.00 GiB) of GPU cache, 1073741824 bytes (1.00 GiB) "
        "available; 2 partition(s) x 1 GPU(s) x 512 MiB (what is available follows spec.cache.memoryPerGPU, "
        "spec.gpusPerPod and spec.partitions, and the nodes' GPUs)"
    )
