"""Placement benchmark, in two parts; each prints a table and writes JSON under ``bench/results/``.

**Mixes** (``placement.json``): the planner (``auto``) side by side with the usual baselines on a
Criteo-like and a Meta-like table mix with room to spare (80Gi per GPU), fresh and after rescaling
(N -> N+1, N -> 2N, N -> N-1), plus the planning time of 1,000 tables on 10,000 GPUs. Baselines:
round-robin of whole tables (HugeCTR's localized slots), greedy largest-load-first onto the
least-loaded GPU (the TorchRec / DreamShard baseline), and replicate-everywhere (HPS's default). Every
baseline re-plans from scratch; its movedBytes counts the bytes a GPU holds that it did not hold before,
the same rule as the planner's. ``moved/LB`` divides by the planner's movementLowerBound for the same
change from the planner's own previous plan. ``fits`` says whether every GPU stays within the budget.

**Scale** (``placement-scale.json`` and ``placement-scale.png``, time against size): memory-tight
models through the real ``hps plan`` command, one process per plan (start, reading the model and the
previous plan, planning and printing the JSON all counted), timed from outside (wall clock, what a user
waits) and its CPU time and peak resident memory read by ``/usr/bin/time -v`` (or ``getrusage`` where
that is missing): on a shared machine the wall clock also counts other processes' turns. A model has 100 or 1,000
tables: rows log-normal (median 160k, sigma 2, at most 60M), dim 64 or 128, hotness uniform at random
(seeded). ``--gpu-memory`` is the headroom (1.1, 1.25, 1.5, 2) x the model's bytes over the GPUs of
the fresh plan (64, 1,024 or 10,000 GPUs: 8, 128 or 1,250 pods of 8); the re-plans keep that memory
per GPU on N+1, 2N and N-1 pods, so N-1 has less headroom (at 64 GPUs and 1.1 the model no longer
fits: the command says so, and that is the row's result; ``here`` is each plan's own headroom). The
peer, beside each fresh plan: greedy whole tables, largest load first (TorchRec's baseline). Also: one
plan of 2,500 tables on 64 GPUs, for the size of its document.

    .venv/bin/python bench/placement.py [--repeats 3] [--skip-large] [--skip-mixes] [--skip-scale]

The PNG needs matplotlib (``pip install -e '.[bench]'``); without it the tables and JSON still come.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from hps_operator.core.planner import plan_placement
from hps_operator.core.topology import Topology

from node_agent.plan import Plan
from node_agent.spec import ModelSpec, load_model_file, parse_model_spec

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


# ---------------------------------------------------------------------------------------------
# scale: memory-tight models through `hps plan`

RESULTS = Path(__file__).resolve().parent / "results"
HPS = Path(sys.executable).parent / "hps"
GPUS_PER_POD = 8
SCALE_TABLES = (100, 1000)
SCALE_GPUS = (64, 1024, 10_000)
HEADROOMS = (1.1, 1.25, 1.5, 2.0)
CHANGES = (("fresh", 0), ("N+1", 1), ("2N", None), ("N-1", -1))


def tight_tables(count: int, seed: int = 10) -> list[dict[str, Any]]:
    """The issue's model: rows log-normal (median 160k, sigma 2, capped at 60M), dim 64 or 128, hotness
    uniform at random."""
    rng = np.random.default_rng(seed)
    rows = np.clip(rng.lognormal(np.log(160_000), 2.0, count), 1, 60_000_000).astype(np.int64)
    dims = rng.choice([64, 128], count)
    hotness = rng.uniform(0.0, 1.0, count)
    return [
        {"name": f"t{i}", "rows": int(r), "dim": int(d), "hotness": round(float(h), 6)}
        for i, (r, d, h) in enumerate(zip(rows, dims, hotness, strict=True))
    ]


def write_model(path: Path, tables: list[dict[str, Any]], *, partitions: int, memory: int) -> None:
    import yaml

    doc = {
        "apiVersion": "hps.dev/v1alpha1",
        "kind": "EmbeddingModel",
        "metadata": {"name": "tight"},
        "spec": {"tables": tables, "gpusPerPod": GPUS_PER_POD, "partitions": partitions,
                 "cache": {"memoryPerGPU": memory}},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_hps_plan(args: list[str]) -> tuple[float, float, int, int, str, str]:
    """One ``hps plan`` process: (wall seconds, CPU seconds, peak resident bytes, exit code, stdout, the
    command's error line). On a shared machine the wall time also counts the other processes' turns; the
    CPU time (user + system) is the command's own work."""
    timer = Path("/usr/bin/time")
    if timer.exists():
        command = [str(timer), "-v", str(HPS), "plan", *args]
    else:  # a launcher whose only child is hps: its children's peak is the command's
        launcher = (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "peak = u.ru_maxrss // 1024 if sys.platform == 'darwin' else u.ru_maxrss; "
            "print(f'User time (seconds): {u.ru_utime}', file=sys.stderr); "
            "print(f'System time (seconds): {u.ru_stime}', file=sys.stderr); "
            "print(f'Maximum resident set size (kbytes): {peak}', file=sys.stderr); sys.exit(r.returncode)"
        )
        command = [sys.executable, "-c", launcher, str(HPS), "plan", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", done.stderr))
    errors = "\n".join(line for line in done.stderr.splitlines() if line.startswith("hps plan"))
    return seconds, cpu, int(peak.group(1)) * 1024 if peak else 0, done.returncode, done.stdout, errors


def plan_case(model: Path, previous: Path | None, partitions: int, repeats: int) -> dict[str, Any]:
    args = ["-f", str(model), "--partitions", str(partitions), "-o", "json"]
    if previous is not None:
        args += ["--previous", str(previous)]
    runs = [run_hps_plan(args) for _ in range(repeats)]
    code, out, err = runs[-1][3], runs[-1][4], runs[-1][5]
    row: dict[str, Any] = {"gpus": partitions * GPUS_PER_POD, "seconds": statistics.median(r[0] for r in runs),
                           "cpuSeconds": statistics.median(r[1] for r in runs), "peakBytes": max(r[2] for r in runs)}  # fmt: skip
    if code != 0:
        return {**row, "error": err or f"exit code {code}"}
    plan = Plan.from_json(out)
    m = plan.metrics
    return {**row, "imbalance": m.imbalance, "memoryImbalance": m.memory_imbalance, "movedBytes": m.moved_bytes,
            "lowerBound": m.movement_lower_bound, "reason": m.reason, "shards": len(plan.assignments),
            "bucketCount": plan.bucket_count, "planBytes": len(plan.to_json()), "plan": out}  # fmt: skip


SCALE_HEADER = (f"{'tables':>6}{'GPUs':>7} {'change':<6}{'headroom':>9}{'here':>7}{'s':>6}{'cpu s':>6}{'peak MB':>8}"
                f"{'imbal':>8}{'memImbal':>9}{'moved/LB':>9}{'shards':>8}{'plan KB':>9}  peer, reason")  # fmt: skip


def run_scale(repeats: int, *, tables_counts: tuple[int, ...], gpu_counts: tuple[int, ...],
              headrooms: tuple[float, ...], changes: tuple[tuple[str, int | None], ...] = CHANGES
              ) -> list[dict[str, Any]]:  # fmt: skip
    print(SCALE_HEADER)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for count in tables_counts:
            tables = tight_tables(count)
            total = sum(t["rows"] * t["dim"] * 4 for t in tables)
            for gpus in gpu_counts:
                pods = gpus // GPUS_PER_POD
                for headroom in headrooms:
                    memory = int(headroom * total / gpus)
                    model = work / f"model-{count}-{gpus}-{headroom}.yaml"
                    write_model(model, tables, partitions=pods, memory=memory)
                    previous = work / f"plan-{count}-{gpus}-{headroom}.json"
                    for change, delta in changes:
                        parts = 2 * pods if delta is None else pods + delta
                        row = plan_case(model, None if change == "fresh" else previous, parts, repeats)
                        plan_text = row.pop("plan", None)
                        if change == "fresh":
                            if plan_text is None:
                                break  # no fresh plan: nothing to re-plan from
                            previous.write_text(plan_text)
                            # the peer: greedy whole tables, largest load first (TorchRec's baseline)
                            spec = load_model_file(model)
                            row["greedy"] = layout_metrics(spec, greedy(spec, gpus))
                        row.update({"tables": count, "fromGpus": gpus, "change": change, "headroom": headroom,
                                    "headroomHere": round(memory * parts * GPUS_PER_POD / total, 4)})  # fmt: skip
                        rows.append(row)
                        print_scale_row(row)
    return rows


def print_scale_row(r: dict[str, Any]) -> None:
    common = (f"{r['tables']:>6}{r['gpus']:>7} {r['change']:<6}{r['headroom']:>9.2f}{r['headroomHere']:>7.3f}"
              f"{r['seconds']:>6.2f}{r['cpuSeconds']:>6.2f}{r['peakBytes'] / 2**20:>8.0f}")  # fmt: skip
    if "error" in r:
        print(f"{common}  {r['error'][:90]}")
        return
    ratio = "-" if r["change"] == "fresh" else (f"{r['movedBytes'] / r['lowerBound']:.3f}" if r["lowerBound"] else
                                                ("0 of 0" if r["movedBytes"] == 0 else "inf"))  # fmt: skip
    peer = ""
    if "greedy" in r:
        g = r["greedy"]
        peer = f"greedy: imbalance {g['imbalance']:.3f}, {'fits' if g['fits'] else 'does NOT fit'}  "
    print(f"{common}{r['imbalance']:>8.4f}{r['memoryImbalance']:>9.4f}{ratio:>9}{r['shards']:>8}"
          f"{r['planBytes'] / 1024:>9.0f}  {peer}{r['reason'][:60]}")


def plot_scale(rows: list[dict[str, Any]], out: Path) -> bool:
    """Seconds against GPUs, one line per change (the median over the headrooms, bars from the fastest to
    the slowest; dashed, the CPU time), one panel per model size; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(SCALE_TABLES), figsize=(11, 4.2), sharey=True)
    for ax, count in zip(axes, SCALE_TABLES, strict=True):
        for change, _ in CHANGES:
            xs, mid, low, high, cpu = [], [], [], [], []
            for gpus in SCALE_GPUS:
                case = [r for r in rows
                        if (r["tables"], r["fromGpus"], r["change"]) == (count, gpus, change) and "error" not in r]  # fmt: skip
                if case:
                    times = [r["seconds"] for r in case]
                    xs.append(gpus)
                    mid.append(statistics.median(times))
                    low.append(mid[-1] - min(times))
                    high.append(max(times) - mid[-1])
                    cpu.append(statistics.median(r["cpuSeconds"] for r in case))
            line = ax.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, label=f"{change} (wall)")
            ax.plot(xs, cpu, linestyle="--", color=line.lines[0].get_color(), label=f"{change} (CPU)")
        ax.axhline(2.0, color="red", linestyle=":", label="target: 2 s")
        ax.set_xscale("log")
        ax.set_title(f"{count} tables, headroom 1.1 to 2")
        ax.set_xlabel("GPUs before the change (8 per pod)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("hps plan, start to JSON (s)")
    axes[-1].legend(fontsize=7, ncol=2)
    fig.suptitle("Planning memory-tight models: time against size (median of runs; a shared 2-core machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the median is reported)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 1,000 x 10,000 in-process timing")
    parser.add_argument("--skip-mixes", action="store_true", help="skip the Criteo/Meta mixes and baselines")
    parser.add_argument("--skip-scale", action="store_true", help="skip the memory-tight hps plan cases")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.skip_mixes:
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
        out = RESULTS / "placement.json"
        out.write_text(json.dumps({"budgetPerGPU": BUDGET, "rows": rows, "large": large}, indent=2) + "\n")
        print(f"wrote {out}")
    if not args.skip_scale:
        print(f"\nmemory-tight models through `hps plan` ({os.cpu_count()} CPUs; median of {args.repeats} runs, "
              "peak of their resident memory):")  # fmt: skip
        scale = run_scale(args.repeats, tables_counts=SCALE_TABLES, gpu_counts=SCALE_GPUS, headrooms=HEADROOMS)
        size = run_scale(args.repeats, tables_counts=(2500,), gpu_counts=(64,), headrooms=(1.5,),
                         changes=CHANGES[:1])  # fmt: skip
        out = RESULTS / "placement-scale.json"
        out.write_text(json.dumps({"gpusPerPod": GPUS_PER_POD, "cpus": os.cpu_count(), "repeats": args.repeats,
                                   "rows": scale, "size2500Tables": size}, indent=2) + "\n")  # fmt: skip
        print(f"wrote {out}")
        png = RESULTS / "placement-scale.png"
        print(f"wrote {png}" if plot_scale(scale, png) else "matplotlib is not installed: no PNG (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
