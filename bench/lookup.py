"""Lookup benchmark: the HPS agent over gRPC (``hps``: L2 Redis; ``hps_inproc``: L2 the agent's in-process
hash map) vs plain Redis (pipelined HMGET) vs a NumPy gather, on the same seeded Zipf keys. Prints a
table and writes ``bench/results/lookup.json``; the same as ``hps bench lookup --write``.

    .venv/bin/python bench/lookup.py [--rows 500000 --dim 64 --batch 4096 --alpha 1.05 --cache-ratio 0.1]
                                     [--concurrency 1] [--systems hps,hps_inproc,redis,numpy]
"""

from __future__ import annotations

import sys
from pathlib import Path

from hps_operator.cli import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "lookup.json"
    sys.exit(main(["bench", "lookup", "--write", str(out), *sys.argv[1:]]))
