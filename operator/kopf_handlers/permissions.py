"""Every Kubernetes API permission the operator uses, declared once.

The chart's RBAC is tested to grant exactly these (and no wildcard); the operator's scenario tests
record every request the operator makes against the emulated API and check each is declared here.
kopf runs with scanning disabled (``registry.configure``), so it needs no access to
CustomResourceDefinitions or Namespaces.
"""

from __future__ import annotations

#: (API group, resource, verbs); group "" is the core API
API_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # kopf: watch models, keep its progress annotations and finalizer (patch); the handler reads the
    # live model before deciding (get)
    ("hps.dev", "embeddingmodels", ("get", "list", "watch", "patch")),
    ("hps.dev", "embeddingmodels/status", ("patch",)),
    # children carry blockOwnerDeletion owner references, which the API server allows only to who
    # may update the owner's finalizers (where OwnerReferencesPermissionEnforcement is on)
    ("hps.dev", "embeddingmodels/finalizers", ("update",)),
    # the operator's own events on the EmbeddingModel (kopf posts core v1 Events)
    ("", "events", ("create",)),
    # children: listed and watched by label (server-side), written by server-side apply (patch,
    # and create for a child that does not exist yet), deleted when no longer rendered
    ("", "configmaps", ("list", "watch", "create", "patch", "delete")),
    ("", "services", ("list", "watch", "create", "patch", "delete")),
    # the Redis password: created once, never read (pods take it by reference), removed with the
    # model by the garbage collector
    ("", "secrets", ("create",)),
    # GPU topology, read at each reconcile; watched so a node joining or leaving is seen at once
    ("", "nodes", ("list", "watch")),
    # the model's agent pods (the scheduler's word on pods it cannot place) and, only while some wait
    # for GPUs, the running pods of the cluster (what the GPUs of the usable nodes are taken by)
    ("", "pods", ("list",)),
    # a StatefulSet is also read by name while it is replaced (an immutable field changed)
    ("apps", "statefulsets", ("get", "list", "watch", "create", "patch", "delete")),
    # a Job's name carries a hash of its spec, so a changed Job is a new one, never an update
    ("batch", "jobs", ("list", "watch", "create", "patch", "delete")),
    ("policy", "poddisruptionbudgets", ("list", "watch", "create", "patch", "delete")),
    ("autoscaling", "horizontalpodautoscalers", ("list", "watch", "create", "patch", "delete")),
    # the agents' L1 hit and miss rates, for models that autoscale their partitions
    ("custom.metrics.k8s.io", "pods/hps_l1_hits_per_second", ("get",)),
    ("custom.metrics.k8s.io", "pods/hps_l1_misses_per_second", ("get",)),
    # who may reach a model's Redis and agents (spec.network)
    ("networking.k8s.io", "networkpolicies", ("list", "watch", "create", "patch", "delete")),
    # the agents' own ServiceAccount (no permission of its own unless spec.security.auth); never
    # stale (one per model, of a fixed name), so never deleted but with its model, by the garbage collector
    ("", "serviceaccounts", ("list", "watch", "create", "patch")),
    # the agents' serving certificate, issued by cert-manager (spec.security.tls.issuerRef); listed,
    # not watched, as the kind exists only where cert-manager is installed
    ("cert-manager.io", "certificates", ("list", "create", "patch", "delete")),
    # spec.security.auth: the agents ask the API server whose a caller's token is (TokenReview), for
    # which their ServiceAccount is bound to system:auth-delegator. Cluster-scoped, so not owned by
    # the model: listed by its owner-uid label, deleted with the model and swept at start
    ("rbac.authorization.k8s.io", "clusterrolebindings", ("list", "create", "patch", "delete")),
    # ... and binding a ClusterRole needs "bind" on it: on system:auth-delegator alone (RESOURCE_NAMES)
    ("rbac.authorization.k8s.io", "clusterroles", ("bind",)),
)

#: permissions granted on these objects only: (API group, resource) → resourceNames
RESOURCE_NAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("rbac.authorization.k8s.io", "clusterroles"): ("system:auth-delegator",),
}

#: resources the chart grants cluster-wide even when the operator watches listed namespaces
CLUSTER_SCOPED_RESOURCES = ("nodes", "pods", "clusterrolebindings", "clusterroles")

#: leader election among operator replicas (``hps operator run --leader-elect``): one Lease in the
#: operator's own namespace, granted by a Role there
LEADER_ELECTION_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("coordination.k8s.io", "leases", ("get", "create", "update")),
)
