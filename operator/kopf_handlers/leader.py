"""Leader election on a ``coordination.k8s.io/v1`` Lease, so several operator replicas can run and
exactly one reconciles: the others wait, and take over within the lease's duration when the leader
dies (or at once when it steps down cleanly).

The algorithm is client-go's: the leader renews ``spec.renewTime`` every ``renew_every_s``; a follower
takes the lease when its record has not changed for ``lease_duration_s`` *by the follower's own
clock* (it times how long it has seen the same record, so clocks of different nodes never need to
agree); every write is an update at the resourceVersion read, so two followers racing for the lease
cannot both win. A leader that cannot renew for ``lease_duration_s`` stops leading before any
follower may take over (it gives up after ``lease_duration_s - renew_every_s``), so two replicas
never reconcile at once.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hps_operator.kopf_handlers.kube_api import KubeApi, KubeApiError

from node_agent.errors import UnavailableError

log = logging.getLogger(__name__)
LEASE_API = ("coordination.k8s.io/v1", "Lease")


def _micro_time(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElector:
    """Runs for one operator process; ``identity`` must be unique among replicas (the pod's name)."""

    api: KubeApi
    namespace: str
    identity: str
    name: str = "hps-operator"
    lease_duration_s: float = 10.0
    renew_every_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    #: the record last seen and when (by ``clock``): how a follower tells a dead leader
    _seen: tuple[str, float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.renew_every_s < self.lease_duration_s:
            raise ValueError("renew_every_s must be positive and shorter than lease_duration_s")

    # -- one attempt ---------------------------------------------------------------------------

    def try_lead(self) -> bool:
        """Acquires the lease or renews it; True while this process leads. Never raises for an API
        error: it counts as not leading this round."""
        try:
            return self._try_lead()
        except (KubeApiError, UnavailableError) as exc:
            log.warning("leader election: %s", exc)
            return False

    def _try_lead(self) -> bool:
        api_version, kind = LEASE_API
        lease = self.api.get(api_version, kind, self.namespace, self.name)
        now, wall = self.clock(), self.wall_clock()
        if lease is None:
            return self._write(None, transitions=0, acquired=wall)
        spec: dict[str, Any] = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = f"{holder}|{spec.get('renewTime')}|{lease['metadata'].get('resourceVersion')}"
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, now)
        if holder == self.identity:
            return self._write(lease, transitions=int(spec.get("leaseTransitions") or 0),
                               acquired=None)  # fmt: skip
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and now - self._seen[1] < duration:
            return False  # someone else leads, and was heard from within the lease
        return self._write(lease, transitions=int(spec.get("leaseTransitions") or 0) + 1, acquired=wall)

    def _write(self, lease: dict[str, Any] | None, *, transitions: int, acquired: float | None) -> bool:
        api_version, kind = LEASE_API
        wall = self.wall_clock()
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=max(1, round(self.lease_duration_s)),
                    renewTime=_micro_time(wall), leaseTransitions=transitions)  # fmt: skip
        if acquired is not None:
            spec["acquireTime"] = _micro_time(acquired)
        try:
            if lease is None:
                self.api.create({"apiVersion": api_version, "kind": kind,
                                 "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec})  # fmt: skip
                created = self.api.get(api_version, kind, self.namespace, self.name) or {}
                return (created.get("spec") or {}).get("holderIdentity") == self.identity
            self.api.replace({**lease, "spec": spec})
        except KubeApiError as exc:
            if exc.status == 409:  # another replica wrote first
                return False
            raise
        return True

    def release(self) -> None:
        """Steps down (a clean shutdown): clears the holder so a follower takes over at once."""
        api_version, kind = LEASE_API
        try:
            lease = self.api.get(api_version, kind, self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                spec = {**lease["spec"], "holderIdentity": "", "renewTime": _micro_time(self.wall_clock())}
                self.api.replace({**lease, "spec": spec})
        except (KubeApiError, UnavailableError) as exc:
            log.warning("could not release the leader lease (the next leader waits it out): %s", exc)

    # -- loops ---------------------------------------------------------------------------------

    def wait_for_leadership(self, stop: threading.Event) -> bool:
        """Blocks until this process leads (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            if self.try_lead():
                log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.name)
                return True
            stop.wait(self.renew_every_s)
        return False

    def keep_leading(self, lost: threading.Event, stop: threading.Event) -> None:
        """Renews until ``stop`` is set; sets ``lost`` (and returns) once renewals failed for long
        enough that a follower may take over soon. Runs forever until one of the two."""
        last_renewed = self.clock()
        give_up_after = self.lease_duration_s - self.renew_every_s
        while not stop.wait(self.renew_every_s):
            if self.try_lead():
                last_renewed = self.clock()
            elif self.clock() - last_renewed >= give_up_after:
                log.error("lost the leader lease %s/%s: stopping", self.namespace, self.name)
                lost.set()
                return
