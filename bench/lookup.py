"""Lookup benchmark: the HPS agent (``hps``: L2 Redis over TCP gRPC; ``hps_same_node``: the same agent
through its same-node socket; ``hps_inproc``: L2 the agent's in-process hash map) vs plain Redis
(pipelined HMGET) vs a NumPy gather, on the same seeded Zipf keys. Prints a table and writes
``bench/results/lookup.json``; the same as ``hps bench lookup --write``.

    .venv/bin/python bench/lookup.py [--rows 500000 --dim 64 --batch 4096 --alpha 1.05 --cache-ratio 0.1]
                                     [--policy lfu] [--concurrency 1] [--repeat 3] [--systems ...]
                                     [--write PATH]

With ``--sweep`` first, the policy sweep instead (``hps bench lookup-sweep``): L1 hit rate and keys/s
against cache ratio and Zipf alpha for each policy beside plain Redis, written to
``bench/results/lookup-sweep.json`` and ``.png`` (needs ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hps_operator.cli import main

if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    argv = sys.argv[1:]
    if argv[:1] == ["--sweep"]:
        sys.exit(main(["bench", "lookup-sweep", "--write", str(results / "lookup-sweep.json"),
                       "--png", str(results / "lookup-sweep.png"), *argv[1:]]))  # fmt: skip
    write = [] if "--write" in argv else ["--write", str(results / "lookup.json")]
    sys.exit(main(["bench", "lookup", *write, *argv]))
