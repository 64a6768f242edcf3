"""What glibc's allocator tuning (``node_agent.allocator``) is worth: the lookup benchmark run with the
tuning off (``HPS_MALLOC_TUNING=off``, glibc's defaults) and on, in alternating runs, each run a fresh
``hps bench lookup`` process (glibc's thresholds are per process, and the agents it starts inherit the
variable). Reports each system's median keys/s and p99 per setting and the on/off ratio, written to
``bench/results/lookup-malloc.json``.

    .venv/bin/python bench/malloc.py [--rounds 3] [--duration 6] [--cache-ratio 0.1] [--systems ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "lookup-malloc.json"
SYSTEMS = "hps,hps_same_node,hps_inproc,hps_inproc_same_node,redis,numpy"


def run_once(tuning: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"lookup-{tuning}.json"
    env = {**os.environ, "HPS_MALLOC_TUNING": tuning}
    command = [sys.executable, "-m", "hps_operator", "bench", "lookup", "--repeat", "1", "--duration",
               str(args.duration), "--cache-ratio", str(args.cache_ratio), "--systems", args.systems,
               "--write", str(out)]  # fmt: skip
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def summarise(runs: dict[str, list[dict[str, Any]]], systems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in systems:
        row: dict[str, Any] = {}
        for tuning, results in runs.items():
            row[tuning] = {
                "keys_per_s": statistics.median(r[system]["keys_per_s"] for r in results),
                "p50_ms": statistics.median(r[system]["p50_ms"] for r in results),
                "p99_ms": statistics.median(r[system]["p99_ms"] for r in results),
                "keys_per_s_each_run": [r[system]["keys_per_s"] for r in results],
            }
        # the ratio of the medians (the runs alternate, so both settings saw the same machine's moods)
        row["on/off"] = round(row["on"]["keys_per_s"] / row["off"]["keys_per_s"], 3)
        out[system] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds each system is measured per run")
    parser.add_argument("--cache-ratio", type=float, default=0.1)
    parser.add_argument("--systems", default=SYSTEMS)
    parser.add_argument("--write", default=str(RESULTS))
    args = parser.parse_args()
    systems = args.systems.split(",")
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="hps-malloc-") as tmp:
        for round_ in range(args.rounds):
            for tuning in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                print(f"round {round_ + 1}/{args.rounds}: tuning {tuning} ...", flush=True)
                runs[tuning].append(run_once(tuning, args, Path(tmp)))
    result = {
        "systems": summarise(runs, systems),
        "config": {"rounds": args.rounds, "duration": args.duration, "cache_ratio": args.cache_ratio,
                   "settings": {"off": "glibc's defaults", "on": "node_agent.allocator.keep_freed_memory()"}},
        "environment": {"cpus": os.cpu_count()},
    }  # fmt: skip
    for system, row in result["systems"].items():
        print(f"{system:24s} off {row['off']['keys_per_s'] / 1e6:6.2f} M/s  on {row['on']['keys_per_s'] / 1e6:6.2f} M/s"
              f"  x{row['on/off']:.2f}  p99 {row['off']['p99_ms']:.1f} -> {row['on']['p99_ms']:.1f} ms")  # fmt: skip
    path = Path(args.write)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
