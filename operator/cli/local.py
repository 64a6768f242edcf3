"""``hps local up|rebalance|restart|status|down``: the whole stack on this machine (Redis, loaded tables,
agents), the embedded default a user starts with before Kubernetes."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from hps_operator.cli.security_flags import help_from_doc, port_number

if TYPE_CHECKING:
    from node_agent.local.rebalance import PhaseChange, RebalanceResult
    from node_agent.plan import Plan
    from node_agent.spec import ModelSpec

#: exit codes of ``hps local status`` (like ``systemctl status``: scripts can test them)
STATUS_EXIT = {"up": 0, "degraded": 1, "down": 3, "absent": 3}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "local", help="run the whole stack on this machine (redis-server, loaded tables, agents)"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    state_help = "where the stack keeps its state, data and logs (default: $HPS_STATE_DIR or ./.hps-local)"

    up = verbs.add_parser(
        "up",
        help="start the stack and return once every agent serves",
        description="Starts redis-server, loads the tables into Redis and RocksDB, starts the agents and "
        "returns once each answers gRPC health SERVING; the stack keeps running. On a stack already "
        "up with the same model file and options this does nothing; when part of it died it restarts only "
        "that (Redis replays its append-only file, agents resume their update groups); when only the "
        "partitions, GPUs or agents per partition changed it rebalances the live stack make-before-break "
        "(as hps local rebalance); with a changed model it restarts it on the same data. Tables the stores "
        "already hold (with their online updates) are never loaded again from their sources.",
    )
    up.add_argument("-f", "--file", required=True, help="the EmbeddingModel YAML")
    up.add_argument("--state-dir", help=state_help)
    up.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                    help="run a Redis Cluster of N (>= 3) masters instead of one redis-server")  # fmt: skip
    up.add_argument("--agents", type=int, default=None, metavar="K",
                    help="agent processes per partition (default 1)")  # fmt: skip
    up.add_argument("--partitions", type=int, default=None, metavar="P",
                    help="override spec.partitions: model-parallel partitions, each caching its share of "
                    "the tables (0: the fewest that fit); more than one runs the placement plan")  # fmt: skip
    up.add_argument("--gpus-per-pod", type=int, default=None, metavar="G",
                    help="override spec.gpusPerPod for the plan (each partition's L1 spans G GPUs)")  # fmt: skip
    up.add_argument("--agents-per-partition", type=int, default=None, metavar="R",
                    help="agents serving each partition (same as --agents)")  # fmt: skip
    up.add_argument("--port", type=port_number, default=0, metavar="P",
                    help="first agent's port; agent i listens on P+i (default: free ports)")  # fmt: skip
    up.add_argument("--no-redis", action="store_true",
                    help="no Redis: agents keep the volatile tier in process (RocksDB still holds the tables)")  # fmt: skip
    up.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the agents' L1 cache device")
    up.add_argument("--tls", action="store_true",
                    help="serve gRPC and Redis over TLS with certificates of a throwaway CA made in STATE_DIR/tls "
                    "(clients trust STATE_DIR/tls/ca.crt); Update RPCs need the stack's token either way")  # fmt: skip
    up.add_argument("--reflection", action="store_true",
                    help="the agents serve gRPC server reflection, which lists their services to anyone who "
                    "asks (off unless this or the model's spec.security.reflection asks)")  # fmt: skip
    up.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="seconds to wait for the agents to serve (default 120)")  # fmt: skip
    up.add_argument("--grace", type=float, default=None, metavar="S",
                    help="when up rebalances: seconds the old agents serve after the routing "
                    "switched (default 2)")  # fmt: skip
    up.set_defaults(func=run_up)

    rebalance = verbs.add_parser(
        "rebalance",
        help="re-plan the running stack and roll the plan out make-before-break",
        description="Plans again from the active plan (version + 1, movedBytes reported), then: Warming "
        "(the new plan's agents start beside the old ones and must all serve), Switching (routing.json "
        "names them; clients following it move over), Draining (after --grace seconds the old agents "
        "stop), Idle. No lookup fails on the way. Each phase is printed with its time.",
    )
    rebalance.add_argument("--state-dir", help=state_help)
    rebalance.add_argument("--partitions", type=int, default=None, metavar="P",
                           help="partitions of the new plan (default: the active plan's; 0: the "
                           "fewest that fit)")  # fmt: skip
    rebalance.add_argument("--gpus-per-pod", type=int, default=None, metavar="G",
                           help="GPUs per partition in the new plan (default: the active plan's)")  # fmt: skip
    rebalance.add_argument("--agents-per-partition", type=int, default=None, metavar="R",
                           help="agents serving each partition (default: as now)")  # fmt: skip
    rebalance.add_argument("--grace", type=float, default=None, metavar="S",
                           help="seconds the old agents keep serving after the routing switched "
                           "(default 2)")  # fmt: skip
    rebalance.add_argument("--timeout", type=float, default=120.0, metavar="S",
                           help="seconds to wait for the new agents to serve (default 120)")  # fmt: skip
    rebalance.set_defaults(func=run_rebalance)

    from hps_operator.cli import local_autoscale

    autoscale = verbs.add_parser(
        "autoscale",
        help="widen or narrow the running stack's partitions with its L1 hit rate",
        description=help_from_doc(local_autoscale.__doc__),
    )
    local_autoscale.add_arguments(autoscale, state_help)
    autoscale.set_defaults(func=local_autoscale.run)

    restart = verbs.add_parser(
        "restart",
        help="restart one agent, or Redis, of the running stack",
        description="Stops the process (SIGTERM, then SIGKILL after 10 s) and starts it again as it was "
        "started: an agent on its port with its identity (it resumes its update consumer group; another "
        "agent writes the shared stores meanwhile), Redis on its port and data directory (it replays its "
        "append-only file). The rest of the stack keeps serving.",
    )
    restart.add_argument("what", choices=("agent", "redis"), help="agent N, or redis (every server, or N)")
    restart.add_argument("index", nargs="?", type=int, metavar="N",
                         help="which one, counting from 0 as hps local status lists them")  # fmt: skip
    restart.add_argument("--state-dir", help=state_help)
    restart.add_argument("--timeout", type=float, default=120.0, metavar="S",
                         help="seconds to wait for a restarted agent to serve (default 120)")  # fmt: skip
    restart.set_defaults(func=run_restart)

    status = verbs.add_parser(
        "status",
        help="is each process alive, the endpoints, what each agent reports",
        description="Exit code: 0 up, 1 degraded, 3 down or no stack.",
    )
    status.add_argument("--state-dir", help=state_help)
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.set_defaults(func=run_status)

    down = verbs.add_parser("down", help="stop the agents and Redis (data kept unless --purge)")
    down.add_argument("--state-dir", help=state_help)
    down.add_argument("--purge", action="store_true", help="also delete the loaded data, logs and password")
    down.set_defaults(func=run_down)


def run_up(args: argparse.Namespace) -> int:
    from node_agent.errors import InvalidArgumentError
    from node_agent.local.stack import LocalStack
    from node_agent.spec import load_model_file

    given = {n for n in (args.agents, args.agents_per_partition) if n is not None}
    if len(given) > 1:
        raise InvalidArgumentError("--agents and --agents-per-partition name the same count: give one")
    for flag, value, least in (("--partitions", args.partitions, 0), ("--gpus-per-pod", args.gpus_per_pod, 1)):
        if value is not None and value < least:
            raise InvalidArgumentError(f"{flag} must be at least {least}, got {value}")
    stack = LocalStack(args.state_dir)
    try:
        previous = stack.read_plan()
    except InvalidArgumentError as exc:
        logging.getLogger(__name__).warning("planning afresh: %s", exc)
        previous = None
    plan = local_plan(load_model_file(args.file), previous, partitions=args.partitions,
                      gpus_per_pod=args.gpus_per_pod)  # fmt: skip
    per_partition = next((n for n in (args.agents_per_partition, args.agents) if n is not None), 1)
    if args.grace is not None and args.grace < 0:
        raise InvalidArgumentError(f"--grace must not be negative, got {args.grace}")
    result = stack.up(
        args.file,
        agents=per_partition,
        plan=plan,
        redis_cluster=args.redis_cluster,
        port=args.port,
        no_redis=args.no_redis,
        device=args.device,
        ready_timeout=args.timeout,
        grace_s=args.grace,
        on_phase=print_phase,
        tls=args.tls,
        reflection=args.reflection,
    )
    state = result.state
    for endpoint in state.endpoints:
        print(f"endpoint: {endpoint}")
    print_credentials(stack, tls=bool(state.options.get("tls")), redis=bool(state.redis_addresses))
    if state.plan is not None:
        print(plan_line(state.plan))
        for partition, endpoints in sorted(state.partitions.items()):
            print(f"partition {partition}: {', '.join(endpoints)}")
    if result.already_up:
        verb = "already up"
    elif result.revived:
        names = ", ".join(f"{p.role} {p.address}" for p in result.revived)
        verb = f"restarted what had stopped ({names}); the rest kept running"
    elif result.rebalance is not None:
        verb = rebalanced_words(result.rebalance)
    elif result.restarted:
        verb = "restarted (the model or options changed, or part of it had stopped)"
    else:
        verb = "up"
    redis = ",".join(state.redis_addresses) or "none (in-process)"
    kind = " (cluster)" if state.redis_cluster and state.redis_addresses else ""
    print(f"model {state.model}: {verb}; {len(state.agents())} agent(s); redis {redis}{kind}; "
          f"state in {stack.state_dir}")  # fmt: skip
    print(f"stop it with: hps local down --state-dir {stack.state_dir}")
    return 0


def run_rebalance(args: argparse.Namespace) -> int:
    from node_agent.errors import InvalidArgumentError, NotFoundError
    from node_agent.local.rebalance import DEFAULT_GRACE_S, rebalance
    from node_agent.local.stack import LocalStack
    from node_agent.spec import load_model_file

    for flag, value, least in (("--partitions", args.partitions, 0), ("--gpus-per-pod", args.gpus_per_pod, 1),
                               ("--agents-per-partition", args.agents_per_partition, 1)):  # fmt: skip
        if value is not None and value < least:
            raise InvalidArgumentError(f"{flag} must be at least {least}, got {value}")
    if args.grace is not None and args.grace < 0:
        raise InvalidArgumentError(f"--grace must not be negative, got {args.grace}")
    stack = LocalStack(args.state_dir)
    current = stack.read_state()
    if current is None or current.phase != "up":
        raise NotFoundError(f"no running stack in {stack.state_dir}: start one with hps local up")
    previous = stack.read_plan() if current.plan is not None else None
    # unspecified numbers stay what the running plan has (not what the model file says)
    partitions = args.partitions if args.partitions is not None else (previous.partitions if previous else 1)
    gpus = args.gpus_per_pod if args.gpus_per_pod is not None else (previous.gpus_per_pod if previous else None)
    plan = local_plan(load_model_file(current.model_file), previous, partitions=partitions, gpus_per_pod=gpus)
    result = rebalance(
        stack, plan, agents=args.agents_per_partition, ready_timeout=args.timeout, on_phase=print_phase,
        grace_s=DEFAULT_GRACE_S if args.grace is None else args.grace,
    )  # fmt: skip
    state = result.state
    if state.plan is not None:
        print(plan_line(state.plan))
    for partition, endpoints in sorted(state.partitions.items()):
        print(f"partition {partition}: {', '.join(endpoints)}")
    print(f"model {state.model}: {rebalanced_words(result)}; {len(state.agents())} agent(s); "
          f"state in {stack.state_dir}")  # fmt: skip
    return 0


def run_restart(args: argparse.Namespace) -> int:
    import time

    from node_agent.local.stack import LocalStack

    stack = LocalStack(args.state_dir)
    started = time.monotonic()
    restarted = stack.restart(args.what, args.index, ready_timeout=args.timeout)
    took = time.monotonic() - started
    for record in restarted:
        print(f"restarted {record.role} {record.address} (pid {record.pid})")
    print(f"took {took:.1f} s; the rest of the stack kept running")
    return 0


def print_credentials(stack: Any, *, tls: bool, redis: bool) -> None:
    """What a client of the stack needs, said once at ``up``: where the token and the CA are, and how
    the commands take them."""
    where = stack.state_dir
    print(f"token: {stack.token_file} (Update RPCs carry it as 'authorization: Bearer <token>'; "
          f"hps lookup/update --state-dir {where} send it, as RoutedClient.from_local_state does)")  # fmt: skip
    if tls:
        print(f"tls ca: {stack.certificates.ca_file} (the agents and Redis serve TLS: hps lookup --tls-ca FILE, "
              "Client(..., tls=FILE))")  # fmt: skip
    if redis:
        print(f"redis users: hps-agent, hps-loader, hps-producer (passwords in {stack.redis_users_file}; "
              f"hps update --redis ADDRESS --state-dir {where} publishes as hps-producer)")  # fmt: skip


def print_phase(change: PhaseChange) -> None:
    print(change.line(), flush=True)


def rebalanced_words(result: RebalanceResult) -> str:
    if not result.changed:
        return f"already balanced (plan version {result.to_version})"
    return (f"rebalanced make-before-break from plan version {result.from_version} to {result.to_version} "
            f"(movedBytes {result.moved_bytes}; {len(result.started)} agent(s) started, "
            f"{len(result.stopped)} stopped)")  # fmt: skip


def local_plan(model: ModelSpec, previous: Plan | None, *, partitions: int | None,
               gpus_per_pod: int | None) -> Plan | None:  # fmt: skip
    """The plan a local stack runs: ``None`` (every agent holds every table whole, as without a plan)
    when the model and the flags ask for one partition, leave the GPUs alone and the stack never ran a
    plan; otherwise the planner's, re-planned from the stack's previous plan of the same model so
    little moves (and its version keeps counting when the stack goes back to one partition)."""
    from hps_operator.core.planner import plan_placement
    from hps_operator.core.topology import Topology

    if previous is not None and previous.model != model.name:
        previous = None
    wanted = model.partitions if partitions is None else partitions
    if wanted == 1 and gpus_per_pod is None and previous is None:
        return None
    topology = Topology.from_model(model, gpus_per_pod=gpus_per_pod, partitions=partitions)
    return plan_placement(model, topology, previous)


def plan_line(summary: dict[str, Any]) -> str:
    """One line on a plan's summary (as ``state.json`` keeps it)."""
    return (f"plan: version {summary['version']}, strategy {summary['strategy']}, "
            f"{summary['partitions']} partition(s) x {summary['gpusPerPod']} GPU(s), "
            f"imbalance {float(summary['imbalance']):.3f}, movedBytes {summary['movedBytes']}")  # fmt: skip


def run_status(args: argparse.Namespace) -> int:
    from node_agent.local.stack import LocalStack

    report = LocalStack(args.state_dir).status()
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        _print_status(report)
    return STATUS_EXIT[report["state"]]


def _print_status(report: dict[str, Any]) -> None:
    if report["state"] == "absent":
        print(f"no stack in {report['stateDir']}")
        return
    print(f"model {report['model']}: {report['state']} (state in {report['stateDir']})")
    credentials = report.get("credentials") or {}
    if credentials.get("token"):
        transport = f"TLS, CA {credentials['ca']}" if credentials.get("ca") else "plaintext on loopback"
        print(f"  {transport}; Update token {credentials['token']}")
    if report.get("plan"):
        print(f"  {plan_line(report['plan'])}")
    rebalance = report.get("rebalance")
    if rebalance:
        if rebalance.get("state") == "Rebalancing":
            print(f"  rebalance: {rebalance['phase']} from plan version {rebalance.get('fromVersion')} to "
                  f"{rebalance.get('toVersion')} since {rebalance.get('since')}")  # fmt: skip
        else:
            failed = rebalance.get("failedVersion")
            note = f" (rolling out version {failed} failed)" if failed is not None else ""
            print(f"  rebalance: Idle, plan version {rebalance.get('toVersion')} active since "
                  f"{rebalance.get('since')}{note}")  # fmt: skip
    counts: dict[str, int] = {}
    for p in report["processes"]:
        where = f" {p['address']}" if p["address"] else ""
        number = counts.get(p["role"], 0)
        counts[p["role"]] = number + 1
        name = f"{p['role']} {number}"
        print(f"  {name:<9} pid {p['pid']:<8}{where:<22} {'alive' if p['alive'] else 'DEAD'}")
    planned = bool(report.get("plan"))
    for a in report["agents"]:
        where = f" (partition {a.get('partition', 0)})" if planned else ""
        if not a.get("answering"):
            print(f"  agent {a['endpoint']}{where}: not answering ({a.get('error', '')})")
            continue
        rates = a.get("hitRates") or {}
        hit = ", ".join(f"{t} {r:.2f}" for t, r in sorted(rates.items()) if isinstance(r, int | float))
        version = (a.get("describe") or {}).get("planVersion")
        if planned:
            where = f" (partition {a.get('partition', 0)}, plan version {version})"
        if not a.get("routed", True):
            where += " not routed to (rebalancing)"
        updates = a.get("updates") or {}
        role = ", writes the shared stores" if updates.get("store_writer") else ""
        print(f"  agent {a['endpoint']}{where}: device {a.get('device') or '?'}, "
              f"{'DEGRADED' if a.get('degraded') else 'healthy'}{role}" + (f", L1 hit rate {hit}" if hit else ""))  # fmt: skip
        if updates:
            lag = updates.get("lag_ms_p99")
            print(f"    updates: last applied {updates.get('last_applied_id') or 'none'}, "
                  f"{updates.get('applied_entries', 0)} applied, {updates.get('gaps', 0)} gaps, "
                  f"{updates.get('rejected_entries', 0)} rejected" + (f", lag p99 {lag:.1f} ms" if lag else ""))  # fmt: skip
        for reason in a.get("reasons") or []:
            print(f"    degraded: {reason}")
    for endpoint in report["endpoints"]:
        print(f"endpoint: {endpoint}")
    if planned:
        for partition, endpoints in sorted(report.get("partitions", {}).items(), key=lambda kv: int(kv[0])):
            print(f"partition {partition}: {', '.join(endpoints)}")


def run_down(args: argparse.Namespace) -> int:
    from node_agent.local.stack import LocalStack

    stack = LocalStack(args.state_dir)
    stopped = stack.down(purge=args.purge)
    if stopped:
        roles = ", ".join(f"{p.role} {p.pid}" for p in stopped)
        print(f"stopped {len(stopped)} process(es): {roles}")
    else:
        print(f"nothing running in {stack.state_dir}")
    if args.purge:
        print("data, logs, passwords, the token and the certificates removed")
    elif stack.data_file.exists():
        print(f"the tables and their updates stay in {stack.state_dir}: hps local up serves them again "
              "(--purge deletes them)")  # fmt: skip
    return 0
