"""The kopf operator, run for real (in-process, cluster-wide) against kmock's Kubernetes emulator.

The Kubernetes API is the one part that cannot run here, so it is emulated (``kube_emulator.py`` lists
the gaps filled). The emulator has no kubelet: pods never start, so "the agents became ready" is
simulated by writing the StatefulSets' ``status`` as the StatefulSet controller would.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kopf
import kubernetes_validate
import pytest
import yaml
from hps_operator.core.reconcile import Options
from hps_operator.kopf_handlers.permissions import API_PERMISSIONS
from hps_operator.kopf_handlers.registry import OperatorConfig, build_registry, configure
from kmock import Server

from tests.operator.kube_emulator import ApiCall, HpsKubernetesEmulator
from tests.operator.test_status import status_schema_errors

ROOT = Path(__file__).resolve().parents[2]
MODELS = "hps.dev/v1alpha1/embeddingmodels"
STATEFULSETS = "apps/v1/statefulsets"
CONFIGMAPS = "v1/configmaps"
JOBS = "batch/v1/jobs"
NS = "ml"
WAIT_S = 15.0


def model_manifest(name: str = "dlrm", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tables": [
            {"name": "user-id", "rows": 2_000_000, "dim": 64, "dtype": "float32", "source": "file:///m/user"},
            {"name": "item-id", "rows": 1_000_000, "dim": 64, "dtype": "float32", "source": "file:///m/item"},
            {"name": "country", "rows": 300, "dim": 16, "dtype": "float16", "source": "file:///m/country"},
        ],
        "replicas": 2,
        "gpusPerPod": 4,
        "partitions": 1,
        "cache": {"memoryPerGPU": "1Gi"},
        "volatileStore": {"type": "redis", "redis": {"shards": 1, "memory": "1Gi"}},
        "persistentStore": {"type": "none"},
        "agent": {"image": "registry.example/hps:1.0"},
    }
    base.update(spec)
    return {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel",
            "metadata": {"name": name, "namespace": NS}, "spec": base}  # fmt: skip


def gpu_node(name: str, gpus: int, memory_mib: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": str(memory_mib)}},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64", "memory": "512Gi"}},
    }


async def wait_until(what: str, check: Callable[[], Any], within_s: float = WAIT_S,
                     show: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    """Polls ``check`` until it returns something truthy; fails after ``within_s`` seconds, with what
    ``show`` returns then."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}" + (f"; found {show()}" if show else ""))


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None


class Cluster:
    """The emulated API plus the verbs a test uses on it (as a user, or as the missing kubelet)."""

    def __init__(self, emulator: HpsKubernetesEmulator, server: Server) -> None:
        self.emulator = emulator
        self.url = str(server.url).rstrip("/")

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        async with self.emulator.request(method, path, json=body, headers={"Content-Type": content_type}) as rsp:
            assert rsp.status < 400, f"{method} {path}: {rsp.status} {await rsp.text()}"
            return await rsp.json()

    async def create_model(self, manifest: dict[str, Any]) -> None:
        await self.request("POST", f"/apis/hps.dev/v1alpha1/namespaces/{NS}/embeddingmodels", manifest)

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        await self.request("PATCH", f"/apis/hps.dev/v1alpha1/namespaces/{NS}/embeddingmodels/{name}",
                           {"spec": spec}, "application/merge-patch+json")  # fmt: skip

    def model(self, name: str = "dlrm") -> dict[str, Any] | None:
        return self.emulator.get_object(MODELS, NS, name)

    def children(self, res: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.emulator.list_objects(res) if o["metadata"].get("namespace") == NS}

    def agents(self, partition: int = 0) -> dict[str, Any] | None:
        """Partition ``partition``'s agent StatefulSet (the newest set, during a rollout)."""
        sets = [o for o in self.children(STATEFULSETS).values()
                if o["metadata"]["labels"].get("hps.dev/partition") == str(partition)]  # fmt: skip
        return max(sets, key=lambda o: int(o["metadata"]["annotations"]["hps.dev/plan-version"]), default=None)

    def agents_name(self, partition: int = 0) -> str:
        found = self.agents(partition)
        assert found is not None, f"no agent StatefulSet for partition {partition}"
        return str(found["metadata"]["name"])

    def plan_cm(self, name: str = "dlrm") -> dict[str, Any] | None:
        return self.emulator.get_object(CONFIGMAPS, NS, f"{name}-plan")

    async def make_agents_ready(self) -> None:
        """What the StatefulSet controller reports once every pod of every StatefulSet is ready."""
        for sts in self.emulator.list_objects(STATEFULSETS):
            meta, want = sts["metadata"], sts["spec"].get("replicas", 1)
            status = {"observedGeneration": meta["generation"], "replicas": want, "readyReplicas": want,
                      "updatedReplicas": want, "availableReplicas": want}  # fmt: skip
            if (sts.get("status") or {}) != status:
                await self.emulator.patch_object(STATEFULSETS, meta["namespace"], meta["name"], {"status": status})

    async def set_ready(self, name: str, ready: int) -> None:
        """A StatefulSet's pods exist on the current template but only ``ready`` pass their probe."""
        sts = self.children(STATEFULSETS)[name]
        want = sts["spec"].get("replicas", 1)
        status = {"observedGeneration": sts["metadata"]["generation"], "replicas": want, "readyReplicas": ready,
                  "updatedReplicas": want, "availableReplicas": ready}  # fmt: skip
        await self.emulator.patch_object(STATEFULSETS, NS, name, {"status": status})

    async def finish_jobs(self, *, failed: bool = False) -> None:
        """What the Job controller reports once the loader's pod exits (0, or out of retries)."""
        condition = ({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                      "message": "Job has reached the specified backoff limit"} if failed
                     else {"type": "Complete", "status": "True"})  # fmt: skip
        for name, job in self.children(JOBS).items():
            if (job.get("status") or {}).get("conditions") != [condition]:
                status = {"failed": 11} if failed else {"succeeded": 1}
                await self.emulator.patch_object(JOBS, NS, name, {"status": {**status, "conditions": [condition]}})

    def events(self, name: str = "dlrm") -> list[tuple[str, str, str]]:
        """``(type, reason, message)`` of every Event posted about the model, oldest first."""
        found = [e for e in self.emulator.list_objects("v1/events")
                 if (e.get("involvedObject") or {}).get("name") == name]  # fmt: skip
        found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [(e["type"], e["reason"], e.get("message", "")) for e in found]

    def reasons(self, name: str = "dlrm") -> list[str]:
        return [reason for _, reason, _ in self.events(name)]

    def writes(self, since: int) -> list[ApiCall]:
        return [c for c in self.operator_calls()[since:] if c.verb in ("create", "patch", "update", "delete")
                and c.resource != "events" and not c.path.endswith("/status")]  # fmt: skip

    def operator_calls(self) -> list[ApiCall]:
        return [c for c in self.emulator.api_calls if not c.user_agent.startswith("kmock/")]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    crd = yaml.safe_load((ROOT / "crds" / "hps.dev_embeddingmodels.yaml").read_text())
    async with HpsKubernetesEmulator() as emulator, Server(emulator) as server:
        emulator.register_crd(crd)
        for i in range(2):
            await emulator.seed("v1/nodes", gpu_node(f"gpu-{i}", gpus=8, memory_mib=81920))
        yield Cluster(emulator, server)


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster, tmp_path: Path, *, drain_seconds: float = 0.0) -> AsyncIterator[OperatorConfig]:
    """The operator as ``hps operator run -A --standalone`` runs it, with a kubeconfig naming the
    emulator, short timeouts and its metrics endpoint on a free loopback port, stopped (and awaited)
    on exit."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": cluster.url}}],
        "users": [{"name": "operator", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
    }))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(kubeconfig))
        config = OperatorConfig(Options(image="registry.example/hps:default", drain_seconds=drain_seconds),
                                resync_seconds=0.5, metrics_port=0, metrics_address="127.0.0.1")  # fmt: skip
        settings = kopf.OperatorSettings()
        configure(settings)
        settings.peering.standalone = True
        settings.watching.connect_timeout = 2
        settings.networking.request_timeout = 5
        settings.queueing.exit_timeout = 1
        settings.queueing.idle_timeout = 0.5  # workers wait this long for more events before exiting
        settings.execution.max_workers = 4
        # kopf gets a loop of its own: on exit it waits for every task of its loop, the emulator's too
        stop, ready = threading.Event(), threading.Event()
        failures: list[BaseException] = []

        def operator_thread() -> None:
            try:
                asyncio.run(kopf.operator(
                    registry=build_registry(config), settings=settings, clusterwide=True, standalone=True,
                    stop_flag=stop, ready_flag=ready,
                ))  # fmt: skip
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=operator_thread, name="operator", daemon=True)
        thread.start()
        try:
            await wait_until("the operator to start", lambda: ready.is_set() or failures)
            yield config
        finally:
            stop.set()
            await wait_until("the operator to stop", lambda: not thread.is_alive())
        assert failures == []


async def deployed(cluster: Cluster, tmp_path: Path) -> None:
    """The scenario model created and fully served: its agents, Redis and loader all report done.

    The children are applied one by one in kind and name order (the Job first, Redis's StatefulSet
    after the agents'), so the controllers' part is played until every tier answers (Degraded has
    left NotYetReady), not only until Ready: Ready needs no Redis, and a Redis StatefulSet created
    after the agents were made ready would otherwise stay unready for the rest of the test."""
    await cluster.create_model(model_manifest())
    await wait_until("the agent StatefulSet", lambda: cluster.agents(0) is not None)
    await wait_until("the loader Job", lambda: cluster.children(JOBS))

    async def served() -> bool:
        await cluster.make_agents_ready()
        await cluster.finish_jobs()
        return (condition(cluster.model(), "Degraded") or {}).get("reason") == "AsExpected"

    deadline = time.monotonic() + WAIT_S
    while not await served():
        assert time.monotonic() < deadline, f"never fully served: {(cluster.model() or {}).get('status')}"
        await asyncio.sleep(0.1)
    assert (condition(cluster.model(), "Ready") or {}).get("status") == "True"


async def settled(cluster: Cluster, seconds: float = 1.5) -> None:
    """Lets a few resync periods pass (the timer runs every 0.5 s)."""
    await asyncio.sleep(seconds)


async def quiet(cluster: Cluster, *, for_s: float = 1.0) -> int:
    """Waits until the operator has written nothing for ``for_s`` seconds (kopf may still be
    recording a handler's outcome); returns the request mark to count later writes from."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        mark = len(cluster.operator_calls())
        await asyncio.sleep(for_s)
        if not cluster.writes(mark):
            return len(cluster.operator_calls())
    raise AssertionError("the operator never stopped writing")




#: the labels of the scenario model's series, as Prometheus prints them
MODEL = 'model="dlrm",namespace="ml"'


async def scraped(config: OperatorConfig, check: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Scrapes until ``check`` holds for the samples (bounded by WAIT_S); returns the last scrape."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = await scrape(config)
        if check(samples) or time.monotonic() > deadline:
            assert check(samples), f"the metrics never matched: {samples}"
            return samples
        await asyncio.sleep(0.1)


async def scrape(config: OperatorConfig) -> dict[str, float]:
    """The operator's ``/metrics`` as ``{'name{labels}': value}`` (labels as Prometheus prints them)."""
    assert config.metrics.port, "the metrics endpoint is not serving"
    url = f"http://127.0.0.1:{config.metrics.port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# ---------------------------------------------------------------------------------------------


async def test_create_makes_children_and_reports_conditions(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path):
        await cluster.create_model(model_manifest())
        await wait_until("children", lambda: cluster.agents(0) is not None)
        await wait_until("Placed", lambda: condition(cluster.model(), "Placed"))
        model = cluster.model()
        assert model is not None
        status = model["status"]
        assert status["observedGeneration"] == model["metadata"]["generation"]
        assert {c["type"] for c in status["conditions"]} >= {"Ready", "Placed", "Loaded", "Progressing", "Degraded"}
        assert condition(model, "Placed")["status"] == "True"  # type: ignore[index]
        assert condition(model, "Ready")["status"] == "False"  # type: ignore[index]  # no pod is ready yet
        assert status["selector"] == "app.kubernetes.io/instance=dlrm,app.kubernetes.io/component=agent,hps.dev/partition=0"
        assert status["placement"]["version"] == 1
        assert status["replicas"] == 0 and status["readyReplicas"] == 0  # no agent pod exists yet
        sts = cluster.children(STATEFULSETS)
        assert cluster.agents(0)["spec"]["replicas"] == 2  # type: ignore[index]
        assert "dlrm-redis" in sts
        plan_cm = cluster.plan_cm()
        assert plan_cm is not None and '"version":1' in plan_cm["data"]["routing.json"]
        owner_uid = model["metadata"]["uid"]
        assert all(o["metadata"]["ownerReferences"][0]["uid"] == owner_uid for o in sts.values())

        assert status_schema_errors(status) == []
        await wait_until("the PlanCreated event", lambda: cluster.reasons())
        assert cluster.reasons() == ["PlanCreated"]
        assert "plan v1: " in cluster.events()[0][2]

        await cluster.make_agents_ready()
        # agents serve, but the loader Job has not finished filling Redis: not Ready, and Loaded says why
        await wait_until("Loaded=Loading", lambda: (condition(cluster.model(), "Loaded") or {}).get("reason") == "Loading")
        assert condition(cluster.model(), "Ready")["reason"] == "Loading"  # type: ignore[index]
        await cluster.finish_jobs()
        await wait_until("Ready=True", lambda: (condition(cluster.model(), "Ready") or {}).get("status") == "True")
        ready_since = condition(cluster.model(), "Ready")["lastTransitionTime"]  # type: ignore[index]
        assert cluster.model()["status"]["readyReplicas"] == 2  # type: ignore[index]
        assert condition(cluster.model(), "Loaded")["status"] == "True"  # type: ignore[index]
        assert condition(cluster.model(), "Degraded")["status"] == "False"  # type: ignore[index]

        # unchanged spec: the resync timer keeps running and writes nothing at all
        mark = await quiet(cluster)
        await settled(cluster)
        assert cluster.writes(mark) == []
        assert condition(cluster.model(), "Ready")["lastTransitionTime"] == ready_since  # type: ignore[index]

    # every manifest the operator applied is valid against the official Kubernetes schemas
    for res in (STATEFULSETS, CONFIGMAPS, "v1/services", "v1/secrets", "batch/v1/jobs", "policy/v1/poddisruptionbudgets"):
        for obj in cluster.children(res).values():
            applied = {k: v for k, v in copy.deepcopy(obj).items() if k != "status"}
            for field in ("uid", "resourceVersion", "generation", "creationTimestamp"):
                applied["metadata"].pop(field, None)
            kubernetes_validate.validate(applied, "1.31", strict=True)


async def test_scaling_replicas_changes_no_plan(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path):
        await deployed(cluster, tmp_path)
        plan_before = cluster.plan_cm()["data"]["plan.json"]  # type: ignore[index]
        # the scale subresource, as `kubectl scale` and the HPA use it
        await cluster.request("PATCH", f"/apis/hps.dev/v1alpha1/namespaces/{NS}/embeddingmodels/dlrm/scale",
                              {"spec": {"replicas": 4}}, "application/merge-patch+json")  # fmt: skip
        await wait_until("4 agent replicas", lambda: cluster.agents(0)["spec"]["replicas"] == 4)  # type: ignore[index]
        await cluster.make_agents_ready()
        await wait_until("status.replicas", lambda: cluster.model()["status"]["replicas"] == 4)  # type: ignore[index]
        await wait_until("4 ready", lambda: cluster.model()["status"]["readyReplicas"] == 4)  # type: ignore[index]
        assert cluster.plan_cm()["data"]["plan.json"] == plan_before  # type: ignore[index]
        assert cluster.model()["status"]["placement"]["version"] == 1  # type: ignore[index]
        assert cluster.model()["status"]["rebalance"]["state"] == "Idle"  # type: ignore[index]


async def test_more_gpus_rolls_out_a_new_plan_make_before_break(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path) as config:
        await deployed(cluster, tmp_path)
        await cluster.patch_spec("dlrm", {"gpusPerPod": 8})
        await wait_until("a rebalance", lambda: (cluster.model()["status"].get("rebalance") or {}).get("phase") == "Warming")  # type: ignore[index]
        status = cluster.model()["status"]  # type: ignore[index]
        assert status["placement"]["version"] == 2 and status["placement"]["movedBytes"] > 0
        assert status_schema_errors(status) == []
        await wait_until("the RebalanceStarted event", lambda: "RebalanceStarted" in cluster.reasons())
        started = next(m for _, r, m in cluster.events() if r == "RebalanceStarted")
        assert "v1 -> v2" in started and f"moves {status['placement']['movedBytes']} bytes" in started
        # the gauges follow each reconcile (set just after its status is written)
        metrics = await scraped(config, lambda m: m.get(f"hps_model_rollout_phase{{{MODEL},phase=\"Warming\"}}") == 1)
        assert metrics[f"hps_model_plan_version{{{MODEL}}}"] == 2
        assert metrics[f"hps_model_plan_moved_bytes{{{MODEL}}}"] == status["placement"]["movedBytes"]
        assert metrics[f"hps_model_rollout_phase{{{MODEL},phase=\"Idle\"}}"] == 0
        assert status["rebalance"]["fromVersion"] == 1 and status["rebalance"]["toVersion"] == 2
        assert condition(cluster.model(), "Progressing")["reason"] == "Rebalancing"  # type: ignore[index]
        # routing stays on v1 until the new owners are warm
        assert '"version":1' in cluster.plan_cm()["data"]["routing.json"]  # type: ignore[index]

        await cluster.make_agents_ready()
        await wait_until("routing on v2", lambda: '"version":2' in cluster.plan_cm()["data"]["routing.json"])  # type: ignore[index]
        for _ in range(3):  # Switching → Draining → Idle, each once the agents are ready again
            await cluster.make_agents_ready()
            await asyncio.sleep(0.3)
        await wait_until("Idle", lambda: cluster.model()["status"]["rebalance"]["state"] == "Idle")  # type: ignore[index]
        await wait_until("Progressing=False", lambda: condition(cluster.model(), "Progressing")["status"] == "False")  # type: ignore[index]
        status = cluster.model()["status"]  # type: ignore[index]
        assert status["placement"]["version"] == 2
        # one shape, the CRD's: Idle names the active plan only (the merge patch removed fromVersion)
        assert sorted(status["rebalance"]) == ["phase", "since", "state", "toVersion"]
        assert status["rebalance"]["toVersion"] == 2
        assert status_schema_errors(status) == []
        await wait_until("RebalanceCompleted", lambda: "RebalanceCompleted" in cluster.reasons())
        rollout = [r for r in cluster.reasons() if r in ("RebalanceStarted", "RoutingSwitched", "DrainingOldShards",
                                                          "RebalanceCompleted")]  # fmt: skip
        assert rollout == ["RebalanceStarted", "RoutingSwitched", "DrainingOldShards", "RebalanceCompleted"]
        metrics = await scraped(config, lambda m: m.get(f"hps_model_rollout_phase{{{MODEL},phase=\"Idle\"}}") == 1)
        assert metrics[f"hps_model_ready_replicas{{{MODEL}}}"] == 2
        assert metrics['hps_operator_reconciles_total{result="Reconciled"}'] >= 5
        assert metrics["hps_operator_reconcile_duration_seconds_count"] >= 5


async def test_invalid_spec_is_reported_on_the_field(cluster: Cluster, tmp_path: Path) -> None:
    bad = model_manifest(name="typo")
    bad["spec"]["tables"][1]["name"] = "user-id"  # duplicate table names: no schema can say that
    async with running_operator(cluster, tmp_path) as config:
        await cluster.create_model(bad)
        ready = await wait_until("Ready=False", lambda: condition(cluster.model("typo"), "Ready"))
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
        assert "spec.tables[1].name" in ready["message"]
        assert cluster.children(STATEFULSETS) == {}
        assert {c["type"] for c in cluster.model("typo")["status"]["conditions"]} == {  # type: ignore[index]
            "Ready", "Placed", "Loaded", "Progressing", "Degraded"}  # fmt: skip
        await wait_until("the InvalidSpec event", lambda: "InvalidSpec" in cluster.reasons("typo"))
        await settled(cluster)  # several resyncs of the same invalid spec: one event, not one per round
        invalid = [e for e in cluster.events("typo") if e[1] == "InvalidSpec"]
        assert len(invalid) == 1 and invalid[0][0] == "Warning" and "spec.tables[1].name" in invalid[0][2]
        await scraped(config, lambda m: m.get('hps_operator_reconciles_total{result="InvalidSpec"}', 0) >= 2)


async def test_unplaceable_spec_keeps_the_deployment_serving(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path):
        await deployed(cluster, tmp_path)
        before = {n: o["metadata"]["resourceVersion"] for n, o in cluster.children(STATEFULSETS).items()}
        plan_before = cluster.plan_cm()["data"]["plan.json"]  # type: ignore[index]
        huge = model_manifest()["spec"]["tables"] + [{"name": "huge", "rows": 400_000_000, "dim": 128}]
        await cluster.patch_spec("dlrm", {"tables": huge})
        placed = await wait_until("Placed=False", lambda: (condition(cluster.model(), "Placed") or {}).get("status") == "False"
                                  and condition(cluster.model(), "Placed"))  # fmt: skip
        assert placed["reason"] == "InsufficientGPUMemory"
        assert "needs" in placed["message"] and "available" in placed["message"]
        await settled(cluster)
        assert {n: o["metadata"]["resourceVersion"] for n, o in cluster.children(STATEFULSETS).items()} == before
        assert cluster.plan_cm()["data"]["plan.json"] == plan_before  # type: ignore[index]
        # the new spec is not served (Ready=False says why), the old one still is
        ready = condition(cluster.model(), "Ready")
        assert ready["reason"] == "InsufficientGPUMemory" and "still serving plan version 1" in ready["message"]  # type: ignore[index]
        assert cluster.model()["status"]["readyReplicas"] == 2  # type: ignore[index]
        await wait_until("the InsufficientGPUMemory event", lambda: "InsufficientGPUMemory" in cluster.reasons())
        await settled(cluster, 1.0)
        warnings = [e for e in cluster.events() if e[1] == "InsufficientGPUMemory"]
        assert len(warnings) == 1 and warnings[0][0] == "Warning" and "needs" in warnings[0][2]


async def test_deleted_child_is_recreated(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path):
        await deployed(cluster, tmp_path)
        await cluster.emulator.delete_object(CONFIGMAPS, NS, "dlrm-plan")
        agents = cluster.agents_name(0)
        await cluster.emulator.delete_object(STATEFULSETS, NS, agents)
        await wait_until("the plan back", lambda: cluster.plan_cm() is not None)
        await wait_until("the agents back", lambda: cluster.agents(0) is not None)
        assert '"version":1' in cluster.plan_cm()["data"]["plan.json"]  # type: ignore[index]

        def recreated() -> str:
            return " ".join(m for _, r, m in cluster.events() if r == "ChildRecreated")

        # one reconcile or two (a resync may have listed the ConfigMaps before the deletion and the
        # StatefulSets after it), each posting its own event once it has applied
        await wait_until("ChildRecreated events naming both",
                         lambda: "ConfigMap/dlrm-plan" in recreated() and f"StatefulSet/{agents}" in recreated(),
                         show=recreated)  # fmt: skip
        assert "RebalanceStarted" not in cluster.reasons()  # the same plan came back, nothing moves


async def test_degraded_says_which_part_is_unhealthy(cluster: Cluster, tmp_path: Path) -> None:
    def degraded() -> tuple[str, str]:
        c = condition(cluster.model(), "Degraded") or {}
        return c.get("status", ""), c.get("reason", "")

    async with running_operator(cluster, tmp_path) as config:
        await deployed(cluster, tmp_path)
        await quiet(cluster)  # the first reconciles are done: what follows is the operator's answer
        await cluster.set_ready("dlrm-redis", 0)
        await wait_until("Redis degraded", lambda: degraded() == ("True", "VolatileStoreUnavailable"),
                         show=lambda: (cluster.model() or {}).get("status"))
        assert condition(cluster.model(), "Ready")["status"] == "True"  # type: ignore[index]  # L1/L3 answer
        await wait_until("its event", lambda: "VolatileStoreUnavailable" in cluster.reasons())
        await scraped(config, lambda m: m.get(f"hps_model_condition{{condition=\"Degraded\",{MODEL}}}") == 1)
        await cluster.make_agents_ready()
        await wait_until("recovered", lambda: degraded() == ("False", "AsExpected"))
        await wait_until("the Recovered event", lambda: "Recovered" in cluster.reasons())

        await cluster.set_ready(cluster.agents_name(0), 1)  # one agent pod stopped passing its probe
        await wait_until("a replica lost", lambda: degraded() == ("True", "ReplicasUnavailable"))
        assert cluster.model()["status"]["readyReplicas"] == 1  # type: ignore[index]
        await cluster.make_agents_ready()
        await wait_until("recovered again", lambda: degraded() == ("False", "AsExpected"))

        await cluster.finish_jobs(failed=True)
        await wait_until("the load failed", lambda: degraded() == ("True", "LoadFailed"))
        loaded = condition(cluster.model(), "Loaded")
        assert (loaded["status"], loaded["reason"]) == ("False", "LoadFailed")  # type: ignore[index]
        assert "backoff limit" in loaded["message"]  # type: ignore[index]
        assert status_schema_errors(cluster.model()["status"]) == []  # type: ignore[index]


async def test_restarted_operator_makes_no_duplicates_and_no_new_plan(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path):
        await deployed(cluster, tmp_path)
        await quiet(cluster)
    names = {res: sorted(cluster.children(res)) for res in (STATEFULSETS, CONFIGMAPS, "v1/services")}
    mark = len(cluster.operator_calls())
    async with running_operator(cluster, tmp_path):
        await settled(cluster)
    assert {res: sorted(cluster.children(res)) for res in names} == names
    assert cluster.writes(mark) == []
    assert cluster.model()["status"]["placement"]["version"] == 1  # type: ignore[index]


async def test_every_request_is_declared_in_the_rbac(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, tmp_path):
        await deployed(cluster, tmp_path)
        await cluster.patch_spec("dlrm", {"replicas": 3})
        await wait_until("3 replicas", lambda: cluster.agents(0)["spec"]["replicas"] == 3)  # type: ignore[index]
        await cluster.emulator.delete_object(CONFIGMAPS, NS, "dlrm-plan")
        await wait_until("the plan back", lambda: cluster.plan_cm() is not None)
    granted = {(group, resource, verb) for group, resource, verbs in API_PERMISSIONS for verb in verbs}
    used = {(c.group, c.resource, c.verb) for c in cluster.operator_calls()}
    assert used, "the operator made no request at all"
    assert ("", "events", "create") in used
    assert used - granted == set()
    # kopf's scanning is off: no cluster-wide read of CRDs or namespaces is needed
    assert not {r for _, r, _ in used} & {"customresourcedefinitions", "namespaces"}
