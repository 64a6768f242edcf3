"""Rolls a running ``hps local`` stack onto a new placement plan make-before-break, so that no lookup
fails while partitions or GPUs change.

The phases mirror the operator's rollout (``operator/core/rollout.py``), with processes for pods:

- **Warming**: the new plan's agents start beside the old ones (``--plan plan-v<N>.json``); every tier
  below L1 is shared, so each answers every key exactly the moment it reports SERVING. Clients keep
  routing by the old plan meanwhile.
- **Switching**: ``routing.json`` (plan and endpoints in one file, replaced by rename) names the new
  agents, then ``plan.json`` and ``state.json`` follow. Clients that follow ``routing.json``
  (:meth:`node_agent.routing.RoutedClient.from_local_state`) move over within their poll interval; the
  old agents keep serving for ``grace_s`` so a client that has not looked yet still gets answers.
- **Draining**: the old agents are stopped (SIGTERM: they finish the calls in flight); a client that
  still reaches one is refused, re-reads the routing and asks the new agents.
- **Idle**: the new plan is the active one.

A failure while warming stops the new agents and leaves the old ones serving, the routing untouched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from node_agent.errors import InvalidArgumentError, NotFoundError, UnavailableError
from node_agent.local.stack import (
    LocalStack,
    ProcessRecord,
    StackState,
    check_plan_fits,
    fingerprints,
    partition_map,
    plan_file_name,
    plan_summary,
)
from node_agent.plan import Plan
from node_agent.spec import load_model_file

log = logging.getLogger(__name__)

#: how long the old agents keep serving after the routing switched (clients poll it every ~100 ms)
DEFAULT_GRACE_S = 2.0


class Phase(StrEnum):
    """The operator's rollout phases (``hps_operator.core.rollout.Phase``), the same names."""

    IDLE = "Idle"
    WARMING = "Warming"
    SWITCHING = "Switching"
    DRAINING = "Draining"


@dataclass(frozen=True)
class PhaseChange:
    """One step of a rebalance, as printed and recorded."""

    phase: Phase
    at: datetime
    from_version: int
    to_version: int
    detail: str

    def line(self) -> str:
        stamp = self.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return f"{stamp} rebalance v{self.from_version} -> v{self.to_version}: {self.phase} ({self.detail})"


@dataclass(frozen=True)
class RebalanceResult:
    state: StackState
    from_version: int
    to_version: int
    #: the new plan's ``movedBytes`` against the previous one (0 without a plan)
    moved_bytes: int
    #: ``False`` when the stack already ran this plan with these agents (nothing was started)
    changed: bool
    started: tuple[ProcessRecord, ...] = ()
    stopped: tuple[ProcessRecord, ...] = ()
    phases: tuple[PhaseChange, ...] = ()


def rebalance(
    stack: LocalStack,
    plan: Plan | None,
    *,
    agents: int | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    ready_timeout: float = 120.0,
    on_phase: Callable[[PhaseChange], None] | None = None,
) -> RebalanceResult:
    """Moves the running stack in ``stack.state_dir`` to ``plan`` (``None``: one partition, every table
    whole) with ``agents`` agents per partition (default: as many as now). Raises
    :class:`NotFoundError` when no stack is up there."""
    with stack.locked():
        current = stack.read_state()
        if current is None or current.phase != "up":
            raise NotFoundError(f"no running stack in {stack.state_dir}: start one with hps local up")
        return rebalance_locked(stack, current, plan, agents=agents, grace_s=grace_s,
                                ready_timeout=ready_timeout, on_phase=on_phase)  # fmt: skip


def rebalance_locked(
    stack: LocalStack,
    current: StackState,
    plan: Plan | None,
    *,
    agents: int | None,
    grace_s: float,
    ready_timeout: float,
    on_phase: Callable[[PhaseChange], None] | None,
) -> RebalanceResult:
    """:func:`rebalance` for a caller that holds ``stack.locked()`` and has read ``current``."""
    if grace_s < 0:
        raise InvalidArgumentError(f"the drain grace must not be negative, got {grace_s}")
    per_partition = int(current.options.get("agents") or 1) if agents is None else agents
    if per_partition < 1:
        raise InvalidArgumentError(f"agents per partition must be at least 1, got {per_partition}")
    model_file = Path(current.model_file)
    model = load_model_file(model_file)
    if plan is not None:
        check_plan_fits(plan, model)
    dead_redis = [p for p in current.redis() if not p.alive()]
    if dead_redis:
        raise UnavailableError(
            f"Redis of the stack in {stack.state_dir} is not running (pid {dead_redis[0].pid}): "
            "hps local up (or hps local restart redis) starts it again"
        )

    # agents the routing does not name are a generation an interrupted rebalance left behind
    routed = {e for eps in current.partitions.values() for e in eps} | set(current.endpoints)
    leftovers = [a for a in current.agents() if a.address not in routed]
    for agent in leftovers:
        agent.stop()
    current.processes = [p for p in current.processes if p not in leftovers]
    old = current.agents()

    from_version = current.plan_version()
    to_version = plan.version if plan is not None else 0
    moved = plan.metrics.moved_bytes if plan is not None else 0
    active = stack.read_plan() if current.plan is not None else None
    same_plan = (active is None and plan is None) or (
        active is not None and plan is not None and active.to_json() == plan.to_json()
    )
    if same_plan and per_partition == int(current.options.get("agents") or 1) and all(a.alive() for a in old):
        if leftovers:
            stack.write_state(current)
        return RebalanceResult(current, from_version, to_version, moved, changed=False)

    phases: list[PhaseChange] = []

    def enter(phase: Phase, detail: str) -> None:
        change = PhaseChange(phase, datetime.now(UTC), from_version, to_version, detail)
        phases.append(change)
        status: dict[str, Any] = {
            "state": "Idle" if phase is Phase.IDLE else "Rebalancing",
            "phase": str(phase),
            "toVersion": to_version,
            "since": change.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "movedBytes": moved,
        }
        if phase is not Phase.IDLE:
            status["fromVersion"] = from_version
        current.rebalance = status
        stack.write_state(current)
        if on_phase is not None:
            on_phase(change)
        else:
            log.info("%s", change.line())

    enter(Phase.WARMING, f"starting {per_partition * (plan.partitions if plan else 1)} agent(s) of plan "
                         f"version {to_version} beside the {len(old)} running; movedBytes {moved}")  # fmt: skip
    busy = [int(a.address.rsplit(":", 1)[1]) for a in old if a.address]
    try:
        new = stack.launch_agents(
            current, plan, agents=per_partition, ready_timeout=ready_timeout, busy_ports=busy,
            read_only=any(a.writer and a.alive() for a in old),
        )  # fmt: skip
    except BaseException:
        started = [p for p in current.agents() if p not in old]
        for agent in started:
            agent.stop()
        current.processes = [p for p in current.processes if p not in started]
        current.rebalance = {"state": "Idle", "phase": str(Phase.IDLE), "toVersion": from_version,
                             "since": _now(), "failedVersion": to_version}  # fmt: skip
        stack.write_state(current)
        if plan is not None and to_version != from_version:
            with contextlib.suppress(OSError):
                (stack.state_dir / plan_file_name(to_version)).unlink()
        raise

    partitions = partition_map(new)
    enter(Phase.SWITCHING, f"routing.json names {sum(map(len, partitions.values()))} agent(s) in "
                           f"{len(partitions)} partition(s); old agents serve {grace_s:g} s more")  # fmt: skip
    stack.write_routing(plan, partitions, model=model)
    stack.activate_plan(plan)
    current.endpoints = [a.address for a in new]
    current.partitions = partitions
    current.plan = plan_summary(plan) if plan is not None else None
    current.options = {**current.options, "agents": per_partition}
    # what `up` compares: the same model, options and now this plan count as already up
    current.fingerprint, _ = fingerprints(
        model_file, agents=per_partition, redis_cluster=int(current.options.get("redisCluster") or 0),
        port=int(current.options.get("port") or 0), use_redis=bool(current.options.get("useRedis")),
        device=str(current.options.get("device") or "auto"), plan=plan,
        same_node=bool(current.options.get("sameNode")), tls=bool(current.options.get("tls")),
        reflection=bool(current.options.get("reflection")),
    )  # fmt: skip
    stack.write_state(current)
    time.sleep(grace_s)

    enter(Phase.DRAINING, f"stopping {len(old)} agent(s) of plan version {from_version}")
    running = [a for a in old if a.stop()]
    current.processes = [p for p in current.processes if p not in old]
    kept = {plan_file_name(to_version)}
    for generation in stack.state_dir.glob("plan-v*.json"):
        if generation.name not in kept:
            generation.unlink(missing_ok=True)
    enter(Phase.IDLE, f"plan version {to_version} active; {len(running)} old agent(s) stopped")
    return RebalanceResult(current, from_version, to_version, moved, changed=True, started=tuple(new),
                           stopped=tuple(old), phases=tuple(phases))  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
