"""Placement benchmark: the planner (``auto``) side by side with the usual baselines on a Criteo-like and a
Meta-like table mix, fresh and after rescaling (N -> N+1, N -> 2N, N -> N-1), plus the planning time of
1,000 tables on 10,000 GPUs. Prints a table and writes ``bench/results/placement.json``.

Baselines: round-robin of whole tables (HugeCTR's localized slots), greedy largest-load-first onto the
least-loaded GPU (the TorchRec / DreamShard baseline), and replicate-everywhere (HPS's default). Every
baseline re-plans from scratch; its movedBytes counts the bytes a GPU holds that it did not hold before,
the same rule as the planner's. ``moved/LB`` divides by the planner's movementLowerBound for the same
change from the planner's own previous plan. ``fits`` says whether every GPU stays within the budget.

    .venv/bin/python bench/placement.py [--repeats 3] [--skip-large]
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from hps_operator.core.planner import plan_placement
from hps_operator.core.topology import Topology

from node_agent.spec import ModelSpec, parse_model_spec

#: Criteo-1TB's 26 categorical cardinalities (public); at dim 128 float32 the tables hold 96 GB
CRITEO_ROWS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip
BUDGET = "80Gi"
#: (table, slot) pairs a layout places whole tables on
Layout = dict[int, list[str]]


def criteo_model(gpus: int) -> ModelSpec:
    tables = [{"name": f"c{i}", "rows": r, "dim": 128} for i, r in enumerate(CRITEO_ROWS)]
    return _model("criteo", tables, 1, partitions=gpus)


def meta_model(gpus: int, *, count: int = 850, seed: int = 42, gpus_per_pod: int = 1) -> ModelSpec:
    """~850 tables: log-normal row counts, mixed dims, Zipf-skewed hotness shuffled against size."""
    rng = np.random.default_rng(seed)
    rows = np.maximum(rng.lognormal(12.0, 2.0, count), 16).astype(np.int64)
    dims = rng.choice([32, 64, 128, 256], count)
    hotness = 1.0 / np.arange(1, count + 1) ** 1.05
    rng.shuffle(hotness)
    tables = [
        {"name": f"m{i}", "rows": int(r), "dim": int(d), "hotness": float(h)}
        for i, (r, d, h) in enumerate(zip(rows, dims, hotness, strict=True))
    ]
    return _model("meta", tables, gpus_per_pod, partitions=gpus // gpus_per_pod)


def _model(name: str, tables: list[dict[str, Any]], gpus_per_pod: int, *, partitions: int) -> ModelSpec:
    """The N GPUs of the rescaling runs are N one-GPU pods (a pod has at most 64 GPUs)."""
    return parse_model_spec(
        name,
        {
            "tables": tables,
            "gpusPerPod": gpus_per_pod,
            "partitions": partitions,
            "cache": {"memoryPerGPU": BUDGET},
        },
    )


# ---------------------------------------------------------------------------------------------
# baselines: whole tables (or everything everywhere), planned from scratch


def round_robin(model: ModelSpec, slots: int) -> Layout:
    layout: Layout = {s: [] for s in range(slots)}
    for i, table in enumerate(model.tables):
        layout[i % slots].append(table.name)
    return layout


def greedy(model: ModelSpec, slots: int) -> Layout:
    hot = model.hotness()
    layout: Layout = {s: [] for s in range(slots)}
    heap = [(0.0, s) for s in range(slots)]
    for table in sorted(model.tables, key=lambda t: (-hot[t.name] * t.row_bytes, t.name)):
        load, s = heapq.heappop(heap)
        layout[s].append(table.name)
        heapq.heappush(heap, (load + hot[table.name] * table.row_bytes, s))
    return layout


def replicate(model: ModelSpec, slots: int) -> Layout:
    return {s: [t.name for t in model.tables] for s in range(slots)}


BASELINES: dict[str, Callable[[ModelSpec, int], Layout]] = {
    "round-robin": round_robin,
    "greedy": greedy,
    "replicate": replicate,
}


def layout_metrics(model: ModelSpec, layout: Layout) -> dict[str, Any]:
    hot = model.hotness()
    copies = {t.name: sum(t.name in names for names in layout.values()) for t in model.tables}
    # replicated tables split their traffic over the GPUs holding them
    load = np.array(
        [sum(hot[n] * model.table(n).row_bytes / copies[n] for n in names) for names in layout.values()]
    )
    used = np.array(
        [sum(model.table(n).total_bytes for n in names) for names in layout.values()], dtype=float
    )
    return {
        "imbalance": float(load.max() / load.mean()),
        "memoryImbalance": float(used.max() / used.mean()),
        "fits": bool(used.max() <= model.cache.memory_per_gpu),
    }


def layout_moved(model: ModelSpec, before: Layout, after: Layout) -> int:
    return sum(
        model.table(n).total_bytes for s, names in after.items() for n in names if n not in before.get(s, ())
    )


# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def run_mix(name: str, build: Callable[[int], ModelSpec], gpus: int, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    model = build(gpus)
    first, seconds = timed(lambda: plan_placement(model, Topology.from_model(model)), repeats)
    m = first.metrics
    rows.append({"mix": name, "gpus": gpus, "change": "fresh", "method": "planner", "imbalance": m.imbalance,
                 "memoryImbalance": m.memory_imbalance, "fits": True, "movedBytes": 0, "lowerBound": 0,
                 "planSeconds": seconds})  # fmt: skip
    for method, baseline in BASELINES.items():
        layout, seconds = timed(partial(baseline, model, gpus), repeats)
        rows.append({"mix": name, "gpus": gpus, "change": "fresh", "method": method, **layout_metrics(model, layout),
                     "movedBytes": 0, "lowerBound": 0, "planSeconds": seconds})  # fmt: skip
    for change, after_gpus in (("N+1", gpus + 1), ("2N", 2 * gpus), ("N-1", gpus - 1)):
        resized = build(after_gpus)
        after, seconds = timed(partial(plan_placement, resized, Topology.from_model(resized), first), repeats)
        m = after.metrics
        bound = m.movement_lower_bound
        rows.append({"mix": name, "gpus": gpus, "change": change, "method": "planner", "imbalance": m.imbalance,
                     "memoryImbalance": m.memory_imbalance, "fits": True, "movedBytes": m.moved_bytes,
                     "lowerBound": bound, "planSeconds": seconds})  # fmt: skip
        for method, baseline in BASELINES.items():
            before_layout = baseline(model, gpus)
            layout, seconds = timed(partial(baseline, resized, after_gpus), repeats)
            rows.append({"mix": name, "gpus": gpus, "change": change, "method": method,
                         **layout_metrics(resized, layout), "movedBytes": layout_moved(resized, before_layout, layout),
                         "lowerBound": bound, "planSeconds": seconds})  # fmt: skip
    return rows


def run_large(repeats: int) -> dict[str, Any]:
    """1,000 tables on 1,250 pods x 8 GPUs: a fresh plan, then one pod added (N -> N+8 GPUs)."""
    model = meta_model(10_000, count=1000, seed=7, gpus_per_pod=8)
    topology = Topology.from_model(model)
    plan, fresh = timed(lambda: plan_placement(model, topology), repeats)
    grown = topology.with_partitions(1251)
    after, replan = timed(lambda: plan_placement(model, grown, plan), repeats)
    return {"tables": 1000, "gpus": topology.slots, "freshSeconds": fresh, "replanSeconds": replan,
            "assignments": len(plan.assignments), "bucketCount": plan.bucket_count,
            "imbalance": plan.metrics.imbalance, "replanImbalance": after.metrics.imbalance,
            "replanMovedOverBound": after.metrics.moved_bytes / max(after.metrics.movement_lower_bound, 1)}  # fmt: skip


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'mix':<7}{'GPUs':>5} {'change':<6} {'method':<12}{'imbal':>8}{'memImbal':>9}{'fits':>6}" \
             f"{'moved GB':>10}{'moved/LB':>10}{'ms':>9}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = (
            r["movedBytes"] / r["lowerBound"]
            if r["lowerBound"]
            else (0.0 if r["movedBytes"] == 0 else float("inf"))
        )
        ratio_text = "-" if r["change"] == "fresh" else ("inf" if ratio == float("inf") else f"{ratio:.3f}")
        print(f"{r['mix']:<7}{r['gpus']:>5} {r['change']:<6} {r['method']:<12}{r['imbalance']:>8.3f}"
              f"{r['memoryImbalance']:>9.3f}{'yes' if r['fits'] else 'NO':>6}{r['movedBytes'] / 1e9:>10.2f}"
              f"{ratio_text:>10}{r['planSeconds'] * 1000:>9.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the median is reported)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 1,000 x 10,000 timing")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for gpus in (8, 16, 64):
        rows += run_mix("criteo", criteo_model, gpus, args.repeats)
    for gpus in (8, 16, 64):
        rows += run_mix("meta", meta_model, gpus, args.repeats)
    print_table(rows)
    large = None if args.skip_large else run_large(args.repeats)
    if large is not None:
        print(f"\n1,000 tables x {large['gpus']} GPUs: fresh plan {large['freshSeconds']:.3f} s, re-plan after "
              f"+8 GPUs {large['replanSeconds']:.3f} s ({large['assignments']} assignments, B={large['bucketCount']}, "
              f"imbalance {large['imbalance']:.3f} -> {large['replanImbalance']:.3f}, "
              f"moved/LB {large['replanMovedOverBound']:.3f}); median of {args.repeats}")  # fmt: skip
    out = Path(__file__).resolve().parent / "results" / "placement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budgetPerGPU": BUDGET, "rows": rows, "large": large}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
