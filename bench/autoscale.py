"""Autoscaling over a day: a seeded day-long QPS trace (diurnal, with a flash-crowd spike) replayed through
the HPA algorithm (replicas) and the partition autoscaler (partitions) of ``hps_operator.core.elasticity``
for a Criteo-like model, the real planner re-planning on every partition change. Side by side in the same
run: the HPA alone at the fewest and at the most partitions, and static provisioning for the peak.
Prints a table and writes ``bench/results/autoscale.json`` and, with matplotlib (``pip install
.[bench]``), ``bench/results/autoscale.png``.

    .venv/bin/python bench/autoscale.py [--seed 42] [--zipf 1.05] [--target-hit-rate 0.85] [--no-plot]
                                        [--equal-hotness] [--l1-split agents|max-min-fair]

The model: Criteo-1TB's 26 categorical cardinalities, dim 128 float32 (96 GB), 2 GPUs per pod with a
4 GiB L1 budget each and ``cachedFraction`` 0.05 (a GPU owns up to 80 GiB of shards and caches a share
of them), hotness left to the planner's default. Every Criteo sample looks up each table once, so the
model's hit rate weighs the 26 tables equally.

Hit rate as a function of cache size: **Che's approximation** for an LRU cache under the independent
reference model (Che, Tung, Wang 2002; Fricker, Robert, Roberts 2012): with request probabilities
``p_i`` and ``C`` slots, the characteristic time ``T`` solves ``sum_i (1 - exp(-p_i T)) = C`` and the hit
rate is ``sum_i p_i (1 - exp(-p_i T))``. Keys are Zipf(``--zipf``) over the table's *active* keys. A
table split over GPUs is a set of shards, each a hash-uniform sample ``q`` of the keys with the cache
the agents give it (``split_budget`` of ``memoryPerGPU`` over the GPU's shards, as ``build_l1`` does), and
a sample's LRU behaves like the whole table's with ``C / q`` slots. The sums run over Zipf ranks binned
geometrically (exact for the first 2,048). ``validation`` in the JSON (and
``tests/operator/test_elasticity.py``) checks Che against an exact LRU simulation of a sampled trace
and against the agents' own 32-way set-associative L1 admitting every miss (HPS's LRU). The agents'
default L1 admits a miss only when TinyLFU counts it more often asked than its victim, which does
better than LRU (and no better than holding the hottest keys, the ``staticTopC`` figure): the hit rates
here are the pessimistic side of the agents'. The agents also count distinct keys per batch, which
weighs the tail more than this per-lookup hit rate does.

Traffic (assumptions, all seeded): QPS is lookup RPCs of 64 samples (26 x 64 keys each); a diurnal
shape with its trough at 04:30 and an evening peak, multiplicative noise of 3 % per 15 s, and a flash
crowd of x2.5 at 11:00 for 25 min. The *active* share of each table's keys (users and items in play)
follows the diurnal shape from 30 % to 100 %; the flash crowd asks for keys already in play (a live
event), so it raises QPS and not the working set. New replicas are pending 45 s, then load and warm for
120 s (no QPS sample for their first 60 s, then 0) before they take traffic; a partition change is a
make-before-break rollout of 60 s plus the moved bytes at ``--warm-gbps`` per replica, during which the
old and the new pods hold GPUs.

Two side figures in the JSON say how much of the hit rate is the cache's layout rather than its size:
``hotnessHint`` (the planner's plans by partition count with the default hotness and with the true,
equal, per-table lookup share) and ``l1SplitCheck`` (the hit rate at the peak working set with the
agents' proportional L1 split against a max-min fair one that caches small shards whole first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from hps_operator.core.elasticity import (
    HorizontalPodAutoscaler,
    HPASpec,
    PartitionAutoscaler,
    PartitionAutoscaling,
    PartitionSample,
    PodMetric,
)
from hps_operator.core.planner import plan_placement
from hps_operator.core.render.autoscaling import render_hpa
from hps_operator.core.topology import Topology

from node_agent.cache.l1 import FULL_TABLE_HEADROOM_PERCENT, split_budget
from node_agent.cache.set_associative import SetAssociativeCache, bytes_for_rows, rows_for_bytes
from node_agent.plan import Plan
from node_agent.spec import ModelSpec, parse_model_spec

RESULTS = Path(__file__).resolve().parent / "results"

#: Criteo-1TB's 26 categorical cardinalities (public); at dim 128 float32 the tables hold 96 GB
CRITEO_ROWS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip
DAY_S = 86_400.0


@dataclass(frozen=True)
class Scenario:
    seed: int = 42
    step_s: float = 15.0  # the HPA controller's sync period
    partition_sample_s: float = 30.0  # how often the partition autoscaler gets a sample
    zipf: float = 1.05
    # the model
    dim: int = 128
    gpus_per_pod: int = 2
    memory_per_gpu: str = "4Gi"
    cached_fraction: float = 0.05
    equal_hotness: bool = False
    # spec.autoscaling and spec.autoscaling.partitions
    min_replicas: int = 1
    max_replicas: int = 16
    target_qps_per_replica: int = 20_000
    min_partitions: int = 2
    max_partitions: int = 8
    target_hit_rate: float = 0.85
    # traffic
    peak_qps: float = 120_000.0
    night_share: float = 0.15  # trough QPS over peak QPS
    min_active: float = 0.30  # share of each table's keys in play at the trough
    samples_per_rpc: int = 64
    qps_noise: float = 0.03
    spike_at_h: float = 11.0
    spike_minutes: float = 25.0
    spike_factor: float = 2.5
    hit_rate_noise: float = 0.005  # of the measured (not the true) hit rate
    # the serving side
    gpu_keys_per_s: float = 40e6  # one GPU's lookup path, keys per second
    schedule_s: float = 45.0
    warm_s: float = 120.0
    rate_window_s: float = 60.0
    rollout_base_s: float = 60.0
    warm_gbps: float = 1.0

    @property
    def keys_per_rpc(self) -> int:
        return self.samples_per_rpc * len(CRITEO_ROWS)


# ---------------------------------------------------------------------------------------------
# the hit-rate model: Che's approximation for LRU under Zipf


@lru_cache(maxsize=4096)
def zipf_popularity(
    n: int, alpha: float, *, head: int = 2048, ratio: float = 1.002
) -> tuple[np.ndarray, np.ndarray]:
    """Request probabilities of Zipf(``alpha``) over ``n`` keys as ``(p, count)`` bins: ranks
    ``1..head`` one per bin, then geometric bins of width ratio ``ratio`` whose ``p`` is the bin's mean
    (the integral of ``x^-alpha`` over it), so sums over a 40M-key table take ~7,000 terms."""
    k = min(n, head)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    weight, count = ranks**-alpha, np.ones(k)
    if n > k:
        steps = int(math.log((n + 0.5) / (k + 0.5)) / math.log(ratio)) + 2
        edges = np.unique(np.round(np.geomspace(k + 0.5, n + 0.5, steps)))
        lo, hi = edges[:-1], edges[1:]
        if abs(alpha - 1.0) < 1e-12:
            mass = np.log(hi / lo)
        else:
            mass = (hi ** (1 - alpha) - lo ** (1 - alpha)) / (1 - alpha)
        weight = np.concatenate([weight, mass / (hi - lo)])
        count = np.concatenate([count, hi - lo])
    p = weight / float((weight * count).sum())
    p.setflags(write=False)
    count.setflags(write=False)
    return p, count


def che_hit_rate(p: np.ndarray, count: np.ndarray, capacities: Sequence[float] | np.ndarray) -> np.ndarray:
    """Che's approximation of an LRU cache's hit rate for each capacity (in keys), keys requested
    with probabilities ``p`` (``count`` keys per entry). Newton from ``T = C``: the left side is
    concave and increasing in ``T``, so the iterates climb to the root without overshooting."""
    caps = np.atleast_1d(np.asarray(capacities, dtype=np.float64))
    keys = float(count.sum())
    out = np.ones_like(caps)
    small = caps < keys
    if not small.any():
        return out
    target = caps[small]
    t = target.copy()
    for _ in range(200):
        e = np.exp(-np.outer(t, p))
        g = ((1.0 - e) * count).sum(axis=1) - target
        step = g / (count * p * e).sum(axis=1)
        t -= step
        if np.all(np.abs(step) <= 1e-10 * t):
            break
    out[small] = (count * p * (1.0 - np.exp(-np.outer(t, p)))).sum(axis=1)
    return out


def exact_lru_hit_rate(n: int, alpha: float, capacity: int, requests: int, seed: int) -> float:
    """An exact LRU cache of ``capacity`` keys fed ``requests`` Zipf(``alpha``) draws over ``n`` keys;
    the hit rate after the first fifth (the warm-up)."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    draws = rng.choice(n, size=requests, p=p / p.sum()).tolist()
    cache: OrderedDict[int, None] = OrderedDict()
    warm = requests // 5
    hits = 0
    for i, key in enumerate(draws):
        if key in cache:
            cache.move_to_end(key)
            hits += i >= warm
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / (requests - warm)


def static_top_hit_rate(p: np.ndarray, count: np.ndarray, capacity: float) -> float:
    """The hit rate of a cache holding the ``capacity`` most popular keys: under a stationary
    popularity no policy without foresight does better in the long run."""
    order = np.argsort(-p, kind="stable")
    cumulative = np.cumsum(count[order])
    full = int(np.searchsorted(cumulative, capacity, side="right"))
    held = float((p[order][:full] * count[order][:full]).sum())
    if full < len(order):  # part of the next bin
        held += float(p[order][full]) * (capacity - (float(cumulative[full - 1]) if full else 0.0))
    return min(1.0, held)


def agent_cache_hit_rate(
    n: int, alpha: float, capacity: int, requests: int, *, batch: int, seed: int, admission: str = "always"
) -> float:
    """The agents' own L1 (:class:`SetAssociativeCache`, 32-way LRU eviction) fed the same kind of
    trace in batches as the lookup path feeds it (query, then insert the misses); hits per lookup
    after the first fifth. ``admission="always"`` is HPS's admit-every-miss LRU, which Che's
    approximation models; the agents' default, ``"tinylfu"``, admits a miss only when it was asked
    for more often than its victim, and does better."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    keys = rng.choice(n, size=requests, p=p / p.sum()).astype(np.int64)
    cache = SetAssociativeCache(dim=4, capacity_rows=capacity, admission=admission)
    warm = requests // 5
    hits = 0
    for start in range(0, requests, batch):
        chunk = keys[start : start + batch]
        _, hit = cache.query(chunk)
        missed = np.unique(chunk[~hit])
        if missed.size:
            cache.insert(missed, np.zeros((missed.size, 4), dtype=np.float32))
        if start >= warm:
            hits += int(hit.sum())
    return hits / (requests - (warm + -warm % batch))


Split = Callable[[int, Mapping[str, int]], dict[str, int]]


def max_min_fair_split(budget: int, wants: Mapping[str, int]) -> dict[str, int]:
    """Not what the agents do (see :func:`split_budget`): every shard gets what it wants up to an
    equal share, the rest going round again, so small shards are cached whole first. For the
    ``l1SplitCheck`` figure only."""
    grants: dict[str, int] = {}
    left = budget
    pending = sorted(wants.items(), key=lambda kv: kv[1])
    for i, (name, want) in enumerate(pending):
        grants[name] = min(max(0, want), left // (len(pending) - i))
        left -= grants[name]
    return grants


def shard_caches(
    model: ModelSpec, plan: Plan, split: Split = split_budget
) -> dict[str, list[tuple[float, int]]]:
    """For each table, its shards as ``(share of the table's buckets, L1 rows)``: each GPU splits
    ``memoryPerGPU`` over its shards in proportion to their rows plus headroom and rounds each cache
    down to whole sets, as ``build_l1`` does (``split`` replaces the proportional split)."""
    tables = {t.name: t for t in model.tables}
    buckets: dict[tuple[int, int, str], int] = defaultdict(int)
    for a in plan.assignments:
        buckets[(a.partition, a.gpu, a.table)] += a.buckets[1] - a.buckets[0]
    wants: dict[tuple[int, int], dict[str, int]] = defaultdict(dict)
    for (partition, gpu, name), n in buckets.items():
        t = tables[name]
        rows = -(-t.rows * n // plan.bucket_count)
        wanted = rows + -(-rows * FULL_TABLE_HEADROOM_PERCENT // 100)
        wants[(partition, gpu)][name] = bytes_for_rows(wanted, dim=t.dim, dtype=t.dtype)
    out: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for (partition, gpu), by_table in wants.items():
        for name, grant in split(model.cache.memory_per_gpu, by_table).items():
            t = tables[name]
            share = buckets[(partition, gpu, name)] / plan.bucket_count
            rows = rows_for_bytes(grant, dim=t.dim, dtype=t.dtype)
            ways = max(1, min(model.cache.associativity, rows))  # whole sets only, as the cache has
            out[name].append((share, rows // ways * ways))
    return out


class HitRateModel:
    """The model's L1 hit rate under a plan as a function of the active share of keys: Che per
    shard on a grid of active shares, interpolated; one grid per distinct plan."""

    def __init__(
        self, model: ModelSpec, alpha: float, grid: Sequence[float] | np.ndarray, split: Split = split_budget
    ) -> None:
        self.model, self.alpha, self.grid = model, alpha, np.asarray(grid, dtype=np.float64)
        self.split = split
        self._curves: dict[tuple[Any, ...], np.ndarray] = {}

    def curve(self, plan: Plan) -> np.ndarray:
        key = (plan.bucket_count, plan.assignments)
        if key not in self._curves:
            shards = shard_caches(self.model, plan, self.split)
            per_table = []
            for t in self.model.tables:
                share = np.array([q for q, _ in shards[t.name]])
                rows = np.array([c for _, c in shards[t.name]], dtype=np.float64)
                row = []
                for active in self.grid:
                    p, count = zipf_popularity(max(1, round(t.rows * active)), self.alpha)
                    row.append(float((share * che_hit_rate(p, count, rows / share)).sum()))
                per_table.append(row)
            # every Criteo sample looks up each table once: the tables weigh the same
            self._curves[key] = np.mean(np.array(per_table), axis=0)
        return self._curves[key]

    def hit_rate(self, plan: Plan, active: float) -> float:
        return float(np.interp(active, self.grid, self.curve(plan)))


# ---------------------------------------------------------------------------------------------
# traffic


@dataclass(frozen=True)
class Traffic:
    t: np.ndarray
    qps: np.ndarray
    #: share of each table's keys in play
    active: np.ndarray

    def points(self) -> list[tuple[float, float, float]]:
        """``(time, qps, active share)`` per step, as Python floats."""
        return list(zip(self.t.tolist(), self.qps.tolist(), self.active.tolist(), strict=True))


def diurnal(hours: np.ndarray) -> np.ndarray:
    """0 at the 04:30 trough, 1 at the evening peak: a daily cosine plus an evening bump."""
    base = 0.5 - 0.5 * np.cos(2 * np.pi * (hours - 4.5) / 24)
    shape = base + 0.35 * np.exp(-(((hours - 20.5) / 1.8) ** 2))
    return (shape - shape.min()) / (shape.max() - shape.min())


def make_traffic(scn: Scenario) -> Traffic:
    rng = np.random.default_rng(scn.seed)
    t = np.arange(0.0, DAY_S, scn.step_s)
    hours = t / 3600
    d = diurnal(hours)
    start, ramp = scn.spike_at_h * 3600, 120.0
    end = start + scn.spike_minutes * 60
    rise = np.clip((t - start) / ramp, 0, 1) * np.clip((end - t) / ramp, 0, 1)
    spike = 1 + (scn.spike_factor - 1) * rise
    noise = rng.lognormal(0.0, scn.qps_noise, t.size)
    qps = scn.peak_qps * (scn.night_share + (1 - scn.night_share) * d) * spike * noise
    return Traffic(t, qps, scn.min_active + (1 - scn.min_active) * d)


# ---------------------------------------------------------------------------------------------
# the model and one day of serving it


def criteo_model(scn: Scenario, partitions: int) -> ModelSpec:
    hot = {"hotness": 1 / len(CRITEO_ROWS)} if scn.equal_hotness else {}
    tables = [{"name": f"c{i}", "rows": r, "dim": scn.dim, **hot} for i, r in enumerate(CRITEO_ROWS)]
    return parse_model_spec(
        "criteo",
        {
            "tables": tables,
            "gpusPerPod": scn.gpus_per_pod,
            "partitions": partitions,
            "cache": {"memoryPerGPU": scn.memory_per_gpu, "cachedFraction": scn.cached_fraction},
            "autoscaling": {
                "minReplicas": scn.min_replicas,
                "maxReplicas": scn.max_replicas,
                "targetQPSPerReplica": scn.target_qps_per_replica,
            },
        },
    )


@dataclass
class Replica:
    created: float


@dataclass
class Run:
    name: str
    t: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    serving: list[int] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    hit_rate: list[float] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    qps_per_replica: list[float] = field(default_factory=list)  # per serving replica
    moved_bytes: list[int] = field(default_factory=list)  # cumulative, every replica
    events: list[dict[str, Any]] = field(default_factory=list)

    def record(self, now: float, replicas: int, serving: int, partitions: int, hit_rate: float,
               qps_per_replica: float, gpus: int, moved_bytes: int) -> None:  # fmt: skip
        self.t.append(now)
        self.replicas.append(replicas)
        self.serving.append(serving)
        self.partitions.append(partitions)
        self.hit_rate.append(hit_rate)
        self.qps_per_replica.append(qps_per_replica)
        self.gpus.append(gpus)
        self.moved_bytes.append(moved_bytes)

    def summary(self, scn: Scenario, total_bytes: int) -> dict[str, Any]:
        hit = np.array(self.hit_rate)
        below = float((hit < scn.target_hit_rate).sum() * scn.step_s / 3600)
        changes = [e for e in self.events if e["kind"] == "partitions"]
        return {
            "gpuHours": round(float(np.sum(self.gpus) * scn.step_s / 3600), 1),
            "peakReplicas": int(max(self.replicas)),
            "meanReplicas": round(float(np.mean(self.replicas)), 2),
            "maxQPSPerServingReplica": round(max(self.qps_per_replica)),
            "replicaChanges": sum(1 for e in self.events if e["kind"] == "replicas"),
            "partitionsMin": int(min(self.partitions)),
            "partitionsMax": int(max(self.partitions)),
            "partitionChanges": len(changes),
            "movedBytes": int(self.moved_bytes[-1]),
            "movedBytesPerReplica": int(sum(e["movedBytesPerReplica"] for e in changes)),
            "movedOverModel": round(sum(e["movedBytesPerReplica"] for e in changes) / total_bytes, 3),
            "hoursBelowTargetHitRate": round(below, 2),
            "meanHitRate": round(float(hit.mean()), 4),
            "minHitRate": round(float(hit.min()), 4),
        }


def simulate(
    scn: Scenario, traffic: Traffic, hits: HitRateModel, *, name: str, partitions: int, autoscale: bool
) -> Run:
    """One day: the HPA every ``step_s`` on the HPA that ``render_hpa`` writes for the model, the
    partition autoscaler (when ``autoscale``) every ``partition_sample_s``, each change re-planned by
    ``plan_placement`` from the plan in use."""
    rng = np.random.default_rng(scn.seed + 1)
    model = criteo_model(scn, partitions)
    hpa = HorizontalPodAutoscaler(HPASpec.from_manifest(render_hpa(model, owner=_OWNER) or {}))
    limits = PartitionAutoscaling(
        min=scn.min_partitions, max=scn.max_partitions, target_hit_rate=scn.target_hit_rate
    )
    autoscaler = PartitionAutoscaler(limits)
    plan = plan_placement(model, Topology.from_model(model))
    first = max(1, math.ceil(traffic.qps[0] / scn.target_qps_per_replica))
    replicas = [Replica(-DAY_S) for _ in range(first)]  # serving since yesterday
    rate = float(traffic.qps[0])
    rollout: tuple[float, Plan] | None = None
    moved = 0
    run = Run(name)
    sample_every = round(scn.partition_sample_s / scn.step_s)
    for i, (now, qps, active) in enumerate(traffic.points()):
        if rollout is not None and now >= rollout[0]:
            plan, rollout = rollout[1], None
        # the metric is a rate over a window: an exponential average stands in for it
        rate += (qps - rate) * min(1.0, scn.step_s / scn.rate_window_s)
        ages = [now - r.created for r in replicas]
        serving = max(1, sum(age >= scn.schedule_s + scn.warm_s for age in ages))
        pods = [_pod(k, age, rate / serving, scn) for k, age in enumerate(ages)]
        decision = hpa.reconcile(now, len(replicas), pods)
        if decision.rescale:
            run.events.append(
                {"kind": "replicas", "t": now, "from": len(replicas), "to": decision.desired_replicas,
                 "reason": decision.message}
            )  # fmt: skip
            if decision.desired_replicas > len(replicas):
                replicas += [Replica(now) for _ in range(decision.desired_replicas - len(replicas))]
            else:  # the newest go first, out of routing before their pods do
                del replicas[decision.desired_replicas :]
        true_hit = hits.hit_rate(plan, active)
        if autoscale and i % sample_every == 0:
            keys_per_gpu = rate / serving * scn.keys_per_rpc / (plan.partitions * plan.gpus_per_pod)
            busiest = keys_per_gpu * plan.metrics.imbalance / scn.gpu_keys_per_s
            measured = float(np.clip(true_hit + rng.normal(0.0, scn.hit_rate_noise), 0.0, 1.0))
            lookups = int(rate * scn.partition_sample_s * scn.keys_per_rpc)
            step = autoscaler.observe(PartitionSample(now, plan.partitions, measured, busiest, lookups))
            if step.action != "hold" and rollout is None:
                new = plan_placement(model, Topology.from_model(model, partitions=step.partitions), plan)
                per_replica = new.metrics.moved_bytes
                moved += per_replica * len(replicas)
                rollout = (now + scn.rollout_base_s + per_replica / (scn.warm_gbps * 1e9), new)
                run.events.append({
                    "kind": "partitions", "t": now, "from": plan.partitions, "to": new.partitions,
                    "code": step.code, "reason": step.reason, "movedBytesPerReplica": per_replica,
                    "rolloutSeconds": round(rollout[0] - now, 1), "hitRateBefore": round(true_hit, 4),
                    "hitRateAfter": round(hits.hit_rate(new, active), 4),
                })  # fmt: skip
        # make-before-break: while a change rolls out, the new pods run beside the old ones
        pods_per_replica = plan.partitions + (rollout[1].partitions if rollout else 0)
        run.record(now, len(replicas), serving, plan.partitions, true_hit, rate / serving,
                   len(replicas) * pods_per_replica * scn.gpus_per_pod, moved)  # fmt: skip
    return run


def static_peak(scn: Scenario, traffic: Traffic, hits: HitRateModel) -> Run:
    """No autoscaling: enough replicas for the day's highest QPS, at the most partitions."""
    model = criteo_model(scn, scn.max_partitions)
    plan = plan_placement(model, Topology.from_model(model))
    replicas = min(scn.max_replicas, math.ceil(float(traffic.qps.max()) / scn.target_qps_per_replica))
    run = Run("static for the peak")
    gpus = replicas * plan.partitions * scn.gpus_per_pod
    for now, qps, active in traffic.points():
        hit = hits.hit_rate(plan, active)
        run.record(now, replicas, replicas, plan.partitions, hit, qps / replicas, gpus, 0)
    return run


_OWNER = {"apiVersion": "hps.dev/v1alpha1", "kind": "EmbeddingModel", "name": "criteo", "uid": "bench"}


def _pod(index: int, age: float, per_replica_qps: float, scn: Scenario) -> PodMetric:
    """Partition 0's agent pod of one replica as the HPA sees it."""
    name = f"criteo-agent-p0-{index}"
    if age < scn.schedule_s:
        return PodMetric(name, None, "Pending")
    if age < scn.schedule_s + scn.rate_window_s:
        return PodMetric(name, None)  # running, but no rate until two scrapes
    if age < scn.schedule_s + scn.warm_s:
        return PodMetric(name, 0.0)  # warming: serves nothing yet
    return PodMetric(name, per_replica_qps)


# ---------------------------------------------------------------------------------------------
# report


def validation(alpha: float, seed: int) -> list[dict[str, float]]:
    """Che against an exact LRU, against the agents' set-associative L1 admitting every miss (batches
    of 64), and beside the agents' default L1 (TinyLFU admission) and the static top-C bound, on
    sampled Zipf traces small enough to run here."""
    out = []
    n = 5_000
    p, count = zipf_popularity(n, alpha)
    for capacity in (256, 1024, 4096):
        che = float(che_hit_rate(p, count, [capacity])[0])
        exact = exact_lru_hit_rate(n, alpha, capacity, 200_000, seed)
        lru = agent_cache_hit_rate(n, alpha, capacity, 100_000, batch=64, seed=seed)
        tinylfu = agent_cache_hit_rate(n, alpha, capacity, 100_000, batch=64, seed=seed, admission="tinylfu")
        out.append({
            "keys": n, "alpha": alpha, "capacity": capacity, "che": round(che, 4),
            "exactLru": round(exact, 4), "agentL1Lru": round(lru, 4), "agentL1TinyLfu": round(tinylfu, 4),
            "staticTopC": round(static_top_hit_rate(p, count, capacity), 4),
            "errorVsExact": round(che - exact, 4), "errorVsAgentL1Lru": round(che - lru, 4),
        })  # fmt: skip
    return out


def hotness_check(scn: Scenario) -> list[dict[str, Any]]:
    """What the planner's ``hotness`` hint does to the cache: with the default (proportional to rows)
    more partitions spread the bytes; with equal hotness (the true Criteo lookup share) they spread
    lookup load by moving the small tables and leave the large ones where they were."""
    rows = []
    for equal in (False, True):
        s = replace(scn, equal_hotness=equal)
        model = criteo_model(s, scn.min_partitions)
        hits = HitRateModel(model, scn.zipf, [1.0])
        plan = plan_placement(model, Topology.from_model(model))
        curve = []
        for partitions in range(scn.min_partitions, scn.max_partitions + 1):
            plan = plan_placement(model, Topology.from_model(model, partitions=partitions), plan)
            held = [sum(a.bytes for a in plan.assignments_for(partition=p_)) for p_ in range(plan.partitions)]
            curve.append({"partitions": partitions, "hitRateAtPeak": round(hits.hit_rate(plan, 1.0), 4),
                          "memoryImbalance": round(plan.metrics.memory_imbalance, 3),
                          "largestPartitionBytes": max(held)})  # fmt: skip
        hint = "equal (1/26)" if equal else "default (proportional to rows)"
        rows.append({"hotness": hint, "plans": curve})
    return rows


def l1_split_check(scn: Scenario) -> list[dict[str, Any]]:
    """The model's hit rate at the peak working set with the agents' L1 split (each shard on a GPU
    gets the same share of its rows) against a max-min fair split (small shards cached whole first):
    with every table looked up once per sample, the small tables' share of the hit rate is large."""
    model = criteo_model(scn, scn.min_partitions)
    agents = HitRateModel(model, scn.zipf, [1.0])
    fair = HitRateModel(model, scn.zipf, [1.0], max_min_fair_split)
    plan = plan_placement(model, Topology.from_model(model))
    out = []
    for partitions in range(scn.min_partitions, scn.max_partitions + 1):
        plan = plan_placement(model, Topology.from_model(model, partitions=partitions), plan)
        out.append({
            "partitions": partitions,
            "agentsSplit": round(agents.hit_rate(plan, 1.0), 4),
            "maxMinFairSplit": round(fair.hit_rate(plan, 1.0), 4),
        })  # fmt: skip
    return out


def plot(runs: Sequence[Run], traffic: Traffic, scn: Scenario, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    hours = np.asarray(runs[0].t) / 3600
    fig, axes = plt.subplots(5, 1, figsize=(11, 12), sharex=True)
    elastic, *others = runs
    axes[0].plot(hours, traffic.qps / 1000, lw=0.6, color="tab:gray")
    axes[0].set_ylabel("QPS (k RPC/s)")
    axes[1].step(hours, elastic.replicas, where="post", label="replicas (spec)")
    axes[1].step(hours, elastic.serving, where="post", lw=0.8, label="serving")
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].step(hours, elastic.partitions, where="post", color="tab:green")
    axes[2].set_ylabel("partitions")
    for ax in axes[1:3]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].plot(hours, elastic.hit_rate, label=elastic.name, color="tab:green")
    for run in others:
        if not run.name.startswith("static"):  # its hit rate is the widest fixed count's
            axes[3].plot(hours, run.hit_rate, lw=0.8, label=run.name)
    axes[3].axhline(scn.target_hit_rate, ls="--", color="black", lw=0.8, label="target")
    axes[3].set_ylabel("L1 hit rate")
    axes[3].legend(loc="lower left", fontsize=8)
    axes[4].plot(hours, np.asarray(elastic.moved_bytes) / 1e9, color="tab:red")
    axes[4].set_ylabel("moved (GB, cumulative)")
    axes[4].set_xlabel("hour of day")
    axes[4].set_xticks(range(0, 25, 2))
    fig.suptitle("Criteo-like model over a day: HPA replicas and partition autoscaling", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _downsample(values: Sequence[float] | np.ndarray, every: int, digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values[::every]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=Scenario.seed)
    parser.add_argument("--zipf", type=float, default=Scenario.zipf)
    parser.add_argument("--target-hit-rate", type=float, default=Scenario.target_hit_rate)
    parser.add_argument("--warm-gbps", type=float, default=Scenario.warm_gbps)
    parser.add_argument("--equal-hotness", action="store_true", help="plan with hotness 1/26 per table")
    parser.add_argument(
        "--l1-split", choices=("agents", "max-min-fair"), default="agents",
        help="how a GPU's L1 budget is split over its shards: as the agents do, or small shards whole first",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "autoscale.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    scn = Scenario(
        seed=args.seed,
        zipf=args.zipf,
        target_hit_rate=args.target_hit_rate,
        warm_gbps=args.warm_gbps,
        equal_hotness=args.equal_hotness,
    )
    started = time.perf_counter()
    traffic = make_traffic(scn)
    model = criteo_model(scn, scn.min_partitions)
    split = split_budget if args.l1_split == "agents" else max_min_fair_split
    hits = HitRateModel(model, scn.zipf, np.linspace(scn.min_active, 1.0, 36), split)
    first = _first_partitions(scn, traffic, hits)
    narrow, wide = scn.min_partitions, scn.max_partitions
    runs = [
        simulate(scn, traffic, hits, name="elastic", partitions=first, autoscale=True),
        *(
            simulate(scn, traffic, hits, name=f"HPA only, {n} partitions", partitions=n, autoscale=False)
            for n in (narrow, wide)
        ),
        static_peak(scn, traffic, hits),
    ]
    summaries = {run.name: run.summary(scn, model.total_bytes) for run in runs}
    static = summaries["static for the peak"]["gpuHours"]
    for s in summaries.values():
        s["gpuHoursOverStatic"] = round(s["gpuHours"] / static, 3)
    elastic = runs[0]
    every = round(300 / scn.step_s)
    png = args.out.with_suffix(".png")
    plotted = not args.no_plot and plot(runs, traffic, scn, png)
    result: dict[str, Any] = {
        "benchmark": "autoscale",
        "command": " ".join(["bench/autoscale.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "scenario": {**asdict(scn), "l1Split": args.l1_split},
        "model": {
            "tables": len(model.tables),
            "rows": sum(t.rows for t in model.tables),
            "totalBytes": model.total_bytes,
            "startPartitions": first,
        },
        "hitRateModel": {
            "method": "Che's approximation for LRU; Zipf over each table's active keys; per shard, with the "
            "L1 rows the agents give it (split_budget of memoryPerGPU, whole sets)",
            "validation": validation(scn.zipf, scn.seed),
        },
        "summary": summaries,
        "partitionEvents": [e for e in elastic.events if e["kind"] == "partitions"],
        "hotnessHint": hotness_check(scn),
        "l1SplitCheck": l1_split_check(scn),
        "timeline": {
            "stepSeconds": every * scn.step_s,
            "hour": _downsample(np.asarray(elastic.t) / 3600, every, 3),
            "qps": _downsample(traffic.qps, every, 0),
            "replicas": elastic.replicas[::every],
            "partitions": elastic.partitions[::every],
            "hitRate": _downsample(elastic.hit_rate, every),
            "movedBytes": elastic.moved_bytes[::every],
            "gpus": elastic.gpus[::every],
        },
        "plot": _shown(png) if plotted else None,
        "runtimeSeconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _print_table(summaries, result, scn)
    if not plotted and not args.no_plot:
        print("matplotlib is not installed (pip install '.[bench]'): wrote the JSON, no plot")
    return 0


def _shown(path: Path) -> str:
    """A path as the results name it: relative to the repository when inside it."""
    repo = RESULTS.parents[1]
    resolved = path.resolve()
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else path.name


def _print_table(summaries: dict[str, dict[str, Any]], result: dict[str, Any], scn: Scenario) -> None:
    columns: list[tuple[str, str, Callable[[Any], str]]] = [
        ("GPU-h", "gpuHours", lambda v: f"{v:.0f}"),
        ("/static", "gpuHoursOverStatic", lambda v: f"{v:.2f}"),
        ("peak rep", "peakReplicas", str),
        ("mean rep", "meanReplicas", lambda v: f"{v:.1f}"),
        ("part min-max", "partitionsMin", str),
        ("part changes", "partitionChanges", str),
        ("moved GB", "movedBytes", lambda v: f"{v / 1e9:.0f}"),
        (f"h<{scn.target_hit_rate:g} hours", "hoursBelowTargetHitRate", lambda v: f"{v:.1f}"),
        ("mean hit", "meanHitRate", lambda v: f"{v:.3f}"),
    ]
    print(f"{'strategy':<28}" + "".join(f"{c[0]:>14}" for c in columns))
    for name, s in summaries.items():
        cells = [fmt(s[key]) for _, key, fmt in columns]
        cells[4] = f"{s['partitionsMin']}-{s['partitionsMax']}"
        print(f"{name:<28}" + "".join(f"{c:>14}" for c in cells))
    checks = result["l1SplitCheck"]
    split = [f"{x['partitions']}: {x['agentsSplit']:.3f}/{x['maxMinFairSplit']:.3f}" for x in checks]
    print(f"hit rate at the peak, agents' L1 split / max-min fair split, by partitions: {', '.join(split)}")
    v = result["hitRateModel"]["validation"]
    errors = [f"C={x['capacity']}: {x['errorVsExact']:+.4f} / {x['errorVsAgentL1Lru']:+.4f}" for x in v]
    print(f"Che minus exact LRU / minus the agents' L1 admitting every miss (5,000 keys): {', '.join(errors)}")
    print("Che / the agents' L1 with TinyLFU admission / static top-C: "
          + ", ".join(f"C={x['capacity']}: {x['che']:.3f} / {x['agentL1TinyLfu']:.3f} / {x['staticTopC']:.3f}"
                      for x in v))  # fmt: skip
    print(f"wrote the JSON and {result['plot'] or 'no plot'} in {result['runtimeSeconds']} s")


def _first_partitions(scn: Scenario, traffic: Traffic, hits: HitRateModel) -> int:
    """Where a day that follows a day like it starts: the fewest partitions that meet the target
    with the margin at midnight's working set."""
    model = criteo_model(scn, scn.min_partitions)
    plan = plan_placement(model, Topology.from_model(model))
    for partitions in range(scn.min_partitions, scn.max_partitions + 1):
        plan = plan_placement(model, Topology.from_model(model, partitions=partitions), plan)
        if hits.hit_rate(plan, float(traffic.active[0])) >= scn.target_hit_rate + 0.02:
            return partitions
    return scn.max_partitions


if __name__ == "__main__":
    sys.exit(main())
