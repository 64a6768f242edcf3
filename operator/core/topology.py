"""The GPU slots a plan places shards on: ``partitions`` pods per replica, ``gpus_per_pod`` GPUs each, and
the cache budget of one GPU."""

from __future__ import annotations

from dataclasses import dataclass

from node_agent.errors import InvalidSpecError
from node_agent.spec import ModelSpec, parse_quantity


@dataclass(frozen=True)
class Topology:
    """One replica's GPUs. ``partitions == 0`` asks the planner for the smallest count that fits.

    Replicas are not part of a topology: every replica runs the same plan, so scaling replicas
    never changes a plan."""

    partitions: int
    gpus_per_pod: int
    #: cache budget of one GPU, in bytes
    gpu_memory_bytes: int

    def __post_init__(self) -> None:
        if self.partitions < 0:
            raise InvalidSpecError("partitions", f"must not be negative, got {self.partitions}")
        if self.gpus_per_pod < 1:
            raise InvalidSpecError("gpusPerPod", f"must be at least 1, got {self.gpus_per_pod}")
        if self.gpu_memory_bytes <= 0:
            raise InvalidSpecError("gpuMemory", f"must be greater than zero, got {self.gpu_memory_bytes}")

    @property
    def slots(self) -> int:
        """GPUs of one replica (``partitions x gpus_per_pod``); 0 while partitions are unresolved."""
        return self.partitions * self.gpus_per_pod

    def with_partitions(self, partitions: int) -> Topology:
        return Topology(partitions, self.gpus_per_pod, self.gpu_memory_bytes)

    @classmethod
    def from_model(
        cls,
        model: ModelSpec,
        gpus_per_pod: int | None = None,
        partitions: int | None = None,
        gpu_memory: int | str | None = None,
    ) -> Topology:
        """The model's own topology, with any of its three numbers overridden (the CLI's flags);
        ``gpu_memory`` is bytes or a Kubernetes quantity such as ``16Gi``."""
        memory = (
            model.cache.memory_per_gpu
            if gpu_memory is None
            else parse_quantity(gpu_memory, field="gpuMemory")
        )
        return cls(
            partitions=model.partitions if partitions is None else partitions,
            gpus_per_pod=model.gpus_per_pod if gpus_per_pod is None else gpus_per_pod,
            gpu_memory_bytes=memory,
        )
