"""The make-before-break rollout of a new placement plan, as a pure state machine.

Idle → Warming → Switching → Draining → Idle:

- **Warming**: each partition whose share of the plan changes gets a new agent set (StatefulSet)
  beside its old one (``render.agents``): the new pods load the target's shards while clients still
  route by the active plan to the old pods, which keep running untouched.
- **Switching**: every new agent set is ready, so the plan ConfigMap's ``routing.json`` now names the
  target; clients pick it up. The old sets still run, so a client that has not re-read the routing
  yet still finds its keys. It lasts at least ``switch_grace_s``.
- **Draining**: the target's agent sets alone are rendered (the old sets, and partitions the target
  lacks, are deleted). Once they are rolled out and ready, the target becomes active: Idle.

No lookup fails along the way: at every step the plan clients route by is served by ready agents.
The first plan of a model goes straight to Idle (nothing serves yet, so nothing can break).
:func:`advance` decides; the handler renders with ``render.render_children(..., phase=rollout.phase)``
and applies, and reports the :class:`Action` list as events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

#: how long clients get to re-read the routing plan before old shards are dropped
DEFAULT_SWITCH_GRACE_S = 60.0


class Phase(StrEnum):
    IDLE = "Idle"
    WARMING = "Warming"
    SWITCHING = "Switching"
    DRAINING = "Draining"


class Action(StrEnum):
    """What the handler must do after a transition (beyond re-rendering with the new phase)."""

    #: render agents serving both plans; create the StatefulSets of new partitions
    WARM_NEW_OWNERS = "WarmNewOwners"
    #: point the plan ConfigMap's routing at the target plan
    SWITCH_ROUTING = "SwitchRouting"
    #: render the target alone and delete agent StatefulSets it no longer has
    DROP_OLD_SHARDS = "DropOldShards"
    #: the target is now the active plan
    ACTIVATE = "Activate"


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with seconds, as Kubernetes writes times (``2024-05-01T12:00:00Z``)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Rollout:
    """Where a model's plan rollout stands; stored as ``status.rebalance``.

    ``active_version`` is the plan clients route by (before Switching) or routed by (after);
    ``target_version`` the plan being rolled out (equal to the active one when Idle)."""

    phase: Phase = Phase.IDLE
    active_version: int | None = None
    target_version: int | None = None
    since: str | None = None

    @property
    def state(self) -> str:
        return "Idle" if self.phase is Phase.IDLE else "Rebalancing"

    @property
    def routing_version(self) -> int | None:
        """The plan version clients should route by in this phase."""
        return self.active_version if self.phase is Phase.WARMING else self.target_version

    def to_status(self) -> dict[str, Any]:
        """``status.rebalance``: ``state``, ``phase``, ``fromVersion``/``toVersion`` (only ``toVersion``,
        the active plan, when Idle) and ``since``."""
        out: dict[str, Any] = {"state": self.state, "phase": str(self.phase)}
        if self.phase is not Phase.IDLE and self.active_version is not None:
            out["fromVersion"] = self.active_version
        if self.target_version is not None:
            out["toVersion"] = self.target_version
        if self.since is not None:
            out["since"] = self.since
        return out

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> Rollout:
        """Inverse of :meth:`to_status`; ``None`` or ``{}`` (a new model) is Idle with no plan."""
        if not raw:
            return cls()
        phase = Phase(raw.get("phase", "Idle"))
        target = raw.get("toVersion")
        active = target if phase is Phase.IDLE else raw.get("fromVersion")
        return cls(
            phase=phase,
            active_version=int(active) if active is not None else None,
            target_version=int(target) if target is not None else None,
            since=raw.get("since"),
        )


@dataclass(frozen=True)
class RolloutObservation:
    """What the handler saw this round.

    ``desired_version``: the version of the plan the planner returned now. ``agents_ready``: every
    agent StatefulSet rendered for the current phase runs its current template with all replicas
    ready (``status.statefulset_rolled_out``). ``now``: the handler's clock."""

    desired_version: int
    agents_ready: bool
    now: datetime


def advance(
    rollout: Rollout, observed: RolloutObservation, *, switch_grace_s: float = DEFAULT_SWITCH_GRACE_S
) -> tuple[Rollout, tuple[Action, ...]]:
    """One step of the state machine: the next rollout state and what to do about it.

    Calling it again with the same observation changes nothing (a no-op round writes nothing)."""
    moment = observed.now if observed.now.tzinfo else observed.now.replace(tzinfo=UTC)
    now = format_time(moment)
    desired = observed.desired_version

    if rollout.phase is Phase.IDLE:
        if rollout.active_version is None:
            return Rollout(Phase.IDLE, desired, desired, now), (Action.ACTIVATE,)
        if desired == rollout.active_version:
            return rollout, ()
        return Rollout(Phase.WARMING, rollout.active_version, desired, now), (Action.WARM_NEW_OWNERS,)

    if desired != rollout.target_version:
        # The target moved mid-rollout. Until Switching, clients route by the active plan: warm the
        # new target from it. From Switching on they route by the old target: it is the new base.
        base = rollout.active_version if rollout.phase is Phase.WARMING else rollout.target_version
        return Rollout(Phase.WARMING, base, desired, now), (Action.WARM_NEW_OWNERS,)

    if not observed.agents_ready:
        return rollout, ()
    if rollout.phase is Phase.WARMING:
        return replace(rollout, phase=Phase.SWITCHING, since=now), (Action.SWITCH_ROUTING,)
    if rollout.phase is Phase.SWITCHING:
        started = parse_time(rollout.since) if rollout.since else moment
        if (moment - started).total_seconds() < switch_grace_s:
            return rollout, ()
        return replace(rollout, phase=Phase.DRAINING, since=now), (Action.DROP_OLD_SHARDS,)
    # Draining, and the agents run the target alone
    return Rollout(Phase.IDLE, rollout.target_version, rollout.target_version, now), (Action.ACTIVATE,)
