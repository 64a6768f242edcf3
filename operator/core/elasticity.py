"""Elasticity decisions, pure: how many replicas the Kubernetes HPA asks for from the agents'
per-replica QPS metric, and how many partitions ``spec.autoscaling.partitions`` asks for from the
measured L1 hit rate. No I/O and no clock: every call takes the time (seconds, any epoch, never
decreasing) and what was observed at that time, and returns a decision with its reason.

**Replicas** (:class:`HorizontalPodAutoscaler`) follow the real controller of Kubernetes
(``pkg/controller/podautoscaler``: ``replica_calculator.go`` for a ``Pods`` metric with an
``AverageValue`` target, ``horizontal.go`` for behaviours), so a timeline replayed here gives the
replica counts the cluster's HPA gives, for whatever has no HPA controller to ask (the embedded
default, ``bench/autoscale.py``):

* metric values are milli-units rounded up (``Quantity.MilliValue``); the average is the integer
  mean of the pods' values, and the usage ratio is that average over the target;
* pods being deleted and failed pods are ignored; pending pods are *unready*; running pods without
  a sample are *missing*. For a Pods metric the Ready condition does not matter (only CPU looks at
  it), so a running agent that is still warming and reports 0 QPS pulls the average down: the
  scale-down stabilisation window is what keeps that from removing replicas;
* within the tolerance (0.1 each way unless the behaviour sets ``tolerance``) nothing changes;
  otherwise ``ceil(ratio x ready pods)``. With missing pods the ratio is recomputed with them at the
  target (scale-down) or at 0 (scale-up), with unready pods at 0 on a scale-up, and nothing changes
  when that flips the direction or lands within the tolerance;
* a current count outside ``[minReplicas, maxReplicas]`` is brought to the bound at once;
* the proposal is stabilised (the lowest of the scale-up window's proposals, the highest of the
  scale-down window's; the first reconcile records the current count, so a new HPA does not scale
  down within its first window) and rate-limited by the policies of its direction against the
  replicas added and removed within each policy's period; then clamped to min/max.

Defaults are the API server's and the controller's: scale up by ``max(100 %, 4 pods)`` per 15 s with
no window, scale down by up to 100 % per 15 s after a 300 s window (``--horizontal-pod-autoscaler-
downscale-stabilization``). The controller keeps its recommendations and scale events in memory, so
does :class:`HorizontalPodAutoscaler` (a restarted controller starts over; so does this).

**Partitions** (:class:`PartitionAutoscaler`) have no upstream: widening a model across more
partitions gives each GPU's cache a larger share of what it owns, so it is the answer to an L1 hit
rate below ``targetHitRate``; narrowing gives GPUs back when the hit rate is well above the target and
the GPUs are idle. Every change is a re-plan (bytes move) and a make-before-break rollout, so the
state machine acts only on sustained evidence, one partition at a time, and learns from each change
what one partition is worth; see :class:`PartitionAutoscaling` for the rules and their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from node_agent.errors import HpsError, InvalidArgumentError, InvalidSpecError

# ---------------------------------------------------------------------------------------------
# Replicas: the HPA algorithm

#: the controller's ``--horizontal-pod-autoscaler-tolerance``
DEFAULT_TOLERANCE = 0.1
#: the controller's ``--horizontal-pod-autoscaler-downscale-stabilization``, used when the HPA's
#: ``behavior.scaleDown.stabilizationWindowSeconds`` is unset
DEFAULT_DOWNSCALE_STABILIZATION_S = 300

PolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]


class MetricsUnavailableError(HpsError):
    """The HPA cannot compute a replica count: no pod matches the selector, or no ready pod has a
    sample. The controller then keeps the current count and reports ``ScalingActive=False``."""


@dataclass(frozen=True)
class ScalingPolicy:
    """One ``behavior.scale{Up,Down}.policies[]`` entry: change by ``value`` pods or percent per
    ``period_seconds``."""

    type: PolicyType
    value: int
    period_seconds: int

    def __post_init__(self) -> None:
        if self.type not in ("Pods", "Percent"):
            raise InvalidSpecError("behavior.policies.type", f"must be Pods or Percent, got {self.type!r}")
        if self.value <= 0:
            raise InvalidSpecError("behavior.policies.value", f"must be greater than zero, got {self.value}")
        if not 0 < self.period_seconds <= 1800:
            raise InvalidSpecError(
                "behavior.policies.periodSeconds", f"must be in 1..1800, got {self.period_seconds}"
            )


@dataclass(frozen=True)
class ScalingRules:
    """``behavior.scaleUp`` or ``behavior.scaleDown`` with the API server's defaults filled in."""

    stabilization_window_seconds: int
    policies: tuple[ScalingPolicy, ...]
    select_policy: SelectPolicy = "Max"
    #: how far the usage ratio may stray (above 1 for scale-up rules, below 1 for scale-down) before
    #: the count changes
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if not 0 <= self.stabilization_window_seconds <= 3600:
            raise InvalidSpecError(
                "behavior.stabilizationWindowSeconds",
                f"must be in 0..3600, got {self.stabilization_window_seconds}",
            )
        if self.select_policy not in ("Max", "Min", "Disabled"):
            raise InvalidSpecError(
                "behavior.selectPolicy", f"must be Max, Min or Disabled, got {self.select_policy!r}"
            )
        if not self.policies and self.select_policy != "Disabled":
            raise InvalidSpecError("behavior.policies", "must name at least one policy")
        if self.tolerance < 0:
            raise InvalidSpecError("behavior.tolerance", f"must not be negative, got {self.tolerance}")

    @property
    def longest_period(self) -> int:
        return max((p.period_seconds for p in self.policies), default=0)


DEFAULT_SCALE_UP = ScalingRules(
    stabilization_window_seconds=0,
    policies=(ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15)),
)
DEFAULT_SCALE_DOWN = ScalingRules(
    stabilization_window_seconds=DEFAULT_DOWNSCALE_STABILIZATION_S,
    policies=(ScalingPolicy("Percent", 100, 15),),
)


@dataclass(frozen=True)
class HPASpec:
    """An ``autoscaling/v2`` HPA with one ``Pods`` metric and an ``AverageValue`` target (what
    ``render_hpa`` writes for ``spec.autoscaling``)."""

    max_replicas: int
    #: the per-pod target in the metric's unit (QPS per replica for the agents' metric)
    target_average_value: float
    min_replicas: int = 1
    scale_up: ScalingRules = DEFAULT_SCALE_UP
    scale_down: ScalingRules = DEFAULT_SCALE_DOWN
    metric_name: str = "hps_lookup_requests_per_second"

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise InvalidSpecError("minReplicas", f"must not be negative, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise InvalidSpecError(
                "maxReplicas",
                f"must be at least minReplicas ({self.min_replicas}) and 1, got {self.max_replicas}",
            )
        if _milli(self.target_average_value) <= 0:
            raise InvalidSpecError(
                "metrics.pods.target.averageValue",
                f"must be greater than zero, got {self.target_average_value}",
            )

    @classmethod
    def from_manifest(
        cls, hpa: Mapping[str, Any], *, downscale_stabilization_s: int = DEFAULT_DOWNSCALE_STABILIZATION_S
    ) -> HPASpec:
        """The spec of an ``autoscaling/v2`` HPA manifest, behaviours defaulted as the API server and
        the controller default them (``downscale_stabilization_s`` is the controller's flag)."""
        spec = hpa.get("spec")
        if not isinstance(spec, Mapping):
            raise InvalidSpecError("spec", "an HPA manifest needs a spec")
        metrics = spec.get("metrics") or []
        pods = [m for m in metrics if isinstance(m, Mapping) and m.get("type") == "Pods"]
        if len(pods) != 1 or len(metrics) != 1:
            raise InvalidSpecError("spec.metrics", "expected exactly one metric, of type Pods")
        target = pods[0].get("pods", {}).get("target", {})
        if target.get("type") != "AverageValue" or "averageValue" not in target:
            raise InvalidSpecError(
                "spec.metrics[0].pods.target", "expected type AverageValue with averageValue"
            )
        behavior = spec.get("behavior") or {}
        return cls(
            min_replicas=int(spec.get("minReplicas", 1)),
            max_replicas=int(spec["maxReplicas"]),
            target_average_value=parse_metric_quantity(
                target["averageValue"], field="spec.metrics[0].pods.target.averageValue"
            ),
            scale_up=_rules(behavior.get("scaleUp"), DEFAULT_SCALE_UP, "spec.behavior.scaleUp"),
            scale_down=_rules(
                behavior.get("scaleDown"),
                replace(DEFAULT_SCALE_DOWN, stabilization_window_seconds=downscale_stabilization_s),
                "spec.behavior.scaleDown",
            ),
            metric_name=str(pods[0].get("pods", {}).get("metric", {}).get("name", "")),
        )


def _rules(raw: Any, default: ScalingRules, where: str) -> ScalingRules:
    """``copyHPAScalingRules``: every field the manifest sets replaces the default's."""
    if raw is None:
        return default
    if not isinstance(raw, Mapping):
        raise InvalidSpecError(where, f"expected a mapping, got {raw!r}")
    policies = default.policies
    if raw.get("policies") is not None:
        policies = tuple(
            ScalingPolicy(str(p["type"]), int(p["value"]), int(p["periodSeconds"]))  # type: ignore[arg-type]
            for p in raw["policies"]
        )
    tolerance = default.tolerance
    if raw.get("tolerance") is not None:
        tolerance = parse_metric_quantity(raw["tolerance"], field=f"{where}.tolerance")
    return ScalingRules(
        stabilization_window_seconds=int(
            raw.get("stabilizationWindowSeconds", default.stabilization_window_seconds)
        ),
        policies=policies,
        select_policy=raw.get("selectPolicy", default.select_policy),
        tolerance=tolerance,
    )


_DECIMAL_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def parse_metric_quantity(value: str | int | float, *, field: str) -> float:
    """A Kubernetes quantity as a metric value (``20000``, ``1500m``, ``2k``) → a float."""
    if isinstance(value, bool):
        raise InvalidSpecError(field, f"expected a quantity such as 20000 or 1500m, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    number = text.rstrip("numkMGTPEi")
    suffix = text[len(number) :]
    try:
        if suffix not in _DECIMAL_SUFFIXES:
            raise InvalidOperation
        return float(Decimal(number) * _DECIMAL_SUFFIXES[suffix])
    except InvalidOperation:
        raise InvalidSpecError(field, f"expected a quantity such as 20000 or 1500m, got {value!r}") from None


def _milli(value: float) -> int:
    """``Quantity.MilliValue()``: rounded up. Through the decimal text so that 0.1 is 100, not 101."""
    return math.ceil(Decimal(repr(float(value))) * 1000)


@dataclass(frozen=True)
class PodMetric:
    """One pod the HPA's selector matches, and its sample from the custom metrics API (``None``
    when the API has none for it, e.g. before Prometheus has two scrapes to take a rate from)."""

    name: str
    value: float | None
    phase: PodPhase = "Running"
    #: the pod has a deletionTimestamp
    deleting: bool = False


@dataclass(frozen=True)
class ReplicaCalculation:
    """What ``calcPlainMetricReplicas`` returns, with the pod counts it grouped."""

    replicas: int
    #: the average the controller reports in ``status.currentMetrics`` (ready pods only)
    average_value: float
    ready: int
    missing: int
    unready: int
    ignored: int


def _usage_ratio(metrics: Mapping[str, int], target_milli: int) -> tuple[float, int]:
    average = sum(metrics.values()) // len(metrics)  # Go's int64 division
    return average / target_milli, average


def pods_metric_replicas(
    current_replicas: int,
    pods: Sequence[PodMetric],
    target_average_value: float,
    *,
    tolerance_up: float = DEFAULT_TOLERANCE,
    tolerance_down: float = DEFAULT_TOLERANCE,
) -> ReplicaCalculation:
    """The replica count a ``Pods`` metric with an ``AverageValue`` target proposes (before the
    behaviours), as ``ReplicaCalculator.GetMetricReplicas`` computes it. Raises
    :class:`MetricsUnavailableError` when no pod or no ready pod's sample is there."""
    if not pods:
        raise MetricsUnavailableError("no pods returned by selector while calculating replica count")
    target = _milli(target_average_value)
    metrics = {p.name: _milli(p.value) for p in pods if p.value is not None}
    ready = 0
    unready: set[str] = set()
    missing: set[str] = set()
    ignored: set[str] = set()
    for pod in pods:
        if pod.deleting or pod.phase == "Failed":
            ignored.add(pod.name)
        elif pod.phase == "Pending":
            unready.add(pod.name)
        elif pod.name not in metrics:
            missing.add(pod.name)
        else:
            ready += 1
    for name in ignored | unready:
        metrics.pop(name, None)
    if not metrics:
        raise MetricsUnavailableError("did not receive metrics for targeted pods (pods might be unready)")

    def within(ratio: float) -> bool:
        return 1.0 - tolerance_down <= ratio <= 1.0 + tolerance_up

    ratio, average = _usage_ratio(metrics, target)
    grouped = {"ready": ready, "missing": len(missing), "unready": len(unready), "ignored": len(ignored)}
    scale_up_with_unready = bool(unready) and ratio > 1.0
    if not scale_up_with_unready and not missing:
        replicas = current_replicas if within(ratio) else math.ceil(ratio * ready)
        return ReplicaCalculation(replicas, average / 1000, **grouped)
    # pods without a sample count against the direction of the change: at the target when scaling
    # down, at zero when scaling up (so do pending pods on a scale-up)
    if missing:
        if ratio < 1.0:
            metrics.update(dict.fromkeys(missing, target))
        elif ratio > 1.0:
            metrics.update(dict.fromkeys(missing, 0))
    if scale_up_with_unready:
        metrics.update(dict.fromkeys(unready, 0))
    new_ratio, _ = _usage_ratio(metrics, target)
    if within(new_ratio) or (ratio < 1.0 < new_ratio) or (new_ratio < 1.0 < ratio):
        return ReplicaCalculation(current_replicas, average / 1000, **grouped)
    replicas = math.ceil(new_ratio * len(metrics))
    if (new_ratio < 1.0 and replicas > current_replicas) or (new_ratio > 1.0 and replicas < current_replicas):
        replicas = current_replicas
    return ReplicaCalculation(replicas, average / 1000, **grouped)


@dataclass(frozen=True)
class HPADecision:
    """One reconcile of the HPA: the count to set and why, in the controller's own words."""

    time: float
    current_replicas: int
    desired_replicas: int
    #: the metric's proposal before stabilisation and rate limits (``None`` when not computed)
    metric_replicas: int | None
    #: the metric's current average over ready pods (``status.currentMetrics``)
    average_value: float | None
    #: ``ScalingActive``'s reason: ValidMetricFound, FailedGetPodsMetric or ScalingDisabled
    scaling_active: str
    #: ``AbleToScale``'s reason: ReadyForNewScale, ScaleUpStabilized or ScaleDownStabilized
    able_to_scale: str
    #: ``ScalingLimited``'s reason: DesiredWithinRange, ScaleUpLimit, ScaleDownLimit, TooManyReplicas,
    #: TooFewReplicas (empty when the count came from the min/max bounds or was not computed)
    scaling_limited: str
    #: the Event the controller writes: ``New size: 3; reason: ...`` on a rescale, else why not
    message: str

    @property
    def rescale(self) -> bool:
        return self.desired_replicas != self.current_replicas


@dataclass
class _ScaleEvent:
    change: int
    time: float
    outdated: bool = False


class HorizontalPodAutoscaler:
    """The HPA controller's reconcile for one HPA, fed its observations: call :meth:`reconcile`
    every sync period (15 s by default) with the scale subresource's ``spec.replicas`` and the
    pods the scale selector matches; set the returned ``desired_replicas`` (the controller records a
    scale event only for a rescale it made, so a caller that fails to apply it should not keep
    feeding this instance as if it had)."""

    def __init__(self, spec: HPASpec) -> None:
        self.spec = spec
        self._recommendations: list[tuple[float, int]] = []
        self._up_events: list[_ScaleEvent] = []
        self._down_events: list[_ScaleEvent] = []
        self._last_time: float | None = None

    def reconcile(self, now: float, current_replicas: int, pods: Sequence[PodMetric]) -> HPADecision:
        if self._last_time is not None and now < self._last_time:
            raise InvalidArgumentError(f"time went backwards: {now} after {self._last_time}")
        self._last_time = now
        spec = self.spec
        if not self._recommendations:
            # recordInitialRecommendation: a new HPA holds the current count for one down window
            self._recommendations.append((now, current_replicas))
        metric_replicas: int | None = None
        average: float | None = None
        able, limited, active = "ReadyForNewScale", "", "ValidMetricFound"
        if current_replicas == 0 and spec.min_replicas != 0:
            return HPADecision(
                now, 0, 0, None, None, "ScalingDisabled", able, "",
                "scaling is disabled since the replica count of the target is zero",
            )  # fmt: skip
        if current_replicas > spec.max_replicas:
            desired, why = spec.max_replicas, "Current number of replicas above Spec.MaxReplicas"
        elif current_replicas < spec.min_replicas:
            desired, why = spec.min_replicas, "Current number of replicas below Spec.MinReplicas"
        else:
            try:
                calc = pods_metric_replicas(
                    current_replicas,
                    pods,
                    spec.target_average_value,
                    tolerance_up=spec.scale_up.tolerance,
                    tolerance_down=spec.scale_down.tolerance,
                )
            except MetricsUnavailableError as exc:
                return HPADecision(
                    now, current_replicas, current_replicas, None, None, "FailedGetPodsMetric", able, "",
                    f"invalid metrics (1 invalid out of 1), first error is: failed to get pods metric "
                    f"value: unable to get metric {spec.metric_name}: {exc}",
                )  # fmt: skip
            metric_replicas, average = calc.replicas, calc.average_value
            proposal = max(0, calc.replicas)
            why = ""
            if proposal > current_replicas:
                why = f"pods metric {spec.metric_name} above target"
            elif proposal < current_replicas:
                why = "All metrics below target"
            stabilized, able = self._stabilize(now, current_replicas, proposal)
            desired, limited = self._limit_rate(now, current_replicas, stabilized)
        if desired != current_replicas:
            self._store_event(now, current_replicas, desired)
            message = f"New size: {desired}; reason: {why}"
        else:
            message = f"decided not to scale: {able}, {limited or 'DesiredWithinRange'}"
        return HPADecision(
            now, current_replicas, desired, metric_replicas, average, active, able, limited, message
        )

    # -- stabilizeRecommendationWithBehaviors ----------------------------------------------------

    def _stabilize(self, now: float, current: int, proposal: int) -> tuple[int, str]:
        up_cutoff = now - self.spec.scale_up.stabilization_window_seconds
        down_cutoff = now - self.spec.scale_down.stabilization_window_seconds
        up, down = proposal, proposal
        old: int | None = None
        for i, (at, recommendation) in enumerate(self._recommendations):
            if at > up_cutoff:
                up = min(up, recommendation)
            if at > down_cutoff:
                down = max(down, recommendation)
            if at < up_cutoff and at < down_cutoff:
                old = i
        stabilized = min(max(current, up), down)
        if old is not None:  # reuse the slot of a sample both windows have left behind
            self._recommendations[old] = (now, proposal)
        else:
            self._recommendations.append((now, proposal))
        if stabilized == proposal:
            return stabilized, "ReadyForNewScale"
        return stabilized, "ScaleUpStabilized" if proposal >= current else "ScaleDownStabilized"

    # -- convertDesiredReplicasWithBehaviorRate --------------------------------------------------

    def _limit_rate(self, now: float, current: int, desired: int) -> tuple[int, str]:
        spec = self.spec
        if desired > current:
            limit = max(current, self._scale_up_limit(now, current))
            allowed, why = (limit, "ScaleUpLimit")
            if spec.max_replicas <= limit:
                allowed, why = spec.max_replicas, "TooManyReplicas"
            if desired > allowed:
                return allowed, why
        elif desired < current:
            limit = min(current, self._scale_down_limit(now, current))
            allowed, why = (limit, "ScaleDownLimit")
            if spec.min_replicas >= limit:
                allowed, why = spec.min_replicas, "TooFewReplicas"
            if desired < allowed:
                return allowed, why
        return desired, "DesiredWithinRange"

    def _period_start(self, now: float, current: int, period: int) -> int:
        cutoff = now - period
        added = sum(e.change for e in self._up_events if e.time > cutoff)
        removed = sum(e.change for e in self._down_events if e.time > cutoff)
        return current - added + removed

    def _scale_up_limit(self, now: float, current: int) -> int:
        rules = self.spec.scale_up
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            start = self._period_start(now, current, policy.period_seconds)
            if policy.type == "Pods":
                proposals.append(start + policy.value)
            else:  # rounded up, or a small count could never grow
                proposals.append(math.ceil(start * (1 + policy.value / 100)))
        return min(proposals) if rules.select_policy == "Min" else max(proposals)

    def _scale_down_limit(self, now: float, current: int) -> int:
        rules = self.spec.scale_down
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            start = self._period_start(now, current, policy.period_seconds)
            if policy.type == "Pods":
                proposals.append(start - policy.value)
            else:  # Go's int32(float64) truncates toward zero
                proposals.append(int(start * (1 - policy.value / 100)))
        return max(proposals) if rules.select_policy == "Min" else min(proposals)

    # -- storeScaleEvent ---------------------------------------------------------------------------

    def _store_event(self, now: float, previous: int, new: int) -> None:
        if new > previous:
            events, rules = self._up_events, self.spec.scale_up
        else:
            events, rules = self._down_events, self.spec.scale_down
        cutoff = now - rules.longest_period
        reuse: int | None = None
        for i, event in enumerate(events):
            if event.time < cutoff:
                event.outdated = True
            if event.outdated:
                reuse = i
        fresh = _ScaleEvent(abs(new - previous), now)
        if reuse is not None:
            events[reuse] = fresh
        else:
            events.append(fresh)


@dataclass(frozen=True)
class HPASample:
    """One point of a timeline: at ``time``, the target's ``spec.replicas`` and the selected pods."""

    time: float
    current_replicas: int
    pods: tuple[PodMetric, ...]


def replay_hpa(spec: HPASpec, timeline: Iterable[HPASample]) -> list[HPADecision]:
    """The HPA's decisions along ``timeline`` (each sample's ``current_replicas`` as observed, so
    a caller that applies the decisions feeds them back in the next sample)."""
    hpa = HorizontalPodAutoscaler(spec)
    return [hpa.reconcile(s.time, s.current_replicas, s.pods) for s in timeline]


# ---------------------------------------------------------------------------------------------
# Partitions: the partition autoscaler


@dataclass(frozen=True)
class PartitionAutoscaling:
    """``spec.autoscaling.partitions: {min, max, targetHitRate}`` and the tunables of the state
    machine, with the defaults and why they are what they are.

    Rules (each decision is one of widen, narrow or hold, with a reason):

    * the hit rate judged is the samples' exponentially weighted mean with a time constant of
      ``smoothing_s``, restarted at every change of the count;
    * **widen** by one partition when every sample for ``widen_after_s`` had a hit rate below
      ``target_hit_rate`` (and ``max`` is not reached, and the last widen to this count paid off);
    * **narrow** by one when every sample for ``narrow_after_s`` had a hit rate of at least
      ``target_hit_rate + margin``, a hit rate *predicted after narrowing* of at least
      ``target_hit_rate + margin / 2``, and a busiest-GPU load that stays at most ``max_gpu_load``
      once the same traffic is spread over one partition fewer (``load x P / (P - 1)``);
    * the prediction subtracts the gain of the step, as last measured: each change is followed by a
      ``cooldown_s`` in which nothing is decided, and the mean hit rate of its second half against
      the mean of the window that triggered the change is the gain of one partition at that count
      (kept ``gain_ttl_s``). A step not measured yet is estimated from a measured wider one: every
      partition adds the same cache, and an LRU's hit rate is concave in its size (under Che's
      approximation its slope is a mean of the popularities of the keys at the cache's edge, weighted
      towards ever colder keys as the cache grows, whatever the popularity), so the narrower step
      costs at least as much; it is scaled up by ``(Q - 1/2) / (P - 1/2)`` from a measured step to
      ``Q``, as for a hit rate logarithmic in the cache (Zipf traffic of exponent near 1, whose slope
      falls as one over the cache; flatter traffic makes this an overestimate, the safe side). With
      nothing measured the gain is taken as ``margin / 2``, so the first narrow needs the plain
      margin; one that then falls short is widened back when its cooldown ends and its gain is known
      from then on, so the same traffic does not flap twice;
    * a narrow whose cooldown settled below the target is undone at once (``NarrowFellShort``), the
      second half of its cooldown being the sustained evidence a widen window would wait for;
    * a widen that bought less than ``min_gain`` of hit rate says the misses are not for want of
      cache (new keys, or a working set no reachable cache holds): no further widening while that
      measurement is fresh;
    * a sample with fewer than ``min_lookups`` lookups, or no hit rate, says nothing and breaks every
      streak; so does a gap of more than ``max_gap_s`` between samples (a failover, a metrics outage);
    * a count outside ``[min, max]`` is brought to the nearest bound at once.

    Defaults:

    * ``margin = 0.02``: the hit rate of a 30 s window of at least ``min_lookups`` = 10,000 keys has
      a binomial standard deviation of at most 0.005, so two points is four deviations of noise; more
      would keep idle GPUs for nothing, and the learned gain covers the real size of a step;
    * ``widen_after_s = 600``: a shortfall must outlast what widening cannot fix anyway: a flash
      crowd (the HPA's job), a new replica's cold cache, the 1-2 min rate window of the metric. A low
      hit rate costs latency and L2 load, not failed lookups, so it may wait longer than replicas do;
    * ``narrow_after_s = 1800``: narrowing is the riskier direction (a wrong narrow costs a whole
      widen cycle to undo), so it waits three times longer, as the HPA waits 300 s to scale down and
      0 s to scale up;
    * ``cooldown_s = 900``: a re-plan's moved shards start cold and the hit rate climbs back as the
      caches refill; under Zipf traffic the hot rows (a few percent of the table) are back within
      minutes, and 15 min covers that plus a full rate window, whose second half measures the gain;
    * ``max_gpu_load = 0.6``: after narrowing, the busiest GPU keeps 40 % of its key-rate capacity
      free for a burst of x1.5 until the HPA's new replicas (scheduling, loading, warming: minutes)
      take traffic;
    * ``min_gain = 0.005``: half a point of hit rate is not worth the GPUs of a partition;
    * ``gain_ttl_s = 86400``: traffic is diurnal, so a gain measured within the last day was measured
      on traffic like today's; an older one is forgotten and the margin rules again;
    * ``max_gap_s = 120``: samples come every 15-30 s; four missed ones mean the streak is unknown;
    * ``smoothing_s = 120``: about a Prometheus rate window. One odd interval then neither starts nor
      breaks a streak, and a shortfall smaller than the interval-to-interval noise still shows (the
      mean of the last few minutes has a fraction of one sample's noise), at the cost of about two
      minutes' lag on a window of ten.
    """

    min: int
    max: int
    target_hit_rate: float
    margin: float = 0.02
    widen_after_s: float = 600.0
    narrow_after_s: float = 1800.0
    cooldown_s: float = 900.0
    max_gpu_load: float = 0.6
    min_lookups: int = 10_000
    min_gain: float = 0.005
    gain_ttl_s: float = 86_400.0
    max_gap_s: float = 120.0
    smoothing_s: float = 120.0

    def __post_init__(self) -> None:
        where = "spec.autoscaling.partitions"
        if self.min < 1:
            raise InvalidSpecError(f"{where}.min", f"must be at least 1, got {self.min}")
        if self.max < self.min:
            raise InvalidSpecError(f"{where}.max", f"must be at least min ({self.min}), got {self.max}")
        if not 0.0 < self.target_hit_rate < 1.0:
            raise InvalidSpecError(
                f"{where}.targetHitRate", f"must be between 0 and 1 (exclusive), got {self.target_hit_rate}"
            )
        if not 0.0 <= self.margin < 1.0 - self.target_hit_rate:
            raise InvalidSpecError(
                f"{where}.margin",
                f"must be at least 0 and leave room above targetHitRate {self.target_hit_rate}, "
                f"got {self.margin}",
            )
        for name in ("widen_after_s", "narrow_after_s", "cooldown_s", "gain_ttl_s", "max_gap_s"):
            if getattr(self, name) < 0:
                raise InvalidSpecError(f"{where}.{name}", f"must not be negative, got {getattr(self, name)}")
        if self.smoothing_s < 0:
            raise InvalidSpecError(f"{where}.smoothing_s", f"must not be negative, got {self.smoothing_s}")
        if self.max_gpu_load <= 0:
            raise InvalidSpecError(
                f"{where}.max_gpu_load", f"must be greater than zero, got {self.max_gpu_load}"
            )

    @classmethod
    def from_spec(cls, raw: Any, *, field: str = "spec.autoscaling.partitions") -> PartitionAutoscaling:
        """``{min, max, targetHitRate}`` as written in an EmbeddingModel, each checked by name."""
        if not isinstance(raw, Mapping):
            raise InvalidSpecError(field, f"expected a mapping with min, max and targetHitRate, got {raw!r}")
        unknown = sorted(set(raw) - {"min", "max", "targetHitRate"})
        if unknown:
            raise InvalidSpecError(
                f"{field}.{unknown[0]}", "unknown field (expected min, max, targetHitRate)"
            )
        values: dict[str, Any] = {}
        for key in ("min", "max"):
            value = raw.get(key, 1 if key == "min" else None)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidSpecError(f"{field}.{key}", f"expected an integer, got {value!r}")
            values[key] = value
        target = raw.get("targetHitRate")
        if isinstance(target, bool) or not isinstance(target, int | float):
            raise InvalidSpecError(f"{field}.targetHitRate", f"expected a number such as 0.9, got {target!r}")
        try:
            return cls(min=values["min"], max=values["max"], target_hit_rate=float(target))
        except InvalidSpecError as exc:
            where = exc.field.replace("spec.autoscaling.partitions", field)
            raise InvalidSpecError(where, exc.detail) from None


@dataclass(frozen=True)
class PartitionSample:
    """What the model measured over the last interval (the operator reads it from the agents'
    metrics; the embedded default from its agents' Stats):

    * ``partitions``: the count routing uses now (``status.placement``'s plan, not ``spec``);
    * ``hit_rate``: L1 hits over hits + misses (``hps_l1_hits`` / ``hps_l1_misses``, distinct keys
      per batch, summed over every table and agent of the model), ``None`` without lookups;
    * ``gpu_load``: the busiest GPU's key rate over the key rate one GPU's lookup path sustains
      (``hps_lookup_keys`` rate per GPU against the measured capacity), 0 idle, 1 saturated;
      ``None`` when unknown, which forbids narrowing;
    * ``lookups``: keys the hit rate was measured on."""

    time: float
    partitions: int
    hit_rate: float | None
    gpu_load: float | None
    lookups: int

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise InvalidArgumentError(f"partitions must be at least 1, got {self.partitions}")
        if self.hit_rate is not None and not 0.0 <= self.hit_rate <= 1.0:
            raise InvalidArgumentError(f"hit_rate must be within [0, 1], got {self.hit_rate}")
        if self.gpu_load is not None and self.gpu_load < 0:
            raise InvalidArgumentError(f"gpu_load must not be negative, got {self.gpu_load}")
        if self.lookups < 0:
            raise InvalidArgumentError(f"lookups must not be negative, got {self.lookups}")


PartitionAction = Literal["widen", "narrow", "hold"]


@dataclass(frozen=True)
class PartitionDecision:
    """``partitions`` is the count to run: the current one on a hold, the new one on a widen or a
    narrow, and the pending one while a change rolls out (so re-applying it is harmless). ``code`` is
    a CamelCase Event reason, ``reason`` the Event's message."""

    time: float
    action: PartitionAction
    current: int
    partitions: int
    code: str
    reason: str


@dataclass(frozen=True)
class Streak:
    """Samples that all met one condition, from ``since`` to the latest, with their hit-rate sum."""

    since: float
    total: float
    count: int

    @property
    def mean(self) -> float:
        return self.total / self.count

    def extend(self, hit_rate: float) -> Streak:
        return Streak(self.since, self.total + hit_rate, self.count + 1)


@dataclass(frozen=True)
class StepChange:
    """A change being rolled out or measured: ``before`` is the mean hit rate that triggered it;
    ``after`` collects the second half of its cooldown."""

    from_partitions: int
    to_partitions: int
    before: float
    after_total: float = 0.0
    after_count: int = 0


@dataclass(frozen=True)
class StepGain:
    """Hit rate that the step from ``partitions - 1`` to ``partitions`` added, measured at ``at``."""

    partitions: int
    gain: float
    at: float


@dataclass(frozen=True)
class PartitionAutoscalerState:
    """Everything the autoscaler remembers; :meth:`to_dict` / :meth:`from_dict` keep it in an
    annotation or a status field, so an operator that fails over carries on where it was."""

    partitions: int | None = None
    last_sample: float | None = None
    #: when the current count started serving: the cooldown runs from here
    settled_at: float | None = None
    pending: int | None = None
    #: the exponentially weighted hit rate and when it was last updated
    smoothed: float | None = None
    smoothed_at: float | None = None
    below: Streak | None = None
    above: Streak | None = None
    change: StepChange | None = None
    gains: tuple[StepGain, ...] = field(default_factory=tuple)

    def gain(self, partitions: int, now: float, ttl: float) -> StepGain | None:
        for g in self.gains:
            if g.partitions == partitions and now - g.at <= ttl:
                return g
        return None

    def to_dict(self) -> dict[str, Any]:
        def streak(s: Streak | None) -> dict[str, Any] | None:
            return None if s is None else {"since": s.since, "total": s.total, "count": s.count}

        change = self.change
        return {
            "version": 1,
            "partitions": self.partitions,
            "lastSample": self.last_sample,
            "settledAt": self.settled_at,
            "pending": self.pending,
            "smoothed": self.smoothed,
            "smoothedAt": self.smoothed_at,
            "below": streak(self.below),
            "above": streak(self.above),
            "change": None
            if change is None
            else {
                "from": change.from_partitions,
                "to": change.to_partitions,
                "before": change.before,
                "afterTotal": change.after_total,
                "afterCount": change.after_count,
            },
            "gains": [{"partitions": g.partitions, "gain": g.gain, "at": g.at} for g in self.gains],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PartitionAutoscalerState:
        if raw.get("version") != 1:
            raise InvalidArgumentError(f"unknown partition autoscaler state version {raw.get('version')!r}")

        def streak(s: Mapping[str, Any] | None) -> Streak | None:
            return None if s is None else Streak(float(s["since"]), float(s["total"]), int(s["count"]))

        def number(value: Any) -> float | None:
            return None if value is None else float(value)

        c = raw.get("change")
        change = None
        if c is not None:
            change = StepChange(
                int(c["from"]), int(c["to"]), float(c["before"]), float(c["afterTotal"]), int(c["afterCount"])
            )
        return cls(
            partitions=None if raw.get("partitions") is None else int(raw["partitions"]),
            last_sample=number(raw.get("lastSample")),
            settled_at=number(raw.get("settledAt")),
            pending=None if raw.get("pending") is None else int(raw["pending"]),
            smoothed=number(raw.get("smoothed")),
            smoothed_at=number(raw.get("smoothedAt")),
            below=streak(raw.get("below")),
            above=streak(raw.get("above")),
            change=change,
            gains=tuple(
                StepGain(int(g["partitions"]), float(g["gain"]), float(g["at"])) for g in raw.get("gains", [])
            ),
        )


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


class PartitionAutoscaler:
    """The partition state machine of one model: feed it a :class:`PartitionSample` every metrics
    interval with :meth:`observe`, apply each decision's ``partitions`` (a re-plan with the current
    plan as ``previous`` and a make-before-break rollout), and keep :attr:`state` across restarts.
    When a proposed count cannot be applied (the planner finds no fit, the GPUs never come), call
    :meth:`abandon` so the autoscaler stops waiting for it."""

    def __init__(self, spec: PartitionAutoscaling, state: PartitionAutoscalerState | None = None) -> None:
        self.spec = spec
        self.state = state or PartitionAutoscalerState()

    def observe(self, sample: PartitionSample) -> PartitionDecision:
        s, spec, now, current = self.state, self.spec, sample.time, sample.partitions
        if s.last_sample is not None and now < s.last_sample:
            raise InvalidArgumentError(f"samples must come in time order: {now} after {s.last_sample}")
        gap = s.last_sample is not None and now - s.last_sample > spec.max_gap_s
        s = replace(s, last_sample=now)

        pending = s.pending
        if pending is not None:
            if current == pending:  # routing switched: the change is done, its cooldown starts
                s = replace(s, partitions=current, pending=None, settled_at=now)
                s = replace(s, smoothed=None, below=None, above=None)
            elif current == s.partitions:
                self.state = s
                why = f"waiting for the change from {current} to {pending} partitions to roll out"
                return self._decide(sample, "hold", pending, "AwaitingRollout", why)
            else:  # someone else changed the count: forget ours
                s = replace(s, pending=None, change=None)
        if current != s.partitions:
            # first sample, or a count set by hand: its caches are as cold as after our own change
            s = replace(s, partitions=current, settled_at=now, change=None)
            s = replace(s, smoothed=None, below=None, above=None)

        if not spec.min <= current <= spec.max:
            bound = spec.min if current < spec.min else spec.max
            self.state = replace(s, pending=bound, below=None, above=None, change=None)
            side, code = ("below min", "BelowMinimum") if bound == spec.min else ("above max", "AboveMaximum")
            why = f"{current} partitions is {side} ({bound}) of spec.autoscaling.partitions"
            return self._decide(sample, "widen" if bound > current else "narrow", bound, code, why)

        valid = sample.hit_rate is not None and sample.lookups >= spec.min_lookups
        if gap or not valid:
            s = replace(s, smoothed=None, smoothed_at=None)
        if sample.hit_rate is not None and valid:
            s = self._smooth(s, now, sample.hit_rate)
        settled = s.settled_at
        assert settled is not None
        if now < settled + spec.cooldown_s:
            self.state = self._measure(s, sample)
            why = (
                f"{current} partitions have served for {_duration(now - settled)}; caches warm and the "
                f"hit rate settles for {_duration(settled + spec.cooldown_s - now)} more"
            )
            return self._decide(sample, "hold", current, "Cooldown", why)
        change = s.change
        if change is not None:
            s = self._learn(s, now)
            narrowed = change.to_partitions < change.from_partitions
            after = change.after_total / change.after_count if change.after_count else None
            if narrowed and after is not None and after < spec.target_hit_rate:
                # a narrow whose settled hit rate is below the target is undone at once: the second
                # half of its cooldown is the sustained evidence a widen window would wait for
                back = change.from_partitions
                undo = StepChange(current, back, after)
                self.state = replace(s, pending=back, below=None, above=None, change=undo)
                why = (
                    f"narrowing from {back} to {current} partitions left the hit rate at {after:.3f}, below "
                    f"the target {spec.target_hit_rate:g}: back to {back}; that step is now known to cost "
                    f"{change.before - after:.3f}"
                )
                return self._decide(sample, "widen", back, "NarrowFellShort", why)
        if gap:
            s = replace(s, below=None, above=None)
        if sample.hit_rate is None or s.smoothed is None:
            self.state = replace(s, below=None, above=None)
            why = f"{sample.lookups} lookups in the interval, fewer than {spec.min_lookups} to judge by"
            return self._decide(sample, "hold", current, "TooFewLookups", why)

        # conditions on the smoothed rate; the streaks sum the raw one, which measures a step's gain
        raw, hit, target = sample.hit_rate, s.smoothed, spec.target_hit_rate
        below = None
        if hit < target:
            below = s.below.extend(raw) if s.below else Streak(now, raw, 1)
        can_narrow, code, why = self._narrow_check(s, sample, hit)
        above = None
        if can_narrow:
            above = s.above.extend(raw) if s.above else Streak(now, raw, 1)
        s = self.state = replace(s, below=below, above=above)

        if below is not None:
            held = now - below.since
            futile = s.gain(current, now, spec.gain_ttl_s)
            if current >= spec.max:
                code = "AtMaximum"
                why = f"hit rate {hit:.3f} is below the target {target:g} at the maximum of {current}"
            elif futile is not None and futile.gain < spec.min_gain:
                code = "WideningFutile"
                why = (
                    f"hit rate {hit:.3f} is below the target {target:g}, but widening to {current} "
                    f"partitions raised it by only {futile.gain:.4f}: the misses are not for want of cache"
                )
            elif held < spec.widen_after_s:
                code = "BelowTargetNotSustained"
                why = (
                    f"hit rate {hit:.3f} below the target {target:g} for {_duration(held)} "
                    f"of {_duration(spec.widen_after_s)}"
                )
            else:
                change = StepChange(current, current + 1, below.mean)
                self.state = replace(s, pending=current + 1, below=None, change=change)
                why = (
                    f"hit rate {below.mean:.3f} (mean) has been below the target {target:g} for "
                    f"{_duration(held)}: widening from {current} to {current + 1} partitions"
                )
                return self._decide(sample, "widen", current + 1, "HitRateBelowTarget", why)
        elif above is not None:
            held = now - above.since
            if held < spec.narrow_after_s:
                code = "AboveTargetNotSustained"
                why = (
                    f"hit rate {hit:.3f} well above the target and GPUs idle for {_duration(held)} "
                    f"of {_duration(spec.narrow_after_s)}"
                )
            else:
                change = StepChange(current, current - 1, above.mean)
                self.state = replace(s, pending=current - 1, above=None, change=change)
                why = (
                    f"hit rate {above.mean:.3f} (mean) has been at least {target + spec.margin:g} with idle "
                    f"GPUs for {_duration(held)}: narrowing from {current} to {current - 1} partitions; {why}"
                )
                return self._decide(sample, "narrow", current - 1, "HitRateAboveTarget", why)
        return self._decide(sample, "hold", current, code, why)

    def abandon(self, now: float) -> None:
        """The pending change cannot be applied: stop waiting for it; the current count gets a fresh
        cooldown (so a refused change is retried at most once per cooldown and window)."""
        s = self.state
        self.state = replace(s, pending=None, change=None, settled_at=now, below=None, above=None)

    # -- internals ---------------------------------------------------------------------------------

    def _narrow_check(
        self, s: PartitionAutoscalerState, sample: PartitionSample, hit: float
    ) -> tuple[bool, str, str]:
        """Whether this sample (smoothed hit rate ``hit``) allows narrowing, with the hold's code and
        reason when it does not (and the prediction when it does)."""
        spec, current = self.spec, sample.partitions
        if hit < spec.target_hit_rate + spec.margin:
            return False, "WithinTarget", (
                f"hit rate {hit:.3f} is within {spec.margin:g} of the target {spec.target_hit_rate:g}"
            )
        if current <= spec.min:
            why = f"hit rate {hit:.3f} is well above the target at the minimum of {current}"
            return False, "AtMinimum", why
        learned = s.gain(current, sample.time, spec.gain_ttl_s)
        if learned is not None:
            step, source = learned.gain, "as measured"
        else:
            step, source = spec.margin / 2, "assumed, not yet measured"
            for g in s.gains:
                if g.partitions > current and sample.time - g.at <= spec.gain_ttl_s:
                    scaled = g.gain * (g.partitions - 0.5) / (current - 0.5)
                    if scaled > step:
                        step, source = scaled, f"scaled from the step to {g.partitions}, as measured"
        predicted = hit - step
        if predicted < spec.target_hit_rate + spec.margin / 2:
            return False, "NarrowWouldMissTarget", (
                f"narrowing to {current - 1} partitions would cost about {step:.3f} of hit rate ({source}), "
                f"leaving {predicted:.3f}, too close to the target {spec.target_hit_rate:g}"
            )
        if sample.gpu_load is None:
            return False, "GPULoadUnknown", "no GPU load measured: not narrowing blind"
        after = sample.gpu_load * current / (current - 1)
        if after > spec.max_gpu_load:
            return False, "GPUsBusy", (
                f"GPU load {sample.gpu_load:.2f} would reach {after:.2f} on {current - 1} partitions, "
                f"over {spec.max_gpu_load:g}"
            )
        return True, "", f"predicted hit rate {predicted:.3f} ({source}), GPU load {after:.2f} after"

    def _smooth(self, s: PartitionAutoscalerState, now: float, hit: float) -> PartitionAutoscalerState:
        if s.smoothed is None or s.smoothed_at is None:
            return replace(s, smoothed=hit, smoothed_at=now)
        tau = self.spec.smoothing_s
        weight = 1.0 if tau <= 0 else 1.0 - math.exp(-(now - s.smoothed_at) / tau)
        return replace(s, smoothed=s.smoothed + weight * (hit - s.smoothed), smoothed_at=now)

    def _measure(self, s: PartitionAutoscalerState, sample: PartitionSample) -> PartitionAutoscalerState:
        """In the second half of a change's cooldown, collect the hit rate it settled at."""
        c = s.change
        if c is None or s.settled_at is None or sample.time < s.settled_at + self.spec.cooldown_s / 2:
            return s
        if sample.hit_rate is None or sample.lookups < self.spec.min_lookups:
            return s
        measured = replace(c, after_total=c.after_total + sample.hit_rate, after_count=c.after_count + 1)
        return replace(s, change=measured)

    def _learn(self, s: PartitionAutoscalerState, now: float) -> PartitionAutoscalerState:
        """Turn a measured change into the gain of its step (LRU is a stack algorithm: more cache
        never lowers its hit rate, so a negative difference is drift and counts as no gain)."""
        c = s.change
        assert c is not None
        if c.after_count == 0:
            return replace(s, change=None)
        after = c.after_total / c.after_count
        widened = c.to_partitions > c.from_partitions
        step = max(c.to_partitions, c.from_partitions)
        gain = max(0.0, after - c.before if widened else c.before - after)
        gains = [g for g in s.gains if g.partitions != step] + [StepGain(step, gain, now)]
        return replace(s, change=None, gains=tuple(sorted(gains, key=lambda g: g.partitions)))

    def _decide(
        self, sample: PartitionSample, action: PartitionAction, partitions: int, code: str, reason: str
    ) -> PartitionDecision:
        return PartitionDecision(sample.time, action, sample.partitions, partitions, code, reason)
