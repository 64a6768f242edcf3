"""Plan-aware lookups: :class:`RoutedClient` sends each key to the partition whose agents cache its hash
bucket under the placement plan, and reassembles the answer in the caller's order.

Routing decides speed, never correctness: every agent answers every key (from L2/L3 when its L1 does
not hold the bucket), so a partition with no agent answering is served by another partition's agents,
and a plan the agents do not run yet (a rollout in progress) only costs cache hits. Both are counted
(:meth:`RoutedClient.routing_stats`) and the second is logged as a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node_agent import wire
from node_agent.client import Client, ModelInfo
from node_agent.errors import HpsError, InvalidArgumentError, UnavailableError
from node_agent.plan import Plan, bucket_of, merge_bucket_ranges
from node_agent.tls import ClientTLS

log = logging.getLogger(__name__)

ROUTING_FORMAT = "hps.dev/routing/v1"
#: most partitions asked at once by one call (the rest queue in the client's pool)
MAX_PARALLEL_PARTITIONS = 8
#: how often a client following a routing file looks whether it was replaced (one stat per look)
ROUTING_POLL_S = 0.1
#: the Describe that checks each agent's plan must not hold up a first lookup for long
_PLAN_CHECK_TIMEOUT_S = 2.0

#: per partition: ``{table: (positions of its keys in the caller's array or None for all, keys)}``
_Split = dict[int, dict[str, tuple[np.ndarray | None, np.ndarray]]]


def owner_partitions(plan: Plan, table: str) -> np.ndarray | None:
    """The partition each bucket of ``table`` is routed to (``-1`` where no partition caches it), or
    ``None`` when the plan holds no shard of the table.

    Unlike :meth:`Plan.partitions_of` (which names the lowest owner), a bucket cached by several
    partitions (strategy ``replicate``) goes to one of them chosen by the bucket's number, so the
    partitions share its load instead of the first one taking all of it."""
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for a in plan.assignments_for(table=table):
        spans[a.partition].append(a.buckets)
    if not spans:
        return None
    count = plan.bucket_count
    # several GPUs of one partition may hold the same buckets (replicate): count each partition once
    merged = {p: merge_bucket_ranges(ranges) for p, ranges in sorted(spans.items())}
    holders = np.zeros(count, dtype=np.int32)
    for ranges in merged.values():
        for lo, hi in ranges:
            holders[lo:hi] += 1
    owner = np.full(count, -1, dtype=np.int32)
    if int(holders.max()) <= 1:
        for p, ranges in merged.items():
            for lo, hi in ranges:
                owner[lo:hi] = p
        return owner
    choice = np.arange(count, dtype=np.int64) % np.maximum(holders, 1)
    seen = np.zeros(count, dtype=np.int32)
    for p, ranges in merged.items():  # ascending partition: the i-th holder of a bucket is the i-th seen
        for lo, hi in ranges:
            mine = seen[lo:hi] == choice[lo:hi]
            owner[lo:hi][mine] = p
            seen[lo:hi] += 1
    return owner


@dataclass(frozen=True)
class PlanMismatch:
    """An agent that does not serve what the routing map says: another plan version (a rollout in
    progress) or another partition (an endpoint listed under the wrong partition)."""

    endpoint: str
    #: the partition the routing map lists the endpoint under, and the plan version it routes by
    partition: int
    plan_version: int
    #: what the agent itself reports (Describe)
    reported_partition: int
    reported_version: int

    def __str__(self) -> str:
        return (
            f"agent {self.endpoint} listed as partition {self.partition} of plan version {self.plan_version} "
            f"serves partition {self.reported_partition} of plan version {self.reported_version}"
        )


def parse_routing(raw: Mapping[str, Any]) -> tuple[Plan, dict[int, list[str]]]:
    """The plan and each partition's endpoints of a routing document (:func:`routing_document`)."""
    try:
        plan = Plan.from_dict(raw["plan"])
        endpoints = {int(p): [str(e) for e in eps] for p, eps in dict(raw["endpoints"]).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"not a routing document (plan and endpoints): {exc!r}") from None
    return plan, endpoints


def read_routing_file(path: str | Path) -> tuple[Plan, dict[int, list[str]]]:
    """:func:`parse_routing` of a JSON file; :class:`FileNotFoundError` passes through."""
    try:
        raw = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise InvalidArgumentError(f"routing file {path} is not JSON: {exc}") from None
    return parse_routing(raw)


def routing_document(plan: Plan, endpoints: Mapping[int, Sequence[str]]) -> dict[str, Any]:
    """The routing file's content: the plan and each partition's endpoints (what
    :meth:`RoutedClient.from_routing_file` reads)."""
    return {
        "format": ROUTING_FORMAT,
        "plan": plan.to_dict(),
        "endpoints": {str(p): list(eps) for p, eps in sorted(endpoints.items())},
    }


def _listed_endpoints(endpoints: Mapping[int, Sequence[str] | str]) -> dict[int, list[str]]:
    """Partition → its endpoints, sorted by partition; a partition with none is left out."""
    listed: dict[int, list[str]] = {}
    for partition, eps in endpoints.items():
        p = int(partition)
        if p < 0:
            raise InvalidArgumentError(f"partition numbers must not be negative, got {p}")
        names = [e.strip() for e in eps.split(",")] if isinstance(eps, str) else [str(e).strip() for e in eps]
        names = [e for e in names if e]
        if names:
            listed[p] = names
    if not listed:
        raise InvalidArgumentError("no endpoint given for any partition")
    return dict(sorted(listed.items()))


class _Route:
    """One routing: a plan, each partition's endpoints and a :class:`Client` for them. A call takes
    the route once and keeps it to its end, so a reroute never mixes two plans in one answer; a
    retired route's channels close when the last call using it returns."""

    def __init__(self, plan: Plan, endpoints: dict[int, list[str]], *, timeout: float, retries: int,
                 security: Mapping[str, Any]) -> None:  # fmt: skip
        self.plan = plan
        self.endpoints = endpoints
        self.clients = {p: Client(eps, timeout=timeout, retries=retries, **security) for p, eps in endpoints.items()}
        self.order = list(self.clients)
        self.owners: dict[str, np.ndarray | None] = {}
        self.owners_lock = threading.Lock()
        #: partitions that failed recently (their agents are asked last until then)
        self.down_until: dict[int, float] = {}
        #: model → the plan mismatches its agents reported (checked once per route)
        self.checked: dict[str, list[PlanMismatch]] = {}
        self.check_lock = threading.Lock()
        #: calls using the route now; guarded by the client's route lock
        self.users = 0
        self.retired = False

    def owner_array(self, table: str) -> np.ndarray | None:
        try:
            return self.owners[table]
        except KeyError:
            pass
        with self.owners_lock:  # built once per table: a plan may have up to 2^20 buckets
            if table not in self.owners:
                self.owners[table] = owner_partitions(self.plan, table)
            return self.owners[table]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


class _RoutingFile:
    """A routing file a client follows: looked at (one ``stat``) at most every ``poll_s`` seconds and
    re-read when it was replaced (a new inode, mtime or size)."""

    def __init__(self, path: Path, poll_s: float) -> None:
        self.path = path
        self.poll_s = poll_s
        # taken before the caller reads the file: a replacement in between is seen at the next look
        self.signature = self._signature()
        self.looked_at = time.monotonic()
        self.lock = threading.Lock()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def replaced(self, *, force: bool) -> tuple[Plan, dict[int, list[str]]] | None:
        """The new routing when the file changed since the last read, else ``None`` (also while it is
        missing or unreadable: the client keeps routing as it did)."""
        if not force and time.monotonic() - self.looked_at < self.poll_s:
            return None
        with self.lock:
            now = time.monotonic()
            if not force and now - self.looked_at < self.poll_s:
                return None  # another thread looked while this one waited
            self.looked_at = now
            signature = self._signature()
            if signature is None or signature == self.signature:
                return None
            try:
                routing = read_routing_file(self.path)
            except (OSError, InvalidArgumentError) as exc:
                log.warning("routing file %s could not be read; routing as before: %s", self.path, exc)
                return None
            self.signature = signature
            return routing


class RoutedClient:
    """Lookups routed by ``plan`` to the agents of each partition (``endpoints``: partition → its
    agents' ``HOST:PORT``); the same calls as :class:`~node_agent.client.Client`.

    Keys of one call that belong to several partitions are sent to them concurrently, one request
    per partition holding all of its tables. A partition whose agents do not answer (UNAVAILABLE or
    DEADLINE_EXCEEDED on each of them) is skipped for ``cooloff_s`` and its keys go to the next
    partition that answers.

    :meth:`reroute` swaps plan and endpoints while lookups run; a client built from a routing file
    (:meth:`from_routing_file`, :meth:`from_local_state`) follows the file by itself, so it moves with
    a make-before-break rebalance without a failed lookup. Thread-safe.

    ``tls``, ``token``, ``token_file``: as :class:`~node_agent.client.Client` takes them, for every agent."""

    def __init__(
        self,
        plan: Plan,
        endpoints: Mapping[int, Sequence[str] | str],
        *,
        timeout: float = 5.0,
        retries: int = 2,
        cooloff_s: float = 1.0,
        tls: ClientTLS | str | os.PathLike[str] | bool | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.cooloff_s = cooloff_s
        self._security: dict[str, Any] = {"tls": tls, "token": token, "token_file": token_file}
        self._route = _Route(plan, _listed_endpoints(endpoints), timeout=timeout, retries=retries,
                             security=self._security)  # fmt: skip
        self._route_lock = threading.Lock()
        self._routing_file: _RoutingFile | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._requests: dict[int, int] = defaultdict(int)
        self._keys: dict[int, int] = defaultdict(int)
        self._fallbacks = 0
        self._fallback_keys = 0
        self._unowned_keys = 0
        self._reroutes = 0

    @property
    def plan(self) -> Plan:
        """The plan the next call routes by."""
        return self._route.plan

    @property
    def endpoints(self) -> dict[int, list[str]]:
        """Partition → its agents' endpoints, as the next call routes."""
        return self._route.endpoints

    # -- construction from files -----------------------------------------------------------------

    @classmethod
    def from_routing(cls, raw: Mapping[str, Any], **options: Any) -> RoutedClient:
        """From a routing document ``{"plan": {...}, "endpoints": {"0": [...], ...}}``."""
        plan, endpoints = parse_routing(raw)
        return cls(plan, endpoints, **options)

    @classmethod
    def from_routing_file(
        cls, path: str | Path, *, follow: bool = True, poll_s: float = ROUTING_POLL_S, **options: Any
    ) -> RoutedClient:
        """From a JSON file as :func:`routing_document` writes it. With ``follow`` the client looks at
        the file at most every ``poll_s`` seconds before a call and reroutes when it was replaced
        (write a new file and rename it over the old one), and re-reads it at once when every agent
        it routes to refuses a call."""
        watch = _RoutingFile(Path(path), poll_s)
        try:
            plan, endpoints = read_routing_file(path)
        except FileNotFoundError:
            raise InvalidArgumentError(f"routing file {path} not found") from None
        client = cls(plan, endpoints, **options)
        client._routing_file = watch if follow else None
        return client

    @classmethod
    def from_local_state(
        cls,
        state_dir: str | Path | None = None,
        *,
        follow: bool = True,
        poll_s: float = ROUTING_POLL_S,
        **options: Any,
    ) -> RoutedClient:
        """Routes by the plan of the ``hps local`` stack in ``state_dir`` (default: as ``hps local``),
        following its ``routing.json`` through rebalances (``follow``, ``poll_s``: as
        :meth:`from_routing_file`), with the stack's credentials: its token, and its CA when it serves
        TLS (``options`` may override them)."""
        from node_agent.local.stack import LocalStack

        stack = LocalStack(state_dir)
        watch = _RoutingFile(stack.routing_file, poll_s)
        plan, endpoints = stack.routing()
        client = cls(plan, endpoints, **{**stack.client_credentials(), **options})
        client._routing_file = watch if follow else None
        return client

    # -- rerouting -------------------------------------------------------------------------------

    def reroute(self, plan: Plan, endpoints: Mapping[int, Sequence[str] | str]) -> bool:
        """Routes the next calls by ``plan`` and ``endpoints``, both at once: a call in flight ends on
        the routing it started with (whose channels close after it). Returns ``False`` when both are
        what the client routes by already."""
        listed = _listed_endpoints(endpoints)
        with self._route_lock:
            old = self._route
            if old.plan == plan and old.endpoints == listed:
                return False
            self._route = _Route(plan, listed, timeout=self.timeout, retries=self.retries, security=self._security)
            old.retired = True
            idle = old.users == 0
        with self._stats_lock:
            self._reroutes += 1
        if idle:
            old.close()
        log.info(
            "routing by plan version %d (was %d): %s", plan.version, old.plan.version,
            "; ".join(f"partition {p}: {','.join(eps)}" for p, eps in listed.items()),
        )  # fmt: skip
        return True

    def _follow_routing(self, *, force: bool = False) -> bool:
        """Reroutes when the followed routing file was replaced; returns whether it did."""
        watch = self._routing_file
        if watch is None:
            return False
        routing = watch.replaced(force=force)
        return routing is not None and self.reroute(*routing)

    @contextlib.contextmanager
    def _using(self) -> Iterator[_Route]:
        with self._route_lock:
            route = self._route
            route.users += 1
        try:
            yield route
        finally:
            with self._route_lock:
                route.users -= 1
                finished = route.retired and route.users == 0
            if finished:
                route.close()

    # -- lookups ---------------------------------------------------------------------------------

    def lookup(self, model: str, table: str, keys: Any) -> np.ndarray:
        """Vectors of ``keys`` in ``table``: ``(len(keys), dim)`` in the table's dtype, as
        :meth:`Client.lookup`."""
        return self.lookup_many(model, {table: keys})[table]

    def lookup_many(self, model: str, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{table: keys}`` → ``{table: (len(keys), dim)}``, each partition asked once."""
        self._follow_routing()
        keyed = {table: wire.as_keys(keys) for table, keys in batch.items()}
        with self._using() as route:
            try:
                return self._lookup_on(route, model, keyed)
            except UnavailableError:
                # every agent named refused: drained by a rebalance whose routing this client has not
                # read yet (or read by another thread meanwhile); a fresh routing gets one more try
                if not self._follow_routing(force=True) and self._route is route:
                    raise
                log.info("no agent of plan version %d answered; retrying on the new routing", route.plan.version)
        with self._using() as route:
            return self._lookup_on(route, model, keyed)

    def _lookup_on(self, route: _Route, model: str, keyed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_once(route, model)
        split = self._split(route, keyed)
        answers = self._ask_partitions(route, model, split)
        out: dict[str, np.ndarray] = {}
        for table, keys in keyed.items():
            parts = [(sub[table][0], answers[p][table]) for p, sub in split.items() if table in sub]
            if len(parts) == 1 and parts[0][0] is None:
                out[table] = parts[0][1]
                continue
            first = parts[0][1]
            rows = np.empty((keys.shape[0], *first.shape[1:]), dtype=first.dtype)
            for positions, vectors in parts:
                rows[positions] = vectors
            out[table] = rows
        return out

    def _split(self, route: _Route, keyed: Mapping[str, np.ndarray]) -> _Split:
        split: _Split = defaultdict(dict)
        empty: list[str] = []
        unowned = 0
        for table, keys in keyed.items():
            if keys.shape[0] == 0:
                empty.append(table)
                continue
            owners_of_buckets = route.owner_array(table)
            if owners_of_buckets is None:
                # not in the plan (a table newer than the plan, or a typo the agent will name)
                owners = np.full(keys.shape[0], -1, dtype=np.int32)
            else:
                owners = owners_of_buckets[bucket_of(keys, route.plan.bucket_count)]
            lost = owners < 0
            if lost.any():
                unowned += int(lost.sum())
                owners = np.where(lost, route.order[0], owners)
            low, high = int(owners.min()), int(owners.max())
            if low == high:
                split[low][table] = (None, keys)
                continue
            order = np.argsort(owners, kind="stable")
            cuts = np.flatnonzero(np.diff(owners[order])) + 1
            for positions in np.split(order, cuts):
                split[int(owners[positions[0]])][table] = (positions, keys[positions])
        # a table asked with no keys still needs its (0, dim) shape and dtype: any partition tells
        for table in empty:
            split[next(iter(split), route.order[0])][table] = (None, keyed[table])
        if unowned:
            with self._stats_lock:
                self._unowned_keys += unowned
        return dict(split)

    def _ask_partitions(self, route: _Route, model: str, split: _Split) -> dict[int, dict[str, np.ndarray]]:
        items = list(split.items())
        if not items:  # no table asked: nothing to ask anyone
            return {}
        if len(items) == 1:
            partition, tables = items[0]
            return {partition: self._ask(route, model, partition, tables)}
        pool = self._executor()
        pending: list[tuple[int, Future[dict[str, np.ndarray]]]] = [
            (partition, pool.submit(self._ask, route, model, partition, tables)) for partition, tables in items[1:]
        ]
        # the caller's thread asks one partition itself rather than idle while the pool works
        answers = {items[0][0]: self._ask(route, model, items[0][0], items[0][1])}
        for partition, future in pending:
            answers[partition] = future.result()
        return answers

    def _ask(
        self, route: _Route, model: str, partition: int, tables: Mapping[str, tuple[np.ndarray | None, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """One partition's share of a call, from its agents or, failing them, another partition's."""
        request = {table: keys for table, (_, keys) in tables.items()}
        count = sum(int(k.shape[0]) for k in request.values())
        failures: list[str] = []
        for candidate in self._candidates(route, partition):
            try:
                answer = route.clients[candidate].lookup_many(model, request)
            except UnavailableError as exc:
                with self._stats_lock:
                    route.down_until[candidate] = time.monotonic() + self.cooloff_s
                failures.append(f"partition {candidate}: {exc}")
                continue
            with self._stats_lock:
                route.down_until.pop(candidate, None)
                self._requests[candidate] += 1
                self._keys[candidate] += count
                if candidate != partition:
                    self._fallbacks += 1
                    self._fallback_keys += count
            if candidate != partition:
                log.debug(
                    "partition %d did not answer; %d keys served by partition %d", partition, count, candidate
                )
            return answer
        raise UnavailableError(
            f"no partition's agents answered a lookup of model {model!r}: {'; '.join(failures)}"
        )

    def _candidates(self, route: _Route, partition: int) -> list[int]:
        """Who to ask for ``partition``'s keys, in order: its own agents, then the other partitions
        (the next ones first, so one partition's load spreads rather than piling on partition 0);
        partitions that failed within ``cooloff_s`` go last."""
        start = next((i for i, p in enumerate(route.order) if p > partition), 0)
        ring = route.order[start:] + route.order[:start]
        ordered = ([partition] if partition in route.clients else []) + [p for p in ring if p != partition]
        now = time.monotonic()
        with self._stats_lock:
            cooling = {p for p in ordered if route.down_until.get(p, 0.0) > now}
        return [p for p in ordered if p not in cooling] + [p for p in ordered if p in cooling]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # threads start only as calls need them: a reroute to more partitions needs no new pool
                self._pool = ThreadPoolExecutor(
                    max_workers=MAX_PARALLEL_PARTITIONS, thread_name_prefix="hps-route"
                )
            return self._pool

    # -- the plan the agents run -----------------------------------------------------------------

    def check_plan(self, model: str) -> list[PlanMismatch]:
        """Asks every listed agent (Describe) which partition and plan version it serves; logs a
        warning for each that differs from the routing map and returns them. Agents that do not
        answer are left out (lookups fail over around them)."""
        with self._using() as route:
            return self._check_plan_on(route, model)

    def _check_plan_on(self, route: _Route, model: str) -> list[PlanMismatch]:
        jobs = [(p, e) for p, eps in route.endpoints.items() for e in eps]
        pool = self._executor()
        futures = [(p, e, pool.submit(self._describe_one, model, e)) for p, e in jobs]
        mismatches: list[PlanMismatch] = []
        for partition, endpoint, future in futures:
            info = future.result()
            if info is None:
                continue
            if info.plan_version != route.plan.version or info.partition != partition:
                mismatch = PlanMismatch(
                    endpoint, partition, route.plan.version, info.partition, info.plan_version
                )
                log.warning("%s: lookups stay exact, but keys routed to it may miss its cache", mismatch)
                mismatches.append(mismatch)
        with route.check_lock:
            route.checked[model] = mismatches
        return mismatches

    def _describe_one(self, model: str, endpoint: str) -> ModelInfo | None:
        try:
            with Client(endpoint, timeout=min(self.timeout, _PLAN_CHECK_TIMEOUT_S), retries=0,
                        **self._security) as client:  # fmt: skip
                return client.describe(model)
        except HpsError as exc:
            log.debug("plan check: %s did not describe model %s: %s", endpoint, model, exc)
            return None

    def _check_once(self, route: _Route, model: str) -> None:
        if model in route.checked:
            return
        with route.check_lock:
            if model in route.checked:
                return
            # marked first: a second thread's lookup must not wait for (or repeat) this check
            route.checked[model] = []
        self._check_plan_on(route, model)

    def describe(self, model: str) -> ModelInfo:
        """What the first answering partition serves of ``model`` (the tables are the same on all)."""
        self._follow_routing()
        with self._using() as route:
            self._check_once(route, model)
            failures: list[str] = []
            for candidate in self._candidates(route, route.order[0]):
                try:
                    return route.clients[candidate].describe(model)
                except UnavailableError as exc:
                    failures.append(f"partition {candidate}: {exc}")
        raise UnavailableError(
            f"no partition's agents answered Describe of model {model!r}: {'; '.join(failures)}"
        )

    def describe_partitions(self, model: str) -> dict[int, ModelInfo]:
        """Each partition's Describe (partitions with no agent answering are left out)."""
        self._follow_routing()
        out: dict[int, ModelInfo] = {}
        with self._using() as route:
            for partition, client in route.clients.items():
                try:
                    out[partition] = client.describe(model)
                except UnavailableError:
                    continue
        return out

    def agent_stats(self, model: str) -> dict[int, dict[str, Any]]:
        """Each partition's agent counters (Stats of one of its agents); silent partitions left out."""
        self._follow_routing()
        out: dict[int, dict[str, Any]] = {}
        with self._using() as route:
            for partition, client in route.clients.items():
                try:
                    out[partition] = client.stats(model)
                except UnavailableError:
                    continue
        return out

    def routing_stats(self) -> dict[str, Any]:
        """What this client routed: requests and keys per partition of the current routing, the
        sub-requests (and their keys) another partition served, keys of buckets the plan gives no
        partition, how often it rerouted, and the agents found on another plan (current routing)."""
        route = self._route
        with self._stats_lock:
            partitions = {
                p: {
                    "endpoints": list(route.endpoints[p]),
                    "requests": self._requests[p],
                    "keys": self._keys[p],
                }
                for p in route.order
            }
            stats: dict[str, Any] = {
                "plan_version": route.plan.version,
                "partitions": partitions,
                "fallbacks": self._fallbacks,
                "fallback_keys": self._fallback_keys,
                "unowned_keys": self._unowned_keys,
                "reroutes": self._reroutes,
            }
        with route.check_lock:
            stats["plan_mismatches"] = [str(m) for found in route.checked.values() for m in found]
        return stats

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._route_lock:
            route = self._route
            route.retired = True
            idle = route.users == 0
        if idle:
            route.close()

    def __enter__(self) -> RoutedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
