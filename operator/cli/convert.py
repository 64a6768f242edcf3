"""``hps convert-hps-config hps.json > model.yaml``: migrates a HugeCTR HPS configuration.

The edge around the pure converter (:mod:`hps_operator.core.hps_config`): reads the JSON, measures
each table's HugeCTR sparse-model directory (rows = size of ``key`` / 8), writes the
``EmbeddingModel`` documents to stdout (or ``-o``) and every setting without an equivalent to stderr
as ``# note:`` lines, so the YAML on stdout can be piped straight into ``kubectl apply -f -``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from node_agent.errors import InvalidArgumentError, InvalidSpecError, TableSourceError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert-hps-config",
        help="convert a HugeCTR HPS JSON configuration into EmbeddingModel YAML",
        description=(
            "Convert a HugeCTR HPS JSON configuration into EmbeddingModel manifests (one per model) on "
            "stdout. Row counts are read from each table's sparse-model directory ('key' holds one "
            "int64 per row); relative paths are read relative to the JSON file and written relative to "
            "where the YAML goes (the -o file's folder, else the current directory), where hps load and "
            "hps local up read them. Settings with no equivalent are listed on stderr as '# note:' lines."
        ),
    )
    parser.add_argument("config", type=Path, help="the HPS JSON configuration file")
    parser.add_argument(
        "--rows",
        action="append",
        default=[],
        metavar="TABLE=N",
        help="row count of a table whose sparse files are not readable here (repeatable; HPS or converted name)",
    )
    parser.add_argument("-n", "--namespace", help="metadata.namespace of the generated models")
    parser.add_argument("-o", "--output", type=Path, help="write the YAML here instead of stdout")
    parser.set_defaults(func=run)


def parse_rows(values: list[str]) -> dict[str, int]:
    """``["user_id=1000", ...]`` → ``{"user_id": 1000}``."""
    rows: dict[str, int] = {}
    for value in values:
        table, sep, count = value.partition("=")
        if not sep or not table or not count.strip().isdigit():
            raise InvalidArgumentError(f"--rows {value!r}: expected TABLE=N with N a whole number")
        rows[table.strip()] = int(count)
    return rows


def read_hps_config(path: Path) -> Any:
    """The parsed JSON; a missing file or invalid JSON is an :class:`InvalidSpecError` naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InvalidSpecError(str(path), "file not found") from None
    except OSError as exc:
        raise InvalidSpecError(str(path), f"cannot be read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSpecError(
            str(path), f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def measure_sparse_model(path: Path, *, as_written: str) -> Any:
    """Sizes of a HugeCTR sparse-model directory, or ``None`` when nothing is at ``path``.

    A path that exists but is not such a directory is an error naming what is missing."""
    from hps_operator.core.hps_config import SparseModelFiles

    if not path.exists():
        return None
    if not path.is_dir():
        raise TableSourceError(
            f"{as_written}: not a HugeCTR sparse-model directory (expected a folder holding 'key' and "
            "'emb_vector'; the single-file format of HugeCTR before 3.x is not supported)"
        )
    sizes = {}
    for name in ("key", "emb_vector"):
        member = path / name
        if not member.is_file():
            raise TableSourceError(f"{as_written}/{name}: missing from the HugeCTR sparse-model directory")
        sizes[name] = member.stat().st_size
    return SparseModelFiles(path=as_written, key_bytes=sizes["key"], vector_bytes=sizes["emb_vector"])


def rebase_sparse_files(config: Any, json_dir: Path, yaml_dir: Path) -> dict[str, str]:
    """Rewrites, in ``config``, each relative local ``sparse_files`` path (relative to ``json_dir``, as
    HPS reads it) relative to ``yaml_dir`` instead; returns ``{new: as written in the JSON}`` for the
    paths it changed. Absolute and remote paths stay as they are."""
    changed: dict[str, str] = {}
    models = config.get("models") if isinstance(config, dict) else None
    for model in models if isinstance(models, list) else []:  # anything else: the converter names it
        files = model.get("sparse_files") if isinstance(model, dict) else None
        if not isinstance(files, list):
            continue
        for i, written in enumerate(files):
            if not isinstance(written, str):
                continue
            local = written[len("file://") :] if written.startswith("file://") else written
            if "://" in local or local.startswith("/") or not local:
                continue
            moved = os.path.relpath(json_dir / local, yaml_dir)
            if moved != written:
                files[i] = moved
                changed[moved] = local
    return changed


def run(args: argparse.Namespace) -> int:
    import yaml
    from hps_operator.core.hps_config import convert_hps_config, sparse_file_paths

    config = read_hps_config(args.config)
    base = args.config.resolve().parent
    # a model file's relative sources are read from its own folder: rebase them from the JSON's to it
    rebased = rebase_sparse_files(config, base, (args.output.resolve().parent if args.output else Path.cwd()))
    measured = {}
    for written in sparse_file_paths(config):
        local = written[len("file://") :] if written.startswith("file://") else written
        if "://" in local:
            continue  # remote (hdfs://, s3://): only --rows can give its size
        files = measure_sparse_model(base / rebased.get(local, local), as_written=rebased.get(local, written))
        if files is not None:
            measured[written] = files
    conversion = convert_hps_config(
        config, sparse_files=measured, rows_override=parse_rows(args.rows), namespace=args.namespace
    )
    text = yaml.safe_dump_all(list(conversion.manifests), sort_keys=False, default_flow_style=False)
    if args.output is not None:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    for note in conversion.notes:
        print(f"# note: {note}", file=sys.stderr)
    return 0
