"""L1 cache benchmark: effective bandwidth (bytes of vectors looked up per second, as HPS reports it) and
latency of the set-associative cache on seeded Zipf keys, beside a dense ``xp.take`` from the whole
table and a device-to-device copy of a buffer larger than the device's L2 (the ceilings). Runs on CuPy
or, with ``--device cpu``, NumPy. Prints a table and writes ``bench/results/gpu_cache-<device>.json``.

    .venv/bin/python bench/gpu_cache.py [--device auto|cpu|cuda:N] [--rows 2000000 --dim 128
        --batches 1024,16384,65536 --alpha 1.05 --cache-ratios 0.2,1.0 --iters 200 --policy lfu]

Operations, each warmed up untimed (``--warmup-iters``) before ``--iters`` timed runs:

* ``L1 query``: a lookup of device keys alone (the cache's query kernel work);
* ``L1 query+fill``: the lookup path's L1 work on fresh keys: query, take the misses from the table,
  offer them to the cache;
* ``served``: what an agent serves, end to end: host keys in, deduplicated, L1 on the device, misses
  from a host tier (the in-process hash map holding the table), rows back on the host through the
  lookup path (``LookupPath.lookup``: pageable ``.get()``);
* ``HPS point``: ``L1 query`` at 2,000 keys and alpha 1.2, beside HPS's published profiler figure
  for that batch (0.231 ms, hit rate 0.844).

Statistics: GB/s is from the median time; p99 is reported only with at least 100 samples (else the
largest sample, as ``max_ms``). Hit rates are over the keys asked (repeats included).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from node_agent.array_backend import device_index, get_xp, on_device
from node_agent.cache import SetAssociativeCache

#: HPS's published profiler figure for its GPU embedding cache (HugeCTR's hps profiler)
HPS_POINT = {"keys": 2000, "alpha": 1.2, "latency_ms": 0.231, "hit_rate": 0.844}
#: samples a p99 needs to be more than the largest sample
P99_MIN_SAMPLES = 100


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
    if xp is not np:  # kernels are asynchronous, on the caches' streams too: a timer waits for them all
        xp.cuda.Device().synchronize()


def timed(xp: ModuleType, run: Callable[[Any], Any], batches: list[Any], *, warmup: int) -> list[float]:
    """Runs ``run`` on the first ``warmup`` batches untimed (kernels compile, pools fill), then times
    each of the rest, synchronised before and after."""
    for batch in batches[:warmup]:
        run(batch)
    times = []
    for batch in batches[warmup:]:
        synchronize(xp)
        start = time.perf_counter()
        run(batch)
        synchronize(xp)
        times.append(time.perf_counter() - start)
    return times


def query_and_fill(xp: ModuleType, table: Any, cache: SetAssociativeCache, keys: Any) -> tuple[Any, Any]:
    """What the lookup path does on the device: query, take the misses from the table, offer them."""
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


def l2_bytes(xp: ModuleType, device: str) -> int:
    """The device's L2 cache size (a CPU's is taken as 32 MiB: its last-level cache, roughly)."""
    if xp is np:
        return 32 << 20
    return int(xp.cuda.runtime.getDeviceProperties(device_index(device) or 0)["l2CacheSize"])


def summary(times: list[float], looked_up_bytes: int) -> dict[str, Any]:
    ordered = sorted(times)
    median = statistics.median(ordered)
    out: dict[str, Any] = {
        "samples": len(ordered),
        "p50_ms": median * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "GBps": looked_up_bytes / median / 1e9,
    }
    if len(ordered) >= P99_MIN_SAMPLES:
        out["p99_ms"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3
    else:
        out["p99_ms"] = None
        out["max_ms"] = ordered[-1] * 1e3
    return out


def copy_bandwidth(xp: ModuleType, device: str, *, iters: int, warmup: int) -> dict[str, Any]:
    """Device-to-device copy of a buffer four times the L2 (at least 256 MiB), so it times memory, not
    the cache; bandwidth counts the bytes copied (each read once and written once)."""
    nbytes = max(4 * l2_bytes(xp, device), 256 << 20)
    source = xp.ones(nbytes // 4, dtype=xp.float32)
    target = xp.empty_like(source)
    times = timed(xp, lambda _: xp.copyto(target, source), [None] * (warmup + iters), warmup=warmup)
    return {"op": "d2d copy", "bytes": nbytes, **summary(times, nbytes)}


def host_tier(table: np.ndarray) -> Any:
    """The in-process hash map holding the whole table on the host: the served path's L2."""
    from node_agent.spec import TableSpec
    from node_agent.tiers.base import TableLayout
    from node_agent.tiers.hashmap import HashMapTier

    tier = HashMapTier([TableLayout.of(TableSpec("emb", table.shape[0], table.shape[1]))])
    tier.insert("emb", np.arange(table.shape[0], dtype=np.int64), table)
    return tier


def served_path(tier: Any, table: np.ndarray, cache: SetAssociativeCache) -> Any:
    """A lookup path as an agent builds it: ``cache`` as the L1, ``tier`` as the L2; host keys in,
    host rows out."""
    from node_agent.cache import TableCache
    from node_agent.lookup import LookupPath
    from node_agent.spec import TableSpec

    spec = TableSpec("emb", table.shape[0], table.shape[1])
    # fills synchronous, as while a cache warms: the timed lookups pay for their own inserts
    return LookupPath([spec], l1={"emb": TableCache(cache)}, volatile=tier, persistent=None,
                      hit_rate_threshold=1.0, close_tiers=False)  # fmt: skip


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
    parser.add_argument("--admission", default="tinylfu", choices=["tinylfu", "always"])
    parser.add_argument("--iters", type=int, default=200, help="timed runs per operation (p99 needs 100)")
    parser.add_argument("--warmup-iters", type=int, default=5, help="untimed runs before each operation")
    parser.add_argument("--warmup-rows", type=float, default=2.0,
                        help="keys streamed through each cache before timing, as a multiple of the rows")  # fmt: skip
    parser.add_argument("--ops", default="query,fill,served,hps-point",
                        help="which of query,fill,served,hps-point to run (the ceilings always run)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)

    xp, device = get_xp(args.device)
    label = device_label(xp, device)
    rng = np.random.default_rng(args.seed)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    ratios = [float(r) for r in args.cache_ratios.split(",")]
    ops = {op.strip() for op in args.ops.split(",") if op.strip()}
    row_bytes = args.dim * 4
    runs = args.warmup_iters + args.iters
    results: list[dict[str, Any]] = []

    def record(op: str, batch: int, ratio: float | None, times: list[float], hit_rate: float | None,
               **extra: Any) -> None:  # fmt: skip
        results.append({"op": op, "batch": batch, "cache_ratio": ratio, "hit_rate": hit_rate,
                        **summary(times, batch * row_bytes), **extra})  # fmt: skip

    with on_device(xp, device):
        host_table = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
        table = xp.asarray(host_table)
        results.append(copy_bandwidth(xp, device, iters=args.iters, warmup=args.warmup_iters))

        # warm each cache on a stream of Zipf keys long enough to reach its steady state
        zipf = ZipfKeys(rng, rows=args.rows, alpha=args.alpha)
        warm_keys = zipf.draw(int(args.warmup_rows * args.rows))
        warm_batch = max(batch_sizes)
        caches: dict[float, SetAssociativeCache] = {}
        for ratio in ratios:
            cache = SetAssociativeCache(
                dim=args.dim, capacity_rows=max(1, int(args.rows * ratio)), associativity=args.associativity,
                policy=args.policy, admission=args.admission, xp=xp, device=device,
            )  # fmt: skip
            for start in range(0, warm_keys.shape[0], warm_batch):
                query_and_fill(xp, table, cache, xp.asarray(warm_keys[start : start + warm_batch]))
            caches[ratio] = cache

        tier = host_tier(host_table) if "served" in ops else None
        paths = {ratio: served_path(tier, host_table, cache) for ratio, cache in caches.items()} if tier else {}
        for batch in batch_sizes:
            fill_batches = [xp.asarray(zipf.draw(batch)) for _ in range(runs)]
            query_batches = [xp.asarray(zipf.draw(batch)) for _ in range(runs)]
            host_batches = [zipf.draw(batch) for _ in range(runs)]
            record("dense take", batch, None,
                   timed(xp, lambda k: xp.take(table, k, axis=0), query_batches, warmup=args.warmup_iters), None)  # fmt: skip
            for ratio, cache in caches.items():
                hit_counts: list[Any] = []  # device scalars, read after timing (no sync inside)

                def fill(keys: Any, cache: SetAssociativeCache = cache, counts: list[Any] = hit_counts) -> None:
                    counts.append(query_and_fill(xp, table, cache, keys)[1].sum())

                def query(keys: Any, cache: SetAssociativeCache = cache, counts: list[Any] = hit_counts) -> None:
                    counts.append(cache.query(keys)[1].sum())

                for op, name, run, batches in (("fill", "L1 query+fill", fill, fill_batches),
                                               ("query", "L1 query", query, query_batches)):  # fmt: skip
                    if op not in ops:
                        continue
                    hit_counts.clear()
                    times = timed(xp, run, batches, warmup=args.warmup_iters)
                    asked = batch * (len(batches) - args.warmup_iters)
                    timed_hits = sum(int(c) for c in hit_counts[args.warmup_iters :])
                    record(name, batch, ratio, times, timed_hits / asked)
                if ratio in paths:
                    path = paths[ratio]
                    before = cache.hits, cache.misses
                    times = timed(xp, partial(path.lookup, "emb"), host_batches, warmup=args.warmup_iters)
                    hits, misses = cache.hits - before[0], cache.misses - before[1]
                    exact = bool(np.array_equal(path.lookup("emb", host_batches[0]), host_table[host_batches[0]]))
                    record("served", batch, ratio, times, hits / max(1, hits + misses), exact=exact,
                           hit_rate_over="distinct keys")  # fmt: skip
        for path in paths.values():
            path.close()

        if "hps-point" in ops:
            point = ZipfKeys(rng, rows=args.rows, alpha=HPS_POINT["alpha"])
            point_batches = [xp.asarray(point.draw(int(HPS_POINT["keys"]))) for _ in range(runs)]
            for ratio in ratios:
                cache = SetAssociativeCache(
                    dim=args.dim, capacity_rows=max(1, int(args.rows * ratio)), associativity=args.associativity,
                    policy=args.policy, admission=args.admission, xp=xp, device=device,
                )  # fmt: skip
                stream = point.draw(int(args.warmup_rows * args.rows))
                for start in range(0, stream.shape[0], warm_batch):
                    query_and_fill(xp, table, cache, xp.asarray(stream[start : start + warm_batch]))
                counts: list[Any] = []

                def point_query(keys: Any, cache: SetAssociativeCache = cache, counts: list[Any] = counts) -> None:
                    counts.append(cache.query(keys)[1].sum())

                times = timed(xp, point_query, point_batches, warmup=args.warmup_iters)
                hit_rate = sum(int(c) for c in counts[args.warmup_iters :]) / (HPS_POINT["keys"] * args.iters)
                record("HPS point", int(HPS_POINT["keys"]), ratio, times, hit_rate, alpha=HPS_POINT["alpha"],
                       hps_published=HPS_POINT)  # fmt: skip

    copy = results[0]
    for r in results[1:]:
        r["of_copy_bandwidth"] = r["GBps"] / copy["GBps"]
    header = (f"{'op':<15} {'batch':>7} {'cache':>6} {'hit':>6} {'p50 ms':>9} {'p99 ms':>9} {'GB/s':>9} "
              f"{'of copy':>8}")  # fmt: skip
    print(f"device: {label} ({device}); rows {args.rows} x dim {args.dim} fp32; Zipf alpha {args.alpha}; "
          f"{args.policy}+{args.admission}; {args.iters} timed runs after {args.warmup_iters} untimed")
    print(f"d2d copy of {copy['bytes'] >> 20} MiB (4 x L2 or more): {copy['GBps']:.1f} GB/s")
    print(header)
    print("-" * len(header))
    for r in results[1:]:
        cache_col = f"{r['cache_ratio']:.0%}" if r["cache_ratio"] is not None else "-"
        hit_col = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
        p99 = r["p99_ms"] if r["p99_ms"] is not None else r["max_ms"]
        p99_col = f"{p99:.3f}" + ("" if r["p99_ms"] is not None else "*")
        print(f"{r['op']:<15} {r['batch']:>7} {cache_col:>6} {hit_col:>6} {r['p50_ms']:>9.3f} {p99_col:>9} "
              f"{r['GBps']:>9.2f} {r['of_copy_bandwidth']:>8.1%}")  # fmt: skip
    if any(r["p99_ms"] is None for r in results):
        print(f"* fewer than {P99_MIN_SAMPLES} samples: the largest, not a p99")
    print(f"HPS's published figure: {HPS_POINT['keys']} keys, alpha {HPS_POINT['alpha']}: "
          f"{HPS_POINT['latency_ms']} ms, hit rate {HPS_POINT['hit_rate']}")

    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu_cache-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.write_text(json.dumps({"device": label, "device_name": device, "config": config, "results": results,
                               "hps_published": HPS_POINT}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
