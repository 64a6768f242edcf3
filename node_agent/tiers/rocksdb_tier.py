"""L3 persistent tier on RocksDB (through ``rocksdict``), also readable by several agents off a shared volume.

One column family per table (``table:<name>``), not a key prefix in one keyspace: evicting a whole
table is one range delete over its own family, a table's rows are compacted and counted on their
own, and tables cannot collide whatever their names. Keys are 8 bytes big-endian with the sign bit
flipped, so RocksDB's byte order is the keys' numeric order; values are the row's raw little-endian
bytes. Writes go through one ``WriteBatch`` per call (atomic: a failed insert writes nothing), reads
through one multi-get.

The default column family holds one metadata entry per table (``hps/layout/<name>``: dim and dtype),
checked on every open: a DB written for another dim or dtype is refused with a
:class:`TableSourceError` naming the table, rather than serving rows cut at the wrong width.
``read_only=True`` opens the DB read-only (many agents may do so at once); writes are then refused.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
from rocksdict import AccessType, Options, Rdict, WriteBatch

from node_agent.errors import InvalidArgumentError, NotFoundError, TableSourceError, UnavailableError
from node_agent.tiers.arguments import as_keys, as_values
from node_agent.tiers.base import TableLayout

_SIGN = np.uint64(1 << 63)
_LAYOUT_PREFIX = b"hps/layout/"
#: a range end above every 8-byte key
_KEYS_END = b"\xff" * 9


def encode_keys(keys: np.ndarray) -> list[bytes]:
    """int64 keys → 8-byte big-endian, sign bit flipped (so byte order = numeric order)."""
    encoded: list[bytes] = (keys.view(np.uint64) ^ _SIGN).astype(">u8").view("V8").tolist()
    return encoded


def _column_family(table: str) -> str:
    return f"table:{table}"


def _raw_options() -> Options:
    return Options(raw_mode=True)


class RocksDBTier:
    """Rows of several tables in one RocksDB directory; see the module docstring."""

    name = "rocksdb"

    def __init__(self, path: str | Path, layouts: Iterable[TableLayout], *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._layouts = {layout.name: layout for layout in layouts}
        self._lock = threading.Lock()
        self._hits = self._misses = self._errors = 0
        exists = (self.path / "CURRENT").exists()
        if read_only and not exists:
            raise UnavailableError(f"rocksdb: no database at {self.path} to open read-only")
        options = _raw_options()
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        try:
            families = [cf for cf in Rdict.list_cf(str(self.path)) if cf != "default"] if exists else []
            self._db = Rdict(
                str(self.path),
                options,
                column_families={cf: _raw_options() for cf in families},
                access_type=AccessType.read_only() if read_only else AccessType.read_write(),
            )
        except Exception as exc:  # rocksdict raises bare Exception for RocksDB's Status errors
            raise UnavailableError(f"rocksdb: cannot open {self.path}: {exc}") from None
        try:
            self._families: dict[str, Rdict | None] = {}
            for layout in self._layouts.values():
                self._families[layout.name] = self._open_table(
                    layout, exists=_column_family(layout.name) in families
                )
        except BaseException:
            self._db.close()
            raise

    def _open_table(self, layout: TableLayout, *, exists: bool) -> Rdict | None:
        meta_key = _LAYOUT_PREFIX + layout.name.encode()
        expected = {"dim": layout.dim, "dtype": layout.dtype.name}
        stored = self._db.get(meta_key)
        if stored is not None:
            found = json.loads(stored)
            if found != expected:
                raise TableSourceError(
                    f"rocksdb at {self.path}: table {layout.name!r} is stored with dim={found.get('dim')} "
                    f"dtype={found.get('dtype')}, but the model says dim={layout.dim} dtype={layout.dtype.name}"
                )
        if self.read_only:
            # a table this read-only DB lacks serves every key as missing
            return self._db.get_column_family(_column_family(layout.name)) if exists else None
        if stored is None:
            self._db.put(meta_key, json.dumps(expected, sort_keys=True).encode())
        if not exists:
            return self._db.create_column_family(_column_family(layout.name), _raw_options())
        return self._db.get_column_family(_column_family(layout.name))

    # -- Tier ----------------------------------------------------------------------------------

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        layout, family = self._table(table)
        keys = as_keys(keys)
        values = np.zeros((len(keys), layout.dim), dtype=layout.dtype)
        found = np.zeros(len(keys), dtype=bool)
        if family is None or not len(keys):
            self._count(hits=0, misses=len(keys))
            return values, found
        try:
            stored = cast(list[bytes | None], family.get(list[Any](encode_keys(keys))))
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: reading table {table!r}: {exc}") from None
        found = np.fromiter(
            (v is not None and len(v) == layout.row_bytes for v in stored), dtype=bool, count=len(keys)
        )
        # a value of the wrong length (a foreign writer, a torn disk) is served as missing, never cut
        malformed = sum(1 for v in stored if v is not None) - int(found.sum())
        if found.any():
            blob = b"".join(v for v, ok in zip(stored, found, strict=True) if ok and v is not None)
            values[found] = np.frombuffer(blob, dtype=layout.dtype.newbyteorder("<")).reshape(-1, layout.dim)
        hits = int(found.sum())
        self._count(hits=hits, misses=len(keys) - hits, errors=malformed)
        return values, found

    def insert(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        layout, _ = self._writable(table, "insert")
        keys = as_keys(keys)
        values = as_values(layout, values, len(keys))
        if not len(keys):
            return
        rows = np.ascontiguousarray(values, dtype=layout.dtype.newbyteorder("<"))
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._db.get_column_family_handle(_column_family(table)))
        for key, row in zip(
            encode_keys(keys), rows.view(f"V{layout.row_bytes}").reshape(-1).tolist(), strict=True
        ):
            batch.put(key, row)
        self._write(batch, table)

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        _, family = self._writable(table, "evict")
        try:
            if keys is None:
                family.delete_range(b"", _KEYS_END)
                return
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: evicting table {table!r}: {exc}") from None
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._db.get_column_family_handle(_column_family(table)))
        for key in encode_keys(as_keys(keys)):
            batch.delete(key)
        self._write(batch, table)

    def count(self, table: str) -> int:
        """Exact, by walking the table's keys (O(rows)): for stats and checks, not the lookup path."""
        _, family = self._table(table)
        if family is None:
            return 0
        return sum(1 for _ in family.keys())  # noqa: SIM118 (walks keys only, not values)

    def stats(self) -> Mapping[str, int | float | str]:
        with self._lock:
            return {
                "tier": self.name,
                "path": str(self.path),
                "read_only": int(self.read_only),
                "hits": self._hits,
                "misses": self._misses,
                "errors": self._errors,
            }

    def close(self) -> None:
        # every column-family handle keeps RocksDB open: drop them before closing the DB
        for family in self._families.values():
            if family is not None:
                family.close()
        self._families = {}
        self._db.close()

    # -- internals -----------------------------------------------------------------------------

    def _table(self, table: str) -> tuple[TableLayout, Rdict | None]:
        try:
            return self._layouts[table], self._families[table]
        except KeyError:
            raise NotFoundError(f"table {table!r} is not held by the rocksdb tier") from None

    def _writable(self, table: str, operation: str) -> tuple[TableLayout, Rdict]:
        layout, family = self._table(table)
        if self.read_only or family is None:
            raise InvalidArgumentError(
                f"rocksdb at {self.path} is open read-only: cannot {operation} {table!r}"
            )
        return layout, family

    def _write(self, batch: WriteBatch, table: str) -> None:
        try:
            self._db.write(batch)
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: writing table {table!r}: {exc}") from None

    def _count(self, *, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses
            self._errors += errors
