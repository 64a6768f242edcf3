"""Generates the embedding tables an example model's sources point at (default: ``demo.yaml`` beside
this script), seeded so every run writes the same vectors; a table whose files are already there with
the right shape and dtype is skipped, so running it again is cheap.

Each ``file://`` source becomes a directory holding ``vectors.npy`` (rows x dim in the table's dtype;
a row's key is its index), or a single ``.npy`` file when the source names one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from node_agent.spec import TableSpec, load_model_file, resolve_source


def table_vectors(table: TableSpec, *, seed: int) -> np.ndarray:
    """The table's rows: small normal values, different per table, identical across runs."""
    # the table name goes into the seed so adding a table does not change the others' vectors
    rng = np.random.default_rng([seed, *table.name.encode()])
    return (rng.standard_normal((table.rows, table.dim), dtype=np.float32) * 0.1).astype(table.dtype)


def vectors_file(table: TableSpec, base: Path) -> Path:
    if table.source is None:
        raise SystemExit(f"table {table.name} has no source to generate")
    path = resolve_source(table.source, base=base)
    return path if path.suffix == ".npy" else path / "vectors.npy"


def already_there(path: Path, table: TableSpec) -> bool:
    try:
        existing = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return existing.shape == (table.rows, table.dim) and existing.dtype == np.dtype(table.dtype)


def write_npy(path: Path, values: np.ndarray) -> None:
    """Writes through a temporary name so an interrupted run never leaves a truncated table behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, values)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--file", default=str(Path(__file__).with_name("demo.yaml")),
                        help="the EmbeddingModel YAML whose sources to generate (default: demo.yaml here)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--force", action="store_true", help="rewrite tables that are already there")
    args = parser.parse_args(argv)
    model_file = Path(args.file).resolve()
    model = load_model_file(model_file)
    for table in model.tables:
        path = vectors_file(table, model_file.parent)
        if not args.force and already_there(path, table):
            print(f"{table.name}: {path} already there ({table.rows}x{table.dim} {table.dtype})")
            continue
        write_npy(path, table_vectors(table, seed=args.seed))
        print(f"{table.name}: wrote {path} ({table.rows}x{table.dim} {table.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
