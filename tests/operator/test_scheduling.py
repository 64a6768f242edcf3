"""Which nodes a model's agents can use, and so which GPUs set its cache budget."""

from __future__ import annotations

from typing import Any

from hps_operator.core.reconcile import reconcile
from hps_operator.core.scheduling import gpu_capacity, node_fits, tolerates

from node_agent.spec import parse_model
from tests.operator.test_reconcile import OPTIONS, condition, model, observe


def node(name: str, *, gpus: int = 8, memory_mib: int = 81920, labels: dict[str, str] | None = None,
         taints: list[dict[str, str]] | None = None, unschedulable: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": str(memory_mib), **(labels or {})}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def test_tolerations_follow_the_core_rules() -> None:
    assert tolerates([{"key": "nvidia.com/gpu", "operator": "Exists"}], GPU_TAINT)
    assert tolerates([{"operator": "Exists"}], GPU_TAINT)  # tolerates everything
    assert tolerates([{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}], GPU_TAINT)
    assert not tolerates([{"key": "nvidia.com/gpu", "value": "absent"}], GPU_TAINT)
    assert not tolerates([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], GPU_TAINT)
    assert not tolerates([], GPU_TAINT)


def test_node_selector_taints_affinity_and_cordon_decide_fit() -> None:
    plain = parse_model(model())
    assert node_fits(plain, node("a"))
    assert not node_fits(plain, node("tainted", taints=[GPU_TAINT]))
    assert not node_fits(plain, node("cordoned", unschedulable=True))
    # a PreferNoSchedule taint does not keep a pod off
    assert node_fits(plain, node("soft", taints=[{**GPU_TAINT, "effect": "PreferNoSchedule"}]))

    picky = parse_model(model(agent={
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1", "z2"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
        ]}}},
    }))  # fmt: skip
    assert node_fits(picky, node("a", labels={"pool": "a100", "zone": "z1"}, taints=[GPU_TAINT]))
    assert node_fits(picky, node("special", labels={"pool": "a100"}))  # the second term, by name
    assert not node_fits(picky, node("b", labels={"pool": "a100", "zone": "z9"}))
    assert not node_fits(picky, node("c", labels={"pool": "t4", "zone": "z1"}))


def test_a_small_gpu_on_a_node_the_model_cannot_use_leaves_its_budget_alone() -> None:
    """A 16 GiB node pool tainted for another team: the model (no toleration) keeps its plan."""
    # 95 GiB of rows: they fit 4 GPUs of 40 GiB, not 4 of 16 GiB
    body = model(tables=[{"name": "user-id", "rows": 200_000_000, "dim": 128}], cache={"memoryPerGPU": "40Gi"})
    big = [node("big-0"), node("big-1")]
    small = node("small", memory_mib=16384, taints=[{"key": "team", "value": "vision", "effect": "NoSchedule"}])
    spec = parse_model(body)
    assert gpu_capacity(spec, [*big, small]).gpu_memory_bytes == 81920 * 2**20

    alone = reconcile(observe(body, [], nodes=big), OPTIONS)
    beside = reconcile(observe(body, [], nodes=[*big, small]), OPTIONS)
    assert condition(beside.status, "Placed")["status"] == "True"
    assert beside.status["placement"] == alone.status["placement"]

    # the same node without the taint is one the agents could land on: it does cap the budget
    usable = reconcile(observe(body, [], nodes=[*big, node("small", memory_mib=16384)]), OPTIONS)
    assert condition(usable.status, "Placed")["reason"] == "InsufficientGPUMemory"


def test_no_usable_node_for_a_whole_pod_is_reported() -> None:
    body = model(gpusPerPod=8)
    decision = reconcile(observe(body, [], nodes=[node("four", gpus=4)]), OPTIONS)
    placed = condition(decision.status, "Placed")
    assert (placed["status"], placed["reason"]) == ("False", "InsufficientGPUMemory")
    assert "can allocate 8 nvidia.com/gpu" in placed["message"]
