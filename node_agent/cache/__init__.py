"""The L1 embedding cache: a set-associative cache on NumPy or CuPy, and its per-table, per-GPU layout."""

from node_agent.cache.l1 import (
    LAYOUTS,
    BucketRoutedCache,
    BucketShard,
    L1Table,
    TableCache,
    build_l1,
    split_budget,
)
from node_agent.cache.set_associative import (
    ADMISSIONS,
    POLICIES,
    SLOT_METADATA_BYTES,
    SetAssociativeCache,
    bytes_for_rows,
    rows_for_bytes,
)

__all__ = [
    "ADMISSIONS",
    "LAYOUTS",
    "POLICIES",
    "SLOT_METADATA_BYTES",
    "BucketRoutedCache",
    "BucketShard",
    "L1Table",
    "SetAssociativeCache",
    "TableCache",
    "build_l1",
    "bytes_for_rows",
    "rows_for_bytes",
    "split_budget",
]
