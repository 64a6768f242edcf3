"""The storage tiers behind the L1 cache, and :func:`open_tiers`, which opens them in lookup order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from node_agent.errors import InvalidArgumentError
from node_agent.redis_access import RedisAccess
from node_agent.tiers.base import TableLayout, Tier
from node_agent.tiers.hashmap import HashMapTier
from node_agent.tiers.redis_tier import RedisTier
from node_agent.tiers.rocksdb_tier import RocksDBTier

__all__ = ["HashMapTier", "RedisTier", "RocksDBTier", "TableLayout", "Tier", "open_tiers"]


def open_tiers(
    layouts: Iterable[TableLayout],
    *,
    model: str = "",
    redis_addresses: Sequence[str] = (),
    redis_access: RedisAccess | None = None,
    redis_password: str | None = None,
    redis_cluster: bool = False,
    redis_partitions: int = 64,
    in_process: bool = False,
    rocksdb_path: str | Path | None = None,
    rocksdb_read_only: bool = False,
) -> list[Tier]:
    """The tiers asked for, L2 before L3: Redis when addresses are given, else the in-process hash
    map when ``in_process``; then RocksDB when a path is given. Closes what it opened if one fails.
    ``redis_access`` is the Redis user, password and TLS; ``redis_password`` alone the default user's."""
    if redis_access is not None and redis_password is not None:
        raise InvalidArgumentError("redis_access carries the password: give it or redis_password, not both")
    if redis_password is not None:
        redis_access = RedisAccess(password=redis_password)
    layouts = list(layouts)
    tiers: list[Tier] = []
    try:
        if redis_addresses:
            tiers.append(
                RedisTier(
                    layouts,
                    addresses=redis_addresses,
                    access=redis_access,
                    cluster=redis_cluster,
                    partitions=redis_partitions,
                    model=model,
                )
            )
        elif in_process:
            tiers.append(HashMapTier(layouts))
        if rocksdb_path is not None:
            tiers.append(RocksDBTier(rocksdb_path, layouts, read_only=rocksdb_read_only))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers
