"""Parses and validates an ``EmbeddingModel`` (a manifest dict or a YAML file) into typed, frozen specs.

Pure: no I/O beyond :func:`load_model_file`. Every rejection is an :class:`InvalidSpecError` naming
the field path (``spec.tables[2].dim``), so the operator can put it in a ``Ready=False`` condition
and the CLI can print it in one line. Field names follow DESIGN.md's contract (camelCase in YAML).

A field the parser does not know is an error too, naming its path and the closest known field
(``spec.replica: unknown field; did you mean replicas?``): a misspelt field silently ignored would
leave its default in force while the user believes otherwise. The known fields of each object are
exactly the CRD's (a test checks it), so what the API server accepts, this parser accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from node_agent.errors import InvalidSpecError

API_GROUP = "hps.dev"
API_VERSION = "v1alpha1"
KIND = "EmbeddingModel"

DTYPES: dict[str, int] = {"float32": 4, "float16": 2}
CACHE_POLICIES = ("lru", "lfu")
PLACEMENT_STRATEGIES = ("auto", "replicate", "table", "row")
VOLATILE_TYPES = ("redis", "hashmap", "none")
REDIS_PERSISTENCE_TYPES = ("aof", "none")
REDIS_APPENDFSYNC = ("everysec", "always", "no")
PERSISTENT_TYPES = ("rocksdb", "none")
#: hostPath types that make sense for files the pods only read (``DirectoryOrCreate`` would mount an
#: empty directory and fail later, at load time, instead of at pod start)
HOST_PATH_TYPES = ("Directory", "File", "")
DEFAULT_MODEL_STORE_MOUNT = "/models"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: an absolute, normalised path: no empty, ``.`` or ``..`` segment and no trailing slash
ABSOLUTE_PATH_PATTERN = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"
#: a table source :func:`source_path` takes (the CRD says the same): no ``://`` after an optional
#: ``file://``, so another scheme (``s3://``) is refused when the model is applied
SOURCE_PATTERN = r"^(file://)?([^:]|:[^/]|:/[^/])*(:/?)?$"
_ABSOLUTE_PATH = re.compile(ABSOLUTE_PATH_PATTERN)
#: a label or annotation key: an optional DNS subdomain prefix and a name of at most 63 characters
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_quantity(value: str | int | float, *, field: str) -> int:
    """Kubernetes resource quantity (``16Gi``, ``500M``, ``1024``) → bytes."""
    if isinstance(value, bool):
        raise InvalidSpecError(field, f"expected a quantity such as 16Gi, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise InvalidSpecError(field, f"must not be negative, got {value!r}")
        return int(value)
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise InvalidSpecError(field, f"expected a quantity such as 16Gi or 500M, got {value!r}")
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def format_quantity(num_bytes: int) -> str:
    """Bytes → the shortest exact binary quantity (``17179869184`` → ``16Gi``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        factor = _QUANTITY_FACTORS[suffix]
        if num_bytes and num_bytes % factor == 0:
            return f"{num_bytes // factor}{suffix}"
    return str(num_bytes)


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    dtype: str = "float32"
    source: str | None = None
    #: share of lookups as given by the user; ``None`` means "proportional to rows"
    hotness: float | None = None
    default_value: float = 0.0

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.dim * self.itemsize

    @property
    def total_bytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class CacheSpec:
    memory_per_gpu: int = 16 * 2**30
    policy: str = "lru"
    hit_rate_threshold: float = 0.9
    #: share of each owned shard's rows a GPU cache must hold (HPS's gpucacheper); the planner sizes
    #: ownership by it, the rest is served from L2/L3
    cached_fraction: float = 1.0
    #: slots per set of the set-associative cache (HPS: slab size)
    associativity: int = 32


@dataclass(frozen=True)
class RedisPersistenceSpec:
    """What Redis keeps across restarts: ``aof`` logs every write and replays the log at start
    (``appendfsync`` as Redis means it), ``none`` makes it a pure cache."""

    type: str = "aof"
    appendfsync: str = "everysec"

    def redis_args(self) -> list[str]:
        """The ``redis-server`` arguments that set it up (no RDB snapshots either way: the AOF is the
        record, and a snapshot of a large L2 would stall the server every few minutes)."""
        if self.type == "none":
            return ["--appendonly", "no", "--save", ""]
        return ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""]


@dataclass(frozen=True)
class RedisSpec:
    shards: int = 1
    replicas_per_shard: int = 0
    memory: int = 2**30
    #: run the shards as a Redis Cluster (hash slots) instead of client-side sharding
    cluster: bool = False
    #: name of a Secret key holding the AUTH password; the operator generates one when empty
    password_secret: str | None = None
    persistence: RedisPersistenceSpec = field(default_factory=RedisPersistenceSpec)


@dataclass(frozen=True)
class VolatileStoreSpec:
    type: str = "redis"
    redis: RedisSpec = field(default_factory=RedisSpec)


@dataclass(frozen=True)
class PersistentStoreSpec:
    type: str = "rocksdb"
    storage: int = 10 * 2**30
    read_only: bool = False
    storage_class: str | None = None


@dataclass(frozen=True)
class PlacementSpec:
    strategy: str = "auto"
    max_imbalance: float = 1.05
    #: hash buckets per table for row sharding; ``0`` lets the planner choose
    bucket_count: int = 0


@dataclass(frozen=True)
class UpdatesSpec:
    enabled: bool = True
    stream: str | None = None


@dataclass(frozen=True)
class PartitionAutoscalingSpec:
    """Widen the model over more partitions while its L1 hit rate stays below ``target_hit_rate`` (its
    cache is too small for the traffic), narrow it while the rate stays well above and GPUs idle."""

    min_partitions: int = 1
    max_partitions: int = 8
    target_hit_rate: float = 0.8


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 1
    max_replicas: int = 8
    target_qps_per_replica: int = 20000
    partitions: PartitionAutoscalingSpec | None = None


@dataclass(frozen=True)
class TLSSpec:
    """gRPC over TLS on the agents: a Secret of ``tls.crt``/``tls.key`` (and ``ca.crt`` with mutual
    TLS), either the user's (``secret_name``) or one cert-manager issues into ``<model>-agent-tls``
    (``issuer``: ``{name, kind, group}`` of an Issuer or ClusterIssuer)."""

    secret_name: str | None = None
    issuer: Mapping[str, str] | None = None
    #: require client certificates signed by the Secret's ``ca.crt``
    mutual: bool = False


@dataclass(frozen=True)
class AuthSpec:
    """Who may call the agents: Kubernetes service accounts (``system:serviceaccount:NS:NAME``) or
    groups (``group:NAME``), verified with TokenReview. No writers: every Update is refused."""

    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    #: Lookup, Describe and Stats need a credential too (the writers' or the readers')
    restrict_reads: bool = False
    #: a token must be for one of these audiences (empty: the API server's own)
    audiences: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.writers or self.readers or self.restrict_reads)


@dataclass(frozen=True)
class RedisSecuritySpec:
    #: ACL users per role (agent, loader, producer), each with its own password, least privilege
    acl: bool = True
    #: serve Redis over TLS with this Secret (``tls.crt``, ``tls.key``, ``ca.crt``)
    tls_secret_name: str | None = None


@dataclass(frozen=True)
class SecuritySpec:
    tls: TLSSpec | None = None
    auth: AuthSpec = field(default_factory=AuthSpec)
    redis: RedisSecuritySpec = field(default_factory=RedisSecuritySpec)
    #: serve gRPC server reflection (it lists the services to anyone who asks)
    reflection: bool = False


@dataclass(frozen=True)
class NetworkSpec:
    """Who may reach what (rendered as NetworkPolicies). Peers are NetworkPolicy peers
    (``namespaceSelector``/``podSelector``/``ipBlock``), kept as given; the renderer's output is
    validated against the official schema."""

    #: render the NetworkPolicies at all
    policy: bool = True
    #: who may call the agents' gRPC port; empty: every pod of the model's namespace
    clients: tuple[Mapping[str, Any], ...] = ()
    #: who may scrape the agents' metrics; empty: pods of the namespace named ``monitoring``
    metrics_from: tuple[Mapping[str, Any], ...] = ()
    #: who besides the model's own pods may reach its Redis (e.g. training jobs publishing updates)
    redis_clients: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class PersistentVolumeClaimSource:
    claim_name: str
    #: read-only by default: the pods never write the store, and the kubelet skips the recursive
    #: ``fsGroup`` ownership change of a read-only volume (hours on a large model store)
    read_only: bool = True


@dataclass(frozen=True)
class NFSSource:
    server: str
    path: str
    read_only: bool = True


@dataclass(frozen=True)
class HostPathSource:
    path: str
    type: str = "Directory"


ModelStoreVolume = PersistentVolumeClaimSource | NFSSource | HostPathSource


@dataclass(frozen=True)
class ModelStoreSpec:
    """Shared storage holding the table sources, mounted read-only at ``mount_path`` in the pods that
    read sources (the loader Job, and the agents when they load)."""

    volume: ModelStoreVolume
    mount_path: str = DEFAULT_MODEL_STORE_MOUNT

    def cluster_path(self, source: str, *, field: str) -> str:
        """Where ``source`` lies inside the pods: absolute sources as they are, relative ones under the
        mount path. Raises :class:`InvalidSpecError` naming ``field`` when it lies outside the store."""
        raw = source_path(source, field=field)
        # posixpath, not Path: pod paths are POSIX whatever the operator runs on; join keeps an
        # absolute ``raw`` as it is, and normpath folds ``..`` so it cannot climb out of the store
        path = posixpath.normpath(posixpath.join(self.mount_path, raw))
        if path != self.mount_path and not path.startswith(self.mount_path + "/"):
            raise InvalidSpecError(
                field,
                f"{source!r} lies outside the model store mounted at {self.mount_path}: use a path "
                f"under {self.mount_path}/ or one relative to it",
            )
        return path


@dataclass(frozen=True)
class AgentSpec:
    image: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    #: extended resource name of a GPU; e.g. ``nvidia.com/mig-1g.10gb`` on MIG nodes
    gpu_resource_name: str = "nvidia.com/gpu"
    #: largest number of keys one Lookup may carry (RESOURCE_EXHAUSTED above it)
    max_batch_keys: int = 1 << 20
    port: int = 50051
    #: Prometheus metrics (``/metrics``) of the agents
    metrics_port: int = 9464
    priority_class_name: str | None = None
    #: names of Secrets in the model's namespace to pull the agent image with
    image_pull_secrets: tuple[str, ...] = ()
    #: extra labels and annotations on every pod running the agent image (agents and the loader)
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tables: tuple[TableSpec, ...]
    namespace: str = "default"
    replicas: int = 1
    gpus_per_pod: int = 1
    partitions: int = 1
    cache: CacheSpec = field(default_factory=CacheSpec)
    volatile_store: VolatileStoreSpec = field(default_factory=VolatileStoreSpec)
    persistent_store: PersistentStoreSpec = field(default_factory=PersistentStoreSpec)
    placement: PlacementSpec = field(default_factory=PlacementSpec)
    updates: UpdatesSpec = field(default_factory=UpdatesSpec)
    autoscaling: AutoscalingSpec | None = None
    agent: AgentSpec = field(default_factory=AgentSpec)
    model_store: ModelStoreSpec | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)
    security: SecuritySpec = field(default_factory=SecuritySpec)

    def table(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        return sum(t.total_bytes for t in self.tables)

    def hotness(self) -> dict[str, float]:
        """Each table's share of lookups, summing to 1.

        Tables with an explicit ``hotness`` keep it; the others share what is left (or, when the
        explicit ones already sum to 1 or more, a share as if unspecified) in proportion to rows.
        """
        given = {t.name: t.hotness for t in self.tables if t.hotness is not None}
        rest = [t for t in self.tables if t.hotness is None]
        weights: dict[str, float] = {name: float(h) for name, h in given.items() if h is not None}
        if rest:
            total_rows = sum(t.rows for t in self.tables)
            remaining = 1.0 - sum(weights.values())
            rest_rows = sum(t.rows for t in rest)
            for t in rest:
                if remaining > 0:
                    weights[t.name] = remaining * t.rows / rest_rows
                else:
                    weights[t.name] = t.rows / total_rows
        total = sum(weights.values())
        if total <= 0:  # every table explicitly 0: treat them as equally hot
            return {t.name: 1.0 / len(self.tables) for t in self.tables}
        return {t.name: weights[t.name] / total for t in self.tables}


# ---------------------------------------------------------------------------------------------
# parsing


def _mapping(value: Any, field: str, known: Sequence[str] | None = None) -> Mapping[str, Any]:
    """``value`` as an object (None: empty); with ``known``, a key outside it is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpecError(field, f"expected an object, got {type(value).__name__}")
    if known is not None:
        for key in value:
            if key not in known:
                raise InvalidSpecError(f"{field}.{key}" if field != "<root>" else str(key),
                                       unknown_field_message(str(key), known))  # fmt: skip
    return value


def unknown_field_message(key: str, known: Sequence[str]) -> str:
    """``unknown field; did you mean replicas?`` (the closest known field), or the known ones."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[key.lower()]] if key.lower() in lowered else []
    if close:
        return f"unknown field; did you mean {close[0]}?"
    return f"unknown field; the known fields here are {', '.join(known)}"


#: the fields each object of the spec may carry (the CRD's properties, checked by a test)
MANIFEST_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
SPEC_FIELDS = ("tables", "replicas", "gpusPerPod", "partitions", "cache", "volatileStore", "persistentStore",
               "placement", "updates", "autoscaling", "agent", "modelStore", "network", "security")  # fmt: skip
TABLE_FIELDS = ("name", "rows", "dim", "dtype", "source", "hotness", "defaultValue")
CACHE_FIELDS = ("memoryPerGPU", "policy", "hitRateThreshold", "cachedFraction", "associativity")
VOLATILE_FIELDS = ("type", "redis")
REDIS_FIELDS = ("shards", "replicasPerShard", "memory", "cluster", "passwordSecret", "persistence")
REDIS_PERSISTENCE_FIELDS = ("type", "appendfsync")
PERSISTENT_FIELDS = ("type", "storage", "readOnly", "storageClassName")
PLACEMENT_FIELDS = ("strategy", "maxImbalance", "bucketCount")
UPDATES_FIELDS = ("enabled", "stream")
AUTOSCALING_FIELDS = ("minReplicas", "maxReplicas", "targetQPSPerReplica", "partitions")
PARTITION_AUTOSCALING_FIELDS = ("min", "max", "targetHitRate")
NETWORK_FIELDS = ("policy", "clients", "metricsFrom", "redisClients")
SECURITY_FIELDS = ("tls", "auth", "redis", "reflection")
TLS_FIELDS = ("secretName", "issuerRef", "mutual")
ISSUER_FIELDS = ("name", "kind", "group")
AUTH_FIELDS = ("writers", "readers", "restrictReads", "audiences")
REDIS_SECURITY_FIELDS = ("acl", "tlsSecretName")
_IDENTITY = re.compile(r"^(system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-.a-z0-9]*[a-z0-9])?|group:\S+)$")
PEER_FIELDS = ("namespaceSelector", "podSelector", "ipBlock")
SELECTOR_FIELDS = ("matchLabels", "matchExpressions")
AGENT_FIELDS = ("image", "resources", "nodeSelector", "tolerations", "affinity", "gpuResourceName",
                "maxBatchKeys", "port", "metricsPort", "priorityClassName", "imagePullSecrets", "podLabels",
                "podAnnotations")  # fmt: skip
RESOURCES_FIELDS = ("limits", "requests")
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")
MODEL_STORE_FIELDS = ("persistentVolumeClaim", "nfs", "hostPath", "mountPath")
PVC_FIELDS = ("claimName", "readOnly")
NFS_FIELDS = ("server", "path", "readOnly")
HOST_PATH_FIELDS = ("path", "type")


def _int(obj: Mapping[str, Any], key: str, field: str, default: int | None, *, minimum: int = 0,
         maximum: int | None = None) -> int:  # fmt: skip
    """``obj[key]`` as an integer in range; ``default=None`` makes the field required."""
    if default is None and obj.get(key) is None:
        bounds = f"an integer of at least {minimum}" + (f" and at most {maximum}" if maximum is not None else "")
        raise InvalidSpecError(f"{field}.{key}", f"is required ({bounds})")
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecError(f"{field}.{key}", f"expected an integer, got {value!r}")
    if value < minimum:
        raise InvalidSpecError(f"{field}.{key}", f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidSpecError(f"{field}.{key}", f"must be at most {maximum}, got {value}")
    return value


def _float(obj: Mapping[str, Any], key: str, field: str, default: float, *, minimum: float,
           maximum: float | None = None) -> float:  # fmt: skip
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpecError(f"{field}.{key}", f"expected a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise InvalidSpecError(f"{field}.{key}", f"must be in {bounds}, got {value}")
    return float(value)


def _enum(obj: Mapping[str, Any], key: str, field: str, default: str, allowed: Sequence[str]) -> str:
    value = obj.get(key, default)
    if value not in allowed:
        raise InvalidSpecError(f"{field}.{key}", f"must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _bool(obj: Mapping[str, Any], key: str, field: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise InvalidSpecError(f"{field}.{key}", f"expected true or false, got {value!r}")
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSpecError(field, "is required and must be a non-empty string")
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise InvalidSpecError(
            field,
            f"{value!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)",
        )
    return value


def _string(obj: Mapping[str, Any], key: str, field: str, *, pattern: re.Pattern[str] | None = None,
            what: str = "", max_length: int = 253) -> str:  # fmt: skip
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidSpecError(f"{field}.{key}", "is required and must be a non-empty string")
    if len(value) > max_length or (pattern is not None and not pattern.match(value)):
        raise InvalidSpecError(f"{field}.{key}", f"{value!r} is not {what} (at most {max_length} characters)")
    return value


def _absolute_path(obj: Mapping[str, Any], key: str, field: str, default: str | None = None) -> str:
    if default is not None and obj.get(key) is None:
        return default
    return _string(obj, key, field, pattern=_ABSOLUTE_PATH, max_length=1024,
                   what="an absolute path without '.', '..', empty segments or a trailing '/'")  # fmt: skip


def _qualified_key(key: Any, field: str) -> str:
    """A label or annotation key: ``[prefix/]name``, the prefix a DNS subdomain."""
    if not isinstance(key, str):
        raise InvalidSpecError(field, f"keys must be strings, got {key!r}")
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))) or (
        len(name) > 63 or not _QUALIFIED_NAME.match(name)
    ):
        raise InvalidSpecError(
            field,
            f"{key!r} is not a valid key ([prefix/]name: a DNS subdomain prefix, and a name of at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
        )
    return key


def _string_map(raw: Any, field: str, *, label_values: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in _mapping(raw, field).items():
        _qualified_key(key, field)
        if not isinstance(value, str):
            raise InvalidSpecError(f"{field}.{key}", f"expected a string, got {value!r}")
        if label_values and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            raise InvalidSpecError(
                f"{field}.{key}",
                f"{value!r} is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and "
                "ending with a letter or digit)",
            )
        out[key] = value
    return dict(sorted(out.items()))


def _image_pull_secrets(raw: Any, field: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidSpecError(field, "expected a list of {name: SECRET}")
    names: list[str] = []
    for i, item in enumerate(raw):
        name = _string(_mapping(item, f"{field}[{i}]", ("name",)), "name", f"{field}[{i}]", pattern=_DNS1123_SUBDOMAIN,
                       what="a Secret name (a DNS-1123 subdomain)")  # fmt: skip
        if name in names:
            raise InvalidSpecError(f"{field}[{i}].name", f"duplicate Secret {name!r}")
        names.append(name)
    return tuple(names)


def parse_model_store(raw: Any, field: str = "spec.modelStore") -> ModelStoreSpec:
    obj = _mapping(raw, field, MODEL_STORE_FIELDS)
    given = [key for key in ("persistentVolumeClaim", "nfs", "hostPath") if obj.get(key) is not None]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise InvalidSpecError(field, f"set exactly one of persistentVolumeClaim, nfs or hostPath; got {got}")
    (kind,) = given
    known = {"persistentVolumeClaim": PVC_FIELDS, "nfs": NFS_FIELDS, "hostPath": HOST_PATH_FIELDS}[kind]
    sub = _mapping(obj[kind], f"{field}.{kind}", known)
    volume: ModelStoreVolume
    if kind == "persistentVolumeClaim":
        volume = PersistentVolumeClaimSource(
            claim_name=_string(sub, "claimName", f"{field}.{kind}", pattern=_DNS1123_SUBDOMAIN,
                               what="a PersistentVolumeClaim name (a DNS-1123 subdomain)"),
            read_only=_bool(sub, "readOnly", f"{field}.{kind}", True),
        )  # fmt: skip
    elif kind == "nfs":
        volume = NFSSource(
            server=_string(sub, "server", f"{field}.{kind}", what="a host name or IP address"),
            path=_absolute_path(sub, "path", f"{field}.{kind}"),
            read_only=_bool(sub, "readOnly", f"{field}.{kind}", True),
        )
    else:
        volume = HostPathSource(
            path=_absolute_path(sub, "path", f"{field}.{kind}"),
            type=_enum(sub, "type", f"{field}.{kind}", "Directory", HOST_PATH_TYPES),
        )
    return ModelStoreSpec(volume=volume,
                          mount_path=_absolute_path(obj, "mountPath", field, DEFAULT_MODEL_STORE_MOUNT))  # fmt: skip


def parse_table(raw: Any, field: str) -> TableSpec:
    obj = _mapping(raw, field, TABLE_FIELDS)
    hotness = obj.get("hotness")
    if hotness is not None:
        hotness = _float(obj, "hotness", field, 0.0, minimum=0.0)
    default_value = obj.get("defaultValue", 0.0)
    if isinstance(default_value, bool) or not isinstance(default_value, int | float):
        raise InvalidSpecError(f"{field}.defaultValue", f"expected a number, got {default_value!r}")
    source = obj.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        raise InvalidSpecError(f"{field}.source", f"expected a file:// URI or a path, got {source!r}")
    if source is not None:
        source_path(source, field=f"{field}.source")
    return TableSpec(
        name=_name(obj.get("name"), f"{field}.name"),
        rows=_int(obj, "rows", field, None, minimum=1),
        dim=_int(obj, "dim", field, None, minimum=1, maximum=16384),
        dtype=_enum(obj, "dtype", field, "float32", tuple(DTYPES)),
        source=source,
        hotness=hotness,
        default_value=float(default_value),
    )


def _peers(raw: Any, field: str) -> tuple[Mapping[str, Any], ...]:
    """NetworkPolicy peers: each ``namespaceSelector``/``podSelector`` (label selectors) and/or ``ipBlock``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidSpecError(field, "expected a list of peers (namespaceSelector, podSelector, ipBlock)")
    peers = []
    for i, entry in enumerate(raw):
        peer = _mapping(entry, f"{field}[{i}]", PEER_FIELDS)
        if not peer:
            raise InvalidSpecError(f"{field}[{i}]", "name a namespaceSelector, a podSelector or an ipBlock")
        for key in ("namespaceSelector", "podSelector"):
            if key in peer:
                selector = _mapping(peer[key], f"{field}[{i}].{key}", SELECTOR_FIELDS)
                _string_map(selector.get("matchLabels"), f"{field}[{i}].{key}.matchLabels", label_values=True)
        if "ipBlock" in peer and not isinstance(_mapping(peer["ipBlock"], f"{field}[{i}].ipBlock").get("cidr"), str):
            raise InvalidSpecError(f"{field}[{i}].ipBlock.cidr", "is required: a CIDR such as 10.0.0.0/8")
        peers.append(dict(peer))
    return tuple(peers)


def _identities(raw: Any, field: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidSpecError(field, "expected a list such as [system:serviceaccount:ml:trainer, group:trainers]")
    for i, value in enumerate(raw):
        if not isinstance(value, str) or not _IDENTITY.match(value):
            raise InvalidSpecError(f"{field}[{i}]", f"expected system:serviceaccount:NAMESPACE:NAME or group:NAME, "
                                   f"got {value!r}")  # fmt: skip
    return tuple(raw)


def _security(raw: Any) -> SecuritySpec:
    sec = _mapping(raw, "spec.security", SECURITY_FIELDS)
    tls = None
    if sec.get("tls") is not None:
        t = _mapping(sec.get("tls"), "spec.security.tls", TLS_FIELDS)
        secret = t.get("secretName")
        issuer = t.get("issuerRef")
        if (secret is None) == (issuer is None):
            raise InvalidSpecError("spec.security.tls", "set exactly one of secretName (your Secret) or issuerRef "
                                   "(cert-manager issues one)")  # fmt: skip
        issuer_ref = None
        if issuer is not None:
            i = _mapping(issuer, "spec.security.tls.issuerRef", ISSUER_FIELDS)
            if not isinstance(i.get("name"), str) or not i.get("name"):
                raise InvalidSpecError("spec.security.tls.issuerRef.name", "is required: the Issuer's name")
            issuer_ref = {"name": str(i["name"]), "kind": str(i.get("kind", "Issuer")),
                          "group": str(i.get("group", "cert-manager.io"))}  # fmt: skip
        tls = TLSSpec(
            secret_name=_string(t, "secretName", "spec.security.tls", pattern=_DNS1123_SUBDOMAIN,
                                what="a Secret name") if secret is not None else None,
            issuer=issuer_ref,
            mutual=_bool(t, "mutual", "spec.security.tls", False),
        )  # fmt: skip
    a = _mapping(sec.get("auth"), "spec.security.auth", AUTH_FIELDS)
    audiences = a.get("audiences") or []
    if not isinstance(audiences, list) or not all(isinstance(x, str) and x for x in audiences):
        raise InvalidSpecError("spec.security.auth.audiences", "expected a list of audience strings")
    auth = AuthSpec(
        writers=_identities(a.get("writers"), "spec.security.auth.writers"),
        readers=_identities(a.get("readers"), "spec.security.auth.readers"),
        restrict_reads=_bool(a, "restrictReads", "spec.security.auth", False),
        audiences=tuple(audiences),
    )
    r = _mapping(sec.get("redis"), "spec.security.redis", REDIS_SECURITY_FIELDS)
    redis_tls = r.get("tlsSecretName")
    redis = RedisSecuritySpec(
        acl=_bool(r, "acl", "spec.security.redis", True),
        tls_secret_name=_string(r, "tlsSecretName", "spec.security.redis", pattern=_DNS1123_SUBDOMAIN,
                                what="a Secret name") if redis_tls is not None else None,
    )  # fmt: skip
    return SecuritySpec(tls=tls, auth=auth, redis=redis, reflection=_bool(sec, "reflection", "spec.security", False))


def _network(raw: Any) -> NetworkSpec:
    n = _mapping(raw, "spec.network", NETWORK_FIELDS)
    return NetworkSpec(
        policy=_bool(n, "policy", "spec.network", True),
        clients=_peers(n.get("clients"), "spec.network.clients"),
        metrics_from=_peers(n.get("metricsFrom"), "spec.network.metricsFrom"),
        redis_clients=_peers(n.get("redisClients"), "spec.network.redisClients"),
    )


def parse_model_spec(name: Any, spec: Any, *, namespace: str = "default") -> ModelSpec:
    """Validates ``spec`` (the ``.spec`` of an EmbeddingModel) and returns a :class:`ModelSpec`."""
    name = _name(name, "metadata.name")
    s = _mapping(spec, "spec", SPEC_FIELDS)
    raw_tables = s.get("tables")
    if not isinstance(raw_tables, list) or not raw_tables:
        raise InvalidSpecError("spec.tables", "at least one table is required")
    tables = tuple(parse_table(t, f"spec.tables[{i}]") for i, t in enumerate(raw_tables))
    seen: dict[str, int] = {}
    for i, t in enumerate(tables):
        if t.name in seen:
            raise InvalidSpecError(
                f"spec.tables[{i}].name",
                f"duplicate table name {t.name!r} (also spec.tables[{seen[t.name]}])",
            )
        seen[t.name] = i

    c = _mapping(s.get("cache"), "spec.cache", CACHE_FIELDS)
    cache = CacheSpec(
        memory_per_gpu=parse_quantity(c.get("memoryPerGPU", "16Gi"), field="spec.cache.memoryPerGPU"),
        policy=_enum(c, "policy", "spec.cache", "lru", CACHE_POLICIES),
        hit_rate_threshold=_float(c, "hitRateThreshold", "spec.cache", 0.9, minimum=0.0, maximum=1.0),
        cached_fraction=_float(c, "cachedFraction", "spec.cache", 1.0, minimum=0.001, maximum=1.0),
        associativity=_int(c, "associativity", "spec.cache", 32, minimum=1, maximum=1024),
    )
    if cache.memory_per_gpu <= 0:
        raise InvalidSpecError("spec.cache.memoryPerGPU", "must be greater than zero")

    v = _mapping(s.get("volatileStore"), "spec.volatileStore", VOLATILE_FIELDS)
    r = _mapping(v.get("redis"), "spec.volatileStore.redis", REDIS_FIELDS)
    rp = _mapping(r.get("persistence"), "spec.volatileStore.redis.persistence", REDIS_PERSISTENCE_FIELDS)
    secret = r.get("passwordSecret")
    volatile = VolatileStoreSpec(
        type=_enum(v, "type", "spec.volatileStore", "redis", VOLATILE_TYPES),
        redis=RedisSpec(
            shards=_int(r, "shards", "spec.volatileStore.redis", 1, minimum=1, maximum=1000),
            replicas_per_shard=_int(r, "replicasPerShard", "spec.volatileStore.redis", 0, maximum=5),
            memory=parse_quantity(r.get("memory", "1Gi"), field="spec.volatileStore.redis.memory"),
            cluster=_bool(r, "cluster", "spec.volatileStore.redis", False),
            password_secret=str(secret) if secret else None,
            persistence=RedisPersistenceSpec(
                type=_enum(rp, "type", "spec.volatileStore.redis.persistence", "aof", REDIS_PERSISTENCE_TYPES),
                appendfsync=_enum(rp, "appendfsync", "spec.volatileStore.redis.persistence", "everysec",
                                  REDIS_APPENDFSYNC),
            ),
        ),
    )

    p = _mapping(s.get("persistentStore"), "spec.persistentStore", PERSISTENT_FIELDS)
    storage_class = p.get("storageClassName")
    persistent = PersistentStoreSpec(
        type=_enum(p, "type", "spec.persistentStore", "rocksdb", PERSISTENT_TYPES),
        storage=parse_quantity(p.get("storage", "10Gi"), field="spec.persistentStore.storage"),
        read_only=_bool(p, "readOnly", "spec.persistentStore", False),
        storage_class=str(storage_class) if storage_class else None,
    )

    pl = _mapping(s.get("placement"), "spec.placement", PLACEMENT_FIELDS)
    placement = PlacementSpec(
        strategy=_enum(pl, "strategy", "spec.placement", "auto", PLACEMENT_STRATEGIES),
        max_imbalance=_float(pl, "maxImbalance", "spec.placement", 1.05, minimum=1.0),
        bucket_count=_int(pl, "bucketCount", "spec.placement", 0, maximum=1 << 20),
    )

    u = _mapping(s.get("updates"), "spec.updates", UPDATES_FIELDS)
    stream = u.get("stream")
    updates = UpdatesSpec(enabled=_bool(u, "enabled", "spec.updates", True),
                          stream=str(stream) if stream else None)  # fmt: skip

    autoscaling = None
    if s.get("autoscaling") is not None:
        a = _mapping(s.get("autoscaling"), "spec.autoscaling", AUTOSCALING_FIELDS)
        autoscaling = AutoscalingSpec(
            min_replicas=_int(a, "minReplicas", "spec.autoscaling", 1, minimum=1),
            max_replicas=_int(a, "maxReplicas", "spec.autoscaling", 8, minimum=1),
            target_qps_per_replica=_int(a, "targetQPSPerReplica", "spec.autoscaling", 20000, minimum=1),
        )
        if autoscaling.max_replicas < autoscaling.min_replicas:
            raise InvalidSpecError(
                "spec.autoscaling.maxReplicas",
                f"must be at least minReplicas ({autoscaling.min_replicas}), got {autoscaling.max_replicas}",
            )
        if a.get("partitions") is not None:
            pa = _mapping(a.get("partitions"), "spec.autoscaling.partitions", PARTITION_AUTOSCALING_FIELDS)
            parts = PartitionAutoscalingSpec(
                min_partitions=_int(pa, "min", "spec.autoscaling.partitions", 1, minimum=1),
                max_partitions=_int(pa, "max", "spec.autoscaling.partitions", 8, minimum=1, maximum=9999),
                target_hit_rate=_float(pa, "targetHitRate", "spec.autoscaling.partitions", 0.8, minimum=0.0,
                                       maximum=1.0),
            )  # fmt: skip
            if parts.max_partitions < parts.min_partitions:
                raise InvalidSpecError(
                    "spec.autoscaling.partitions.max",
                    f"must be at least min ({parts.min_partitions}), got {parts.max_partitions}",
                )
            autoscaling = dataclasses.replace(autoscaling, partitions=parts)

    ag = _mapping(s.get("agent"), "spec.agent", AGENT_FIELDS)
    image = ag.get("image")
    tolerations = ag.get("tolerations") or []
    if not isinstance(tolerations, list):
        raise InvalidSpecError("spec.agent.tolerations", "expected a list of tolerations")
    agent = AgentSpec(
        image=str(image) if image else None,
        resources=dict(_mapping(ag.get("resources"), "spec.agent.resources", RESOURCES_FIELDS)),
        node_selector={
            str(k): str(v) for k, v in _mapping(ag.get("nodeSelector"), "spec.agent.nodeSelector").items()
        },
        tolerations=tuple(
            dict(_mapping(t, f"spec.agent.tolerations[{i}]", TOLERATION_FIELDS)) for i, t in enumerate(tolerations)
        ),
        affinity=dict(_mapping(ag.get("affinity"), "spec.agent.affinity")),
        gpu_resource_name=str(ag.get("gpuResourceName", "nvidia.com/gpu")),
        max_batch_keys=_int(ag, "maxBatchKeys", "spec.agent", 1 << 20, minimum=1),
        port=_int(ag, "port", "spec.agent", 50051, minimum=1, maximum=65535),
        metrics_port=_int(ag, "metricsPort", "spec.agent", 9464, minimum=1, maximum=65535),
        priority_class_name=(
            _string(ag, "priorityClassName", "spec.agent", pattern=_DNS1123_SUBDOMAIN,
                    what="a PriorityClass name (a DNS-1123 subdomain)")
            if ag.get("priorityClassName") is not None else None
        ),
        image_pull_secrets=_image_pull_secrets(ag.get("imagePullSecrets"), "spec.agent.imagePullSecrets"),
        pod_labels=_string_map(ag.get("podLabels"), "spec.agent.podLabels", label_values=True),
        pod_annotations=_string_map(ag.get("podAnnotations"), "spec.agent.podAnnotations", label_values=False),
    )  # fmt: skip

    network = _network(s.get("network"))
    security = _security(s.get("security"))

    model_store = None
    if s.get("modelStore") is not None:
        model_store = parse_model_store(s.get("modelStore"))
        for i, t in enumerate(tables):
            if t.source is not None:
                model_store.cluster_path(t.source, field=f"spec.tables[{i}].source")

    if agent.metrics_port == agent.port:
        raise InvalidSpecError("spec.agent.metricsPort", f"must differ from spec.agent.port ({agent.port})")
    return ModelSpec(
        name=name,
        namespace=namespace,
        tables=tables,
        replicas=_int(s, "replicas", "spec", 1, minimum=0, maximum=10000),
        gpus_per_pod=_int(s, "gpusPerPod", "spec", 1, minimum=1, maximum=64),
        partitions=_int(s, "partitions", "spec", 1, minimum=0, maximum=10000),
        cache=cache,
        volatile_store=volatile,
        persistent_store=persistent,
        placement=placement,
        updates=updates,
        autoscaling=autoscaling,
        agent=agent,
        model_store=model_store,
        network=network,
        security=security,
    )


def parse_model(manifest: Any) -> ModelSpec:
    """Validates a whole ``EmbeddingModel`` manifest (apiVersion, kind, metadata, spec)."""
    m = _mapping(manifest, "<root>", MANIFEST_FIELDS)
    api_version = m.get("apiVersion", f"{API_GROUP}/{API_VERSION}")
    if api_version != f"{API_GROUP}/{API_VERSION}":
        raise InvalidSpecError("apiVersion", f"expected {API_GROUP}/{API_VERSION}, got {api_version!r}")
    kind = m.get("kind", KIND)
    if kind != KIND:
        raise InvalidSpecError("kind", f"expected {KIND}, got {kind!r}")
    meta = _mapping(m.get("metadata"), "metadata")
    return parse_model_spec(
        meta.get("name"), m.get("spec"), namespace=str(meta.get("namespace") or "default")
    )


def load_model_file(path: str | Path) -> ModelSpec:
    """Reads the ``EmbeddingModel`` document of a YAML file (other kinds beside it are skipped; two
    models in one file are an error naming them: every command taking ``-f`` serves or plans one)."""
    p = Path(path)
    try:
        # libyaml's loader where PyYAML has it: a model of a thousand tables parses in 30 ms, not 300
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        docs = [d for d in yaml.load_all(p.read_text(), Loader=loader) if d is not None]
    except FileNotFoundError:
        raise InvalidSpecError(str(p), "file not found") from None
    except IsADirectoryError:
        raise InvalidSpecError(str(p), "is a directory; give the EmbeddingModel's YAML file (-f model.yaml)") from None
    except UnicodeDecodeError:
        raise InvalidSpecError(str(p), "is not a text file; give the EmbeddingModel's YAML file") from None
    except OSError as exc:
        raise InvalidSpecError(str(p), f"cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise InvalidSpecError(str(p), f"not valid YAML: {exc}") from None
    models = [d for d in docs if isinstance(d, Mapping) and d.get("kind", KIND) == KIND]
    if not models:
        raise InvalidSpecError(str(p), f"holds no {KIND} document")
    if len(models) > 1:
        names = ", ".join(str((m.get("metadata") or {}).get("name", "?")) for m in models)
        raise InvalidSpecError(str(p), f"holds {len(models)} {KIND} documents ({names}); give one model per file")
    return parse_model(models[0])


def source_path(source: str, *, field: str = "source") -> str:
    """A table source's path: ``file:///abs`` and ``file://localhost/abs`` (RFC 8089) → ``/abs``,
    ``file://rel`` → ``rel``, a plain path as it is. Any other scheme (``s3://``, ``gs://``, ...) is an
    :class:`InvalidSpecError` naming ``field``: sources are files the loader can open."""
    raw = source[len("file://") :] if source.startswith("file://") else source
    if source.startswith("file://localhost/"):
        raw = raw[len("localhost") :]
    if "://" in raw:
        raise InvalidSpecError(field, f"unsupported URI scheme in {source!r}; use file:// or a path")
    return raw


def resolve_source(source: str, *, base: Path | None = None) -> Path:
    """``file:///abs``, ``file://rel`` or a plain path → a filesystem path (relative to ``base``)."""
    path = Path(source_path(source))
    if not path.is_absolute() and base is not None:
        path = base / path
    return path
