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

``shared=True`` is for a directory several agents on one machine use at once (``hps local``). RocksDB
admits one writing process (it locks ``LOCK``): the agent that gets the lock opens the DB read-write
and is the store's one writer; the others open it as *secondaries*, which read what the writer wrote
after :meth:`RocksDBTier.catch_up`, and take the lock over with :meth:`RocksDBTier.try_promote` when the
writer is gone (the kernel drops a dead process's lock). Which agent writes is therefore decided by
the store itself, never by two agents at once.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
from rocksdict import AccessType, Options, Rdict, WriteBatch

from node_agent.errors import InvalidArgumentError, NotFoundError, TableSourceError, UnavailableError
from node_agent.tiers.arguments import as_keys, as_values
from node_agent.tiers.base import TableLayout

log = logging.getLogger(__name__)

_SIGN = np.uint64(1 << 63)
_LAYOUT_PREFIX = b"hps/layout/"
#: the default column family's entries that are not table layouts: small facts the writer records
_META_PREFIX = b"hps/meta/"
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


def _secondary_options() -> Options:
    options = Options(raw_mode=True)
    # a secondary must keep every file it opened: the writer may delete them after a compaction
    options.set_max_open_files(-1)
    return options


def _is_lock_error(exc: Exception) -> bool:
    """RocksDB's "IO error: While lock file: .../LOCK: Resource temporarily unavailable" (another
    process writes the DB) and "lock hold by current process" (this one does)."""
    return "lock" in str(exc).lower()


class RocksDBTier:
    """Rows of several tables in one RocksDB directory; see the module docstring."""

    name = "rocksdb"

    def __init__(
        self, path: str | Path, layouts: Iterable[TableLayout], *, read_only: bool = False, shared: bool = False
    ) -> None:
        if read_only and shared:
            raise InvalidArgumentError("a RocksDB tier is read-only or shared, not both")
        self.path = Path(path)
        self.read_only = read_only
        self.shared = shared
        self._layouts = {layout.name: layout for layout in layouts}
        self._lock = threading.Lock()
        # serialises opening and promoting: a promotion swaps the handles readers pick up
        self._open_lock = threading.Lock()
        self._hits = self._misses = self._errors = 0
        self._secondary_dir: Path | None = None
        #: handles a promotion replaced; closed with the tier (a reader may still hold one)
        self._retired: list[tuple[Rdict, dict[str, Rdict | None]]] = []
        exists = (self.path / "CURRENT").exists()
        if read_only and not exists:
            raise UnavailableError(f"rocksdb: no database at {self.path} to open read-only")
        families = [cf for cf in Rdict.list_cf(str(self.path)) if cf != "default"] if exists else []
        if shared and exists:
            try:
                self._db, self._families = self._open(families, writer=True)
                self._writer = True
            except UnavailableError as exc:
                if not _is_lock_error(exc):
                    raise
                self._db, self._families = self._open(families, writer=False)
                self._writer = False
        else:
            self._db, self._families = self._open(families, writer=not read_only)
            self._writer = not read_only
        if shared:
            log.info("rocksdb at %s shared: this agent %s", self.path,
                     "writes it" if self._writer else "reads it as a secondary until the writer is gone")  # fmt: skip

    @property
    def is_writer(self) -> bool:
        """True when this process holds the DB's write lock (not read-only, not a secondary)."""
        return self._writer

    def _open(self, families: list[str], *, writer: bool) -> tuple[Rdict, dict[str, Rdict | None]]:
        """Opens the DB (read-write, read-only, or as a secondary of a shared DB) and its tables."""
        if writer:
            options = _raw_options()
            options.create_if_missing(True)
            options.create_missing_column_families(True)
            access = AccessType.read_write()
        elif self.shared:
            options = _secondary_options()
            if self._secondary_dir is None:
                self._secondary_dir = Path(tempfile.mkdtemp(prefix="hps-rocksdb-secondary-"))
            access = AccessType.secondary(str(self._secondary_dir))
        else:
            options = _raw_options()
            access = AccessType.read_only()
        column_options = _secondary_options if (self.shared and not writer) else _raw_options
        try:
            db = Rdict(str(self.path), options, column_families={cf: column_options() for cf in families},
                       access_type=access)  # fmt: skip
        except Exception as exc:  # rocksdict raises bare Exception for RocksDB's Status errors
            raise UnavailableError(f"rocksdb: cannot open {self.path}: {exc}") from None
        try:
            opened: dict[str, Rdict | None] = {}
            for layout in self._layouts.values():
                opened[layout.name] = self._open_table(
                    db, layout, exists=_column_family(layout.name) in families, writer=writer
                )
        except BaseException:
            db.close()
            raise
        return db, opened

    def try_promote(self) -> bool:
        """A shared secondary takes the DB's write lock when its writer is gone; True when this process
        now writes the DB. Cheap when the lock is held elsewhere (RocksDB fails fast on it)."""
        if self._writer:
            return True
        if not self.shared:
            return False
        with self._open_lock:
            if self._writer:
                return True
            families = [cf for cf in Rdict.list_cf(str(self.path)) if cf != "default"]
            try:
                db, opened = self._open(families, writer=True)
            except UnavailableError as exc:
                if not _is_lock_error(exc):
                    log.warning("rocksdb at %s: taking over as writer failed: %s", self.path, exc)
                return False
            self._retired.append((self._db, self._families))
            # readers pick up the new handles on their next call; the old ones stay open until close()
            self._db, self._families = db, opened
            self._writer = True
        log.info("rocksdb at %s: this agent took over as its writer", self.path)
        return True

    def catch_up(self) -> None:
        """A shared secondary reads what the writer has written since (RocksDB's MANIFEST and WAL tail);
        nothing to do for the writer or a read-only open. Raises :class:`UnavailableError` on failure."""
        if self._writer or not self.shared:
            return
        try:
            self._db.try_catch_up_with_primary()
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: catching up with its writer: {exc}") from None

    def probe(self) -> None:
        """One cheap read, so a background health check notices a store that stopped answering."""
        try:
            self._db.get(_META_PREFIX + b"probe")
        except Exception as exc:
            raise UnavailableError(f"rocksdb at {self.path}: {exc}") from None

    def get_meta(self, name: str) -> str | None:
        """A small fact recorded with :meth:`put_meta` (e.g. the last update applied), or None."""
        try:
            value = self._db.get(_META_PREFIX + name.encode())
        except Exception as exc:
            raise UnavailableError(f"rocksdb at {self.path}: reading {name}: {exc}") from None
        return None if value is None else bytes(value).decode()

    def put_meta(self, name: str, value: str) -> None:
        """Records a small fact beside the rows (only the writer can)."""
        if not self._writer:
            raise InvalidArgumentError(f"rocksdb at {self.path} is not written by this process: cannot record {name}")
        try:
            self._db.put(_META_PREFIX + name.encode(), value.encode())
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: recording {name}: {exc}") from None

    def _open_table(self, db: Rdict, layout: TableLayout, *, exists: bool, writer: bool) -> Rdict | None:
        meta_key = _LAYOUT_PREFIX + layout.name.encode()
        expected = {"dim": layout.dim, "dtype": layout.dtype.name}
        stored = db.get(meta_key)
        if stored is not None:
            found = json.loads(stored)
            if found != expected:
                raise TableSourceError(
                    f"rocksdb at {self.path}: table {layout.name!r} is stored with dim={found.get('dim')} "
                    f"dtype={found.get('dtype')}, but the model says dim={layout.dim} dtype={layout.dtype.name}"
                )
        if not writer:
            # a table this read-only DB lacks serves every key as missing
            return db.get_column_family(_column_family(layout.name)) if exists else None
        if stored is None:
            db.put(meta_key, json.dumps(expected, sort_keys=True).encode())
        if not exists:
            return db.create_column_family(_column_family(layout.name), _raw_options())
        return db.get_column_family(_column_family(layout.name))

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
        db = self._db
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(db.get_column_family_handle(_column_family(table)))
        for key, row in zip(
            encode_keys(keys), rows.view(f"V{layout.row_bytes}").reshape(-1).tolist(), strict=True
        ):
            batch.put(key, row)
        self._write(db, batch, table)

    def evict(self, table: str, keys: np.ndarray | None = None) -> None:
        _, family = self._writable(table, "evict")
        try:
            if keys is None:
                family.delete_range(b"", _KEYS_END)
                return
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: evicting table {table!r}: {exc}") from None
        db = self._db
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(db.get_column_family_handle(_column_family(table)))
        for key in encode_keys(as_keys(keys)):
            batch.delete(key)
        self._write(db, batch, table)

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
                "shared": int(self.shared),
                "writer": int(self._writer),
                "hits": self._hits,
                "misses": self._misses,
                "errors": self._errors,
            }

    def close(self) -> None:
        # every column-family handle keeps RocksDB open: drop them before closing the DB
        for db, families in [*self._retired, (self._db, self._families)]:
            for family in families.values():
                if family is not None:
                    family.close()
            db.close()
        self._retired = []
        self._families = {}
        if self._secondary_dir is not None:
            shutil.rmtree(self._secondary_dir, ignore_errors=True)
            self._secondary_dir = None

    # -- internals -----------------------------------------------------------------------------

    def _table(self, table: str) -> tuple[TableLayout, Rdict | None]:
        try:
            return self._layouts[table], self._families[table]
        except KeyError:
            raise NotFoundError(f"table {table!r} is not held by the rocksdb tier") from None

    def _writable(self, table: str, operation: str) -> tuple[TableLayout, Rdict]:
        layout, family = self._table(table)
        if not self._writer or family is None:
            how = "as a secondary of the agent that writes it" if self.shared else "read-only"
            raise InvalidArgumentError(f"rocksdb at {self.path} is open {how}: cannot {operation} {table!r}")
        return layout, family

    def _write(self, db: Rdict, batch: WriteBatch, table: str) -> None:
        try:
            db.write(batch)
        except Exception as exc:
            self._count(errors=1)
            raise UnavailableError(f"rocksdb at {self.path}: writing table {table!r}: {exc}") from None

    def _count(self, *, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses
            self._errors += errors
