"""Loads embedding tables from their sources (DESIGN.md "Table sources") into storage tiers, in chunks.

A source is opened and checked whole before a single row is written: the format is told from the
files present, every file is memory-mapped (so a table larger than RAM streams through in
``chunk_rows`` slices) and its rows, dim and dtype are compared with the :class:`TableSpec`. A missing,
truncated or mismatched file is a :class:`TableSourceError` naming the file, raised before anything
reaches a tier, so the rows already served stay served. So is a key file that repeats a key: two rows
claiming one key would make the vector served depend on load order (see :func:`check_unique_keys`).
Formats:

- ``npy-dir``: a directory with ``vectors.npy`` (rows x dim, float32 or float16) and optionally
  ``keys.npy`` (integers, one per row; without it a row's key is its index);
- ``npy``: a single ``.npy`` file (key = row index);
- ``hugectr``: HugeCTR's sparse-model directory, ``key`` (raw int64) and ``emb_vector`` (raw float32,
  rows x dim, same order), so HPS users migrate their files as they are.

A float32 source for a float16 table is converted chunk by chunk (values beyond float16's range
become inf, as NumPy casts, and are logged); float16 into float32 is exact.

With a checkpoint file, the loader records after each chunk written to every tier how many rows are
done (a small JSON file replaced atomically), and a re-run against the same source (same files,
sizes and mtimes) and tiers resumes after them. The checkpoint is removed once the table is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from node_agent.errors import InvalidArgumentError, TableSourceError
from node_agent.spec import ModelSpec, TableSpec, resolve_source
from node_agent.tiers.base import Tier

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hps.dev/load-checkpoint/v1"
#: working memory of the duplicate-key check (see :func:`check_unique_keys`)
KEY_CHECK_MEMORY = 512 * 2**20
#: how many of the duplicate keys an error names
DUPLICATES_NAMED = 5
_SOURCE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True)
class TableSource:
    """A table's source, opened and checked: memory-mapped vectors and, when the source has them, keys."""

    table: str
    format: str
    path: Path
    vectors_file: Path
    vectors: np.ndarray
    #: both ``None``: a row's key is its index
    keys_file: Path | None
    keys: np.ndarray | None

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.vectors_file,) if self.keys_file is None else (self.vectors_file, self.keys_file)

    def fingerprint(self, table: TableSpec) -> str:
        """What a table was loaded from and as: the files (path, size, mtime) and the spec's shape. A
        store holding this fingerprint for the table holds these rows or newer ones (updates)."""
        shape = {"rows": table.rows, "dim": table.dim, "dtype": table.dtype, "defaultValue": table.default_value}
        return json.dumps({"source": self.identity(), "shape": shape}, sort_keys=True, separators=(",", ":"))

    def identity(self) -> list[dict[str, Any]]:
        """What a checkpoint remembers of the source: each file's path, size and mtime."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append({"path": str(f.resolve()), "size": st.st_size, "mtimeNs": st.st_mtime_ns})
        return out


@dataclass(frozen=True)
class LoadReport:
    """What one table's load did. ``rows``/``bytes``/``seconds`` count this run only; ``resumed_from``
    is the row a checkpoint let it start at (0 for a fresh load)."""

    table: str
    source: str
    format: str
    rows: int
    total_rows: int
    bytes: int
    seconds: float
    rows_per_s: float
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- opening sources -----------------------------------------------------------------------------


def open_source(table: TableSpec, *, base_dir: Path | None = None) -> TableSource:
    """Finds, maps and checks the source of ``table``; raises :class:`TableSourceError` naming the file."""
    if not table.source:
        raise TableSourceError(f"table {table.name!r} has no source to load from")
    path = resolve_source(table.source, base=base_dir)
    if not path.exists():
        raise TableSourceError(f"{path}: source of table {table.name!r} does not exist")
    if path.is_file():
        source = TableSource(table.name, "npy", path, path, _open_npy(path), None, None)
    elif (path / "vectors.npy").exists():
        vectors_file = path / "vectors.npy"
        keys_file = path / "keys.npy"
        vectors = _open_npy(vectors_file)
        if keys_file.exists():
            source = TableSource(
                table.name, "npy-dir", path, vectors_file, vectors, keys_file, _open_npy(keys_file)
            )
        else:
            source = TableSource(table.name, "npy-dir", path, vectors_file, vectors, None, None)
    elif (path / "emb_vector").exists() or (path / "key").exists():
        source = _open_hugectr(path, table)
    else:
        raise TableSourceError(
            f"{path}: no table source found for {table.name!r}: expected vectors.npy (and optionally "
            "keys.npy), or HugeCTR's key and emb_vector files, or a path to a .npy file"
        )
    _check_against_spec(source, table)
    if source.keys is not None and source.keys_file is not None:
        check_unique_keys(source.keys, source.keys_file)
    return source


#: the first bytes of every .npy file (NumPy's format: the magic string, then the version)
_NPY_MAGIC = b"\x93NUMPY"


def _open_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except FileNotFoundError:
        raise TableSourceError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise TableSourceError(f"{path}: is a directory, not a .npy file") from None
    except OSError as exc:
        raise TableSourceError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if head != _NPY_MAGIC:
        # without this check NumPy tries the file as a pickle and suggests allow_pickle=True
        what = "it is empty" if not head else "it does not start with NumPy's .npy header"
        raise TableSourceError(f"{path}: not a .npy file ({what}); write tables with numpy.save")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise TableSourceError(f"{path}: file does not exist") from None
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc)
        if "mmap length is greater than file size" in reason:
            reason = "file is truncated: shorter than its header says"
        elif isinstance(exc, EOFError) or "pickled" in reason or "EOF" in reason:
            reason = f"not a valid .npy file ({reason})"
        raise TableSourceError(f"{path}: {reason}") from None
    if not isinstance(array, np.ndarray):
        raise TableSourceError(f"{path}: not a single array (.npz archives are not a table source)")
    return array


def _raw_file(path: Path, dtype: str, row_bytes: int, what: str) -> tuple[np.ndarray, int]:
    """Memory-maps a raw HugeCTR file of ``row_bytes`` rows; returns the flat array and its row count."""
    size = path.stat().st_size
    if size % row_bytes:
        raise TableSourceError(f"{path}: size {size} bytes is not a multiple of {what} ({row_bytes} bytes)")
    if size == 0:
        return np.empty(0, dtype=dtype), 0
    try:
        return np.memmap(path, dtype=dtype, mode="r"), size // row_bytes
    except (ValueError, OSError) as exc:
        raise TableSourceError(f"{path}: cannot be read: {exc}") from None


def _open_hugectr(path: Path, table: TableSpec) -> TableSource:
    key_file, vector_file = path / "key", path / "emb_vector"
    for needed in (key_file, vector_file):
        if not needed.exists():
            raise TableSourceError(f"{needed}: missing from HugeCTR sparse-model directory {path}")
    keys, key_rows = _raw_file(key_file, "<i8", 8, "8 (int64 keys)")
    flat, vector_rows = _raw_file(vector_file, "<f4", table.dim * 4, f"dim x 4 = {table.dim} x 4")
    if key_rows != vector_rows:
        raise TableSourceError(
            f"{vector_file}: holds {vector_rows} rows but {key_file} holds {key_rows} keys; they must match"
        )
    vectors = flat.reshape(vector_rows, table.dim)
    return TableSource(table.name, "hugectr", path, vector_file, vectors, key_file, keys)


def _check_against_spec(source: TableSource, table: TableSpec) -> None:
    vectors_file = source.vectors_file
    v = source.vectors
    if v.ndim != 2:
        raise TableSourceError(f"{vectors_file}: expected a 2-D array (rows x dim), got shape {v.shape}")
    if v.dtype not in _SOURCE_DTYPES:
        raise TableSourceError(f"{vectors_file}: has dtype {v.dtype}; expected float32 or float16")
    if v.shape[1] != table.dim:
        raise TableSourceError(
            f"{vectors_file}: has dim {v.shape[1]}, the spec of {table.name!r} says dim: {table.dim}"
        )
    if v.shape[0] != table.rows:
        raise TableSourceError(
            f"{vectors_file}: has {v.shape[0]} rows, the spec of {table.name!r} says rows: {table.rows}"
        )
    if source.keys is None or source.keys_file is None or source.format == "hugectr":
        return
    keys_file = source.keys_file
    k = source.keys
    if k.ndim != 1 or k.dtype.kind not in "iu" or (k.dtype.kind == "u" and k.dtype.itemsize >= 8):
        raise TableSourceError(f"{keys_file}: expected a 1-D int64 array, got {k.dtype} with shape {k.shape}")
    if len(k) != v.shape[0]:
        raise TableSourceError(f"{keys_file}: holds {len(k)} keys but {vectors_file} holds {v.shape[0]} rows")


# -- duplicate keys ------------------------------------------------------------------------------

#: bytes per key the check holds at its peak: the int64 keys of a batch and of the distinct keys seen
#: so far, their concatenation, its sorted copy and the masks ``np.unique`` builds
_CHECK_BYTES_PER_KEY = 32


def check_unique_keys(
    keys: np.ndarray, file: Path, *, memory: int = KEY_CHECK_MEMORY, spill_dir: Path | None = None
) -> None:
    """Raises :class:`TableSourceError` naming ``file``, how many rows repeat a key of an earlier row
    and the smallest few repeated keys, when ``keys`` (a memory-mapped key file) is not all distinct.

    Memory is bounded by ``memory`` bytes (about ``memory / 32`` keys in work at once), whatever the
    file's size. Keys that fit are checked in one sort. A larger file is read once in batches and
    split by a hash of the key into bucket files under ``spill_dir`` (the system's temporary
    directory by default; they need as much disk as the key file and are removed after), so equal
    keys share a bucket and each bucket, about half the working set, is checked on its own. A bucket
    that many copies of one key made too big is still checked in batches, keeping only its distinct
    keys in memory."""
    batch = max(2, memory // _CHECK_BYTES_PER_KEY)
    total = int(keys.shape[0])
    if total <= batch:
        repeated, named = _repeated_keys([keys], batch)
    else:
        buckets = -(-2 * total // batch)
        with tempfile.TemporaryDirectory(prefix="hps-key-check-", dir=spill_dir) as scratch:
            spilled = [
                np.memmap(p, dtype=np.int64, mode="r")
                for p in _spill_by_hash(keys, Path(scratch), buckets, batch)
            ]
            repeated, named = 0, np.empty(0, dtype=np.int64)
            for bucket in spilled:
                count, found = _repeated_keys([bucket], batch)
                repeated += count
                named = np.unique(np.concatenate([named, found]))[:DUPLICATES_NAMED]
            del spilled  # unmapped before the directory goes
    if repeated:
        listed = ", ".join(str(int(k)) for k in named)
        more = ", ..." if repeated > len(named) else ""
        raise TableSourceError(
            f"{file}: {repeated} duplicate key(s) among {total} rows (rows repeating the key of another "
            f"row; which vector a lookup would get depends on load order): keys {listed}{more}"
        )


def _repeated_keys(arrays: Sequence[np.ndarray], batch: int) -> tuple[int, np.ndarray]:
    """How many entries repeat an earlier one across ``arrays``, and the smallest few keys repeated.

    Reads ``batch`` keys at a time and keeps the sorted distinct keys seen so far, so the memory is
    the distinct keys plus one batch."""
    seen = np.empty(0, dtype=np.int64)
    named = np.empty(0, dtype=np.int64)
    total = 0
    for array in arrays:
        for lo in range(0, int(array.shape[0]), batch):
            chunk = np.sort(np.asarray(array[lo : lo + batch]).astype(np.int64, copy=False))
            total += len(chunk)
            repeats = chunk[1:] == chunk[:-1]
            within = chunk[1:][repeats]
            distinct = chunk[np.concatenate(([True], ~repeats))]  # sorted already: no second sort
            if len(seen):
                across = distinct[np.isin(distinct, seen, assume_unique=True)]
                seen = np.union1d(seen, distinct)
            else:
                across, seen = within[:0], distinct
            if len(within) or len(across):
                named = np.unique(np.concatenate([named, within, across]))[:DUPLICATES_NAMED]
    return total - len(seen), named


def _spill_by_hash(keys: np.ndarray, scratch: Path, buckets: int, batch: int) -> list[Path]:
    """Appends every key to the bucket file its hash picks; returns the bucket files written."""
    paths = [scratch / f"bucket-{b}.i64" for b in range(buckets)]
    for lo in range(0, int(keys.shape[0]), batch):
        chunk = np.asarray(keys[lo : lo + batch]).astype(np.int64, copy=False)
        bucket = _mix64(chunk) % np.uint64(buckets)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(buckets + 1, dtype=np.uint64))
        ordered = chunk[order]
        for b in range(buckets):
            if bounds[b] < bounds[b + 1]:
                with paths[b].open("ab") as out:
                    ordered[bounds[b] : bounds[b + 1]].tofile(out)
    return [p for p in paths if p.exists()]


def _mix64(keys: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: spreads keys with structure in their low bits (strides, ids with a type
    tag) evenly over the buckets."""
    z = keys.view(np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


# -- checkpoints ---------------------------------------------------------------------------------


def _checkpoint_state(source: TableSource, tiers: Sequence[Tier]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "table": source.table,
        "source": source.identity(),
        "tiers": [t.name for t in tiers],
    }


def _read_checkpoint(path: Path, expected: dict[str, Any], rows: int) -> int:
    """Rows already loaded according to ``path``; 0 when it is absent, unreadable or for another source."""
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable load checkpoint %s: %s", path, exc)
        return 0
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        log.info("load checkpoint %s is for another source or other tiers: loading from the start", path)
        return 0
    done = recorded.get("rowsDone")
    return done if isinstance(done, int) and 0 <= done <= rows else 0


def _write_checkpoint(path: Path, state: dict[str, Any], rows_done: int) -> None:
    """Replaces ``path`` atomically: a crash leaves the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**state, "rowsDone": rows_done}, sort_keys=True))
    os.replace(tmp, path)


# -- loading -------------------------------------------------------------------------------------


def load_source(
    source: TableSource,
    table: TableSpec,
    *,
    tiers: Sequence[Tier],
    chunk_rows: int = 65536,
    progress: bool = False,
    checkpoint: Path | None = None,
) -> LoadReport:
    """Streams an opened source into every tier, ``chunk_rows`` rows at a time."""
    if chunk_rows < 1:
        raise InvalidArgumentError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if not tiers:
        raise InvalidArgumentError("no tier to load into")
    dtype = np.dtype(table.dtype)
    state = _checkpoint_state(source, tiers) if checkpoint is not None else {}
    start = _read_checkpoint(checkpoint, state, source.rows) if checkpoint is not None else 0
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if start:
        log.info("table %r: resuming at row %d of %d from %s", table.name, start, source.rows, checkpoint)
    began = time.perf_counter()
    overflowed = 0
    with tqdm(total=source.rows, initial=start, unit="row", unit_scale=True, desc=table.name,
              disable=not progress) as bar:  # fmt: skip
        for lo in range(start, source.rows, chunk_rows):
            hi = min(lo + chunk_rows, source.rows)
            keys, values, chunk_overflowed = _read_chunk(source, lo, hi, dtype)
            overflowed += chunk_overflowed
            for tier in tiers:
                tier.insert(table.name, keys, values)
            if checkpoint is not None:
                _write_checkpoint(checkpoint, state, hi)
            bar.update(hi - lo)
    seconds = time.perf_counter() - began
    if checkpoint is not None:
        with contextlib.suppress(FileNotFoundError):
            checkpoint.unlink()
    if overflowed:
        log.warning(
            "table %r: %d values beyond float16's range became inf in the conversion", table.name, overflowed
        )
    loaded = source.rows - start
    return LoadReport(
        table=table.name,
        source=str(source.path),
        format=source.format,
        rows=loaded,
        total_rows=source.rows,
        bytes=loaded * table.row_bytes,
        seconds=seconds,
        rows_per_s=loaded / seconds if seconds > 0 else 0.0,
        resumed_from=start,
    )


def _read_chunk(source: TableSource, lo: int, hi: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows ``[lo, hi)`` read off the mapped files, in the table's dtype, and how many values the
    conversion to float16 pushed to inf."""
    file = source.vectors_file
    try:
        raw = np.asarray(source.vectors[lo:hi])
        values = raw.astype(dtype, copy=False)
        overflowed = 0
        if values.dtype != raw.dtype and dtype == np.float16:
            overflowed = int(np.count_nonzero(np.isinf(values) & np.isfinite(raw)))
        if source.keys is None or source.keys_file is None:
            keys = np.arange(lo, hi, dtype=np.int64)
        else:
            file = source.keys_file
            keys = np.asarray(source.keys[lo:hi]).astype(np.int64, copy=False)
    except OSError as exc:
        raise TableSourceError(f"{file}: read failed at rows {lo}..{hi}: {exc}") from None
    return keys, values, overflowed


def load_table(
    table: TableSpec,
    *,
    tiers: Sequence[Tier],
    base_dir: Path | None = None,
    chunk_rows: int = 65536,
    progress: bool = False,
    checkpoint: Path | None = None,
) -> LoadReport:
    """Opens and checks ``table``'s source, then streams it into ``tiers``."""
    source = open_source(table, base_dir=base_dir)
    return load_source(
        source, table, tiers=tiers, chunk_rows=chunk_rows, progress=progress, checkpoint=checkpoint
    )


def checkpoint_path(directory: Path, model: str, table: str) -> Path:
    return directory / f"{model}.{table}.load.json"


def select_tables(model: ModelSpec, tables: Iterable[str] | None = None) -> list[TableSpec]:
    """The tables named (an unknown name is an :class:`InvalidArgumentError`), or every table with a
    source; tables without one fill from online updates."""
    if tables is None:
        for skipped in (t for t in model.tables if not t.source):
            log.info("table %r has no source: not loaded (it fills from online updates)", skipped.name)
        return [t for t in model.tables if t.source]
    names = list(tables)
    known = {t.name for t in model.tables}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidArgumentError(
            f"model {model.name!r} has no table {', '.join(map(repr, unknown))}; it has {', '.join(sorted(known))}"
        )
    return [model.table(n) for n in names]


def load_model(
    model: ModelSpec,
    *,
    tiers: Sequence[Tier],
    base_dir: Path | None = None,
    tables: Iterable[str] | None = None,
    chunk_rows: int = 65536,
    progress: bool = False,
    checkpoint_dir: Path | None = None,
) -> list[LoadReport]:
    """Loads the model's tables (``tables``, or every table with a source), one after the other.

    Every source is opened and checked before the first row is written: one bad file fails the
    whole load up front and leaves the tiers as they were."""
    sources = [(open_source(t, base_dir=base_dir), t) for t in select_tables(model, tables)]
    return [
        load_source(
            source, table, tiers=tiers, chunk_rows=chunk_rows, progress=progress,
            checkpoint=checkpoint_path(checkpoint_dir, model.name, table.name) if checkpoint_dir else None,
        )
        for source, table in sources
    ]  # fmt: skip
