"""What the compiled deduplication (``node_agent/dedupe.c``) is worth against ``np.unique(keys,
return_inverse=True)``, on the lookup benchmark's batches (``hps bench lookup`` defaults: 4096 Zipf 1.05
keys of 500k rows, about 2,000 distinct) and on 100k random 64-bit keys (below ``NATIVE_MAX_KEYS``, the
compiled version's worst case: every key distinct, every byte varying). Best of ``--repeat`` timings of each, alternating, written to
``bench/results/dedupe.json``.

    .venv/bin/python bench/dedupe.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any

import numpy as np

from node_agent import dedupe
from node_agent.local.lookup_bench import LookupBenchConfig, zipf_batches

RESULTS = Path(__file__).resolve().parent / "results" / "dedupe.json"


def numpy_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, inverse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--write", default=str(RESULTS))
    args = parser.parse_args()
    if not dedupe.NATIVE:
        print("the compiled deduplication was not built (no C compiler): nothing to compare", file=sys.stderr)
        return 1
    batches = list(zipf_batches(LookupBenchConfig())[:200])
    bulk = np.random.default_rng(0).integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 100_000)
    cases = {"lookup batch (4096 Zipf keys)": batches, "100k random int64 keys": [bulk]}
    result: dict[str, Any] = {"numpy": np.__version__}
    for name, inputs in cases.items():
        for keys in inputs[:20]:  # the same answers, or the timing means nothing
            got, want = dedupe.unique_inverse(keys), numpy_unique(keys)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1].reshape(-1))
        timings: dict[str, list[float]] = {"compiled": [], "np.unique": []}
        for _ in range(args.repeat):
            for label, function in (("compiled", dedupe.unique_inverse), ("np.unique", numpy_unique)):
                seconds = timeit.timeit(lambda f=function, batch=inputs: [f(k) for k in batch], number=1)  # type: ignore[misc]
                timings[label].append(seconds / len(inputs) * 1e6)
        best = {label: round(min(values), 1) for label, values in timings.items()}
        result[name] = {"us_per_call": best, "np.unique/compiled": round(best["np.unique"] / best["compiled"], 2)}
    Path(args.write).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
