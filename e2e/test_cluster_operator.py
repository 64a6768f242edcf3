"""The operator on a real control plane: kube-apiserver with etcd, the controller-manager (garbage
collector, StatefulSet, Job, HPA controllers), the scheduler, and kwok's fake GPU nodes; the chart
installed by ``helm install`` and the operator running under its ServiceAccount token, so validation,
defaulting, value normalisation, immutability, size limits and RBAC are the API server's own.

kwok is the one stand-in: it plays the kubelets, so pods on its nodes become Running and Ready (Job
pods Succeeded) without a process in them. What a pod's process does is tested on the embedded
default (``e2e/test_local_e2e.py``, ``e2e/test_rebalance_e2e.py``).

The scenarios share one cluster and one operator; the audit log the last scenarios read holds every
request the operator made in all of them. They run in file order.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hps_operator.kopf_handlers.embedding_model import CHILD_KINDS

from e2e.conftest import (
    LEASE_NAME,
    LEASE_S,
    NODE_POOL,
    OPERATOR_NAMESPACE,
    RELEASE,
    RESYNC_S,
    Kube,
    OperatorProcess,
    condition,
    wait_for,
)
from e2e.control_plane import NodePool
from e2e.metrics_api import CustomMetrics
from node_agent.local.redis_servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
INSTANCE = "app.kubernetes.io/instance"
#: every kind of child, as kubectl names them (Secrets too: the admin may read them)
CHILD_RESOURCES = ("configmaps", "secrets", "services", "statefulsets", "jobs", "poddisruptionbudgets",
                   "horizontalpodautoscalers", "networkpolicies", "serviceaccounts")  # fmt: skip
#: HPA controller warnings that say no custom metrics API serves the agents' metric (none is
#: installed here); they are about the cluster, not about what the operator wrote
METRICS_API_REASONS = ("FailedGetPodsMetric", "FailedComputeMetricsReplicas")


def model(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tables": [
            {"name": "user-id", "rows": 2_000_000, "dim": 64},
            {"name": "item-id", "rows": 1_000_000, "dim": 64},
        ],
        "replicas": 1,
        "gpusPerPod": 1,
        "partitions": 1,
        "cache": {"memoryPerGPU": "8Gi"},
        "volatileStore": {"type": "redis", "redis": {"shards": 1, "memory": "1Gi"}},
        "persistentStore": {"type": "none"},
    }
    base.update(spec)
    return {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "metadata": {"name": name}, "spec": base}


def get_model(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    found = kube.get("embeddingmodel", name, namespace=namespace)
    assert found is not None, f"EmbeddingModel {namespace}/{name} is gone"
    return dict(found)


def ready(kube: Kube, namespace: str, name: str, *, within_s: float = 90) -> dict[str, Any]:
    """Waits until the model is Ready for its current generation; returns it."""

    def check() -> dict[str, Any] | None:
        m = get_model(kube, namespace, name)
        generation = m["metadata"]["generation"]
        ok = (
            condition(m, "Ready").get("status") == "True"
            and m.get("status", {}).get("observedGeneration") == generation
            and (m["status"].get("rebalance") or {}).get("phase", "Idle") == "Idle"
        )
        return m if ok else None

    result: dict[str, Any] = wait_for(f"{namespace}/{name} Ready", check, within_s=within_s)
    return result


def children(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for resource in CHILD_RESOURCES:
        items += kube.get(resource, namespace=namespace, selector=f"{INSTANCE}={name}")
    return items


def agent_sets(kube: Kube, namespace: str, name: str, partition: int | None = None) -> list[dict[str, Any]]:
    """The model's agent StatefulSets (one per partition, two for a partition mid-rollout)."""
    selector = f"{INSTANCE}={name},app.kubernetes.io/component=agent"
    if partition is not None:
        selector += f",hps.dev/partition={partition}"
    return list(kube.get("statefulsets", namespace=namespace, selector=selector))


def plan_of(kube: Kube, namespace: str, name: str, key: str = "plan.json") -> dict[str, Any]:
    cm = kube.get("configmap", f"{name}-plan", namespace=namespace)
    assert cm is not None
    return dict(json.loads(cm["data"][key]))


def operator_warnings(kube: Kube, namespace: str) -> list[str]:
    events = kube.get("events", namespace=namespace)
    return [
        f"{e['involvedObject']['kind']}/{e['involvedObject']['name']} {e['reason']}: {e['message']}"
        for e in events
        if e.get("type") == "Warning" and e.get("reason") not in METRICS_API_REASONS
        and e["involvedObject"]["kind"] in ("EmbeddingModel",)
    ]  # fmt: skip


def model_store_volume(kube: Kube, namespace: str, claim: str) -> None:
    """The read-only model store a cluster would have on NFS: here a hostPath volume any node mounts,
    bound to ``claim`` ahead of time (no provisioner runs)."""
    kube.apply({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}"},
        "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": "/models"},
                 "claimRef": {"namespace": namespace, "name": claim}},
    })  # fmt: skip
    kube.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": f"{namespace}-{claim}",
                 "resources": {"requests": {"storage": "1Ti"}}},
    }, namespace=namespace)  # fmt: skip


@pytest.fixture(autouse=True)
def _operator_running(operator: OperatorProcess) -> Iterator[None]:
    """Every scenario here needs the operator; one a scenario killed is started again after it."""
    yield
    if operator.process is None or operator.process.poll() is not None:
        operator.start()


# ---------------------------------------------------------------------------------------------
# what a user applies


def test_every_example_is_served_owned_and_steady(kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    """``kubectl apply -f examples/...``: each model becomes Ready, every child is owned by it, every
    condition is of the current generation; then over three resync periods nothing is rewritten (no
    child's resourceVersion moves) and no Warning is posted (the API server's normalised values, such
    as the HPA's ``averageValue: "20000"`` stored as ``"20k"``, are not drift)."""
    model_store_volume(kube, namespace, "criteo-models")
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    names = []
    for path in examples:
        done = kube.kubectl("apply", "-n", namespace, "-f", str(path))
        assert "created" in done.stdout
        names.append(yaml.safe_load(path.read_text())["metadata"]["name"])
    for name in names:
        m = ready(kube, namespace, name, within_s=120)
        uid, generation = m["metadata"]["uid"], m["metadata"]["generation"]
        for c in m["status"]["conditions"]:
            assert c["observedGeneration"] == generation, c
        owned = children(kube, namespace, name)
        kinds = {c["kind"] for c in owned}
        assert {"ConfigMap", "Secret", "Service", "StatefulSet", "Job", "PodDisruptionBudget"} <= kinds
        for child in owned:
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == (uid, True, True), child["metadata"]

    # `hps render` prints what the operator created, from the same core
    nodes = kube.kubectl("get", "nodes", "-o", "yaml").stdout
    nodes_file = kube.kubeconfig.parent / f"{namespace}-nodes.yaml"
    nodes_file.write_text(nodes)
    for path, name in zip(examples, names, strict=True):
        rendered = kube_render(path, namespace, nodes_file)
        live = {(c["kind"], c["metadata"]["name"]) for c in children(kube, namespace, name)}
        assert {(o["kind"], o["metadata"]["name"]) for o in rendered} == live

    before = {(c["kind"], c["metadata"]["name"]): c["metadata"]["resourceVersion"]
              for name in names for c in children(kube, namespace, name)}  # fmt: skip
    time.sleep(3 * RESYNC_S + 1)
    after = {(c["kind"], c["metadata"]["name"]): c["metadata"]["resourceVersion"]
             for name in names for c in children(kube, namespace, name)}  # fmt: skip
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    warnings = operator_warnings(kube, namespace)
    assert warnings == [], "\n".join(warnings)
    hpa = kube.get("hpa", "criteo", namespace=namespace)
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "20k"  # the server's spelling


def kube_render(path: Path, namespace: str, nodes: Path) -> list[dict[str, Any]]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "hps_operator", "render", "-f", str(path), "-n", namespace,
                           "--nodes", str(nodes), "-o", "json"], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["items"])


#: one violating manifest change per CEL rule of the CRD, keyed by the rule's message (its start)
CEL_CASES: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    "the model name must be at most 40 characters": (None, {"metadata": {"name": "m" * 41}}),
    "set exactly one of persistentVolumeClaim, nfs or hostPath": (
        None, {"spec": {"modelStore": {"hostPath": {"path": "/m"}, "nfs": {"server": "nfs", "path": "/m"}}}}),
    "mountPath must not overlap /etc/hps or /var/lib/hps": (
        None, {"spec": {"modelStore": {"hostPath": {"path": "/m"}, "mountPath": "/etc/hps"}}}),
    "a Redis Cluster needs at least 3 shards": (
        None, {"spec": {"volatileStore": {"redis": {"cluster": True, "shards": 2}}}}),
    "maxReplicas must be at least minReplicas": (
        None, {"spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}),
    "set exactly one of secretName or issuerRef": (
        None, {"spec": {"security": {"tls": {"mutual": True}}}}),
    "partitions max must be at least min": (
        None, {"spec": {"autoscaling": {"partitions": {"min": 5, "max": 2}}}}),
    # transition rules: the first change creates the model, the second is refused
    "storage cannot change while type is rocksdb": (
        {"spec": {"persistentStore": {"type": "rocksdb", "storage": "10Gi"}}},
        {"spec": {"persistentStore": {"type": "rocksdb", "storage": "20Gi"}}}),
    "storageClassName cannot change": (
        {"spec": {"persistentStore": {"type": "rocksdb", "storageClassName": "local"}}},
        {"spec": {"persistentStore": {"type": "rocksdb", "storageClassName": "fast"}}}),
}  # fmt: skip


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def test_bad_specs_are_refused_naming_the_field(kube: Kube, namespace: str) -> None:
    """kubectl's strict field validation names a misspelt field; each CEL rule, violated once, is
    refused with its message (a new rule without a case here fails this test)."""
    typo = model("typo")
    typo["spec"]["replica"] = 2
    done = kube.apply(typo, namespace=namespace, check=False)
    assert done.returncode != 0 and 'unknown field "spec.replica"' in done.stderr

    crd = yaml.safe_load((ROOT / "crds" / "hps.dev_embeddingmodels.yaml").read_text())
    messages: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            messages.extend(" ".join(r["message"].split()) for r in node.get("x-kubernetes-validations") or [])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(crd["spec"]["versions"][0]["schema"])
    assert sorted(messages) == sorted(m for m in messages if any(m.startswith(k) for k in CEL_CASES)), messages
    for i, (message, (first, change)) in enumerate(CEL_CASES.items()):
        base = model(f"cel-{i}")
        if first is not None:
            kube.apply(merge(base, first), namespace=namespace)
        done = kube.apply(merge(merge(base, first or {}), change), namespace=namespace, check=False)
        assert done.returncode != 0, f"accepted a violation of {message!r}"
        assert message in " ".join(done.stderr.split()), done.stderr


def test_scale_changes_no_plan_and_rollouts_complete(kube: Kube, namespace: str) -> None:
    """``kubectl scale`` makes no new plan; ``gpusPerPod`` and ``partitions`` changes roll out a new
    plan to the end (routing on it, the old partitions' StatefulSets gone)."""
    kube.apply(model("elastic"), namespace=namespace)
    first = ready(kube, namespace, "elastic")
    version = first["status"]["placement"]["version"]
    assert first["status"]["selector"] == (
        "app.kubernetes.io/instance=elastic,app.kubernetes.io/component=agent,hps.dev/partition=0"
    )

    kube.kubectl("scale", "-n", namespace, "em/elastic", "--replicas", "3")
    scaled = wait_for("3 ready replicas", lambda: (
        m if (m := get_model(kube, namespace, "elastic"))["status"].get("readyReplicas") == 3 else None))  # fmt: skip
    assert scaled["status"]["placement"]["version"] == version
    assert plan_of(kube, namespace, "elastic")["version"] == version
    (sts,) = agent_sets(kube, namespace, "elastic", 0)
    assert sts["spec"]["replicas"] == 3
    # the scale subresource's selector matches one pod per replica
    pods = kube.get("pods", namespace=namespace, selector=scaled["status"]["selector"])
    assert len(pods) == 3

    kube.kubectl("patch", "-n", namespace, "em/elastic", "--type=merge", "-p", '{"spec":{"gpusPerPod":2}}')
    wider = wait_for("plan v2 rolled out", lambda: (
        m if (m := ready(kube, namespace, "elastic"))["status"]["placement"]["version"] == version + 1 else None))  # fmt: skip
    assert wider["status"]["placement"]["gpusPerPod"] == 2
    assert plan_of(kube, namespace, "elastic", "routing.json")["version"] == version + 1

    kube.kubectl("patch", "-n", namespace, "em/elastic", "--type=merge", "-p", '{"spec":{"partitions":2}}')
    wait_for("plan v3 on 2 partitions", lambda: (
        ready(kube, namespace, "elastic")["status"]["placement"]["partitions"] == 2))  # fmt: skip
    assert len(agent_sets(kube, namespace, "elastic", 1)) == 1

    kube.kubectl("patch", "-n", namespace, "em/elastic", "--type=merge", "-p", '{"spec":{"partitions":1}}')
    wait_for("back on 1 partition", lambda: ready(kube, namespace, "elastic")["status"]["placement"]["partitions"] == 1)
    wait_for("partition 1's StatefulSet gone", lambda: agent_sets(kube, namespace, "elastic", 1) == [])
    assert operator_warnings(kube, namespace) == []

    # a deleted plan ConfigMap comes back as it was (from what the agents read), the agents untouched
    plan, sets = plan_of(kube, namespace, "elastic"), agent_sets(kube, namespace, "elastic")
    kube.kubectl("delete", "configmap", "-n", namespace, "elastic-plan")
    assert wait_for("the plan ConfigMap back", lambda: (
        kube.get("configmap", "elastic-plan", namespace=namespace) is not None))  # fmt: skip
    assert plan_of(kube, namespace, "elastic") == plan
    assert [s["metadata"]["uid"] for s in agent_sets(kube, namespace, "elastic")] == [s["metadata"]["uid"] for s in sets]


def test_kubectl_scale_still_sizes_a_model_whose_new_spec_cannot_be_placed(kube: Kube, namespace: str) -> None:
    """A spec change that cannot be placed leaves the deployment as it runs, but replicas never need a
    plan: ``kubectl scale`` (or the HPA) still sizes the running agent set."""
    kube.apply(model("pinned"), namespace=namespace)
    ready(kube, namespace, "pinned")
    (before,) = agent_sets(kube, namespace, "pinned", 0)
    kube.kubectl("patch", "-n", namespace, "em/pinned", "--type=merge", "-p", '{"spec":{"cache":{"memoryPerGPU":"64Mi"}}}')
    wait_for("Placed=False", lambda: condition(get_model(kube, namespace, "pinned"), "Placed").get("reason")
             == "InsufficientGPUMemory")  # fmt: skip
    kube.kubectl("scale", "-n", namespace, "em/pinned", "--replicas", "2")
    m = wait_for("2 ready replicas", lambda: (
        m if (m := get_model(kube, namespace, "pinned"))["status"].get("readyReplicas") == 2 else None))  # fmt: skip
    (after,) = agent_sets(kube, namespace, "pinned", 0)
    assert after["metadata"]["uid"] == before["metadata"]["uid"] and after["spec"]["replicas"] == 2
    # nothing else of the unplaceable spec reached it: the pods' template is the one that ran
    assert after["spec"]["template"] == before["spec"]["template"]
    assert condition(m, "Placed")["reason"] == "InsufficientGPUMemory"


def test_a_one_replica_partition_never_goes_dark_in_a_rollout(kube: Kube, namespace: str) -> None:
    """``gpusPerPod`` 4 -> 8 with one replica, and a cache change that alters every agent's pod
    template: the new pod starts beside the old one, which keeps serving, never restarted, until
    routing has switched; at no moment does the partition lack a ready pod."""
    kube.apply(model("steady", gpusPerPod=4), namespace=namespace)
    version = ready(kube, namespace, "steady")["status"]["placement"]["version"]
    selector = f"{INSTANCE}=steady,app.kubernetes.io/component=agent,hps.dev/partition=0"
    (old_set,) = agent_sets(kube, namespace, "steady", 0)
    old_pods = {p["metadata"]["uid"] for p in kube.get("pods", namespace=namespace, selector=selector)}
    kube.kubectl("patch", "-n", namespace, "em/steady", "--type=merge", "-p",
                 '{"spec":{"gpusPerPod":8,"cache":{"memoryPerGPU":"8Gi","policy":"lfu"}}}')  # fmt: skip
    fewest_ready, most_sets = 99, 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        pods = kube.get("pods", namespace=namespace, selector=selector)
        of_old_set = [p for p in pods if p["metadata"]["name"].startswith(old_set["metadata"]["name"] + "-")]
        assert {p["metadata"]["uid"] for p in of_old_set} <= old_pods, "the old plan's pod was restarted"
        ready_pods = [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))]  # fmt: skip
        fewest_ready = min(fewest_ready, len(ready_pods))
        most_sets = max(most_sets, len(agent_sets(kube, namespace, "steady", 0)))
        m = get_model(kube, namespace, "steady")
        if (m["status"]["placement"]["version"] == version + 1
                and (m["status"].get("rebalance") or {}).get("phase") == "Idle"
                and len(agent_sets(kube, namespace, "steady", 0)) == 1):  # fmt: skip
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the rollout did not finish in 90 s")
    assert fewest_ready >= 1, "partition 0 had no ready agent during the rollout"
    assert most_sets == 2  # the new agent set ran beside the old one
    (final,) = agent_sets(kube, namespace, "steady", 0)
    assert final["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_changes_that_reach_immutable_fields_never_stop_a_reconcile(kube: Kube, operator: OperatorProcess,
                                                                    namespace: str) -> None:  # fmt: skip
    """Turning the persistent store on adds volume claim templates (the StatefulSet is replaced, its
    pods adopted); more Redis Cluster shards change the bootstrap Job (a new Job); the status follows
    each generation and no 422 reaches the operator's log."""
    kube.apply(model("mutable", volatileStore={"type": "redis", "redis": {"shards": 3, "cluster": True}}),
               namespace=namespace)  # fmt: skip
    ready(kube, namespace, "mutable")
    sts_uid = agent_sets(kube, namespace, "mutable", 0)[0]["metadata"]["uid"]
    jobs = {j["metadata"]["name"] for j in kube.get("jobs", namespace=namespace, selector=f"{INSTANCE}=mutable")}

    kube.kubectl("patch", "-n", namespace, "em/mutable", "--type=merge", "-p",
                 '{"spec":{"persistentStore":{"type":"rocksdb","storage":"10Gi"},'
                 '"volatileStore":{"redis":{"shards":4}}}}')  # fmt: skip
    ready(kube, namespace, "mutable", within_s=120)
    (sts,) = agent_sets(kube, namespace, "mutable", 0)
    assert sts["metadata"]["uid"] != sts_uid  # replaced, as its volume claim templates changed
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    redis = kube.get("statefulset", "mutable-redis", namespace=namespace)
    assert redis["spec"]["replicas"] == 4
    now = {j["metadata"]["name"] for j in kube.get("jobs", namespace=namespace, selector=f"{INSTANCE}=mutable")}
    bootstrap = {n for n in now if n.startswith("mutable-redis-bootstrap-")}
    assert len(bootstrap) == 1 and not bootstrap & jobs  # a new Job; the old one is deleted
    assert "HTTP 422" not in operator.log()
    m = get_model(kube, namespace, "mutable")
    assert condition(m, "Progressing").get("reason") != "ApplyFailed"


def test_one_refused_child_blocks_neither_the_others_nor_the_status(kube: Kube, namespace: str) -> None:
    """A ResourceQuota forbids HorizontalPodAutoscalers here: every other child is still written, the
    status says which child the API server refused and why, and once the quota goes the HPA follows."""
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-hpa"},
                "spec": {"hard": {"count/horizontalpodautoscalers.autoscaling": "0"}}}, namespace=namespace)  # fmt: skip
    kube.apply(model("quota", autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetQPSPerReplica": 1000}),
               namespace=namespace)  # fmt: skip

    def refused() -> dict[str, Any] | None:
        m = get_model(kube, namespace, "quota")
        progressing = condition(m, "Progressing")
        return m if progressing.get("reason") == "ApplyFailed" else None

    m = wait_for("ApplyFailed", refused)
    message = condition(m, "Progressing")["message"]
    assert "HorizontalPodAutoscaler/quota" in message and "exceeded quota" in message
    assert m["status"]["observedGeneration"] == m["metadata"]["generation"]
    assert agent_sets(kube, namespace, "quota", 0)
    assert kube.get("statefulset", "quota-redis", namespace=namespace) is not None
    # the Event is posted just after the status is written
    events = wait_for("the ApplyFailed event", lambda: [
        e for e in kube.get("events", namespace=namespace) if e["reason"] == "ApplyFailed"], within_s=15)  # fmt: skip
    assert "HorizontalPodAutoscaler/quota" in events[0]["message"]

    kube.kubectl("delete", "-n", namespace, "resourcequota", "no-hpa")
    wait_for("the HPA", lambda: kube.get("hpa", "quota", namespace=namespace))
    wait_for("ApplyFailed cleared", lambda: condition(get_model(kube, namespace, "quota"), "Progressing")
             .get("reason") != "ApplyFailed")  # fmt: skip
    # autoscaling off: the HPA goes
    kube.kubectl("patch", "-n", namespace, "em/quota", "--type=json", "-p", '[{"op":"remove","path":"/spec/autoscaling"}]')
    wait_for("the HPA gone", lambda: kube.get("hpa", "quota", namespace=namespace) is None)


def test_a_node_the_model_cannot_use_leaves_its_budget_alone(kube: Kube, namespace: str) -> None:
    """A tainted pool of 16 GiB GPUs joins: a model that does not tolerate the taint keeps its plan
    and stays Ready (its 95 GiB of rows need the 80 GiB GPUs); one that does tolerate it is told it
    does not fit."""
    big = [{"name": "user-id", "rows": 200_000_000, "dim": 128}]
    kube.apply(model("picky", tables=big, gpusPerPod=4, cache={"memoryPerGPU": "40Gi"}), namespace=namespace)
    before = ready(kube, namespace, "picky")["status"]["placement"]
    pool = NodePool(prefix="small-gpu", count=1, gpus=8, gpu_memory_mib=16384,
                    taints=(("team", "vision", "NoSchedule"),))  # fmt: skip
    kube.plane.add_node(pool, 0, volumes=0)
    try:
        time.sleep(2 * RESYNC_S + 1)
        m = ready(kube, namespace, "picky")
        assert m["status"]["placement"] == before
        assert condition(m, "Placed")["status"] == "True"
        tolerant = model("tolerant", tables=big, gpusPerPod=4, cache={"memoryPerGPU": "40Gi"},
                         agent={"tolerations": [{"key": "team", "operator": "Exists"}]})  # fmt: skip
        kube.apply(tolerant, namespace=namespace)
        wait_for("tolerant told it does not fit", lambda: condition(get_model(kube, namespace, "tolerant"), "Placed")
                 .get("reason") == "InsufficientGPUMemory")  # fmt: skip
    finally:
        kube.kubectl("delete", "node", "small-gpu-0", "--wait=false", check=False)


def test_the_hpa_scales_replicas_from_per_replica_load_whatever_the_partitions(kube: Kube, namespace: str) -> None:
    """The real HPA controller, through the aggregation layer's custom metrics API, scales a model of 2
    partitions 1 -> 3 -> 1: desired replicas = ceil(total load / targetQPSPerReplica), not that times
    the partition count (``status.selector`` selects one pod per replica)."""
    kube.apply(model("autoscaled", partitions=2, replicas=1,
                     autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetQPSPerReplica": 1000}),
               namespace=namespace)  # fmt: skip
    ready(kube, namespace, "autoscaled")
    with CustomMetrics(kube.plane).serving() as metrics:
        metrics.set_load(namespace, "autoscaled", 2500)  # 2.5 replicas' worth

        def replicas(n: int) -> Any:
            m = get_model(kube, namespace, "autoscaled")
            hpa = kube.get("hpa", "autoscaled", namespace=namespace) or {}
            return m if (m["spec"]["replicas"] == n and m["status"].get("readyReplicas") == n
                         and (hpa.get("status") or {}).get("desiredReplicas") == n) else None  # fmt: skip

        wait_for("3 replicas", lambda: replicas(3), within_s=90)
        for p in (0, 1):
            assert [s["spec"]["replicas"] for s in agent_sets(kube, namespace, "autoscaled", p)] == [3]
        time.sleep(12)  # a few HPA periods: it stays at 3 (it would go to 4, the max, if it counted partitions)
        assert replicas(3)
        metrics.set_load(namespace, "autoscaled", 400)
        wait_for("back to 1 replica", lambda: replicas(1), within_s=120)
        assert metrics.requests > 0
        # scaling made no plan
        assert get_model(kube, namespace, "autoscaled")["status"]["placement"]["version"] == 1


def test_a_model_whose_hit_rate_stays_low_is_widened_by_one_partition(kube: Kube, namespace: str) -> None:
    """spec.autoscaling.partitions: the operator reads the agents' L1 hit and miss rates through the
    custom metrics API, and a hit rate below the target for the widen window (seconds, at the e2e
    operator's pace) makes a plan of one more partition, rolled out to the end; spec.partitions
    stays as the user wrote it."""
    kube.apply(model("widening", partitions=1, autoscaling={
        "minReplicas": 1, "maxReplicas": 1, "targetQPSPerReplica": 100000,
        "partitions": {"min": 1, "max": 2, "targetHitRate": 0.9}}), namespace=namespace)  # fmt: skip
    ready(kube, namespace, "widening")
    with CustomMetrics(kube.plane).serving() as metrics:
        metrics.set_l1(namespace, "widening", hits_per_s=400, misses_per_s=600)
        widened = wait_for("2 partitions", lambda: (
            m if (m := ready(kube, namespace, "widening"))["status"]["placement"]["partitions"] == 2 else None),
            within_s=90)  # fmt: skip
    assert widened["status"]["autoscaling"]["partitions"] == 2
    assert widened["status"]["autoscaling"]["hitRate"] == 0.4
    assert widened["spec"]["partitions"] == 1
    assert len(agent_sets(kube, namespace, "widening", 1)) == 1
    events = wait_for("the PartitionsWidened event", lambda: [
        e["message"] for e in kube.get("events", namespace=namespace) if e["reason"] == "PartitionsWidened"],
        within_s=15)  # fmt: skip
    assert events[0].startswith("to 2 partitions:")


def test_agents_waiting_for_gpus_are_reported_and_join_when_a_node_comes(kube: Kube, namespace: str) -> None:
    """A node pool that is too small (a cluster autoscaler would add nodes): the pod that does not fit
    waits, the status says how many GPUs it asks for and how many are free, the model serves on its
    ready replica; when a node joins, the pod is placed and the model becomes Ready."""
    pool = NodePool(prefix="burst", count=2, gpus=8, gpu_memory_mib=81920, labels=(("pool", "burst"),))
    kube.plane.add_node(pool, 0, volumes=0)
    try:
        kube.apply(model("bursty", replicas=2, gpusPerPod=8, agent={"nodeSelector": {"pool": "burst"}}),
                   namespace=namespace)  # fmt: skip

        def waiting() -> dict[str, Any] | None:
            m = get_model(kube, namespace, "bursty")
            # the replica that fits serves (its pod may become Ready after the other is seen waiting)
            waits = condition(m, "Progressing").get("reason") == "WaitingForGPUs"
            return m if waits and (m.get("status") or {}).get("readyReplicas") == 1 else None

        m = wait_for("WaitingForGPUs with the replica that fits serving", waiting)
        message = condition(m, "Progressing")["message"]
        assert "1 agent pod(s) wait for nvidia.com/gpu: 8 asked for, 0 free on the 1 node(s)" in message, message
        assert condition(m, "Degraded").get("status") != "True"
        kube.plane.add_node(pool, 1, volumes=0)
        ready(kube, namespace, "bursty", within_s=30)
        assert condition(get_model(kube, namespace, "bursty"), "Progressing")["reason"] != "WaitingForGPUs"
    finally:
        for i in range(pool.count):
            kube.kubectl("delete", "node", f"burst-{i}", "--wait=false", check=False)


def test_a_model_of_2500_tables_reconciles(kube: Kube, namespace: str) -> None:
    """Its spec is larger than all annotations together may be (256 KiB) and its plans than one
    ConfigMap (1 MiB): it is applied server-side (``kubectl apply --server-side``: client-side apply
    would copy the spec into an annotation) and served."""
    tables = [{"name": f"sparse-feature-{i:04d}", "rows": 100_000 + 37 * i, "dim": 64, "dtype": "float32",
               "hotness": round(1 / 2500, 6), "source": f"file:///models/criteo-like/v1/sparse-feature-{i:04d}"}
              for i in range(2500)]  # fmt: skip
    big = model("huge", tables=tables, gpusPerPod=8, partitions=4, cache={"memoryPerGPU": "40Gi"})
    assert len(json.dumps(big)) > 256 * 1024
    kube.apply(big, namespace=namespace, server_side=True)
    m = ready(kube, namespace, "huge", within_s=180)
    assert m["status"]["tableCount"] == 2500
    annotations = m["metadata"].get("annotations") or {}
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 256 * 1024
    for name in ("huge-plan", "huge-config"):
        cm = kube.get("configmap", name, namespace=namespace)
        assert sum(len(k) + len(v.encode()) for k, v in cm["data"].items()) < 1 << 20


def test_a_killed_operator_finishes_the_rollout_without_duplicates(kube: Kube, operator: OperatorProcess,
                                                                  namespace: str) -> None:  # fmt: skip
    """SIGKILL mid-rollout, then a restart: the rollout completes on the plan it started, nothing is
    duplicated, and the restart reconciles each model once, not once per child."""
    kube.apply(model("phoenix", replicas=2), namespace=namespace)
    kube.apply(model("calm"), namespace=namespace)  # a steady model beside it
    ready(kube, namespace, "calm")
    version = ready(kube, namespace, "phoenix")["status"]["placement"]["version"]
    kube.kubectl("patch", "-n", namespace, "em/phoenix", "--type=merge", "-p", '{"spec":{"partitions":3}}')
    wait_for("the rollout under way", lambda: (get_model(kube, namespace, "phoenix")["status"].get("rebalance") or {})
             .get("phase") in ("Warming", "Switching"), poll_s=0.1)  # fmt: skip
    operator.kill()
    restarted_at = time.time()
    operator.start()
    m = wait_for("plan v2 on 3 partitions", lambda: (
        m if (m := ready(kube, namespace, "phoenix"))["status"]["placement"]["version"] == version + 1 else None))  # fmt: skip
    assert m["status"]["placement"]["partitions"] == 3
    agents = sorted(s["metadata"]["labels"]["hps.dev/partition"] for s in agent_sets(kube, namespace, "phoenix"))
    assert agents == ["0", "1", "2"]  # one agent set per partition: nothing duplicated, nothing left over
    assert len(kube.get("pods", namespace=namespace, selector=f"{INSTANCE}=phoenix,app.kubernetes.io/component=agent")) == 6
    assert plan_of(kube, namespace, "phoenix", "routing.json")["version"] == version + 1

    # after the restart, the steady model was reconciled on resume and by its timer, not once per child
    # (it has a dozen, each listed at start)
    requests = audit(kube, since=restarted_at, until=restarted_at + 2 * RESYNC_S)
    gets = [r for r in requests if r["verb"] == "get" and (r.get("objectRef") or {}).get("resource") == "embeddingmodels"
            and r["objectRef"].get("name") == "calm"]  # fmt: skip
    assert 1 <= len(gets) <= 4, len(gets)
    assert len(children(kube, namespace, "calm")) >= 10


def test_a_deleted_password_secret_comes_back_and_redis_and_the_agents_restart(kube: Kube, operator: OperatorProcess,
                                                                             namespace: str) -> None:  # fmt: skip
    """Someone deletes the Redis users' Secret: the operator (which never reads Secrets, and posts them
    again when it starts or every few minutes) makes it anew with new passwords, and restarts Redis and
    the agents, whose running pods hold the old ones; its own applies then leave the restart mark alone
    (no roll after roll)."""
    kube.apply(model("rotate"), namespace=namespace)
    ready(kube, namespace, "rotate")
    kube.kubectl("delete", "secret", "-n", namespace, "rotate-redis-users")
    operator.kill()
    operator.start()  # a fresh operator posts its Secrets at once
    wait_for("the Secret made anew", lambda: kube.get("secret", "rotate-redis-users", namespace=namespace))
    sets = ["rotate-redis", *(s["metadata"]["name"] for s in agent_sets(kube, namespace, "rotate"))]

    def marks() -> dict[str, str | None]:
        return {name: ((kube.get("statefulset", name, namespace=namespace) or {}).get("spec", {}).get("template", {})
                       .get("metadata", {}).get("annotations") or {}).get("hps.dev/restartedAt") for name in sets}  # fmt: skip

    stamped = wait_for("every StatefulSet restarted", lambda: m if all((m := marks()).values()) else None)
    assert len(set(stamped.values())) == 1, stamped  # one restart, at one time
    generations = {name: kube.get("statefulset", name, namespace=namespace)["metadata"]["generation"] for name in sets}
    time.sleep(2 * RESYNC_S)  # the operator's resyncs re-apply the model: the mark stays, nothing rolls again
    assert marks() == stamped
    assert {name: kube.get("statefulset", name, namespace=namespace)["metadata"]["generation"] for name in sets} == generations
    assert any("CredentialsRecreated: Secret/rotate-redis-users missing, made anew" in w
               for w in operator_warnings(kube, namespace))  # fmt: skip


def test_stale_children_are_deleted(kube: Kube, namespace: str) -> None:
    """A child the operator no longer renders (here, a ConfigMap an older version wrote) goes."""
    kube.apply(model("tidy"), namespace=namespace)
    m = ready(kube, namespace, "tidy")
    stale = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "tidy-legacy", "labels": {INSTANCE: "tidy", "app.kubernetes.io/managed-by": "hps-operator"},
        "ownerReferences": [{"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": "tidy",
                             "uid": m["metadata"]["uid"], "controller": True}]}, "data": {"a": "b"}}  # fmt: skip
    kube.apply(stale, namespace=namespace)
    wait_for("the stale ConfigMap gone", lambda: kube.get("configmap", "tidy-legacy", namespace=namespace) is None)
    # NetworkPolicies turned off: they go too
    assert len(kube.get("networkpolicies", namespace=namespace, selector=f"{INSTANCE}=tidy")) == 2
    kube.kubectl("patch", "-n", namespace, "em/tidy", "--type=merge", "-p", '{"spec":{"network":{"policy":false}}}')
    wait_for("the NetworkPolicies gone", lambda: not kube.get("networkpolicies", namespace=namespace,
                                                              selector=f"{INSTANCE}=tidy"))  # fmt: skip


def test_deleting_a_model_removes_its_children_and_finalizer(kube: Kube, namespace: str) -> None:
    kube.apply(model("brief"), namespace=namespace)
    ready(kube, namespace, "brief")
    assert children(kube, namespace, "brief")
    kube.kubectl("delete", "-n", namespace, "em/brief", "--wait=false")
    # within seconds, even when its resync timer is mid-reconcile (kopf once polled that every 60 s)
    wait_for("the model gone (its finalizer removed)",
             lambda: kube.get("embeddingmodel", "brief", namespace=namespace) is None, within_s=20)  # fmt: skip
    wait_for("the garbage collector to remove the children", lambda: not children(kube, namespace, "brief"))


def test_a_model_installed_with_helm_is_served_and_goes_with_its_release(kube: Kube, namespace: str,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """``helm install`` of ``charts/hps-model`` with the model's spec as values; ``helm upgrade`` with
    more replicas scales it; ``helm uninstall`` deletes it and the operator's children with it."""
    values = tmp_path / "model-values.yaml"
    values.write_text(yaml.safe_dump({"spec": model("helmed")["spec"]}))
    chart = str(Path(__file__).resolve().parents[1] / "charts" / "hps-model")
    kube.helm("install", "helmed", chart, "-n", namespace, "-f", str(values))
    first = ready(kube, namespace, "helmed")
    assert first["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    kube.helm("upgrade", "helmed", chart, "-n", namespace, "-f", str(values), "--set", "spec.replicas=2")
    wait_for("2 ready replicas", lambda: get_model(kube, namespace, "helmed")["status"].get("readyReplicas") == 2)
    assert get_model(kube, namespace, "helmed")["status"]["placement"]["version"] == first["status"]["placement"]["version"]
    kube.helm("uninstall", "helmed", "-n", namespace)
    wait_for("the model gone", lambda: kube.get("embeddingmodel", "helmed", namespace=namespace) is None, within_s=30)
    wait_for("its children gone", lambda: not children(kube, namespace, "helmed"))


def _auth_args(statefulset: dict[str, Any]) -> list[str]:
    """The ``--auth-*`` flags (with their values) the operator gave the agent container."""
    (container,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    args: list[str] = container.get("args") or container.get("command") or []
    picked: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--auth-"):
            picked.append(arg)
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                picked.append(args[i + 1])
    return picked


def test_agents_check_callers_by_service_account_and_their_binding_goes_with_the_model(
    kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """``spec.security.auth.writers`` on a real API server: the operator gives the model's agents their
    own ServiceAccount and binds it to ``system:auth-delegator``; an agent holding that account's token
    and started with the flags the operator rendered lets the writer's ServiceAccount update and refuses
    another's, each checked by the API server's TokenReview; deleting the model deletes the binding (a
    cluster-scoped object the garbage collector cannot reach).

    Stand-in: the agent is a local ``hps agent`` process (kwok runs no process in a pod); its token,
    API server and CA are what a pod would mount."""
    import subprocess
    import sys

    import numpy as np

    writer = f"system:serviceaccount:{namespace}:trainer"
    kube.apply(model("guarded", security={"auth": {"writers": [writer]}}), namespace=namespace)
    uid = ready(kube, namespace, "guarded")["metadata"]["uid"]
    account = kube.get("serviceaccount", "guarded-agent", namespace=namespace)
    assert account["automountServiceAccountToken"] is True
    (statefulset,) = agent_sets(kube, namespace, "guarded", 0)
    assert statefulset["spec"]["template"]["spec"]["serviceAccountName"] == "guarded-agent"
    binding_name = f"hps-operator:{namespace}:guarded:tokenreview"
    binding = kube.get("clusterrolebinding", binding_name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "system:auth-delegator"}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "guarded-agent", "namespace": namespace}]
    assert binding["metadata"]["labels"]["hps.dev/owner-uid"] == uid
    # a model without auth has a ServiceAccount that mounts no token and is bound to nothing
    kube.apply(model("open"), namespace=namespace)
    ready(kube, namespace, "open")
    assert kube.get("serviceaccount", "open-agent", namespace=namespace)["automountServiceAccountToken"] is False
    assert kube.get("clusterrolebinding", f"hps-operator:{namespace}:open:tokenreview") is None

    for account_name in ("trainer", "intruder"):
        kube.kubectl("create", "serviceaccount", account_name, "-n", namespace)
    tokens = {}
    for account_name in ("guarded-agent", "trainer", "intruder"):
        tokens[account_name] = tmp_path / f"{account_name}.token"
        tokens[account_name].write_text(
            kube.kubectl("create", "token", account_name, "-n", namespace, "--duration=1h").stdout.strip())
    server = json.loads(kube.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({
        "apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "metadata": {"name": "guarded"},
        "spec": {"tables": [{"name": "user", "rows": 4, "dim": 2, "source": "user.npy"}]}}))  # fmt: skip
    np.save(tmp_path / "user.npy", np.zeros((4, 2), np.float32))
    np.save(tmp_path / "v.npy", np.full((1, 2), 7.0, np.float32))
    ready_file = tmp_path / "ready.json"
    agent = subprocess.Popen(
        [sys.executable, "-m", "hps_operator", "agent", "-f", str(tmp_path / "model.yaml"), "--port", "0",
         "--load", "--device", "cpu", "--ready-file", str(ready_file), *_auth_args(statefulset),
         "--auth-kube-api", server, "--auth-kube-token-file", str(tokens["guarded-agent"]),
         "--auth-kube-ca", str(kube.plane.pki / "ca.crt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_for("the agent to serve", lambda: ready_file.exists() or agent.poll() is not None)
        assert agent.poll() is None, agent.stderr.read().decode() if agent.stderr else ""
        endpoint = json.loads(ready_file.read_text())["endpoint"]

        def update(token: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "hps_operator", "update", "--endpoint", endpoint, "--model", "guarded",
                 "--table", "user", "--keys", "2", "--vectors-file", str(tmp_path / "v.npy"),
                 "--token-file", str(token)],
                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

        assert update(tokens["trainer"]).returncode == 0
        refused = update(tokens["intruder"])
        assert refused.returncode == 10, refused.stderr  # PERMISSION_DENIED: authenticated, not a writer
        assert f"system:serviceaccount:{namespace}:intruder" in refused.stderr
        (tmp_path / "forged.token").write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl\n")
        assert update(tmp_path / "forged.token").returncode == 9  # UNAUTHENTICATED: the API server knows it not
        looked = subprocess.run([sys.executable, "-m", "hps_operator", "lookup", "--endpoint", endpoint,
                                 "--model", "guarded", "--table", "user", "--keys", "2", "-o", "json"],
                                capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(looked.stdout)["vectors"] == [[7.0, 7.0]]
    finally:
        agent.terminate()
        agent.wait(15)

    kube.kubectl("delete", "-n", namespace, "em/guarded", "em/open", "--timeout=30s")
    wait_for("the binding deleted with its model", lambda: kube.get("clusterrolebinding", binding_name) is None)


#: cert-manager's Certificate kind, served by a CustomResourceDefinition with no controller behind it:
#: the stand-in for cert-manager (not built here), enough to see what the operator asks it for
CERTIFICATE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "certificates.cert-manager.io"},
    "spec": {"group": "cert-manager.io", "scope": "Namespaced",
             "names": {"kind": "Certificate", "listKind": "CertificateList", "plural": "certificates",
                       "singular": "certificate"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
}  # fmt: skip


def test_a_cert_manager_issuer_gets_a_certificate_naming_every_service(kube: Kube, namespace: str) -> None:
    """``spec.security.tls.issuerRef``: the operator asks cert-manager for a Certificate owned by the
    model, naming the client Service and every partition's, its Secret mounted by the agents; switching
    to a Secret of the user's deletes the Certificate. The CRD alone stands in for cert-manager."""
    kube.apply(CERTIFICATE_CRD)
    wait_for("the Certificate kind served", lambda: kube.kubectl("get", "certificates", "-n", namespace,
                                                                 check=False).returncode == 0)  # fmt: skip
    issuer = {"name": "cluster-ca", "kind": "ClusterIssuer"}
    kube.apply(model("certified", partitions=2, security={"tls": {"issuerRef": issuer}}), namespace=namespace)
    m = ready(kube, namespace, "certified")
    certificate = wait_for("the Certificate", lambda: kube.get("certificate", "certified-agent-tls",
                                                               namespace=namespace))  # fmt: skip
    (ref,) = certificate["metadata"]["ownerReferences"]
    assert ref["uid"] == m["metadata"]["uid"]
    spec = certificate["spec"]
    assert spec["secretName"] == "certified-agent-tls"
    assert spec["issuerRef"] == {**issuer, "group": "cert-manager.io"}
    services = [s["metadata"]["name"] for s in kube.get("services", namespace=namespace,
                selector=f"{INSTANCE}=certified,app.kubernetes.io/component=agent")]  # fmt: skip
    assert sorted(services) == ["certified-agent", "certified-agent-p0", "certified-agent-p1"]
    for service in services:
        assert f"{service}.{namespace}.svc" in spec["dnsNames"], spec["dnsNames"]
    for statefulset in agent_sets(kube, namespace, "certified"):
        volumes = statefulset["spec"]["template"]["spec"]["volumes"]
        assert any((v.get("secret") or {}).get("secretName") == "certified-agent-tls" for v in volumes)

    kube.kubectl("patch", "-n", namespace, "em/certified", "--type=merge",
                 "-p", '{"spec":{"security":{"tls":{"issuerRef":null,"secretName":"own-tls"}}}}')  # fmt: skip
    wait_for("the Certificate deleted", lambda: kube.get("certificate", "certified-agent-tls",
                                                         namespace=namespace) is None)  # fmt: skip
    ready(kube, namespace, "certified")
    for statefulset in agent_sets(kube, namespace, "certified"):
        volumes = statefulset["spec"]["template"]["spec"]["volumes"]
        assert any((v.get("secret") or {}).get("secretName") == "own-tls" for v in volumes)


def lease_holder(kube: Kube) -> str:
    lease = kube.get("lease", LEASE_NAME, namespace=OPERATOR_NAMESPACE)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def test_a_second_replica_takes_over_within_15_s_of_the_leaders_death(kube: Kube, operator: OperatorProcess,
                                                                      namespace: str) -> None:  # fmt: skip
    """Two replicas, as the chart runs them: one leads, the other waits and writes nothing; SIGKILL the
    leader and the follower leads and reconciles within 15 s."""
    wait_for("the leader", lambda: lease_holder(kube) == operator.identity)
    metrics_port = free_port()
    follower = OperatorProcess(kube, operator.log_path.with_name("follower.log"), identity="operator-1",
                               extra_args=("--metrics-port", str(metrics_port)))  # fmt: skip
    follower.start()

    def leader_gauge() -> str | None:
        # a follower answers a scrape too (every replica sits behind the chart's metrics Service)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        return next((line.split()[-1] for line in text.splitlines() if line.startswith("hps_operator_leader ")), None)

    try:
        time.sleep(2 * LEASE_S / 5 + 1)  # a few of the follower's tries
        assert lease_holder(kube) == operator.identity
        assert wait_for("the follower's metrics", leader_gauge) == "0.0"
        kube.apply(model("before"), namespace=namespace)
        ready(kube, namespace, "before")
        killed_at = time.time()
        operator.kill()
        kube.apply(model("after"), namespace=namespace)
        wait_for("the follower to lead", lambda: lease_holder(kube) == "operator-1", within_s=15, poll_s=0.2)
        ready(kube, namespace, "after", within_s=15 - (time.time() - killed_at))
        took = time.time() - killed_at
        assert took < 15, took
        assert leader_gauge() == "1.0"
        # while it followed, the follower asked for the Lease and nothing else
        followed = [r for r in audit(kube, until=killed_at) if "operator-1" in r.get("userAgent", "")]
        assert followed and {(r.get("objectRef") or {}).get("resource") for r in followed} == {"leases"}
        assert {r["verb"] for r in followed} <= {"get", "create", "update"}
        # one plan per model, made once: no duplicate writes across the handover
        plans = [e for e in kube.get("events", namespace=namespace) if e["reason"] == "PlanCreated"]
        assert sorted(e["involvedObject"]["name"] for e in plans) == ["after", "before"]
    finally:
        follower.stop()  # a clean stop releases the Lease: the session's operator leads again at once
    operator.start()
    wait_for("the session's operator to lead again", lambda: lease_holder(kube) == operator.identity)


# ---------------------------------------------------------------------------------------------
# what the API server saw the operator do, over every scenario above


def audit(kube: Kube, *, since: float = 0.0, until: float = float("inf")) -> list[dict[str, Any]]:
    """The operator's requests in the API server's audit log (its ServiceAccount's)."""
    user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
    found = []
    for line in kube.plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event["user"]["username"] != user or event.get("stage") != "ResponseComplete":
            continue
        stamp = _timestamp(event["requestReceivedTimestamp"])
        if since <= stamp <= until:
            found.append(event)
    return found


def _timestamp(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def granted_rules(kube: Kube) -> set[tuple[str, str, str]]:
    manifest = kube.helm("get", "manifest", RELEASE, "-n", OPERATOR_NAMESPACE).stdout
    rules: set[tuple[str, str, str]] = set()
    for doc in yaml.safe_load_all(manifest):
        aggregated = any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                         for k in ((doc or {}).get("metadata", {}).get("labels") or {}))  # fmt: skip
        if doc and doc["kind"] in ("ClusterRole", "Role") and not aggregated:
            for rule in doc.get("rules") or []:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            rules.add((group, resource, verb))
    return rules


#: permissions the API server checks without a request of that verb: an owner reference with
#: blockOwnerDeletion needs "update embeddingmodels/finalizers", a server-side apply (a patch)
#: that creates its object needs "create", and a binding of a ClusterRole needs "bind" on it
CHECKED_BY_ADMISSION = {("hps.dev", "embeddingmodels/finalizers", "update"),
                        ("rbac.authorization.k8s.io", "clusterroles", "bind")} | {
    (group, resource, "create")
    for group, resource in (("", "configmaps"), ("", "services"), ("apps", "statefulsets"), ("batch", "jobs"),
                            ("policy", "poddisruptionbudgets"), ("autoscaling", "horizontalpodautoscalers"),
                            ("networking.k8s.io", "networkpolicies"), ("", "serviceaccounts"),
                            ("cert-manager.io", "certificates"), ("rbac.authorization.k8s.io", "clusterrolebindings"))
}  # fmt: skip


def test_watches_are_label_selected_and_permissions_are_exactly_those_used(kube: Kube) -> None:
    requests = audit(kube)
    assert requests, "no request of the operator in the audit log"
    used: set[tuple[str, str, str]] = set()
    for r in requests:
        ref = r.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        used.add((ref.get("apiGroup", ""), resource, r["verb"]))
        status = r.get("responseStatus") or {}
        # no request was denied by RBAC (quota and terminating-namespace refusals are 403s too)
        assert not (status.get("code") == 403 and "cannot" in (status.get("message") or "")), status
    child_resources = {plural for (api_version, kind) in CHILD_KINDS for plural in [_plural(kind)]}
    for r in requests:
        ref = r.get("objectRef") or {}
        if r["verb"] in ("list", "watch") and ref.get("resource") in child_resources:
            assert "labelSelector=" in r["requestURI"], r["requestURI"]
    assert not any(r["verb"] in ("get", "list", "watch") and (r.get("objectRef") or {}).get("resource") == "secrets"
                   for r in requests)  # fmt: skip
    granted = granted_rules(kube)
    assert used <= granted, used - granted
    assert {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")} <= used
    assert granted - used == CHECKED_BY_ADMISSION, granted - used


def _plural(kind: str) -> str:
    from hps_operator.kopf_handlers.kube_api import KINDS

    return next(info.plural for (_, k), info in KINDS.items() if k == kind)


def test_uninstalling_the_chart_leaves_models_serving(kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    """``helm uninstall`` with models present (docs/operations.md): the CRD and the models stay, their
    children keep serving, a model deleted meanwhile waits on its finalizer; installing the chart
    again brings the operator back, which finishes that deletion and plans nothing new."""
    kube.apply(model("survivor"), namespace=namespace)
    kube.apply(model("doomed"), namespace=namespace)
    version = ready(kube, namespace, "survivor")["status"]["placement"]["version"]
    ready(kube, namespace, "doomed")
    # SIGTERM, as the kubelet sends it: the leader releases its Lease and exits well within the pod's
    # 30 s grace period (a stop flag kopf waited on in a worker thread once held the exit until SIGKILL)
    assert operator.stop(timeout_s=10), "the operator was still running 10 s after SIGTERM"
    kube.helm("uninstall", RELEASE, "-n", OPERATOR_NAMESPACE)
    assert kube.get("crd", "embeddingmodels.hps.dev") is not None
    assert agent_sets(kube, namespace, "survivor", 0)[0]["status"]["readyReplicas"] == 1
    kube.kubectl("delete", "-n", namespace, "em/doomed", "--wait=false")
    time.sleep(2)
    doomed = get_model(kube, namespace, "doomed")
    assert doomed["metadata"].get("deletionTimestamp") and doomed["metadata"]["finalizers"] == ["hps.dev/finalizer"]

    kube.helm("install", RELEASE, str(ROOT / "charts" / "hps-operator"), "-n", OPERATOR_NAMESPACE, "--wait=false")
    operator.start()
    wait_for("doomed deleted", lambda: kube.get("embeddingmodel", "doomed", namespace=namespace) is None)
    assert ready(kube, namespace, "survivor")["status"]["placement"]["version"] == version
    assert NODE_POOL.count == len([n for n in kube.get("nodes") if n["metadata"]["name"].startswith("gpu-node")])
