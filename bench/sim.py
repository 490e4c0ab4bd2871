"""A discrete-event model of the predictor's replica pool, to compare autoscaling policies offline.

Model (one run = one trace × one policy × one setpoint, seeded), advanced one second at a time:

* requests arrive as a Poisson process whose rate follows the trace; the Service (kube-proxy) sends each
  to a uniformly random ready replica that is in rotation;
* each replica is the predictor's micro-batcher (one worker thread): when the worker is free it takes the
  queued requests, up to ``max_batch``, as one model call, and a batch of ``b`` users takes ``fixed +
  per_user × b`` seconds at its level, times a log-normal noise (each level's spread at concurrency 1),
  times a per-replica slowness factor (a noisy neighbour makes one 3× slower). Both costs per level are
  fitted to the predictor's own benchmark (``bench/results/serve.json``, its ``ladder`` section, each
  level pinned): a lone request's mean at concurrency 1 is ``fixed + per_user``, and at concurrency 64
  the worker, always busy, serves full batches, so ``max_batch`` users per ``fixed + per_user ×
  max_batch``. A batch's members are the arrivals of the same second queued when it starts; one that
  starts after its second leaves out the next second's arrivals, which only shrinks batches past a 1 s
  backlog (far past any target);
* with the ladder, each replica picks each batch's level with the predictor's own control law and cost
  model (``predictor.serving.ladder``: ``next_level`` over ``LevelCosts.forecasts`` of the queue at
  each level, at the arrival rate ``Arrivals`` measures from it); each level's price in NDCG@10
  (``bench/results/levels.json``) gives the expected quality loss of the requests it served;
* a new replica is ready ``startup_s`` (uniform over a range) after it is requested — ``bench/autoscale.py``
  sets the range from the measured time to ready of the model size; a removed one leaves at once;
* each policy decides on its own period from what its real counterpart sees (per-pod latency histograms
  with the predictor's buckets and ladder counters, CPU busy time, a pooled Prometheus p99, or in-flight
  concurrency) and sets the size (and, for ours, which pods are in rotation).

Policies (:data:`POLICIES`), each with one setpoint that :data:`SETPOINTS` sweeps:

* ``ours_ladder``: ``operators/policy.py`` with the ladder in every replica and the ladder-aware scale-up
  (``desired_with_ladder``); setpoint: headroom below the target (default 0.35, the operator's);
* ``ours``: the same operator, predictors pinned at full quality; setpoint: headroom;
* ``static_min``, ``static_max``;
* ``cpu_hpa``: HPA on CPU utilisation (setpoint: target utilisation, default 0.6), HPA default behaviour;
* ``keda_p99``: KEDA Prometheus trigger on the pooled p99 of a one-minute window, ``metricType: Value``,
  polled every 30 s, which becomes an HPA (setpoint: threshold in ms, default the target);
* ``kpa``: Knative's KPA: average in-flight requests per pod against a target concurrency (setpoint,
  default 0.7), a 60 s stable window, a 6 s panic window that takes over when it asks for 2× the ready
  pods (no scale-down for 60 s after), evaluated every 2 s.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from operators.policy import (
    EjectionPolicy,
    ScalingPolicy,
    Stabilizer,
    desired_replicas,
    desired_with_ladder,
    full_quality_demand,
    limit_step,
    merge,
    outliers,
    quantile,
    read_ladder,
)
from predictor.serving.ladder import Arrivals, LadderPolicy, LadderState, LevelCosts, next_level
from predictor.serving.metrics import LATENCY_BUCKETS

BOUNDS = np.array([*LATENCY_BUCKETS, math.inf])
POLICIES = ("ours_ladder", "ours", "static_min", "static_max", "cpu_hpa", "keda_p99", "kpa")
DEFAULT_SETPOINT = {"ours_ladder": 0.35, "ours": 0.35, "cpu_hpa": 0.6, "keda_p99": 1.0, "kpa": 0.7}
SETPOINTS = {  # what each policy's own knob is swept over (keda_p99: threshold as a share of the target)
    "ours_ladder": (0.0, 0.2, 0.35, 0.5, 0.65),
    "ours": (0.0, 0.2, 0.35, 0.5, 0.65),
    "cpu_hpa": (0.3, 0.45, 0.6, 0.75, 0.9),
    "keda_p99": (0.3, 0.5, 0.7, 1.0),
    "kpa": (0.3, 0.5, 0.7, 1.0, 1.5),
}


@dataclass(frozen=True)
class ServiceTime:
    """Log-normal service time (seconds) with the given median and p99."""

    p50_s: float
    p99_s: float

    @property
    def sigma(self) -> float:
        return max(math.log(self.p99_s / self.p50_s) / 2.326, 0.0)

    @property
    def mean_s(self) -> float:
        return self.p50_s * math.exp(self.sigma**2 / 2)


@dataclass(frozen=True)
class Ladder:
    """The predictor's quality ladder as the simulation sees it: per level, best first, a lone request's
    service time, its relative NDCG@10 loss against the best level, and the seconds each further user
    of a micro-batch adds (``per_user_s``; None: none measured, so requests are served one at a time, a
    FIFO of lone requests)."""

    levels: tuple[str, ...]
    service: tuple[ServiceTime, ...]
    drop: tuple[float, ...]
    per_user_s: tuple[float, ...] | None = None
    max_batch: int = 32

    @classmethod
    def single(cls, service: ServiceTime) -> Ladder:
        return cls(("full",), (service,), (0.0,))

    @property
    def batch_limit(self) -> int:
        return self.max_batch if self.per_user_s else 1

    def costs(self, speed: float = 1.0) -> LevelCosts:
        """Mean seconds of a batch per level, ``speed × (fixed + per_user × users)``, as the predictor
        models them (``speed``: its running measured/predicted ratio, settled at a replica's slowness)."""
        per_user = self.per_user_s or tuple(s.mean_s for s in self.service)
        fixed = [max(s.mean_s - u, 0.0) for s, u in zip(self.service, per_user)]
        return LevelCosts(fixed, list(per_user), speed)


@dataclass
class Trace:
    name: str
    duration_s: int
    rate: Callable[[float], float]  # requests per second at time t
    slow_replica: tuple[float, float] | None = (
        None  # (from time, factor): one replica becomes this much slower
    )


@dataclass(frozen=True)
class SimConfig:
    target_p99_ms: float = 50.0
    min_replicas: int = 2
    max_replicas: int = 24
    control_period_s: float = 15.0  # ours and the HPAs; also the SLO window
    keda_window_s: float = 60.0  # rate(...[1m]) in the KEDA query
    keda_polling_s: float = 30.0
    kpa_tick_s: float = 2.0
    kpa_stable_s: float = 60.0
    kpa_panic_s: float = 6.0
    startup_s: tuple[float, float] = (20.0, 60.0)  # the assumption where nothing was measured
    scale_down_stabilization_s: float = 120.0
    max_degraded_share: float = 0.05
    ladder_hold_s: float = 5.0
    warmup_s: float = 600.0  # every policy first runs this long at the trace's initial rate, unrecorded


@dataclass
class Replica:
    slowness: float = 1.0
    ready_at: float = 0.0
    free_at: float = -math.inf  # when its queue empties
    ladder: LadderState = field(default_factory=LadderState)
    arrivals: Arrivals = field(default_factory=Arrivals)
    # since the last decision of ours / the HPA: latencies (s), busy seconds, users per level
    latencies: list = field(default_factory=list)
    busy_s: float = 0.0
    served: np.ndarray | None = None


@dataclass
class RunResult:
    slo_attainment: float
    replica_seconds: float
    ejection_periods: int
    degraded_share: float  # of all recorded requests, served below the best level
    ndcg_loss: float  # expected relative NDCG@10 loss over all recorded requests
    served: list[
        int
    ]  # recorded requests per level, best first (to re-price them: loss = served · drop / total)
    windows: list[dict]  # per SLO window: t, p99_ms, replicas, ready, ejected, rate, degraded (share)


def histogram(latencies_s: np.ndarray) -> dict[float, float]:
    """Cumulative buckets as the predictor's Prometheus histogram would count them."""
    counts = np.searchsorted(np.sort(latencies_s), BOUNDS, side="right").astype(float)
    return dict(zip(BOUNDS.tolist(), counts.tolist()))


def pod_levels(rep: Replica, ladder: Ladder) -> tuple[dict[str, float], dict[str, float]]:
    """What a replica's metrics say of its ladder this period: users per level, and each level's cost
    (``recsys_level_cost_seconds``: a lone request's predicted seconds on this replica)."""
    served = {lv: float(c) for lv, c in zip(ladder.levels, rep.served)}
    return served, {lv: s.mean_s * rep.slowness for lv, s in zip(ladder.levels, ladder.service)}


def serve_batched(
    rep: Replica, arrivals: np.ndarray, ladder: Ladder, rng: np.random.Generator, policy: LadderPolicy | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Serve ``arrivals`` (sorted) on ``rep``'s micro-batcher; returns each request's latency (s), its
    level index, and the worker's busy seconds. Without ``policy``: every batch at level 0."""
    n = len(arrivals)
    costs = ladder.costs(rep.slowness)
    sigma = [s.sigma for s in ladder.service]
    free = max(rep.free_at, rep.ready_at)
    state, arrivals_seen = rep.ladder, rep.arrivals
    if n and (policy is None or state.level == 0):
        # the common case, vectorised: if no request waits, every batch is one request at level 0
        lone = costs.batch_s(0, 1) * rng.lognormal(0.0, sigma[0], n)
        cum = np.cumsum(lone)
        prev = np.concatenate([[0.0], cum[:-1]])
        departures = np.maximum.accumulate(np.concatenate([[free], arrivals - prev]))[1:] + cum
        waited = np.concatenate([[free], departures[:-1]]) > arrivals
        # a lone request's forecast is the level's mean cost; within the ceiling, no decision misses
        calm = policy is None or costs.batch_s(0, 1) <= policy.down_at * policy.target_s
        if not waited.any() and calm:
            if policy is not None:  # n decisions without a miss at the best level: the miss rate decays
                rep.ladder = replace(state, miss_rate=state.miss_rate * (1 - 1 / policy.memory) ** n)
                # n lone decisions as one: n arrivals since the last, all served
                everyone = arrivals_seen.left + n
                rep.arrivals = arrivals_seen.after(everyone, everyone, arrivals[-1], policy.rate_tau_s)
            rep.free_at = float(departures[-1])
            return departures - arrivals, np.zeros(n, np.int64), float(lone.sum())
    times = arrivals.tolist()
    latencies = np.empty(n)
    levels = np.zeros(n, np.int64)
    noise = [rng.lognormal(0.0, sg, n).tolist() for sg in (sigma if policy is not None else sigma[:1])]
    busy, i, batch = 0.0, 0, 0
    while i < n:
        start = max(free, times[i])
        queued = bisect.bisect_right(times, start, i) - i  # this batch included
        size, level = min(queued, ladder.batch_limit), 0
        if policy is not None:
            arrivals_seen = arrivals_seen.after(queued, size, start, policy.rate_tau_s)
            predicted, ahead = costs.forecasts(
                queued, start - times[i], arrivals_seen.rate, ladder.batch_limit
            )
            state = next_level(state, predicted, start, policy, size, ahead)
            level = state.level
        seconds = costs.batch_s(level, size) * noise[level][batch]
        free, busy, batch = start + seconds, busy + seconds, batch + 1
        latencies[i : i + size] = free - arrivals[i : i + size]
        levels[i : i + size] = level
        i += size
    rep.ladder, rep.arrivals, rep.free_at = state, arrivals_seen, free
    return latencies, levels, busy


def simulate(
    trace: Trace, policy: str, ladder: Ladder, config: SimConfig, seed: int = 0, setpoint: float | None = None
) -> RunResult:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    rng = np.random.default_rng(seed)
    setpoint = DEFAULT_SETPOINT.get(policy) if setpoint is None else setpoint
    uses_ladder = policy == "ours_ladder" and len(ladder.levels) > 1
    full = ladder.service[0]
    headroom = setpoint if policy.startswith("ours") else 0.2
    scaling = ScalingPolicy(
        config.target_p99_ms,
        config.min_replicas,
        config.max_replicas,
        tolerance=0.1,
        headroom=headroom,
        max_step_up=4,
        max_step_down=1,
        scale_down_stabilization_s=config.scale_down_stabilization_s,
        min_requests=20,
        max_degraded_share=config.max_degraded_share,
    )
    ejection = EjectionPolicy(
        ratio=2.0, readmit_ratio=1.3, cooloff_s=30, min_in_rotation=0.5, min_requests=10
    )
    ladder_policy = (
        LadderPolicy(config.target_p99_ms / 1000, hold_s=config.ladder_hold_s) if uses_ladder else None
    )
    if policy in ("static_min", "static_max"):
        start = config.max_replicas if policy == "static_max" else config.min_replicas
    else:  # the dynamic policies start near their steady state (half load); the warm-up settles them
        start = max(
            config.min_replicas, min(config.max_replicas, math.ceil(trace.rate(0) * full.mean_s / 0.5))
        )
    n_levels = len(ladder.levels)
    replicas = [Replica(ready_at=-math.inf, served=np.zeros(n_levels)) for _ in range(start)]
    stabilizer, ejected, strikes = Stabilizer(), {}, {}
    pooled_recent: deque = deque()  # (t, latencies) per second: KEDA's window
    kpa_recent: deque = deque()  # (t, in-flight concurrency over the second)
    kpa_panic_until = -math.inf
    windows: list[dict] = []
    window_lat: list[np.ndarray] = []
    window_served = window_degraded = 0
    replica_seconds = ejection_periods = 0.0
    recorded = degraded = 0
    loss = 0.0
    served_total = np.zeros(n_levels, np.int64)
    drop = np.asarray(ladder.drop)
    period = config.control_period_s
    t = -config.warmup_s
    while t < trace.duration_s:
        slow_from = trace.slow_replica
        if slow_from and t >= slow_from[0] and replicas and replicas[0].slowness == 1.0:
            replicas[0].slowness = slow_from[1]  # the oldest replica turns slow and stays slow
        # --- one second of traffic ---
        n = rng.poisson(trace.rate(max(t, 0.0)))
        arrivals = t + np.sort(rng.random(n))
        names = [i for i, r in enumerate(replicas) if r.ready_at <= t and i not in ejected]
        if not names:  # nothing ready: requests queue on the first replica that will be
            names = [min(range(len(replicas)), key=lambda i: replicas[i].ready_at)]
        target = rng.integers(0, len(names), n)
        second_lat, in_flight = [], 0.0
        for k, i in enumerate(names):
            rep = replicas[i]
            a = arrivals[target == k]
            if not len(a):
                continue
            lat, levels, busy = serve_batched(rep, a, ladder, rng, ladder_policy)
            counts = np.bincount(levels, minlength=n_levels)
            rep.latencies.append(lat)
            rep.busy_s += busy
            rep.served += counts
            second_lat.append(lat)
            in_flight += float(lat.sum())
            if t >= 0:
                recorded += len(a)
                degraded += int(len(a) - counts[0])
                window_served += len(a)
                window_degraded += int(len(a) - counts[0])
                loss += float(counts @ drop)
                served_total += counts
        pooled = np.concatenate(second_lat) if second_lat else np.zeros(0)
        now = t + 1.0
        on_period = abs(now / period - round(now / period)) < 1e-9
        if t >= 0:
            replica_seconds += len(replicas)
            window_lat.append(pooled)
            if on_period:  # an SLO window closes
                lat = np.concatenate(window_lat) if window_lat else np.zeros(0)
                windows.append(
                    {
                        "t": now,
                        "p99_ms": float(np.quantile(lat, 0.99)) * 1000 if len(lat) else 0.0,
                        "replicas": len(replicas),
                        "rate": trace.rate(t),
                        "ready": sum(r.ready_at <= t for r in replicas),
                        "ejected": len(ejected),
                        "degraded": window_degraded / max(window_served, 1),
                    }
                )
                window_lat, window_served, window_degraded = [], 0, 0
        pooled_recent.append((now, pooled))
        while pooled_recent and now - pooled_recent[0][0] >= config.keda_window_s:
            pooled_recent.popleft()
        kpa_recent.append((now, in_flight))  # Σ latency over a second = mean requests in flight (Little)
        while kpa_recent and now - kpa_recent[0][0] >= config.kpa_stable_s:
            kpa_recent.popleft()

        # --- the policy's decision, on its own period ---
        current = len(replicas)
        new = current
        if policy.startswith("ours") and on_period:
            p99s, reqs = {}, {}
            for i, rep in enumerate(replicas):
                if rep.ready_at <= t:
                    lat = np.concatenate(rep.latencies) if rep.latencies else np.zeros(0)
                    h = histogram(lat)
                    p99s[i] = (quantile(h, 0.99) or 0) * 1000 if h[math.inf] else None
                    reqs[i] = h[math.inf]
            if uses_ladder:  # judged at full quality, as the operator does (operators/control.py)
                p99s = {
                    i: v * full_quality_demand([pod_levels(replicas[i], ladder)]) if v is not None else v
                    for i, v in p99s.items()
                }
            ejected = outliers(
                p99s, reqs, ejected, now, ejection, strikes, peer_ceiling_ms=config.target_p99_ms
            )
            ejection_periods += bool(ejected) and t >= 0
            rotation = [i for i in p99s if i not in ejected]
            pooled_h = merge(
                [histogram(np.concatenate(replicas[i].latencies)) for i in rotation if replicas[i].latencies]
            )
            observed = quantile(pooled_h, 0.99) if pooled_h else None
            observed_ms = observed * 1000 if observed is not None else None
            if uses_ladder:
                reading = read_ladder([pod_levels(replicas[i], ladder) for i in rotation])
                wanted = desired_with_ladder(
                    current, observed_ms, pooled_h.get(math.inf, 0), reading.share, reading.demand, scaling
                )
            else:
                wanted = desired_replicas(current, observed_ms, pooled_h.get(math.inf, 0), scaling)
            new = limit_step(current, stabilizer.recommend(now, current, wanted, scaling), scaling)
        elif policy == "cpu_hpa" and on_period:
            ready = [r for r in replicas if r.ready_at <= t]  # HPA ignores unready pods' CPU
            util = float(np.mean([min(r.busy_s / period, 1.0) for r in ready])) if ready else None
            wanted = (
                current
                if util is None or abs(util / setpoint - 1) <= 0.1
                else max(
                    config.min_replicas, min(config.max_replicas, math.ceil(len(ready) * util / setpoint))
                )
            )
            wanted = min(wanted, max(2 * current, current + 4))  # HPA default: +100% or +4 pods per period
            new = stabilizer.recommend(now, current, wanted, scaling)
        elif (
            policy == "keda_p99"
            and abs(now / config.keda_polling_s - round(now / config.keda_polling_s)) < 1e-9
        ):
            window = np.concatenate([lat for _, lat in pooled_recent]) if pooled_recent else np.zeros(0)
            value = quantile(histogram(window), 0.99) if len(window) else None
            threshold = setpoint * config.target_p99_ms
            wanted = current
            if value is not None and abs(value * 1000 / threshold - 1) > 0.1:
                wanted = max(
                    config.min_replicas,
                    min(config.max_replicas, math.ceil(current * value * 1000 / threshold)),
                )
            wanted = min(wanted, max(2 * current, current + 4))
            new = stabilizer.recommend(now, current, wanted, scaling)
        elif policy == "kpa" and abs(now / config.kpa_tick_s - round(now / config.kpa_tick_s)) < 1e-9:
            ready = max(sum(r.ready_at <= t for r in replicas), 1)
            stable = np.mean([c for _, c in kpa_recent]) if kpa_recent else 0.0
            panic = np.mean([c for u, c in kpa_recent if now - u < config.kpa_panic_s]) if kpa_recent else 0.0
            want_stable, want_panic = math.ceil(stable / setpoint), math.ceil(panic / setpoint)
            if want_panic >= 2 * ready:
                kpa_panic_until = now + config.kpa_stable_s
            wanted = max(want_panic, current) if now < kpa_panic_until else want_stable
            new = max(config.min_replicas, min(config.max_replicas, wanted))
        if on_period:  # the period's per-pod data is consumed
            for rep in replicas:
                rep.latencies, rep.busy_s = [], 0.0
                rep.served = np.zeros(n_levels)
        if new > current:
            for _ in range(new - current):
                replicas.append(
                    Replica(ready_at=now + rng.uniform(*config.startup_s), served=np.zeros(n_levels))
                )
        elif new < current:
            for _ in range(current - new):  # the newest go first (ReplicaSet picks unready / newest)
                gone = len(replicas) - 1
                replicas.pop()
                ejected.pop(gone, None)
        t = now

    attained = [w["p99_ms"] <= config.target_p99_ms for w in windows]
    return RunResult(
        float(np.mean(attained)),
        replica_seconds,
        int(ejection_periods),
        degraded / max(recorded, 1),
        loss / max(recorded, 1),
        served_total.tolist(),
        windows,
    )


def traces(base_rps: float, duration_s: int = 1800) -> list[Trace]:
    """The four scenarios: step ×2, spike ×5 for 60 s, diurnal, one replica 3× slower."""
    d = duration_s
    return [
        Trace("step_x2", d, lambda t: base_rps * (2.0 if t >= d / 3 else 1.0)),
        Trace("spike_x5", d, lambda t: base_rps * (5.0 if d / 2 <= t < d / 2 + 60 else 1.0)),
        Trace("diurnal", d, lambda t: base_rps * (1.0 + 0.8 * math.sin(2 * math.pi * t / d - math.pi / 2))),
        Trace("slow_replica", d, lambda t: base_rps, slow_replica=(d / 3, 3.0)),
    ]


def frontier_gap(
    ours: list[tuple[float, float]], baseline: list[tuple[float, float]], points: int = 200
) -> dict:
    """How far ``ours`` lies above ``baseline`` on the SLO-attainment-vs-replica-seconds plane over their
    common cost range: each curve is its Pareto staircase (the best attainment at no more than a cost);
    the worst gap is the least of ours' minus the baseline's over the range (≥ 0: on or above)."""

    def staircase(curve):
        pts = sorted(curve)
        return lambda x: max((a for c, a in pts if c <= x + 1e-9), default=float("nan"))

    lo = max(min(c for c, _ in ours), min(c for c, _ in baseline))
    hi = min(max(c for c, _ in ours), max(c for c, _ in baseline))
    if lo > hi:
        return {"range": None, "worst_gap": None, "at": None}
    ours_at, base_at = staircase(ours), staircase(baseline)
    grid = np.linspace(lo, hi, points)
    gaps = [(ours_at(x) - base_at(x), x) for x in grid]
    worst, at = min(gaps)
    return {"range": [float(lo), float(hi)], "worst_gap": float(worst), "at": float(at)}
