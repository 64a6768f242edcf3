"""The HorizontalPodAutoscaler of a model with ``spec.autoscaling``: it scales the EmbeddingModel through
its scale subresource, so replicas change the way ``kubectl scale`` changes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hps_operator.core.render.meta import Manifest, object_metadata

from node_agent.spec import API_GROUP, API_VERSION, KIND, ModelSpec

#: the agents' lookup-rate metric (served to the HPA by a metrics adapter)
QPS_METRIC = "hps_lookup_requests_per_second"


def render_hpa(model: ModelSpec, *, owner: Mapping[str, Any]) -> Manifest | None:
    """Scales the EmbeddingModel itself (its scale subresource), never the StatefulSets behind the
    operator's back. ``None`` without ``spec.autoscaling``."""
    if model.autoscaling is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_metadata(model, model.name, "agent", owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": model.name},
            "minReplicas": model.autoscaling.min_replicas,
            "maxReplicas": model.autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QPS_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(model.autoscaling.target_qps_per_replica),
                        },
                    },
                }
            ],
        },
    }
