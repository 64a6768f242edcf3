"""Which nodes a model's agent pods can run on, read from the pod's scheduling constraints the way the
scheduler reads them: ``nodeSelector``, tolerations against the node's taints, and required node
affinity. The GPU budget of a model comes from these nodes only, so a small GPU on a node the model
cannot use never changes its plan. Pure: nodes in, facts out.

Not modelled (they decide *which* of the fitting nodes a pod lands on, not whether it can run at
all): preferred affinity, pod (anti-)affinity and topology spread constraints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node_agent.spec import ModelSpec

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by NVIDIA's GPU feature discovery
#: taints the scheduler itself adds to nodes that are going away or not ready
_SCHEDULING_EFFECTS = ("NoSchedule", "NoExecute")


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether one of ``tolerations`` tolerates ``taint`` (the core/v1 rules)."""
    for t in tolerations:
        effect = t.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        operator = t.get("operator") or "Equal"
        key = t.get("key") or ""
        if operator == "Exists":
            if not key or key == taint.get("key"):
                return True
        elif key == taint.get("key") and str(t.get("value") or "") == str(taint.get("value") or ""):
            return True
    return False


def _match_expression(expression: Mapping[str, Any], value: str | None) -> bool:
    operator = expression.get("operator")
    values = [str(v) for v in expression.get("values") or []]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and values:
        try:
            number, bound = int(value), int(values[0])
        except ValueError:
            return False
        return number > bound if operator == "Gt" else number < bound
    return False


def _matches_term(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    labels = _labels(node)
    fields = {"metadata.name": (node.get("metadata") or {}).get("name")}
    expressions = term.get("matchExpressions") or []
    field_expressions = term.get("matchFields") or []
    if not expressions and not field_expressions:
        return False  # an empty term matches no node
    return all(_match_expression(e, labels.get(e.get("key", ""))) for e in expressions) and all(
        _match_expression(e, fields.get(e.get("key", ""))) for e in field_expressions
    )


def node_fits(model: ModelSpec, node: Mapping[str, Any]) -> bool:
    """Whether the scheduler could place one of the model's agent pods on ``node`` (resources aside)."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    labels = _labels(node)
    if any(labels.get(k) != v for k, v in model.agent.node_selector.items()):
        return False
    taints = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("effect") in _SCHEDULING_EFFECTS]
    if not all(tolerates(model.agent.tolerations, taint) for taint in taints):
        return False
    required = ((model.agent.affinity.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
                or {})  # fmt: skip
    terms = required.get("nodeSelectorTerms")
    return not terms or any(_matches_term(term, node) for term in terms)


def allocatable_gpus(model: ModelSpec, node: Mapping[str, Any]) -> int:
    value = str(((node.get("status") or {}).get("allocatable") or {}).get(model.agent.gpu_resource_name, "0"))
    return int(value) if value.isdigit() else 0


@dataclass(frozen=True)
class GpuCapacity:
    """What the nodes a model can use offer its agent pods."""

    #: the smallest GPU memory (bytes) among fitting nodes that say it (None: no node says)
    gpu_memory_bytes: int | None
    #: fitting nodes with any GPU
    gpu_nodes: int
    #: fitting nodes that can allocate a whole pod's GPUs
    pod_nodes: int
    #: GPUs allocatable on fitting nodes
    gpus: int


def gpu_capacity(model: ModelSpec, nodes: Sequence[Mapping[str, Any]]) -> GpuCapacity:
    """The GPUs of the nodes ``model`` can schedule on (see :func:`node_fits`)."""
    fitting = [n for n in nodes if node_fits(model, n)]
    with_gpus = [n for n in fitting if allocatable_gpus(model, n) > 0]
    whole_pod = [n for n in with_gpus if allocatable_gpus(model, n) >= model.gpus_per_pod]
    memories = [
        int(str(_labels(n)[GPU_MEMORY_LABEL])) * 2**20
        for n in whole_pod
        if str(_labels(n).get(GPU_MEMORY_LABEL, "")).isdigit()
    ]
    return GpuCapacity(
        gpu_memory_bytes=min(memories) if memories else None,
        gpu_nodes=len(with_gpus),
        pod_nodes=len(whole_pod),
        gpus=sum(allocatable_gpus(model, n) for n in with_gpus),
    )


@dataclass(frozen=True)
class SchedulingWait:
    """Agent pods the scheduler could not place, and why (what ``status`` reports)."""

    #: pods waiting
    pods: int
    #: True when they wait for GPUs (``Insufficient <gpu resource>``); else for another reason
    for_gpus: bool
    #: the scheduler's message for one of them
    message: str
    #: GPUs the waiting pods ask for, in all
    gpus_asked: int = 0
    #: GPUs allocatable and not requested by running pods on the nodes the model can use (None when
    #: the nodes' pods were not read)
    gpus_free: int | None = None
    #: nodes the model can use that have GPUs
    gpu_nodes: int = 0
    resource: str = "nvidia.com/gpu"

    def describe(self) -> str:
        if not self.for_gpus:
            return f"{self.pods} agent pod(s) cannot be scheduled: {self.message}"
        free = "" if self.gpus_free is None else f", {self.gpus_free} free"
        return (f"{self.pods} agent pod(s) wait for {self.resource}: {self.gpus_asked} asked for{free} on the "
                f"{self.gpu_nodes} node(s) the agents can use; the model serves on the pods that are ready, "
                "and the waiting ones join routing once loaded")  # fmt: skip


def _unschedulable_message(pod: Mapping[str, Any]) -> str | None:
    for c in (pod.get("status") or {}).get("conditions") or ():
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message") or "Unschedulable")
    return None


def pod_gpus(pod: Mapping[str, Any], resource: str) -> int:
    """GPUs a pod requests (an extended resource's request equals its limit)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or ():
        resources = container.get("resources") or {}
        value = str((resources.get("limits") or {}).get(resource) or (resources.get("requests") or {}).get(resource) or 0)
        total += int(value) if value.isdigit() else 0
    return total


def scheduling_wait(model: ModelSpec, agent_pods: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]],
                    node_pods: Sequence[Mapping[str, Any]] | None) -> SchedulingWait | None:  # fmt: skip
    """The model's agent pods the scheduler left pending, if any. ``node_pods`` are the running pods
    of the cluster (None when not read), to count the GPUs still free on the nodes the model can use."""
    resource = model.agent.gpu_resource_name
    waiting = [(p, m) for p in agent_pods if (m := _unschedulable_message(p)) is not None
               and not (p.get("metadata") or {}).get("deletionTimestamp")]  # fmt: skip
    if not waiting:
        return None
    for_gpus = [(p, m) for p, m in waiting if f"Insufficient {resource}" in m]
    if not for_gpus:
        return SchedulingWait(pods=len(waiting), for_gpus=False, message=waiting[0][1], resource=resource)
    usable = [n for n in nodes if node_fits(model, n) and allocatable_gpus(model, n) > 0]
    free: int | None = None
    if node_pods is not None:
        names = {(n.get("metadata") or {}).get("name") for n in usable}
        used = sum(pod_gpus(p, resource) for p in node_pods
                   if (p.get("spec") or {}).get("nodeName") in names
                   and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))  # fmt: skip
        free = max(0, sum(allocatable_gpus(model, n) for n in usable) - used)
    return SchedulingWait(
        pods=len(for_gpus), for_gpus=True, message=for_gpus[0][1],
        gpus_asked=sum(pod_gpus(p, resource) for p, _ in for_gpus), gpus_free=free, gpu_nodes=len(usable),
        resource=resource,
    )  # fmt: skip
