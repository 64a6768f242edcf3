"""Leader election between operator replicas, on an in-memory Lease store (the real API server's Lease
semantics, resourceVersion conflicts included, are exercised by ``e2e/test_cluster_operator.py``).

A stand-in: an in-memory Lease store with resourceVersion checks, because the API server is the one
part that cannot run inside a unit test; it keeps exactly the behaviour the elector relies on."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hps_operator.kopf_handlers.kube_api import KubeApiError
from hps_operator.kopf_handlers.leader import LeaderElector


class Leases:
    """get / create / replace of Lease objects with optimistic concurrency, as the API server does."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found else None

    def create(self, manifest: dict[str, Any]) -> bool:
        key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        if key in self.objects:
            return False
        self.version += 1
        self.objects[key] = {**copy.deepcopy(manifest), "metadata": {**manifest["metadata"], "resourceVersion": str(self.version)}}
        return True

    def replace(self, manifest: dict[str, Any]) -> dict[str, Any]:
        key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        if self.objects[key]["metadata"]["resourceVersion"] != manifest["metadata"]["resourceVersion"]:
            raise KubeApiError(409, "PUT", "leases", "the object has been modified")
        self.version += 1
        self.objects[key] = {**copy.deepcopy(manifest), "metadata": {**manifest["metadata"], "resourceVersion": str(self.version)}}
        return self.objects[key]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: Leases, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(api, namespace="hps-system", identity=identity, lease_duration_s=10, renew_every_s=2,  # type: ignore[arg-type]
                         clock=clock, wall_clock=clock)  # fmt: skip


def test_one_leads_the_other_takes_over_only_after_the_lease_runs_out() -> None:
    api, clock_a, clock_b = Leases(), Clock(), Clock()
    a, b = elector(api, "a", clock_a), elector(api, "b", clock_b)
    assert a.try_lead() and not b.try_lead()
    for _ in range(5):  # a renews; b keeps seeing a fresh record, however long that goes on
        clock_a.now += 2
        clock_b.now += 2
        assert a.try_lead() and not b.try_lead()
    # a dies: b must see the same record for a whole lease before taking it
    clock_b.now += 9
    assert not b.try_lead()
    clock_b.now += 1.5
    assert b.try_lead()
    lease = api.get("coordination.k8s.io/v1", "Lease", "hps-system", "hps-operator") or {}
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    # the old leader, back from a pause, does not lead any more
    clock_a.now += 1
    assert not a.try_lead()


def test_a_clean_step_down_hands_over_at_once() -> None:
    api, clock = Leases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_lead() and not b.try_lead()
    a.release()
    assert b.try_lead()


def test_two_followers_racing_for_an_expired_lease_cannot_both_win() -> None:
    api, clock = Leases(), Clock()
    dead, b, c = elector(api, "dead", clock), elector(api, "b", clock), elector(api, "c", clock)
    assert dead.try_lead()
    assert not b.try_lead() and not c.try_lead()
    clock.now += 11
    # both read the same expired record; the second write is refused by its resourceVersion
    stale = api.get("coordination.k8s.io/v1", "Lease", "hps-system", "hps-operator")
    assert b.try_lead()
    original_get = api.get
    api.get = lambda *args: copy.deepcopy(stale)  # type: ignore[method-assign]
    assert not c.try_lead()
    api.get = original_get  # type: ignore[method-assign]
    assert (api.get("coordination.k8s.io/v1", "Lease", "hps-system", "hps-operator") or {})["spec"]["holderIdentity"] == "b"


def test_a_leader_that_cannot_renew_stops_before_a_follower_may_start() -> None:
    import threading

    api, clock = Leases(), Clock()
    a = elector(api, "a", clock)
    assert a.try_lead()
    api.get = lambda *args: (_ for _ in ()).throw(KubeApiError(503, "GET", "leases", "unavailable"))  # type: ignore[method-assign]
    lost, stop = threading.Event(), threading.Event()

    ticks = iter(range(100))

    def advancing_wait(timeout: float | None = None) -> bool:
        clock.now += a.renew_every_s
        next(ticks)
        return False

    stop.wait = advancing_wait  # type: ignore[method-assign]
    a.keep_leading(lost, stop)
    assert lost.is_set()
    assert clock.now - 1000.0 <= a.lease_duration_s  # gave up within the lease


def test_renewing_faster_than_the_lease_is_required() -> None:
    with pytest.raises(ValueError):
        LeaderElector(Leases(), namespace="n", identity="a", lease_duration_s=2, renew_every_s=2)  # type: ignore[arg-type]
