"""``hps plan -f MODEL.yaml``: the placement plan of a model and its metrics, as JSON or a summary table.

The edge around the pure planner (:func:`hps_operator.core.planner.plan_placement`): reads the model
file and an optional previous plan, applies the topology flags, and prints. An unplaceable model is an
:class:`InsufficientGPUMemoryError`, which the ``hps`` dispatcher turns into one line naming the bytes
needed and available, and its exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_agent.errors import InvalidArgumentError, InvalidSpecError

if TYPE_CHECKING:
    from node_agent.plan import Plan


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan the placement of a model's tables on GPUs",
        description=(
            "Plan where each embedding table (whole, or as hash-bucket ranges) is cached: on which "
            "partition and GPU of every replica. With --previous, re-plan from an existing plan, "
            "moving as little as the balance target (spec.placement.maxImbalance) allows."
        ),
    )
    parser.add_argument("-f", "--file", type=Path, required=True, help="the EmbeddingModel YAML file")
    parser.add_argument("--gpus-per-pod", type=int, metavar="G", help="override spec.gpusPerPod")
    parser.add_argument(
        "--partitions", type=int, metavar="P", help="override spec.partitions (0: the smallest that fits)"
    )
    parser.add_argument(
        "--gpu-memory", metavar="QUANTITY", help="override spec.cache.memoryPerGPU (e.g. 16Gi)"
    )
    parser.add_argument("--previous", type=Path, metavar="PLAN.json", help="the plan to re-plan from")
    parser.add_argument(
        "-o", "--output", choices=("json", "table"), default="table", help="output format (default: table)"
    )
    parser.set_defaults(func=run)


def read_plan(path: Path) -> Plan:
    """A plan file as ``hps plan -o json`` wrote it; anything else is an error naming the file."""
    from node_agent.plan import Plan

    try:
        return Plan.from_json(path.read_text())
    except FileNotFoundError:
        raise InvalidSpecError(str(path), "file not found") from None
    except KeyError as exc:
        raise InvalidSpecError(str(path), f"not a placement plan: it has no {exc} field") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidSpecError(str(path), f"not a placement plan: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from hps_operator.core.planner import plan_placement
    from hps_operator.core.topology import Topology

    from node_agent.spec import load_model_file

    for flag, value, least in (
        ("--gpus-per-pod", args.gpus_per_pod, 1),
        ("--partitions", args.partitions, 0),
    ):
        if value is not None and value < least:
            raise InvalidArgumentError(f"{flag} must be at least {least}, got {value}")
    model = load_model_file(args.file)
    try:
        topology = Topology.from_model(
            model, gpus_per_pod=args.gpus_per_pod, partitions=args.partitions, gpu_memory=args.gpu_memory
        )
    except InvalidSpecError as exc:
        if exc.field != "gpuMemory":
            raise
        raise InvalidArgumentError(f"--gpu-memory: {exc.detail}") from None
    previous = read_plan(args.previous) if args.previous is not None else None
    if previous is not None and previous.model and previous.model != model.name:
        # its version, bucket count and assignments would be carried over into an unrelated plan
        raise InvalidArgumentError(
            f"--previous {args.previous}: a plan of model {previous.model!r}, not {model.name!r}"
        )
    plan = plan_placement(model, topology, previous)
    if args.output == "json":
        sys.stdout.write(render_json(plan))
    else:
        sys.stdout.write(render_summary(plan))
    return 0


def render_json(plan: Plan) -> str:
    """The plan document (what ``--previous`` reads back), indented except inside a table's ranges: a
    plan of 10,000 GPUs keeps one line per table instead of one per number."""
    doc = plan.to_dict()
    tables = doc.pop("tables")
    marker = "\u0000tables\u0000"
    doc["tables"] = marker
    text = json.dumps(doc, indent=2, sort_keys=True)
    body = ",\n".join(
        f"    {json.dumps(name)}: {json.dumps(entry, sort_keys=True, separators=(',', ':'))}"
        for name, entry in sorted(tables.items())
    )
    return text.replace(json.dumps(marker), "{\n" + body + "\n  }" if body else "{}") + "\n"


def render_summary(plan: Plan) -> str:
    """A readable table: one row per GPU with its shards, then the plan's metrics."""
    lines = [
        f"model {plan.model}  plan v{plan.version}  strategy {plan.strategy}  "
        f"{plan.partitions} partition(s) x {plan.gpus_per_pod} GPU(s)  {plan.bucket_count} buckets",
        f"{'PARTITION':>9}  {'GPU':>3}  {'BYTES':>10}  SHARDS",
    ]
    slots: dict[tuple[int, int], list[str]] = {}
    used: dict[tuple[int, int], int] = {}
    for a in sorted(plan.assignments, key=lambda a: (a.partition, a.gpu, a.table, a.buckets)):
        key = (a.partition, a.gpu)
        whole = a.buckets == (0, plan.bucket_count)
        slots.setdefault(key, []).append(a.table if whole else f"{a.table}[{a.buckets[0]}:{a.buckets[1]})")
        used[key] = used.get(key, 0) + a.bytes
    for partition in range(plan.partitions):
        for gpu in range(plan.gpus_per_pod):
            key = (partition, gpu)
            shards = ", ".join(slots.get(key, [])) or "-"
            lines.append(f"{partition:>9}  {gpu:>3}  {_size(used.get(key, 0)):>10}  {shards}")
    m = plan.metrics
    lines.append(
        f"imbalance {m.imbalance:.4f}  memoryImbalance {m.memory_imbalance:.4f}  "
        f"totalBytes {m.total_bytes}  movedBytes {m.moved_bytes}  movementLowerBound {m.movement_lower_bound}"
    )
    return "\n".join(lines) + "\n"


def _size(num_bytes: int) -> str:
    for suffix, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.1f}{suffix}"
    return f"{num_bytes}B"
