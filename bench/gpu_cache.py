"""L1 cache benchmark: effective bandwidth (bytes of vectors returned per second) and latency of the
set-associative cache on seeded Zipf keys, beside a dense ``xp.take`` from the whole table and a
device-to-device copy of the same bytes (the ceilings). Runs on CuPy or, with ``--device cpu``, NumPy.
Prints a table and writes ``bench/results/gpu_cache-<device>.json``.

    .venv/bin/python bench/gpu_cache.py [--device auto|cpu|cuda:N] [--rows 2000000 --dim 128
        --batches 1024,16384,65536 --alpha 1.05 --cache-ratios 0.2,1.0 --iters 50]

"L1 query+fill" is the lookup path's L1 work on fresh keys (query, take misses from the table, insert);
"L1 query" is a lookup alone. Both report the hit rate over the keys asked (repeats included); the
caches are warmed first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from node_agent.array_backend import device_index, get_xp, on_device
from node_agent.cache import SetAssociativeCache


class ZipfKeys:
    """Keys in ``[0, rows)`` whose rank r is drawn with probability proportional to r^-alpha; ranks map
    to keys through one fixed shuffle, so hot keys are spread over the key space as in a real table."""

    def __init__(self, rng: np.random.Generator, *, rows: int, alpha: float) -> None:
        weights = np.arange(1, rows + 1, dtype=np.float64) ** -alpha
        self._cdf = np.cumsum(weights / weights.sum())
        self._key_of_rank = rng.permutation(rows).astype(np.int64)
        self._rng = rng

    def draw(self, count: int) -> np.ndarray:
        ranks = np.searchsorted(self._cdf, self._rng.random(count), side="right")
        return self._key_of_rank[np.minimum(ranks, len(self._key_of_rank) - 1)]


def synchronize(xp: ModuleType) -> None:
    if xp is not np:  # kernels are asynchronous: a timer must wait for them
        xp.cuda.get_current_stream().synchronize()


def timed(xp: ModuleType, run: Callable[[Any], Any], batches: list[Any]) -> list[float]:
    times = []
    for batch in batches:
        synchronize(xp)
        start = time.perf_counter()
        run(batch)
        synchronize(xp)
        times.append(time.perf_counter() - start)
    return times


def query_and_fill(xp: ModuleType, table: Any, cache: SetAssociativeCache, keys: Any) -> tuple[Any, Any]:
    """What the lookup path does on the device: query, take the misses from the table, insert them."""
    values, hit = cache.query(keys)
    missed = xp.nonzero(~hit)[0]
    if missed.shape[0]:
        rows = xp.take(table, keys[missed], axis=0)
        values[missed] = rows
        cache.insert(keys[missed], rows)
    return values, hit


def device_label(xp: ModuleType, device: str) -> str:
    if xp is np:
        return "cpu"
    props = xp.cuda.runtime.getDeviceProperties(device_index(device) or 0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batches", default="1024,16384,65536", help="keys per lookup, comma-separated")
    parser.add_argument("--alpha", type=float, default=1.05)
    parser.add_argument("--cache-ratios", default="0.2,1.0", help="cache capacity as a share of the rows")
    parser.add_argument("--associativity", type=int, default=32)
    parser.add_argument("--policy", default="lru", choices=["lru", "lfu"])
    parser.add_argument("--iters", type=int, default=50, help="timed lookups per configuration")
    parser.add_argument("--warmup-rows", type=float, default=2.0,
                        help="keys streamed through each cache before timing, as a multiple of the rows")  # fmt: skip
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)

    xp, device = get_xp(args.device)
    label = device_label(xp, device)
    rng = np.random.default_rng(args.seed)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    ratios = [float(r) for r in args.cache_ratios.split(",")]
    row_bytes = args.dim * 4
    results: list[dict[str, Any]] = []

    with on_device(xp, device):
        table = xp.asarray(rng.standard_normal((args.rows, args.dim), dtype=np.float32))

        def record(
            op: str, batch: int, ratio: float | None, times: list[float], hit_rate: float | None
        ) -> None:
            mean = statistics.fmean(times)
            ordered = sorted(times)
            results.append({
                "op": op, "batch": batch, "cache_ratio": ratio, "hit_rate": hit_rate,
                "mean_ms": mean * 1e3, "p50_ms": ordered[len(ordered) // 2] * 1e3,
                "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
                "GBps": batch * row_bytes / mean / 1e9,
            })  # fmt: skip

        # warm each cache on a stream of Zipf keys long enough to reach its steady state
        zipf = ZipfKeys(rng, rows=args.rows, alpha=args.alpha)
        warm_keys = zipf.draw(int(args.warmup_rows * args.rows))
        warm_batch = max(batch_sizes)
        caches: dict[float, SetAssociativeCache] = {}
        for ratio in ratios:
            cache = SetAssociativeCache(
                dim=args.dim, capacity_rows=max(1, int(args.rows * ratio)), associativity=args.associativity,
                policy=args.policy, xp=xp, device=device,
            )  # fmt: skip
            for start in range(0, warm_keys.shape[0], warm_batch):
                query_and_fill(xp, table, cache, xp.asarray(warm_keys[start : start + warm_batch]))
            caches[ratio] = cache

        for batch in batch_sizes:
            fill_batches = [xp.asarray(zipf.draw(batch))
                            for _ in range(args.iters)]  # fmt: skip
            query_batches = [xp.asarray(zipf.draw(batch))
                             for _ in range(args.iters)]  # fmt: skip

            def dense_take(keys: Any) -> Any:
                return xp.take(table, keys, axis=0)

            source = table[:batch]
            target = xp.empty_like(source)

            def copy(_keys: Any, source: Any = source, target: Any = target) -> None:
                xp.copyto(target, source)

            record("dense take", batch, None, timed(xp, dense_take, query_batches), None)
            record("d2d copy", batch, None, timed(xp, copy, query_batches), None)
            for ratio, cache in caches.items():
                hit_counts: list[Any] = []  # device scalars, read after timing (no sync inside)

                def fill(
                    keys: Any, cache: SetAssociativeCache = cache, counts: list[Any] = hit_counts
                ) -> None:
                    counts.append(query_and_fill(xp, table, cache, keys)[1].sum())

                def query(
                    keys: Any, cache: SetAssociativeCache = cache, counts: list[Any] = hit_counts
                ) -> None:
                    counts.append(cache.query(keys)[1].sum())

                for op, run, batches in (
                    ("L1 query+fill", fill, fill_batches),
                    ("L1 query", query, query_batches),
                ):
                    hit_counts.clear()
                    times = timed(xp, run, batches)
                    record(op, batch, ratio, times, sum(int(c) for c in hit_counts) / (batch * len(batches)))

    header = f"{'op':<15} {'batch':>7} {'cache':>6} {'hit':>6} {'p50 ms':>9} {'p99 ms':>9} {'GB/s':>8}"
    print(f"device: {label} ({device}); rows {args.rows} x dim {args.dim} fp32; Zipf alpha {args.alpha}")
    print(header)
    print("-" * len(header))
    for r in results:
        cache_col = f"{r['cache_ratio']:.0%}" if r["cache_ratio"] is not None else "-"
        hit_col = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
        print(f"{r['op']:<15} {r['batch']:>7} {cache_col:>6} {hit_col:>6} {r['p50_ms']:>9.3f} "
              f"{r['p99_ms']:>9.3f} {r['GBps']:>8.2f}")  # fmt: skip

    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu_cache-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": label, "device_name": device, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                              for k, v in vars(args).items()},
             "results": results},
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
