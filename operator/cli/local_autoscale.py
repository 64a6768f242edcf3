"""``hps local autoscale``: the partition autoscaler (``spec.autoscaling.partitions``) on the embedded
default. Every interval it reads the L1 counters of the agents (their Stats), feeds the hit rate to
:class:`hps_operator.core.elasticity.PartitionAutoscaler`, and on a widen or a narrow re-plans from
the running plan (minimal movement) and rolls the new plan out make-before-break, as
``hps local rebalance`` does: lookups keep being answered throughout.

The autoscaler's windows default to production pace (a widen after 10 minutes below the target);
``--widen-after``, ``--narrow-after`` and ``--cooldown`` shorten them for a demonstration. Narrowing
needs a GPU load; give ``--gpu-keys-per-s`` (what one GPU's lookup path sustains, e.g. from
``hps bench lookup``) to allow it, else the autoscaler only widens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any


def add_arguments(parser: argparse.ArgumentParser, state_help: str) -> None:
    parser.add_argument("--state-dir", help=state_help)
    parser.add_argument("--interval", type=float, default=15.0, metavar="S", help="seconds between samples (15)")
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="stop after S seconds (default: run until interrupted)")  # fmt: skip
    parser.add_argument("--widen-after", type=float, default=None, metavar="S",
                        help="seconds below the target hit rate before widening (default 600)")  # fmt: skip
    parser.add_argument("--narrow-after", type=float, default=None, metavar="S",
                        help="seconds well above it before narrowing (default 1800)")  # fmt: skip
    parser.add_argument("--cooldown", type=float, default=None, metavar="S",
                        help="seconds after a change before the next decision (default 900)")  # fmt: skip
    parser.add_argument("--min-lookups", type=int, default=None, metavar="N",
                        help="keys a sample needs to count (default 10000)")  # fmt: skip
    parser.add_argument("--gpu-keys-per-s", type=float, default=None, metavar="K",
                        help="keys per second one GPU's lookup path sustains (allows narrowing)")  # fmt: skip
    parser.add_argument("--grace", type=float, default=None, metavar="S",
                        help="seconds the old agents serve after a rollout switches routing")  # fmt: skip
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="one line per sample, as text or JSON (default text)")  # fmt: skip


def l1_counts(stats: Mapping[int, Mapping[str, Any]]) -> tuple[int, int]:
    """``(hits, misses)`` summed over every partition's agent and table."""
    hits = misses = 0
    for agent in stats.values():
        for table in ((agent.get("lookup") or {}).get("tables") or {}).values():
            hits += int(table.get("hits", 0))
            misses += int(table.get("misses", 0))
    return hits, misses


def busiest_keys(stats: Mapping[int, Mapping[str, Any]]) -> int:
    """Keys looked up so far by the busiest partition's agent (its lookup counter)."""
    return max((int((agent.get("server") or {}).get("keys", 0)) for agent in stats.values()), default=0)


def run(args: argparse.Namespace) -> int:
    from hps_operator.cli.local import local_plan, print_phase
    from hps_operator.core.elasticity import PartitionAutoscaler, PartitionAutoscaling, PartitionSample
    from hps_operator.core.planner import plan_placement
    from hps_operator.core.topology import Topology

    from node_agent.errors import InvalidSpecError, NotFoundError
    from node_agent.local.rebalance import DEFAULT_GRACE_S, rebalance
    from node_agent.local.stack import LocalStack
    from node_agent.routing import RoutedClient
    from node_agent.spec import load_model_file

    stack = LocalStack(args.state_dir)
    state = stack.read_state()
    if state is None or state.phase != "up":
        raise NotFoundError(f"no running stack in {stack.state_dir}: start one with hps local up")
    model = load_model_file(state.model_file)
    if model.autoscaling is None or model.autoscaling.partitions is None:
        raise InvalidSpecError("spec.autoscaling.partitions",
                               f"is not set in {state.model_file}: add {{min, max, targetHitRate}} to autoscale partitions")  # fmt: skip
    spec = model.autoscaling.partitions
    tunables = {name: value for name, value in (("widen_after_s", args.widen_after), ("narrow_after_s", args.narrow_after),
                ("cooldown_s", args.cooldown), ("min_lookups", args.min_lookups)) if value is not None}  # fmt: skip
    autoscaler = PartitionAutoscaler(PartitionAutoscaling(
        min=spec.min_partitions, max=spec.max_partitions, target_hit_rate=spec.target_hit_rate, **tunables))  # fmt: skip
    emit = _printer(args.output)
    deadline = time.monotonic() + args.duration if args.duration is not None else None
    client = RoutedClient.from_local_state(stack.state_dir)
    baseline: tuple[int, int, int, float] | None = None  # hits, misses, busiest keys, when
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(args.interval)
            plan = stack.read_plan()
            partitions = plan.partitions if plan is not None else 1
            stats = client.agent_stats(model.name)
            hits, misses = l1_counts(stats)
            keys, now = busiest_keys(stats), time.monotonic()
            if baseline is None or hits < baseline[0] or misses < baseline[1]:
                baseline = (hits, misses, keys, now)  # the first sample, or new agents: counters restarted
                continue
            looked = (hits - baseline[0]) + (misses - baseline[1])
            hit_rate = (hits - baseline[0]) / looked if looked else None
            gpu_load = None
            if args.gpu_keys_per_s and plan is not None:
                rate = (keys - baseline[2]) / max(now - baseline[3], 1e-3)
                gpu_load = rate / (args.gpu_keys_per_s * plan.gpus_per_pod)
            baseline = (hits, misses, keys, now)
            decision = autoscaler.observe(PartitionSample(time=now, partitions=partitions, hit_rate=hit_rate,
                                                          gpu_load=gpu_load, lookups=looked))  # fmt: skip
            line: dict[str, Any] = {"time": round(now, 1), "partitions": partitions, "hitRate": hit_rate,
                                    "lookups": looked, "action": decision.action, "reason": decision.code}  # fmt: skip
            if decision.action != "hold" and decision.partitions != partitions:
                # a stack without a plan serves every table whole on one partition: that plan, made
                # explicit, is what the new one moves from
                previous = plan or plan_placement(model, Topology.from_model(model, partitions=1), None)
                new_plan = local_plan(model, previous, partitions=decision.partitions,
                                      gpus_per_pod=previous.gpus_per_pod)  # fmt: skip
                result = rebalance(stack, new_plan, ready_timeout=120.0, on_phase=print_phase if args.output == "text" else None,
                                   grace_s=DEFAULT_GRACE_S if args.grace is None else args.grace)  # fmt: skip
                line.update(to=decision.partitions, movedBytes=result.moved_bytes, message=decision.reason)
                baseline = None
            emit(line)
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


def _printer(output: str) -> Callable[[dict[str, Any]], None]:
    def emit(line: dict[str, Any]) -> None:
        if output == "json":
            print(json.dumps(line), flush=True)
            return
        rate = "-" if line["hitRate"] is None else f"{line['hitRate']:.3f}"
        text = f"partitions {line['partitions']}  hit rate {rate}  keys {line['lookups']}  {line['action']} ({line['reason']})"
        if "to" in line:
            text += f" -> {line['to']} partitions, movedBytes {line['movedBytes']}: {line['message']}"
        print(text, file=sys.stdout, flush=True)

    return emit

