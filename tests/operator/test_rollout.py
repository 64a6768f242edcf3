"""The make-before-break rollout state machine: each transition, and the cases where it must wait."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hps_operator.core.rollout import Action, Phase, Rollout, RolloutObservation, advance

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def seen(version: int, ready: bool, at: datetime = T0) -> RolloutObservation:
    return RolloutObservation(desired_version=version, agents_ready=ready, now=at)


def test_the_first_plan_is_activated_at_once() -> None:
    rollout, actions = advance(Rollout(), seen(1, False))
    assert rollout == Rollout(Phase.IDLE, 1, 1, "2025-01-01T12:00:00Z") and actions == (Action.ACTIVATE,)


def test_idle_with_the_same_plan_does_nothing() -> None:
    idle = Rollout(Phase.IDLE, 3, 3, "2025-01-01T11:00:00Z")
    assert advance(idle, seen(3, True)) == (idle, ())


def test_a_full_rollout() -> None:
    idle = Rollout(Phase.IDLE, 3, 3)
    warming, actions = advance(idle, seen(4, True))
    assert (warming.phase, warming.active_version, warming.target_version) == (Phase.WARMING, 3, 4)
    assert actions == (Action.WARM_NEW_OWNERS,) and warming.routing_version == 3

    # new owners still loading: wait
    assert advance(warming, seen(4, False)) == (warming, ())
    switching, actions = advance(warming, seen(4, True, T0 + timedelta(seconds=30)))
    assert switching.phase is Phase.SWITCHING and actions == (Action.SWITCH_ROUTING,)
    assert switching.routing_version == 4

    # clients get the grace period to re-read the routing before old shards go
    assert advance(switching, seen(4, True, T0 + timedelta(seconds=60)), switch_grace_s=60) == (switching, ())
    draining, actions = advance(switching, seen(4, True, T0 + timedelta(seconds=91)), switch_grace_s=60)
    assert draining.phase is Phase.DRAINING and actions == (Action.DROP_OLD_SHARDS,)

    assert advance(draining, seen(4, False)) == (draining, ())
    done, actions = advance(draining, seen(4, True, T0 + timedelta(seconds=120)))
    assert done == Rollout(Phase.IDLE, 4, 4, "2025-01-01T12:02:00Z") and actions == (Action.ACTIVATE,)
    assert done.state == "Idle" and draining.state == "Rebalancing"


def test_a_new_target_while_warming_restarts_from_the_active_plan() -> None:
    warming = Rollout(Phase.WARMING, 3, 4, "2025-01-01T12:00:00Z")
    again, actions = advance(warming, seen(5, True))
    assert (again.phase, again.active_version, again.target_version) == (Phase.WARMING, 3, 5)
    assert actions == (Action.WARM_NEW_OWNERS,)


def test_a_new_target_after_switching_starts_from_the_plan_clients_route_by() -> None:
    switching = Rollout(Phase.SWITCHING, 3, 4, "2025-01-01T12:00:00Z")
    again, _ = advance(switching, seen(5, True))
    assert (again.phase, again.active_version, again.target_version) == (Phase.WARMING, 4, 5)


def test_status_round_trip() -> None:
    for rollout in (Rollout(), Rollout(Phase.IDLE, 2, 2, "2025-01-01T12:00:00Z"),
                    Rollout(Phase.SWITCHING, 2, 3, "2025-01-01T12:00:00Z")):  # fmt: skip
        assert Rollout.from_status(rollout.to_status()) == rollout
    assert Rollout(Phase.DRAINING, 2, 3).to_status() == {
        "state": "Rebalancing", "phase": "Draining", "fromVersion": 2, "toVersion": 3,
    }  # fmt: skip
