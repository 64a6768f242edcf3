"""Every Kubernetes API permission the operator uses, declared once.

The chart's RBAC is tested to grant exactly these (and no wildcard); the operator's scenario tests
record every request the operator makes against the emulated API and check each is declared here.
kopf runs with scanning disabled (``registry.configure``), so it needs no access to
CustomResourceDefinitions or Namespaces.
"""

from __future__ import annotations

#: (API group, resource, verbs); group "" is the core API
API_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("hps.dev", "embeddingmodels", ("get", "list", "watch", "patch")),
    ("hps.dev", "embeddingmodels/status", ("get", "patch")),
    # the operator's own events on the EmbeddingModel (kopf posts core v1 Events)
    ("", "events", ("create",)),
    ("", "configmaps", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "services", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "secrets", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "nodes", ("list",)),  # GPU topology, read at each reconcile
    ("apps", "statefulsets", ("get", "list", "watch", "create", "patch", "delete")),
    ("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete")),
    ("policy", "poddisruptionbudgets", ("get", "list", "watch", "create", "patch", "delete")),
    ("autoscaling", "horizontalpodautoscalers", ("get", "list", "watch", "create", "patch", "delete")),
)
