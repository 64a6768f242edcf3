"""The operator against a real cluster: runs only when ``KUBECONFIG`` names one (skipped otherwise).

Needs the CRD installed (``kubectl apply -f crds/``) and rights to create a namespace. The operator
runs in this process, serves only the test's namespace, and the namespace is deleted at the end.
Without GPU nodes or a kubelet that can pull the agent image, the scenario stops at what the control
plane alone decides: children, placement, conditions, scaling without a new plan.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG naming a cluster")


def _model(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "hps.dev/v1alpha1",
        "kind": "EmbeddingModel",
        "metadata": {"name": "e2e", "namespace": namespace},
        "spec": {
            "tables": [{"name": "user-id", "rows": 100_000, "dim": 32, "source": "file:///models/user"}],
            "replicas": 1,
            "gpusPerPod": 1,
            "cache": {"memoryPerGPU": "1Gi"},
            "volatileStore": {"type": "redis", "redis": {"shards": 1}},
            "persistentStore": {"type": "none"},
        },
    }


async def _wait(what: str, check: Callable[[], Any], within_s: float = 60.0) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(1.0)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}")


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    from hps_operator.kopf_handlers.kube_api import KubeApi

    api = KubeApi.from_environment()
    name = f"hps-e2e-{uuid.uuid4().hex[:6]}"
    api._request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        api._request("DELETE", f"/api/v1/namespaces/{name}")
        api.close()


async def test_model_gets_children_status_and_scales_without_a_new_plan(namespace: str) -> None:
    import kopf
    from hps_operator.core.reconcile import Options
    from hps_operator.kopf_handlers.kube_api import KubeApi
    from hps_operator.kopf_handlers.registry import OperatorConfig, build_registry, configure

    api = KubeApi.from_environment()
    settings = kopf.OperatorSettings()
    configure(settings)
    stop, ready = asyncio.Event(), asyncio.Event()
    registry = build_registry(OperatorConfig(Options(image="ghcr.io/hps-operator/hps:latest"), resync_seconds=5))
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, namespaces=[namespace],
                                             standalone=True, stop_flag=stop, ready_flag=ready))  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.to_thread(api.apply, _model(namespace))

        def placed() -> Any:
            model = api.get("hps.dev/v1alpha1", "EmbeddingModel", namespace, "e2e") or {}
            return next((c for c in (model.get("status") or {}).get("conditions", []) if c["type"] == "Placed"), None)

        assert (await _wait("Placed", placed))["status"] in ("True", "False")
        sts = await _wait("agents", lambda: api.get("apps/v1", "StatefulSet", namespace, "e2e-agent-p0"))
        assert sts["spec"]["replicas"] == 1
        plan_before = (api.get("v1", "ConfigMap", namespace, "e2e-plan") or {})["data"]["plan.json"]

        scaled = _model(namespace)
        scaled["spec"]["replicas"] = 2
        await asyncio.to_thread(api.apply, scaled)
        await _wait("2 agent replicas",
                    lambda: (api.get("apps/v1", "StatefulSet", namespace, "e2e-agent-p0") or {})["spec"]["replicas"] == 2)  # fmt: skip
        assert (api.get("v1", "ConfigMap", namespace, "e2e-plan") or {})["data"]["plan.json"] == plan_before
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        api.close()
