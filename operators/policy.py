"""The operator's decisions as pure functions: no Kubernetes, no clocks, no I/O. The kopf handlers
(``operators/handlers.py``) gather inputs, call these, and apply the result; tests drive them directly.

* :func:`window_delta` / :func:`merge` / :func:`quantile`: a windowed p99 from cumulative Prometheus
  histogram buckets, merged across pods by adding bucket counts (never averaging per-pod p99s), with
  counter resets (a restarted pod) handled as Prometheus' ``increase()`` does.
* :func:`desired_replicas`: HPA's rule ``ceil(current × observed / target)`` with a tolerance band,
  max step up/down, min/max clamps; no data or stale data holds the current size and never scales down.
* :class:`Stabilizer`: HPA-style stabilisation windows over recommendations (scale down to the highest
  recommendation of the window, up to the lowest), so the size changes direction at most once a window.
* :func:`degraded_share` / :func:`full_quality_demand` / :func:`desired_with_ladder`: the predictor's
  quality ladder (``predictor/serving/ladder.py``) read off ``recsys_served_level_total``: the share of
  users served below the best level, and how much more work serving them all at the best level would
  take. A scale-up also triggers when that share exceeds ``max_degraded_share`` while p99 is on target
  (p99 held by doing less per request is not healthy), sized by the demand; never a scale-down while any
  user was degraded.
* :func:`outliers`: replicas whose p99 exceeds ``ratio ×`` the median of their peers are ejected from
  rotation, never below the minimum share in rotation; re-admitted after a cool-off once they are back
  under a lower ratio (hysteresis).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

Buckets = dict[float, float]  # upper bound ("le") → cumulative count; +inf included
# the predictor's quality ladder, best first (predictor.models.inference.LEVELS, which a test keeps equal;
# the operator image has no predictor package to import it from)
LEVELS = ("full", "reduced", "retrieval", "popularity")


# --- histograms ------------------------------------------------------------------------------------------
def window_delta(now: Buckets, before: Buckets | None) -> Buckets:
    """Observations between two scrapes of one pod's cumulative histogram.

    A counter reset (the total went down: the process restarted) means everything counted now happened
    since the reset, as in Prometheus' ``increase()``. No earlier scrape: no window yet (empty).
    """
    if before is None:
        return {}
    if now.get(math.inf, 0.0) < before.get(math.inf, 0.0):
        return dict(now)
    return {le: max(count - before.get(le, 0.0), 0.0) for le, count in now.items()}


def merge(histograms: list[Buckets]) -> Buckets:
    """Pool several pods' windows: bucket counts add up (same bucket layout on every pod)."""
    out: Buckets = {}
    for h in histograms:
        for le, count in h.items():
            out[le] = out.get(le, 0.0) + count
    return out


def quantile(buckets: Buckets, q: float) -> float | None:
    """Prometheus ``histogram_quantile``: linear interpolation inside the bucket holding rank ``q × total``.
    None when the window has no observations."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in sorted(buckets):
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bucket: its bound is the best estimate
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


# --- scaling --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingPolicy:
    target_p99_ms: float
    min_replicas: int = 1
    max_replicas: int = 10
    tolerance: float = 0.1  # no change while observed/setpoint is within 1 ± tolerance
    # aim at target × (1 - headroom): a pool held *at* the target misses it half the time. 0.35: on the
    # simulated 5x spike with the quality ladder (bench/autoscale.py, seed 0), 0.2 ran the pool close to
    # its batching capacity and lost 4.1 % expected NDCG@10, 0.35 lost 0.9 % for 7 % more replica-seconds
    headroom: float = 0.35
    max_step_up: int = 4  # replicas added per decision at most: this many ...
    max_step_up_percent: float = 100.0  # ... or this share of the current size, whichever is more (as HPA)
    max_step_down: int = 1
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    min_requests: int = 20  # fewer observations in the window: too little data to act on
    max_degraded_share: float = 0.05  # more of the window's users served below the best level: scale up

    def __post_init__(self):
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError(
                f"need 1 <= minReplicas <= maxReplicas, got {self.min_replicas}..{self.max_replicas}"
            )
        if self.target_p99_ms <= 0:
            raise ValueError("p99TargetMs must be positive")
        if not 0 <= self.max_degraded_share <= 1:
            raise ValueError(f"ladder.maxDegradedShare must be in [0, 1], got {self.max_degraded_share}")


def desired_replicas(
    current: int, observed_p99_ms: float | None, requests: float, policy: ScalingPolicy
) -> int:
    """The size this window asks for, before stabilisation and step limits (as HPA keeps its raw
    recommendations and applies its rate limits afterwards).

    ``observed_p99_ms`` None or too few ``requests``: hold (clamped into [min, max]) — missing metrics must
    never scale a service down.
    """
    current = max(current, 0)
    clamp = lambda n: max(policy.min_replicas, min(policy.max_replicas, n))
    if observed_p99_ms is None or requests < policy.min_requests or current == 0:
        return clamp(current) if current else policy.min_replicas
    ratio = observed_p99_ms / (policy.target_p99_ms * (1.0 - policy.headroom))
    if abs(ratio - 1.0) <= policy.tolerance:
        return clamp(current)
    return clamp(math.ceil(current * ratio))


def counter_delta(now: Mapping[str, float], before: Mapping[str, float] | None) -> dict[str, float]:
    """Increase of labelled counters between two scrapes of one pod; a reset (the sum went down) counts
    everything now, as :func:`window_delta`. No earlier scrape: no window (empty)."""
    if before is None:
        return {}
    if sum(now.values()) < sum(before.values()):
        return dict(now)
    return {k: max(v - before.get(k, 0.0), 0.0) for k, v in now.items()}


def best_level(costs: Mapping[str, float]) -> str | None:
    """The best level a pod's model has: the first of :data:`LEVELS` among its cost gauges."""
    return next((lv for lv in LEVELS if lv in costs), None)


def degraded_share(served: Mapping[str, float], best: str | None) -> float | None:
    """Share of the window's users served below ``best``; None without users or without a ladder."""
    total = sum(served.values())
    if best is None or total <= 0:
        return None
    return 1.0 - served.get(best, 0.0) / total


def full_quality_demand(pods: list[tuple[Mapping[str, float], Mapping[str, float]]]) -> float:
    """How many times the window's model work serving every user at the best level would take (≥ 1),
    pooled over pods given as ``(served, costs)``: ``Σ n × cost_best / Σ n_l × cost_l``, each pod's users
    weighed by its own costs. 1 without data."""
    done = wanted = 0.0
    for served, costs in pods:
        best = best_level(costs)
        if best is None or costs[best] <= 0:
            continue
        done += sum(n * costs.get(lv, costs[best]) for lv, n in served.items())
        wanted += sum(served.values()) * costs[best]
    return max(wanted / done, 1.0) if done > 0 else 1.0


@dataclass(frozen=True)
class LadderReading:
    """A pool's quality ladder over one window: users per level, the best level, the degraded share and
    the full-quality demand (see :func:`degraded_share`, :func:`full_quality_demand`)."""

    served: dict[str, float]
    best: str | None
    share: float | None
    demand: float


def read_ladder(pods: list[tuple[Mapping[str, float], Mapping[str, float]]]) -> LadderReading:
    """The ladder of the pods given as ``(served in the window, level costs)``, pooled."""
    served: dict[str, float] = {}
    for pod_served, _ in pods:
        for level, n in pod_served.items():
            served[level] = served.get(level, 0.0) + n
    best = next((b for b in (best_level(costs) for _, costs in pods) if b), None)
    return LadderReading(served, best, degraded_share(served, best), full_quality_demand(pods))


def desired_with_ladder(
    current: int,
    observed_p99_ms: float | None,
    requests: float,
    share: float | None,
    demand: float,
    policy: ScalingPolicy,
) -> int:
    """:func:`desired_replicas`, and: while more than ``max_degraded_share`` of the users were degraded,
    at least ``ceil(current × demand)`` (and one more) even with p99 on target; never fewer than
    ``current`` while anyone was degraded."""
    wanted = desired_replicas(current, observed_p99_ms, requests, policy)
    if share is None or current == 0:
        return wanted
    if share > policy.max_degraded_share:
        grown = max(math.ceil(current * demand - 1e-9), current + 1)
        wanted = max(wanted, min(policy.max_replicas, grown))
    if share > 0:
        wanted = max(wanted, min(current, policy.max_replicas))
    return wanted


def limit_step(current: int, new: int, policy: ScalingPolicy) -> int:
    """At most ``max(max_step_up, max_step_up_percent % of current)`` replicas added or ``max_step_down``
    removed per decision, within [min, max]."""
    new = min(new, current + max(policy.max_step_up, math.ceil(current * policy.max_step_up_percent / 100)))
    new = max(new, current - policy.max_step_down)
    return max(policy.min_replicas, min(policy.max_replicas, new))


@dataclass
class Stabilizer:
    """Recommendations of the last window, as HPA keeps them. ``recommend`` returns the size to apply."""

    history: list[tuple[float, int]] = field(default_factory=list)  # (time, recommendation)

    def recommend(self, now: float, current: int, wanted: int, policy: ScalingPolicy) -> int:
        self.history.append((now, wanted))
        horizon = max(policy.scale_up_stabilization_s, policy.scale_down_stabilization_s)
        self.history = [(t, r) for t, r in self.history if now - t <= horizon]
        if wanted < current:  # down: to the highest recommendation of the down window (never below it)
            window = [r for t, r in self.history if now - t <= policy.scale_down_stabilization_s]
            return min(current, max(window))
        if wanted > current:  # up: to the lowest recommendation of the up window
            window = [r for t, r in self.history if now - t <= policy.scale_up_stabilization_s]
            return max(current, min(window))
        return current

    def to_list(self) -> list[list[float]]:
        return [[t, r] for t, r in self.history]

    @classmethod
    def from_list(cls, items) -> Stabilizer:
        return cls([(float(t), int(r)) for t, r in (items or [])])


# --- outlier ejection ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EjectionPolicy:
    enabled: bool = True
    ratio: float = 2.0  # eject a pod whose p99 > ratio × the median p99 of the others
    readmit_ratio: float = 1.3  # re-admit once it is back under readmit_ratio × that median ...
    cooloff_s: float = (
        30.0  # ... and at least this long after its ejection (doubled for each repeat ejection)
    )
    max_cooloff_s: float = 480.0
    min_in_rotation: float = 0.5  # share of ready pods that always stays in rotation
    min_requests: int = 10  # a pod needs this many requests in the window to be judged


def outliers(
    pod_p99_ms: Mapping[str, float | None],
    pod_requests: Mapping[str, float],
    ejected_since: Mapping[str, float],
    now: float,
    policy: EjectionPolicy,
    strikes: dict[str, int] | None = None,
    peer_ceiling_ms: float | None = None,
) -> dict[str, float]:
    """The pods out of rotation after this window: ``{pod: ejected since}``.

    ``pod_p99_ms``: every ready pod's p99 over the window (None: no data). ``ejected_since``: the current
    state. An ejected pod gets no traffic, so it has no new data: after its cool-off it is re-admitted on
    probation (it cannot prove itself otherwise) unless it still shows a high p99. ``strikes`` (updated in
    place) counts each pod's ejections: every repeat doubles its cool-off, so a pod that stays slow spends
    ever less time in rotation. Pods gone from ``pod_p99_ms`` are forgotten.

    ``peer_ceiling_ms`` (the p99 target): a pod is ejected only while its peers are within it. When
    everyone is slow the pool lacks capacity, and ejecting the slowest of an overloaded pool would make
    that worse: scaling is the answer then, not ejection.
    """
    if not policy.enabled:
        return {}
    strikes = {} if strikes is None else strikes
    for pod in [p for p in strikes if p not in pod_p99_ms]:
        del strikes[pod]
    pods = list(pod_p99_ms)
    state = {p: t for p, t in ejected_since.items() if p in pod_p99_ms}

    def peer_median(pod: str) -> float | None:
        peers = [
            v
            for p, v in pod_p99_ms.items()
            if p != pod and p not in state and v is not None and pod_requests.get(p, 0) >= policy.min_requests
        ]
        if not peers:
            return None
        peers.sort()
        mid = len(peers) // 2
        return peers[mid] if len(peers) % 2 else (peers[mid - 1] + peers[mid]) / 2

    # re-admission first (hysteresis: a lower ratio than ejection, after a cool-off)
    for pod in sorted(state):
        cooloff = min(policy.cooloff_s * 2 ** max(strikes.get(pod, 1) - 1, 0), policy.max_cooloff_s)
        if now - state[pod] < cooloff:
            continue
        value, median = pod_p99_ms.get(pod), peer_median(pod)
        if (
            value is None
            or pod_requests.get(pod, 0) < policy.min_requests
            or median is None
            or value <= policy.readmit_ratio * median
        ):
            del state[pod]

    max_out = len(pods) - math.ceil(policy.min_in_rotation * len(pods))
    candidates = []
    for pod in pods:
        value = pod_p99_ms[pod]
        if pod in state or value is None or pod_requests.get(pod, 0) < policy.min_requests:
            continue
        median = peer_median(pod)
        if median is not None and peer_ceiling_ms is not None and median > peer_ceiling_ms:
            continue
        if median is not None and value > policy.ratio * median:
            candidates.append((value / median, pod))
    for _, pod in sorted(candidates, reverse=True):  # the slowest first
        if len(state) >= max_out:
            break
        state[pod] = now
        strikes[pod] = strikes.get(pod, 0) + 1
    return state


def online_store_condition(lost: Mapping[str, bool | None]) -> dict:
    """The ``OnlineStore`` status condition from each pod's ``recsys_online_store_lost`` (None: not exported).
    False while any pod finds its online store wiped: its users get fallbacks until a materialization."""
    reported = {pod: v for pod, v in lost.items() if v is not None}
    losing = sorted(pod for pod, v in reported.items() if v)
    if not reported:
        return {
            "type": "OnlineStore",
            "status": "Unknown",
            "reason": "NoData",
            "message": "no pod exports recsys_online_store_lost",
        }
    if losing:
        return {
            "type": "OnlineStore",
            "status": "False",
            "reason": "Lost",
            "message": f"{len(losing)} of {len(reported)} pods find materialized views missing "
            f"({', '.join(losing)}); run `recsys features materialize`",
        }
    return {
        "type": "OnlineStore",
        "status": "True",
        "reason": "Holds",
        "message": f"{len(reported)} pods find every materialized view",
    }
