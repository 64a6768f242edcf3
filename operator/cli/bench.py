"""``hps bench lookup``: embedding lookups through the agent, plain Redis and NumPy on the same Zipf keys."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: as node_agent.local.lookup_bench.DEFAULT_SYSTEMS (not imported: `hps --help` must not load NumPy)
DEFAULT_SYSTEMS = ("hps", "hps_same_node", "hps_inproc", "hps_inproc_same_node", "hps_tls", "hps_inproc_tls",
                   "redis", "numpy")  # fmt: skip
DEFAULT_RESULT_FILE = Path("bench/results/lookup.json")
DEFAULT_SWEEP_FILE = Path("bench/results/lookup-sweep.json")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("bench", help="measure the data plane on this machine")
    kinds = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    lookup = kinds.add_parser(
        "lookup",
        help="keys/s and per-batch latency: the agent over gRPC vs pipelined Redis HMGET vs a NumPy gather",
        description="Measures, for --duration seconds each on the same seeded Zipf keys: hps (an agent over "
        "TCP gRPC whose L1 holds --cache-ratio of the rows, L2 a local redis-server), hps_same_node (the same "
        "agent through its same-node socket, rows via shared memory), hps_inproc (an agent with its in-process "
        "hash map as L2, HPS's default) and hps_inproc_same_node (it through its same-node socket), hps_tls and "
        "hps_inproc_tls (hps and hps_inproc with TLS: the JSON's tls field is what it costs), plain Redis with "
        "pipelined HMGET, and a NumPy gather.",
    )
    add_lookup_arguments(lookup)
    lookup.add_argument("-o", "--output", choices=("text", "json"), default="text")
    lookup.add_argument("--write", nargs="?", const=str(DEFAULT_RESULT_FILE), metavar="PATH",
                        help=f"also write the JSON result (default path {DEFAULT_RESULT_FILE})")  # fmt: skip
    lookup.set_defaults(func=run_lookup)

    sweep = kinds.add_parser(
        "lookup-sweep",
        help="L1 hit rate and keys/s against cache ratio and Zipf alpha, per policy, beside plain Redis",
        description="Runs the agent's lookup path in this process (L1 + a real redis-server as L2) at every "
        "--ratios value (at --alpha) and every --alphas value (at --cache-ratio), for each of --policies, beside "
        "plain Redis on the same keys; writes the JSON and a PNG (needs the bench extra: matplotlib).",
    )
    sweep.add_argument("--rows", type=int, default=500_000)
    sweep.add_argument("--dim", type=int, default=64)
    sweep.add_argument("--batch", type=int, default=4096)
    sweep.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the cache-ratio slice")
    sweep.add_argument("--cache-ratio", type=float, default=0.10, help="cache ratio of the alpha slice")
    sweep.add_argument("--ratios", default="0.01,0.02,0.05,0.1,0.2,0.5", help="cache ratios, comma-separated")
    sweep.add_argument("--alphas", default="0.8,0.9,1.0,1.05,1.1,1.2", help="Zipf exponents, comma-separated")
    sweep.add_argument("--policies", default="lru+always,lru+tinylfu,lfu+always,lfu+tinylfu",
                       help="POLICY+ADMISSION pairs, comma-separated (policy lru|lfu, admission always|tinylfu)")  # fmt: skip
    sweep.add_argument("--warm-batches", type=int, default=300,
                       help="batches run before each point is measured, at least: a larger cache is warmed until "
                            "40 keys per row it holds have been asked for")
    sweep.add_argument("--batches", type=int, default=100, help="batches measured at each point")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--write", default=str(DEFAULT_SWEEP_FILE), metavar="PATH", help="the JSON result")
    sweep.add_argument("--png", default=str(DEFAULT_SWEEP_FILE.with_suffix(".png")), metavar="PATH",
                       help="the figure ('' for none)")  # fmt: skip
    sweep.set_defaults(func=run_sweep)


def add_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    """The knobs of the lookup benchmark; ``bench/lookup.py`` takes the same."""
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the keys")
    parser.add_argument("--cache-ratio", type=float, default=0.10, help="L1 capacity as a share of the rows")
    parser.add_argument("--policy", choices=("lru", "lfu"), default="lfu",
                        help="the L1's eviction policy (spec.cache.policy); admission is TinyLFU either way")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per system")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per system first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the agent's L1 device")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="callers issuing batches at once, for the agents and redis alike")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every system, in turn; the result reports each system's medians")  # fmt: skip
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help="comma-separated systems to run, of hps,hps_same_node,hps_inproc,hps_inproc_same_node,"
                        "hps_tls,hps_inproc_tls,redis,redis_mget,numpy")  # fmt: skip


def run_lookup(args: argparse.Namespace) -> int:
    from node_agent.errors import InvalidArgumentError
    from node_agent.local.lookup_bench import SYSTEMS, LookupBenchConfig, format_table, run_lookup_bench

    if args.rows < 1 or args.dim < 1 or args.batch < 1 or args.duration <= 0 or not 0 < args.cache_ratio <= 1:
        raise InvalidArgumentError("--rows, --dim, --batch and --duration must be positive, --cache-ratio in (0, 1]")
    if args.concurrency < 1:
        raise InvalidArgumentError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.repeat < 1:
        raise InvalidArgumentError(f"--repeat must be at least 1, got {args.repeat}")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = sorted(set(systems) - set(SYSTEMS))
    if not systems or unknown:
        raise InvalidArgumentError(f"--systems: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(SYSTEMS)}")
    config = LookupBenchConfig(rows=args.rows, dim=args.dim, batch=args.batch, alpha=args.alpha,
                               cache_ratio=args.cache_ratio, duration=args.duration, warmup=args.warmup,
                               seed=args.seed, device=args.device, concurrency=args.concurrency,
                               systems=systems, policy=args.policy, repeat=args.repeat)  # fmt: skip
    as_json = args.output == "json"
    # progress goes to stderr when stdout carries the JSON, so `-o json | jq` keeps working
    result = run_lookup_bench(config, say=lambda line: print(line, file=sys.stderr if as_json else sys.stdout))
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_table(result))
    if args.write:
        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _floats(text: str, option: str) -> tuple[float, ...]:
    from node_agent.errors import InvalidArgumentError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise InvalidArgumentError(f"{option} names no value")
    return values


def run_sweep(args: argparse.Namespace) -> int:
    from node_agent.cache import ADMISSIONS, POLICIES
    from node_agent.errors import InvalidArgumentError
    from node_agent.local.lookup_bench import LookupBenchConfig, SweepConfig, plot_sweep, run_lookup_sweep

    ratios, alphas = _floats(args.ratios, "--ratios"), _floats(args.alphas, "--alphas")
    if not all(0 < r <= 1 for r in (*ratios, args.cache_ratio)):
        raise InvalidArgumentError("cache ratios must be in (0, 1]")
    policies = []
    for item in args.policies.split(","):
        policy, _, admission = item.strip().partition("+")
        if policy not in POLICIES or admission not in ADMISSIONS:
            raise InvalidArgumentError(f"--policies: {item.strip()!r} is not POLICY+ADMISSION with policy in "
                                       f"{'|'.join(POLICIES)} and admission in {'|'.join(ADMISSIONS)}")  # fmt: skip
        policies.append((policy, admission))
    if args.rows < 1 or args.dim < 1 or args.batch < 1 or args.warm_batches < 0 or args.batches < 1:
        raise InvalidArgumentError("--rows, --dim, --batch and --batches must be positive, --warm-batches not negative")
    config = LookupBenchConfig(rows=args.rows, dim=args.dim, batch=args.batch, alpha=args.alpha,
                               cache_ratio=args.cache_ratio, seed=args.seed)  # fmt: skip
    sweep = SweepConfig(ratios=ratios, alphas=alphas, policies=tuple(policies), warm_batches=args.warm_batches,
                        batches=args.batches)  # fmt: skip
    result = run_lookup_sweep(config, sweep, say=lambda line: print(line, file=sys.stderr))
    path = Path(args.write)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    if args.png:
        print(f"wrote {plot_sweep(result, args.png)}", file=sys.stderr)
    return 0
