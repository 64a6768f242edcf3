"""Converts a HugeCTR HPS JSON configuration into ``EmbeddingModel`` manifests, and says what it left out.

Pure: the caller reads the JSON and measures the sparse-model files (``key``/``emb_vector`` sizes) and
passes both in, so the mapping itself is a function of its inputs. Every setting of the HPS file lands
either in a manifest field or in a :class:`Conversion` note explaining why it has no equivalent; the
CLI prints the notes on stderr as ``# note:`` lines so stdout stays valid YAML.

HugeCTR reads this file in ``HugeCTR/src/hps/inference_utils.cpp`` (``parameter_server_config``); the
keys it requires there (``models``, ``sparse_files``, ``deployed_device_list``,
``embedding_vecsize_per_table``) are required here too, and its type aliases (``redis`` for
``redis_cluster``, ``rocksdb`` for ``rocks_db``, ...) are accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from node_agent.errors import InvalidSpecError, TableSourceError
from node_agent.spec import API_GROUP, API_VERSION, KIND, format_quantity

#: HugeCTR writes embedding vectors as raw float32 and keys as raw int64
HUGECTR_VECTOR_ITEMSIZE = 4
HUGECTR_KEY_ITEMSIZE = 8

_MIB = 2**20
_GIB = 2**30

# HugeCTR's own spellings of each database and update-source type (get_hps_database_type)
_DISABLED = ("disabled", "disable", "none")
_HASH_MAPS = ("hash_map", "hashmap", "hash", "map", "parallel_hash_map", "parallel_hashmap",
              "parallel_hash", "parallel_map", "multi_process_hash_map")  # fmt: skip
_REDIS = ("redis_cluster", "redis")
_ROCKSDB = ("rocks_db", "rocksdb", "rocks")
_KAFKA = ("kafka_message_queue", "kafka_mq", "kafka")
_NO_UPDATES = ("null", "none")

#: model settings with no equivalent here, and why; printed as notes when present
_MODEL_SETTINGS_WITHOUT_EQUIVALENT: dict[str, str] = {
    "dense_file": "the dense part of the model is served by the inference server, not by the parameter server",
    "network_file": "the network graph belongs to the inference server; HPS only serves embeddings",
    "num_of_worker_buffer_in_pool": "agents allocate lookup buffers per request; there is no fixed pool",
    "num_of_refresher_buffer_in_pool": "online updates are applied in place; there is no refresh buffer pool",
    "maxnum_des_feature_per_sample": "dense features never reach the parameter server",
    "refresh_delay": "the L1 cache is refreshed by online updates as they arrive, not on a timer",
    "refresh_interval": "the L1 cache is refreshed by online updates as they arrive, not on a timer",
    "cache_refresh_percentage_per_iteration": "updated keys are refreshed or invalidated in L1 directly",
    "label_dim": "prediction outputs belong to the inference server",
    "slot_num": "feature slots belong to the inference server; lookups address tables by name",
    "use_static_table": "every table uses the set-associative cache; a table fitting in its budget is fully cached",
    "use_context_stream": "TensorFlow/TensorRT plugin setting; agents serve lookups over gRPC",
    "use_mixed_precision": "set a table's dtype to float16 to halve its cache footprint",
    "scaler": "mixed-precision training setting; not used for serving embeddings",
    "use_algorithm_search": "cuBLAS setting of the dense network; not part of the parameter server",
    "use_cuda_graph": "CUDA graphs of the dense network; not part of the parameter server",
    "thread_pool_size": "agents size their worker threads from the pod's CPU resources",
    "i64_input_key": "keys are always int64 here",
    "device_id": "GPUs are requested from Kubernetes (gpusPerPod); device ids are not chosen by hand",
}
_MODEL_SETTINGS_MAPPED = frozenset({
    "model", "sparse_files", "deployed_device_list", "max_batch_size", "default_value_for_each_table",
    "maxnum_catfeature_query_per_table_per_sample", "embedding_vecsize_per_table", "embedding_table_names",
    "hit_rate_threshold", "gpucacheper", "gpucache",
})  # fmt: skip
_VOLATILE_SETTINGS_WITHOUT_EQUIVALENT: dict[str, str] = {
    "address": "the operator runs the Redis tier itself (a StatefulSet per model); an external cluster is not used",
    "user_name": "the operator's Redis uses the default user with a generated password",
    "password": "never copied into the manifest; the operator generates a password in a Secret "
    "(spec.volatileStore.redis.passwordSecret names an existing one)",
    "num_partitions": "Redis keys are spread over hash slots by the table's hash buckets",
    "allocation_rate": "the in-process hash map grows as needed",
    "shared_memory_size": "the in-process hash map is private to each agent",
    "shared_memory_name": "the in-process hash map is private to each agent",
    "shared_memory_auto_remove": "the in-process hash map is private to each agent",
    "algorithm": "one hash-map implementation",
    "max_batch_size": "requests to Redis are pipelined in fixed-size chunks",
    "max_get_batch_size": "requests to Redis are pipelined in fixed-size chunks",
    "max_set_batch_size": "requests to Redis are pipelined in fixed-size chunks",
    "enable_tls": "Redis runs inside the cluster next to the agents; use a NetworkPolicy or a service mesh for TLS",
    "tls_ca_certificate": "see enable_tls",
    "tls_client_certificate": "see enable_tls",
    "tls_client_key": "see enable_tls",
    "tls_server_name_identification": "see enable_tls",
    "overflow_margin": "Redis evicts by its maxmemory policy, sized from spec.volatileStore.redis.memory",
    "overflow_policy": "Redis evicts by its maxmemory policy, sized from spec.volatileStore.redis.memory",
    "overflow_resolution_target": "Redis evicts by its maxmemory policy",
    "refresh_time_after_fetch": "Redis tracks access itself for its eviction policy",
    "initialize_after_startup": "the loader Job fills the volatile tier once per model version",
    "initial_cache_rate": "the loader Job writes every row to the volatile tier",
    "cache_missed_embeddings": "rows found only in the persistent tier are not copied back to the volatile tier",
    "update_filters": "each model consumes its own update stream; no filters are needed",
}
_PERSISTENT_SETTINGS_WITHOUT_EQUIVALENT: dict[str, str] = {
    "path": "the operator gives each agent its own volume; size it with spec.persistentStore.storage",
    "num_threads": "RocksDB threads are sized by the agent",
    "max_batch_size": "reads and writes are batched per lookup",
    "max_get_batch_size": "reads and writes are batched per lookup",
    "max_set_batch_size": "reads and writes are batched per lookup",
    "update_filters": "each model consumes its own update stream; no filters are needed",
}
_TOP_LEVEL_SETTINGS = frozenset(
    {"supportlonglong", "volatile_db", "persistent_db", "update_source", "models"}
)

_INVALID_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class SparseModelFiles:
    """Sizes of one HugeCTR sparse-model directory: ``key`` (raw int64) and ``emb_vector`` (raw float32)."""

    path: str
    key_bytes: int
    vector_bytes: int


@dataclass(frozen=True)
class Conversion:
    """The manifests (one ``EmbeddingModel`` per HPS model, in file order) and what could not be mapped."""

    manifests: tuple[dict[str, Any], ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def dns1123_label(name: str, *, fallback: str) -> str:
    """Lower-cases ``name``, turns anything outside ``[a-z0-9-]`` (``_``, ``.``, spaces) into ``-``,
    and trims it to a valid DNS-1123 label of at most 63 characters."""
    label = _INVALID_LABEL_CHARS.sub("-", name.strip().lower())
    label = re.sub(r"-{2,}", "-", label)[:63].strip("-")
    return label or fallback


def _unique_labels(names: Sequence[str], *, fallback_prefix: str) -> list[str]:
    """DNS-1123 labels for ``names``; a label already taken gets ``-2``, ``-3``, ... appended."""
    taken: set[str] = set()
    labels: list[str] = []
    for i, name in enumerate(names):
        base = dns1123_label(name, fallback=f"{fallback_prefix}-{i}")
        label, n = base, 2
        while label in taken:
            suffix = f"-{n}"
            label = base[: 63 - len(suffix)].rstrip("-") + suffix
            n += 1
        taken.add(label)
        labels.append(label)
    return labels


def _object(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidSpecError(key, f"expected a JSON object, got {type(value).__name__}")
    return value


def _required(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise InvalidSpecError(f"{where}.{key}" if where else key, "is required in an HPS configuration")
    return obj[key]


def _list(value: Any, key: str, item_type: type | tuple[type, ...], type_name: str) -> list[Any]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item_type) for v in value):
        raise InvalidSpecError(key, f"expected a list of {type_name}, got {value!r}")
    return value


def _number(obj: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpecError(f"{where}.{key}", f"expected a number, got {value!r}")
    return float(value)


def _type_name(obj: Mapping[str, Any], where: str, default: str) -> str:
    value = obj.get("type", default)
    if not isinstance(value, str):
        raise InvalidSpecError(f"{where}.type", f"expected a string, got {value!r}")
    return value.strip().lower()


def sparse_file_paths(config: Any) -> list[str]:
    """Every ``sparse_files`` entry of every model, in file order: what the caller must measure."""
    root = _object(config, "<root>")
    models = root.get("models")
    paths: list[str] = []
    if isinstance(models, list):
        for model in models:
            files = model.get("sparse_files") if isinstance(model, Mapping) else None
            if isinstance(files, list):
                paths.extend(str(f) for f in files if isinstance(f, str))
    return paths


def _table_rows(files: SparseModelFiles | None, *, path: str, dim: int, where: str) -> int:
    if files is None:
        raise TableSourceError(
            f"{where}: cannot read {path!r} (a HugeCTR sparse-model directory holding 'key' and "
            "'emb_vector'); mount it where the converter can read it or give the row count with --rows"
        )
    if files.key_bytes % HUGECTR_KEY_ITEMSIZE:
        raise TableSourceError(f"{path}/key: {files.key_bytes} bytes is not a whole number of int64 keys")
    rows = files.key_bytes // HUGECTR_KEY_ITEMSIZE
    if rows == 0:
        raise TableSourceError(f"{path}/key: the table is empty (0 keys)")
    expected = rows * dim * HUGECTR_VECTOR_ITEMSIZE
    if files.vector_bytes != expected:
        raise TableSourceError(
            f"{path}/emb_vector: {files.vector_bytes} bytes, expected {expected} "
            f"({rows} keys x {dim} float32; {where} says dim {dim})"
        )
    return rows


def _source(path: str) -> str:
    """An absolute path becomes a ``file://`` URI; a relative one stays a plain path (relative to where
    the agent reads its tables), since ``file://rel/path`` would name a host."""
    if "://" in path or not path.startswith("/"):
        return path
    return f"file://{path}"


def _round_up(num_bytes: float, unit: int) -> int:
    return max(unit, math.ceil(num_bytes / unit) * unit)


def _volatile_store(config: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    if "volatile_db" not in config:
        # HPS's default volatile database is the in-process parallel hash map
        return {"type": "hashmap"}
    db = _object(config["volatile_db"], "volatile_db")
    kind = _type_name(db, "volatile_db", "disabled")
    store: dict[str, Any]
    if kind in _DISABLED:
        store = {"type": "none"}
    elif kind in _HASH_MAPS:
        store = {"type": "hashmap"}
        if kind == "multi_process_hash_map":
            notes.append("volatile_db.type multi_process_hash_map: each agent keeps a private in-process "
                         "hash map; share rows between agents with type redis")  # fmt: skip
    elif kind in _REDIS:
        address = db.get("address", "127.0.0.1:7000")
        if not isinstance(address, str):
            raise InvalidSpecError("volatile_db.address", f"expected 'host:port,host:port', got {address!r}")
        shards = max(1, len([a for a in address.split(",") if a.strip()]))
        store = {"type": "redis", "redis": {"shards": shards, "cluster": True}}
        notes.append(f"volatile_db redis_cluster with {shards} node(s) -> an operator-run Redis Cluster of "
                     f"{shards} shard(s); size spec.volatileStore.redis.memory for your tables")  # fmt: skip
    else:
        raise InvalidSpecError(
            "volatile_db.type",
            f"unknown HPS volatile database type {db.get('type')!r} "
            "(expected redis_cluster, hash_map, parallel_hash_map or disabled)",
        )
    for key in sorted(db):
        if key == "type" or (key == "address" and kind in _REDIS):
            continue
        if key == "password" and not db[key]:
            continue  # an empty password carries nothing worth a note
        reason = _VOLATILE_SETTINGS_WITHOUT_EQUIVALENT.get(
            key, "not an HPS volatile_db setting this converter knows"
        )
        notes.append(f"volatile_db.{key} has no equivalent: {reason}")
    if kind in _REDIS:
        notes.append(
            f"volatile_db.address has no equivalent: {_VOLATILE_SETTINGS_WITHOUT_EQUIVALENT['address']}"
        )
    return store


def _persistent_store(config: Mapping[str, Any], notes: list[str], total_bytes: int) -> dict[str, Any]:
    if "persistent_db" not in config:
        return {"type": "none"}
    db = _object(config["persistent_db"], "persistent_db")
    kind = _type_name(db, "persistent_db", "disabled")
    if kind in _DISABLED:
        return {"type": "none"}
    if kind not in _ROCKSDB:
        raise InvalidSpecError(
            "persistent_db.type",
            f"unknown HPS persistent database type {db.get('type')!r} (expected rocks_db or disabled)",
        )
    read_only = db.get("read_only", False)
    if not isinstance(read_only, bool):
        raise InvalidSpecError("persistent_db.read_only", f"expected true or false, got {read_only!r}")
    for key in sorted(db):
        if key in ("type", "read_only"):
            continue
        reason = _PERSISTENT_SETTINGS_WITHOUT_EQUIVALENT.get(
            key, "not an HPS persistent_db setting this converter knows"
        )
        notes.append(f"persistent_db.{key} has no equivalent: {reason}")
    # RocksDB stores each row's key beside its vector and needs room to compact: twice the raw size.
    storage = _round_up(2 * total_bytes, _GIB)
    notes.append(f"persistent_db -> spec.persistentStore.storage {format_quantity(storage)} "
                 "(twice the tables' raw size, for keys and compaction): an estimate, adjust it")  # fmt: skip
    store: dict[str, Any] = {"type": "rocksdb", "storage": format_quantity(storage)}
    if read_only:
        store["readOnly"] = True
    return store


def _updates(config: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    if "update_source" not in config:
        return {"enabled": False}
    source = _object(config["update_source"], "update_source")
    # HugeCTR treats a missing type as Kafka (get_hps_updatesource_type)
    kind = _type_name(source, "update_source", "kafka_message_queue")
    if kind in _NO_UPDATES:
        return {"enabled": False}
    if kind not in _KAFKA:
        raise InvalidSpecError(
            "update_source.type",
            f"unknown HPS update source type {source.get('type')!r} (expected kafka_message_queue or null)",
        )
    notes.append(
        "update_source kafka_message_queue -> spec.updates.enabled true: training publishes updates to a "
        "Redis Stream per model ('hps update' or the Python client) instead of Kafka; brokers, "
        "poll_timeout_ms, receive_buffer_size, max_batch_size, failure_backoff_ms and "
        "max_commit_interval have no equivalent. Unlike HPS's Kafka source, an update is acknowledged "
        "only once stored, so none is lost silently when the transport is down"
    )
    return {"enabled": True}


def _model_manifest(
    raw: Any,
    index: int,
    *,
    name: str,
    config: Mapping[str, Any],
    sparse_files: Mapping[str, SparseModelFiles],
    rows_override: Mapping[str, int],
    namespace: str | None,
    notes: list[str],
) -> dict[str, Any]:
    where = f"models[{index}]"
    model = _object(raw, where)
    files = _list(_required(model, "sparse_files", where), f"{where}.sparse_files", str, "paths")
    if not files:
        raise InvalidSpecError(f"{where}.sparse_files", "lists no sparse-model files (one per table)")
    n = len(files)
    dims = _list(_required(model, "embedding_vecsize_per_table", where),
                 f"{where}.embedding_vecsize_per_table", int, "integers")  # fmt: skip
    if len(dims) != n or any(d < 1 for d in dims):
        raise InvalidSpecError(
            f"{where}.embedding_vecsize_per_table",
            f"needs one positive vector size per sparse file ({n}), got {dims!r}",
        )
    devices = _list(_required(model, "deployed_device_list", where),
                    f"{where}.deployed_device_list", int, "GPU ids")  # fmt: skip
    if not devices:
        raise InvalidSpecError(f"{where}.deployed_device_list", "lists no GPU")

    raw_names = model.get("embedding_table_names")
    if raw_names is None:
        table_names = [f"sparse_embedding{i}" for i in range(n)]  # HugeCTR's default names
    else:
        table_names = _list(raw_names, f"{where}.embedding_table_names", str, "strings")
        if len(table_names) != n:
            raise InvalidSpecError(
                f"{where}.embedding_table_names",
                f"needs one name per sparse file ({n}), got {len(table_names)}",
            )
    labels = _unique_labels(table_names, fallback_prefix="table")
    for original, label in zip(table_names, labels, strict=True):
        if original != label:
            notes.append(
                f"{where}: table {original!r} renamed {label!r} (table names must be DNS-1123 labels)"
            )

    defaults = _list(model.get("default_value_for_each_table", [0.0]),
                     f"{where}.default_value_for_each_table", (int, float), "numbers")  # fmt: skip
    if len(defaults) != n:
        if len(defaults) > 1:
            raise InvalidSpecError(
                f"{where}.default_value_for_each_table",
                f"needs one value per sparse file ({n}), got {len(defaults)}",
            )
        # HugeCTR fills every table with the first value (or 0) when the list is short
        defaults = [defaults[0] if defaults else 0.0] * n

    tables: list[dict[str, Any]] = []
    for i, (path, dim, original, label) in enumerate(zip(files, dims, table_names, labels, strict=True)):
        override = rows_override.get(original, rows_override.get(label))
        if override is not None:
            if override < 1:
                raise InvalidSpecError(f"--rows {original}", f"must be at least 1, got {override}")
            rows = override
        else:
            rows = _table_rows(sparse_files.get(path), path=path, dim=dim,
                               where=f"{where}.sparse_files[{i}]")  # fmt: skip
        if "://" in path and not path.startswith("file://"):
            notes.append(f"{where}.sparse_files[{i}] {path!r}: remote sources are not read by the loader; "
                         "copy the table to a volume the agents mount and use a file:// source")  # fmt: skip
        tables.append({
            "name": label,
            "rows": rows,
            "dim": dim,
            "dtype": "float32",
            "source": _source(path),
            "defaultValue": float(defaults[i]),
        })  # fmt: skip
    total_bytes = sum(t["rows"] * t["dim"] * HUGECTR_VECTOR_ITEMSIZE for t in tables)

    # HPS caches gpucacheper of every table on every deployed GPU: the replicate strategy, cachedFraction
    # gpucacheper, and a per-GPU budget of that share of the model's bytes.
    cache_share = _number(model, "gpucacheper", where, 0.2)
    if not 0.0 < cache_share <= 1.0:
        raise InvalidSpecError(f"{where}.gpucacheper", f"must be in (0, 1], got {cache_share}")
    hit_rate = _number(model, "hit_rate_threshold", where, 0.9)
    if hit_rate > 1.0:
        # HPS documents a threshold above 1 as "always insert synchronously"; 1.0 means the same here
        notes.append(f"{where}.hit_rate_threshold {hit_rate} > 1 -> 1.0 (always insert misses synchronously)")
        hit_rate = 1.0
    if hit_rate < 0.0:
        raise InvalidSpecError(f"{where}.hit_rate_threshold", f"must be at least 0, got {hit_rate}")
    gpucache = model.get("gpucache", True)
    if gpucache is False:
        notes.append(f"{where}.gpucache false has no equivalent: every agent keeps an L1 GPU cache "
                     "(sized from gpucacheper)")  # fmt: skip

    spec: dict[str, Any] = {
        "tables": tables,
        "replicas": 1,
        "gpusPerPod": len(devices),
        "partitions": 1,
        "cache": {
            "memoryPerGPU": format_quantity(_round_up(cache_share * total_bytes, _MIB)),
            "policy": "lru",
            "hitRateThreshold": hit_rate,
            "cachedFraction": cache_share,
        },
        "volatileStore": _volatile_store(config, notes),
        "persistentStore": _persistent_store(config, notes, total_bytes),
        "placement": {"strategy": "replicate"},
        "updates": _updates(config, notes),
    }
    notes.append(f"{where}: deployed_device_list {devices} -> gpusPerPod {len(devices)}; "
                 "placement strategy replicate keeps HPS's layout (set auto to let the planner shard)")  # fmt: skip

    queries = model.get("maxnum_catfeature_query_per_table_per_sample")
    if queries is not None:
        queries = _list(queries, f"{where}.maxnum_catfeature_query_per_table_per_sample", int, "integers")
        max_batch = int(_number(model, "max_batch_size", where, 64))
        # one request may carry a whole batch's keys for every table (lookup_many)
        spec["agent"] = {"maxBatchKeys": max(1, max_batch * sum(queries))}
    elif "max_batch_size" in model:
        notes.append(f"{where}.max_batch_size has no equivalent without "
                     "maxnum_catfeature_query_per_table_per_sample (the keys per sample)")  # fmt: skip

    for key in sorted(model):
        if key in _MODEL_SETTINGS_MAPPED:
            continue
        reason = _MODEL_SETTINGS_WITHOUT_EQUIVALENT.get(key, "not an HPS model setting this converter knows")
        notes.append(f"{where}.{key} has no equivalent: {reason}")

    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}


def convert_hps_config(
    config: Any,
    *,
    sparse_files: Mapping[str, SparseModelFiles],
    rows_override: Mapping[str, int] | None = None,
    namespace: str | None = None,
) -> Conversion:
    """Maps a parsed HPS JSON configuration to one ``EmbeddingModel`` manifest per ``models[]`` entry.

    ``sparse_files`` holds the measured sizes of each ``sparse_files`` path (as written in the
    configuration); a table's row count is its ``key`` file's size / 8. ``rows_override`` (table name,
    as in HPS or as converted → rows) stands in for files the caller cannot read. Raises
    :class:`InvalidSpecError` naming the key for a malformed configuration and
    :class:`TableSourceError` naming the file for a missing or inconsistent sparse model.
    """
    root = _object(config, "<root>")
    models = _required(root, "models", "")
    if not isinstance(models, list) or not models:
        raise InvalidSpecError("models", "expected a non-empty list of models")
    notes: list[str] = []
    model_names = []
    for i, m in enumerate(models):
        raw_name = _required(_object(m, f"models[{i}]"), "model", f"models[{i}]")
        if not isinstance(raw_name, str) or not raw_name.strip():
            raise InvalidSpecError(f"models[{i}].model", f"expected a non-empty model name, got {raw_name!r}")
        model_names.append(raw_name)
    names = _unique_labels(model_names, fallback_prefix="model")
    for i, (original, name) in enumerate(zip(model_names, names, strict=True)):
        if original != name:
            notes.append(f"models[{i}]: model {original!r} renamed {name!r} (names must be DNS-1123 labels)")

    support_long = root.get("supportlonglong", True)
    if support_long is False:
        notes.append(
            "supportlonglong false has no equivalent: keys are always int64 (32-bit keys widen losslessly)"
        )
    for key in sorted(set(root) - _TOP_LEVEL_SETTINGS):
        if key == "fuse_embedding_table":
            notes.append("fuse_embedding_table has no equivalent: tables are cached separately; the "
                         "planner balances them across GPUs instead")  # fmt: skip
        else:
            notes.append(f"{key} has no equivalent: not an HPS setting this converter knows")
    if len(models) > 1 and any(k in root for k in ("volatile_db", "persistent_db")):
        notes.append("HPS shares one volatile_db/persistent_db between its models; each EmbeddingModel "
                     "gets its own stores")  # fmt: skip

    manifests = tuple(
        _model_manifest(
            m, i, name=names[i], config=root, sparse_files=sparse_files,
            rows_override=rows_override or {}, namespace=namespace, notes=notes,
        )
        for i, m in enumerate(models)
    )  # fmt: skip
    # the database notes repeat once per model; keep the first of each
    return Conversion(manifests=manifests, notes=tuple(dict.fromkeys(notes)))
