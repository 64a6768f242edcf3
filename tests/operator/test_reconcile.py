"""The pure reconcile step: given what the cluster shows, what the operator writes and reports."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from hps_operator.core.reconcile import Decision, Observed, Options, reconcile
from hps_operator.core.scheduling import GpuCapacity, gpu_capacity

from node_agent.spec import parse_model
from tests.operator.test_status import status_schema_errors

OPTIONS = Options(image="registry.example/hps:default", drain_seconds=0)
T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:01:00Z"


def model(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tables": [
            {"name": "user-id", "rows": 2_000_000, "dim": 64},
            {"name": "item-id", "rows": 1_000_000, "dim": 64},
            {"name": "country", "rows": 300, "dim": 16, "dtype": "float16"},
        ],
        "replicas": 2,
        "gpusPerPod": 4,
        "partitions": 1,
        "cache": {"memoryPerGPU": "1Gi"},
        "volatileStore": {"type": "redis", "redis": {"shards": 1}},
        "persistentStore": {"type": "none"},
    }
    base.update(spec)
    return {
        "apiVersion": "hps.dev/v1alpha1",
        "kind": "EmbeddingModel",
        "metadata": {"name": "dlrm", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": base,
    }


def node(gpus: int, memory_mib: int) -> dict[str, Any]:
    return {"metadata": {"name": f"n{gpus}-{memory_mib}", "labels": {"nvidia.com/gpu.memory": str(memory_mib)}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}  # fmt: skip


NODES = [node(8, 81920), node(8, 81920)]


def observe(body: dict[str, Any], children: list[dict[str, Any]], *, now: str = T0,
            nodes: list[dict[str, Any]] | None = None) -> Observed:  # fmt: skip
    return Observed(model=body, nodes=NODES if nodes is None else nodes, children=children,
                    redis_password="pw", now=now)  # fmt: skip


def applied(decision: Decision, children: list[dict[str, Any]], *, ready: bool = False) -> list[dict[str, Any]]:
    """The cluster after the handler carried out ``decision`` (and, with ``ready``, after the
    StatefulSet controller saw every pod ready and the loader Job completed)."""
    live = {(c["kind"], c["metadata"]["name"]): c for c in children}
    for m in decision.apply:
        key = (m["kind"], m["metadata"]["name"])
        generation = live[key]["metadata"]["generation"] + 1 if key in live else 1
        obj = copy.deepcopy(m)
        obj["metadata"]["generation"] = generation
        live[key] = obj
    for ref in decision.delete:
        live.pop((ref.kind, ref.name), None)
    for obj in live.values():
        if ready and obj["kind"] == "StatefulSet":
            want = obj["spec"]["replicas"]
            obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "readyReplicas": want,
                             "updatedReplicas": want, "replicas": want}  # fmt: skip
        if ready and obj["kind"] == "Job":
            obj["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    return list(live.values())


def with_status(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    return {**body, "status": decision.status}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def deployed() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    body = model()
    first = reconcile(observe(body, []), OPTIONS)
    children = applied(first, [], ready=True)
    body = with_status(body, first)
    second = reconcile(observe(body, children), OPTIONS)
    return with_status(body, second), applied(second, children, ready=True)


def plan_data(children: list[dict[str, Any]], key: str) -> dict[str, Any]:
    cm = next(c for c in children if c["kind"] == "ConfigMap" and c["metadata"]["name"] == "dlrm-plan")
    return dict(json.loads(cm["data"][key]))


# ---------------------------------------------------------------------------------------------


def test_first_reconcile_places_and_renders_everything() -> None:
    decision = reconcile(observe(model(), []), OPTIONS)
    kinds = {(m["kind"], m["metadata"]["name"]) for m in decision.apply}
    assert {("StatefulSet", "dlrm-redis"), ("ConfigMap", "dlrm-plan"), ("ConfigMap", "dlrm-config")} <= kinds
    assert any(kind == "StatefulSet" and name.startswith("dlrm-p0-") for kind, name in kinds)  # partition 0's agents
    assert decision.delete == ()
    assert decision.status["placement"]["version"] == 1
    assert condition(decision.status, "Placed")["status"] == "True"
    assert condition(decision.status, "Ready")["status"] == "False"  # nothing runs yet
    assert decision.status["selector"] == "app.kubernetes.io/instance=dlrm,app.kubernetes.io/component=agent,hps.dev/partition=0"
    (created,) = [e for e in decision.events if e.reason == "PlanCreated"]
    assert created.type == "Normal" and created.message.startswith("plan v1: ")
    assert decision.status["rebalance"] == {"state": "Idle", "phase": "Idle", "toVersion": 1, "since": T0}


def test_unchanged_cluster_means_no_writes_and_stable_conditions() -> None:
    body, children = deployed()
    assert condition(body["status"], "Ready")["status"] == "True"
    again = reconcile(observe(body, children, now=T1), OPTIONS)
    assert again.apply == () and again.delete == ()
    assert again.status == body["status"]  # lastTransitionTime did not move either


def test_drift_is_repaired() -> None:
    body, children = deployed()
    sts = live(children, "StatefulSet", "dlrm-p0-")
    sts["spec"]["replicas"] = 7  # someone scaled the StatefulSet behind the operator's back
    decision = reconcile(observe(body, children), OPTIONS)
    assert [m["metadata"]["name"] for m in decision.apply] == [sts["metadata"]["name"]]
    assert decision.apply[0]["spec"]["replicas"] == 2
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "DriftCorrected")]
    assert f"StatefulSet/{sts['metadata']['name']}" in decision.events[0].message


def test_a_deleted_child_is_recreated_with_an_event() -> None:
    body, children = deployed()
    p0 = live(children, "StatefulSet", "dlrm-p0-")["metadata"]["name"]
    gone = {("ConfigMap", "dlrm-plan"), ("StatefulSet", p0)}
    children = [c for c in children if (c["kind"], c["metadata"]["name"]) not in gone]
    decision = reconcile(observe(body, children, now=T1), OPTIONS)
    assert sorted((m["kind"], m["metadata"]["name"]) for m in decision.apply) == sorted(gone)
    (event,) = decision.events[:1]
    assert (event.type, event.reason) == ("Warning", "ChildRecreated")
    assert "ConfigMap/dlrm-plan" in event.message and f"StatefulSet/{p0}" in event.message
    # the same deterministic plan comes back under the version the status reports: no rebalance
    assert json.loads(next(m for m in decision.apply if m["metadata"]["name"] == "dlrm-plan")["data"]["plan.json"])["version"] == 1
    assert decision.status["rebalance"]["phase"] == "Idle"


def rebalanced() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`deployed`, then gpusPerPod 4 -> 8 rolled out to the end: plan version 2, reached through a
    rebalance (so planning the spec afresh would not give it back)."""
    body, children = deployed()
    body = {**body, "spec": {**body["spec"], "gpusPerPod": 8}, "metadata": {**body["metadata"], "generation": 2}}
    for step in range(8):
        decision = reconcile(observe(body, children, now=T1 if step else T0), OPTIONS)
        children = applied(decision, children, ready=True)
        body = with_status(body, decision)
    assert body["status"]["rebalance"]["phase"] == "Idle" and body["status"]["placement"]["version"] == 2
    return body, children


def test_a_deleted_plan_configmap_comes_back_from_what_the_agents_read() -> None:
    body, children = rebalanced()
    before = plan_data(children, "plan.json")
    sets = sorted(c["metadata"]["name"] for c in children if c["kind"] == "StatefulSet")
    children = [c for c in children if (c["kind"], c["metadata"]["name"]) != ("ConfigMap", "dlrm-plan")]
    decision = reconcile(observe(body, children, now=T1), OPTIONS)
    assert [(m["kind"], m["metadata"]["name"]) for m in decision.apply] == [("ConfigMap", "dlrm-plan")]
    assert decision.delete == ()
    back = json.loads(decision.apply[0]["data"]["plan.json"])
    assert back == before  # the same placement, version and metrics
    assert decision.status["placement"] == body["status"]["placement"]
    assert decision.status["rebalance"]["phase"] == "Idle"
    assert sorted(c["metadata"]["name"] for c in applied(decision, children) if c["kind"] == "StatefulSet") == sets
    assert [e.reason for e in decision.events][:1] == ["ChildRecreated"]

    # with the agents' config gone too nothing says what they serve: the spec is planned afresh, and
    # the placement this rebalanced plan reached does not come back (its agent sets would be replaced)
    children = [c for c in children if (c["kind"], c["metadata"]["name"]) != ("ConfigMap", "dlrm-config")]
    replanned = reconcile(observe(body, children, now=T1), OPTIONS)
    assert any(r.kind == "StatefulSet" for r in replanned.delete)


def test_a_plan_configmap_deleted_mid_rollout_comes_back_and_the_rollout_goes_on() -> None:
    body, children = deployed()
    body = {**body, "spec": {**body["spec"], "gpusPerPod": 8}, "metadata": {**body["metadata"], "generation": 2}}
    warming = reconcile(observe(body, children), OPTIONS)
    children, body = applied(warming, children), with_status(body, warming)  # the new agents not ready yet
    children = [c for c in children if (c["kind"], c["metadata"]["name"]) != ("ConfigMap", "dlrm-plan")]
    again = reconcile(observe(body, children, now=T1), OPTIONS)
    assert again.status["rebalance"] == warming.status["rebalance"]  # still warming, from 1 to 2
    assert again.delete == ()  # the old owners still serve
    plan_cm = next(m for m in again.apply if m["metadata"]["name"] == "dlrm-plan")
    assert json.loads(plan_cm["data"]["routing.json"])["version"] == 1
    assert json.loads(plan_cm["data"]["plan.json"])["version"] == 2


def test_replicas_scale_the_agents_and_make_no_plan() -> None:
    body, children = deployed()
    body = {**body, "spec": {**body["spec"], "replicas": 4}, "metadata": {**body["metadata"], "generation": 2}}
    decision = reconcile(observe(body, children), OPTIONS)
    changed = {(m["kind"], m["metadata"]["name"]) for m in decision.apply}
    assert any(kind == "StatefulSet" and name.startswith("dlrm-p0-") for kind, name in changed)
    assert next(m for m in decision.apply if m["kind"] == "StatefulSet")["spec"]["replicas"] == 4
    assert decision.status["placement"]["version"] == 1
    assert decision.status["rebalance"]["state"] == "Idle"
    cm = [m for m in decision.apply if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "dlrm-plan"]
    assert all(json.loads(c["data"]["plan.json"])["version"] == 1 for c in cm)
    assert decision.status["observedGeneration"] == 2


def test_more_gpus_warm_up_a_new_plan_before_routing_switches() -> None:
    body, children = deployed()
    body = {**body, "spec": {**body["spec"], "gpusPerPod": 8}, "metadata": {**body["metadata"], "generation": 2}}
    warming = reconcile(observe(body, children), OPTIONS)
    (started,) = warming.events
    assert (started.reason, started.type) == ("RebalanceStarted", "Normal")
    assert f"moves {warming.status['placement']['movedBytes']} bytes" in started.message
    assert warming.status["rebalance"] == {"state": "Rebalancing", "phase": "Warming", "fromVersion": 1,
                                           "toVersion": 2, "since": T0}  # fmt: skip
    assert warming.status["placement"]["version"] == 2
    assert warming.status["placement"]["movedBytes"] > 0
    assert condition(warming.status, "Progressing")["reason"] == "Rebalancing"
    children = applied(warming, children)  # applied, pods not ready yet
    assert plan_data(children, "routing.json")["version"] == 1
    assert plan_data(children, "plan.json")["version"] == 2
    assert warming.delete == ()  # nothing serving is dropped while the new owners warm up

    body = with_status(body, warming)
    still = reconcile(observe(body, children), OPTIONS)
    assert still.status["rebalance"]["phase"] == "Warming" and still.apply == ()

    children = applied(still, children, ready=True)
    switched = reconcile(observe(body, children, now=T1), OPTIONS)
    assert switched.status["rebalance"]["phase"] == "Switching"
    children = applied(switched, children, ready=True)
    assert plan_data(children, "routing.json")["version"] == 2

    assert [e.reason for e in switched.events] == ["RoutingSwitched"]
    body = with_status(body, switched)
    phases, reasons = [], []
    for _ in range(3):
        step = reconcile(observe(body, children, now=T1), OPTIONS)
        children = applied(step, children, ready=True)
        body = with_status(body, step)
        phases.append(step.status["rebalance"]["phase"])
        reasons += [e.reason for e in step.events]
    assert phases == ["Draining", "Idle", "Idle"]
    assert reasons == ["DrainingOldShards", "RebalanceCompleted"]
    assert body["status"]["rebalance"] == {"state": "Idle", "phase": "Idle", "toVersion": 2, "since": T1}
    assert status_schema_errors(body["status"]) == []
    assert condition(body["status"], "Progressing")["status"] == "False"
    assert body["status"]["placement"]["version"] == 2


def test_the_plan_being_left_keeps_its_pods_while_a_spec_change_warms_the_new_one() -> None:
    """gpusPerPod makes a new plan; the cache policy and budget change every agent's pod template too
    (the model file's hash, its memory). The old plan's agent sets serve until routing has switched
    and the grace passed: updating them would restart their pods before the new owners serve."""
    body, children = deployed()
    old_sets = {c["metadata"]["name"]: c for c in children
                if c["kind"] == "StatefulSet" and c["metadata"]["labels"].get("app.kubernetes.io/component") == "agent"}  # fmt: skip
    spec = {**body["spec"], "gpusPerPod": 8, "cache": {"memoryPerGPU": "2Gi", "policy": "lfu"}}
    body = {**body, "spec": spec, "metadata": {**body["metadata"], "generation": 2}}
    warming = reconcile(observe(body, children), OPTIONS)
    assert warming.status["rebalance"]["phase"] == "Warming"
    written = {m["metadata"]["name"] for m in warming.apply if m["kind"] == "StatefulSet"}
    assert written and not written & set(old_sets)  # only the new owners' sets are written
    children = applied(warming, children, ready=True)
    body = with_status(body, warming)
    switched = reconcile(observe(body, children, now=T1), OPTIONS)
    assert switched.status["rebalance"]["phase"] == "Switching"
    assert not {m["metadata"]["name"] for m in switched.apply} & set(old_sets)
    children = applied(switched, children, ready=True)
    assert all(c == old_sets[c["metadata"]["name"]] for c in children if c["metadata"]["name"] in old_sets)
    body = with_status(body, switched)
    draining = reconcile(observe(body, children, now=T1), OPTIONS)
    assert draining.status["rebalance"]["phase"] == "Draining"
    assert {r.name for r in draining.delete if r.kind == "StatefulSet"} == set(old_sets)


def test_invalid_spec_names_the_field_and_touches_nothing() -> None:
    body, children = deployed()
    bad = copy.deepcopy(body)
    bad["spec"]["tables"][1]["name"] = "user-id"
    decision = reconcile(observe(bad, children), OPTIONS)
    assert decision.apply == () and decision.delete == ()
    ready = condition(decision.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.tables[1].name" in ready["message"]


def test_unplaceable_spec_reports_needed_and_available_and_keeps_serving() -> None:
    body, children = deployed()
    small = [node(8, 64)]  # 64 MiB GPUs: the tables cannot fit
    decision = reconcile(observe(body, children, nodes=small), OPTIONS)
    assert decision.apply == () and decision.delete == ()
    placed = condition(decision.status, "Placed")
    assert (placed["status"], placed["reason"]) == ("False", "InsufficientGPUMemory")
    assert "needs" in placed["message"] and "available" in placed["message"]
    assert decision.status["placement"]["version"] == 1
    # the desired spec is not served, but the running deployment still is, and says so
    ready = condition(decision.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUMemory")
    assert "still serving plan version 1" in ready["message"]
    assert decision.status["readyReplicas"] == 2
    assert [e.reason for e in decision.events] == ["InsufficientGPUMemory"]
    # the next round, unchanged, posts no second event
    again = reconcile(observe(with_status(body, decision), children, nodes=small, now=T1), OPTIONS)
    assert again.events == () and again.status == decision.status
    assert decision.scale == ()  # replicas as asked: nothing to size


def test_replicas_still_scale_while_a_spec_cannot_be_placed() -> None:
    """``kubectl scale`` (or the HPA) while the spec waits unplaceable: the running agent sets take
    the new count alone, the rest of the deployment stays as it runs."""
    body, children = deployed()
    body = {**body, "spec": {**body["spec"], "replicas": 3}, "metadata": {**body["metadata"], "generation": 2}}
    small = [node(8, 64)]
    decision = reconcile(observe(body, children, nodes=small), OPTIONS)
    assert decision.apply == () and decision.delete == ()
    agent_sets = [c["metadata"]["name"] for c in children if c["kind"] == "StatefulSet" and "-p0-" in c["metadata"]["name"]]
    assert [(ref.kind, ref.name, n) for ref, n in decision.scale] == [("StatefulSet", name, 3) for name in agent_sets]
    assert condition(decision.status, "Placed")["reason"] == "InsufficientGPUMemory"


def test_gpu_capacity_reads_allocatable_and_the_memory_label() -> None:
    spec = parse_model(model())
    # a 2-GPU node cannot take a 4-GPU pod, so its small GPUs do not set the budget
    assert gpu_capacity(spec, [node(8, 81920), node(4, 40960), node(2, 1024)]) == GpuCapacity(
        gpu_memory_bytes=40960 * 2**20, gpu_nodes=3, pod_nodes=2, gpus=14
    )
    assert gpu_capacity(spec, []) == GpuCapacity(None, 0, 0, 0)


def live(children: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    return next(c for c in children if c["kind"] == kind and c["metadata"]["name"].startswith(prefix))


def test_redis_not_ready_is_degraded_and_recovery_is_reported() -> None:
    body, children = deployed()
    live(children, "StatefulSet", "dlrm-redis")["status"]["readyReplicas"] = 0
    down = reconcile(observe(body, children, now=T1), OPTIONS)
    degraded = condition(down.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "VolatileStoreUnavailable")
    assert condition(down.status, "Ready")["status"] == "True"  # lookups still answer from L1/L3
    assert [(e.type, e.reason) for e in down.events] == [("Warning", "VolatileStoreUnavailable")]
    assert down.apply == ()

    live(children, "StatefulSet", "dlrm-redis")["status"]["readyReplicas"] = 1
    up = reconcile(observe(with_status(body, down), children, now=T1), OPTIONS)
    assert condition(up.status, "Degraded")["status"] == "False"
    assert [(e.type, e.reason) for e in up.events] == [("Normal", "Recovered")]


def test_loaded_follows_the_loader_job_and_a_failed_load_is_degraded() -> None:
    body, children = deployed()
    job = live(children, "Job", "dlrm-load-")
    assert condition(body["status"], "Loaded")["status"] == "True"

    job["status"] = {"active": 1}
    running = reconcile(observe(body, children, now=T1), OPTIONS)
    assert (condition(running.status, "Loaded")["status"], condition(running.status, "Loaded")["reason"]) == (
        "False", "Loading")  # fmt: skip

    job["status"] = {"failed": 11, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                   "message": "Job has reached the specified backoff limit"}]}  # fmt: skip
    failed = reconcile(observe(body, children, now=T1), OPTIONS)
    loaded, degraded = condition(failed.status, "Loaded"), condition(failed.status, "Degraded")
    assert (loaded["status"], loaded["reason"]) == ("False", "LoadFailed")
    assert "backoff limit" in loaded["message"]
    assert (degraded["status"], degraded["reason"]) == ("True", "LoadFailed")
    assert condition(failed.status, "Ready")["reason"] == "LoadFailed"
    assert ("Warning", "LoadFailed") in [(e.type, e.reason) for e in failed.events]
    assert status_schema_errors(failed.status) == []


def test_a_lost_replica_is_degraded_but_a_scale_up_is_progress() -> None:
    body, children = deployed()
    agents = live(children, "StatefulSet", "dlrm-p0-")
    agents["status"]["readyReplicas"] = 1  # a pod crashed: it exists, runs the template, is not ready
    lost = reconcile(observe(body, children, now=T1), OPTIONS)
    degraded = condition(lost.status, "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "ReplicasUnavailable",
                                                                             "1/2 replicas ready")  # fmt: skip
    assert condition(lost.status, "Ready")["reason"] == "ReplicasNotReady"
    # a second round keeps saying so (the condition does not flap)
    again = reconcile(observe(with_status(body, lost), children, now=T1), OPTIONS)
    assert condition(again.status, "Degraded")["status"] == "True" and again.events == ()

    body, children = deployed()
    body = {**body, "spec": {**body["spec"], "replicas": 4}, "metadata": {**body["metadata"], "generation": 2}}
    scaling = reconcile(observe(body, children, now=T1), OPTIONS)
    children = applied(scaling, children)
    sts = live(children, "StatefulSet", "dlrm-p0-")  # the new pods exist but are still loading
    sts["status"] = {"observedGeneration": sts["metadata"]["generation"], "replicas": 4, "updatedReplicas": 4,
                     "readyReplicas": 2}  # fmt: skip
    for _ in range(2):
        scaling = reconcile(observe(with_status(body, scaling), children, now=T1), OPTIONS)
        assert condition(scaling.status, "Degraded")["status"] == "False"
        assert (condition(scaling.status, "Progressing")["status"],
                condition(scaling.status, "Progressing")["reason"]) == ("True", "Scaling")  # fmt: skip


def test_the_operator_pull_policy_reaches_agent_and_loader_containers() -> None:
    options = dataclasses.replace(OPTIONS, image_pull_policy="Always")
    decision = reconcile(observe(model(), []), options)
    policies = {
        (m["kind"], c["image"]): c.get("imagePullPolicy")
        for m in decision.apply if m["kind"] in ("StatefulSet", "Job")
        for c in m["spec"]["template"]["spec"]["containers"]
    }  # fmt: skip
    assert policies[("StatefulSet", "registry.example/hps:default")] == "Always"
    assert policies[("Job", "registry.example/hps:default")] == "Always"
    # Redis runs its own image: the agent policy is not forced on it
    assert all(p is None for (kind, image), p in policies.items() if image.startswith("redis:"))


def test_a_failed_redis_cluster_bootstrap_job_reaches_the_status() -> None:
    """Cluster mode renders ``<model>-redis-bootstrap``; when it fails after everything else came up,
    the model stops reporting Ready and says why."""
    body = model(volatileStore={"type": "redis", "redis": {"shards": 3, "cluster": True}})
    first = reconcile(observe(body, []), OPTIONS)
    (bootstrap,) = [m["metadata"]["name"] for m in first.apply if m["metadata"]["name"].startswith("dlrm-redis-bootstrap-")]
    children = applied(first, [], ready=True)
    body = with_status(body, first)
    healthy = reconcile(observe(body, children), OPTIONS)
    assert condition(healthy.status, "Ready")["status"] == "True"

    job = next(c for c in children if c["metadata"]["name"] == bootstrap)
    job["status"] = {"failed": 7, "conditions": [{"type": "Failed", "status": "True",
                                                  "reason": "BackoffLimitExceeded"}]}  # fmt: skip
    broken = reconcile(observe(with_status(body, healthy), children, now=T1), OPTIONS)
    assert (condition(broken.status, "Degraded")["status"], condition(broken.status, "Degraded")["reason"]) == (
        "True", "RedisClusterBootstrapFailed")  # fmt: skip
    assert condition(broken.status, "Ready")["reason"] == "RedisClusterBootstrapFailed"
    assert condition(broken.status, "Loaded")["status"] == "True"
    assert [e.reason for e in broken.events if e.type == "Warning"] == ["RedisClusterBootstrapFailed"]
    assert bootstrap in condition(broken.status, "Degraded")["message"]
    assert status_schema_errors(broken.status) == []


def test_the_statefulsets_reading_the_generated_passwords_are_named_for_a_restart() -> None:
    """The operator creates the Redis Secrets when absent and never reads them: a first deployment
    has nothing running to restart, a deployed model names every StatefulSet (Redis and the agents),
    for the handler to restart should a create find its Secret missing (someone deleted it)."""
    first = reconcile(observe(model(), []), OPTIONS)
    assert {m["metadata"]["name"] for m in first.create} >= {"dlrm-redis", "dlrm-redis-users"}
    assert first.restart_on_create == ()
    body, children = deployed()
    again = reconcile(observe(body, children, now=T1), OPTIONS)
    assert again.create  # posted again each round; the handler sends them every few minutes
    running = sorted(c["metadata"]["name"] for c in children if c["kind"] == "StatefulSet")
    assert [ref.name for ref in again.restart_on_create] == running
    assert "dlrm-redis" in running and any(name.startswith("dlrm-p0-") for name in running)
