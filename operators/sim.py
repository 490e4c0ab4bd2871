"""A discrete-event model of the predictor's replica pool, to compare autoscaling policies offline.

Model (one run = one trace × one policy, seeded):

* requests arrive as a Poisson process whose rate follows the trace; the Service (kube-proxy) sends each
  to a uniformly random ready replica that is in rotation;
* each replica is a FIFO server (the predictor's worker thread) whose service times are drawn from a
  log-normal fitted to the predictor's own benchmark (``bench/results/serve.json``: p50 and p99 at
  concurrency 1), times a per-replica slowness factor (a noisy neighbour makes one 3× slower);
  departures follow Lindley's recursion, vectorised: ``D_n = max(A_n, D_{n-1}) + S_n``;
* a new replica is ready ``startup_s`` (uniform over a range) after it is requested — ``bench/autoscale.py``
  sets the range from the measured time to ready of the model size (``bench/results/frontier.json``); a
  removed one leaves at once;
* every control period the policy sees what its real counterpart would (per-pod latency histograms with
  the predictor's buckets, CPU busy time, or the pooled Prometheus p99 over its window) and sets the size
  (and, for ours, which pods are in rotation).

Policies: ``ours`` (``operators/policy.py`` itself, default 20 % headroom below the target),
``ours_headroom_0.5`` (the same, aiming at half the target: the price of absorbing a ×2 step), ``static_min``, ``static_max``, ``cpu_hpa`` (HPA on
CPU utilisation), ``keda_p99`` (KEDA Prometheus trigger on the pooled p99, ``metricType: Value``, which
becomes an HPA: same ``ceil(current × value / target)`` rule, HPA default behaviour, no ejection).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from operators.policy import (
    EjectionPolicy,
    ScalingPolicy,
    Stabilizer,
    desired_replicas,
    limit_step,
    merge,
    outliers,
    quantile,
)
from predictor.serving.metrics import LATENCY_BUCKETS

BOUNDS = np.array([*LATENCY_BUCKETS, math.inf])
POLICIES = ("ours", "ours_headroom_0.5", "static_min", "static_max", "cpu_hpa", "keda_p99")


@dataclass(frozen=True)
class ServiceTime:
    """Log-normal service time (seconds) with the given median and p99."""

    p50_s: float
    p99_s: float

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        sigma = max(math.log(self.p99_s / self.p50_s) / 2.326, 1e-6)
        return rng.lognormal(math.log(self.p50_s), sigma, n)

    @property
    def mean_s(self) -> float:
        sigma = max(math.log(self.p99_s / self.p50_s) / 2.326, 1e-6)
        return self.p50_s * math.exp(sigma**2 / 2)


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
    control_period_s: float = 15.0
    window_s: float = 15.0  # metrics window of ours (pod scrapes each period)
    keda_window_s: float = 60.0  # rate(...[1m]) in the KEDA query
    keda_polling_s: float = 30.0
    cpu_target: float = 0.6
    startup_s: tuple[float, float] = (20.0, 60.0)  # the assumption where nothing was measured
    scale_down_stabilization_s: float = 120.0
    warmup_s: float = 600.0  # every policy first runs this long at the trace's initial rate, unrecorded


@dataclass
class Replica:
    slowness: float = 1.0
    ready_at: float = 0.0
    free_at: float = -math.inf  # when its queue empties
    busy_s: float = 0.0  # service time accumulated in the current period
    latencies: list = field(default_factory=list)  # this period's request latencies (s)


@dataclass
class RunResult:
    slo_attainment: float
    replica_seconds: float
    ejection_periods: int
    windows: list[dict]  # per SLO window: t, p99_ms, replicas, ready, ejected, rate


def histogram(latencies_s: np.ndarray) -> dict[float, float]:
    """Cumulative buckets as the predictor's Prometheus histogram would count them."""
    counts = np.searchsorted(np.sort(latencies_s), BOUNDS, side="right").astype(float)
    return dict(zip(BOUNDS.tolist(), counts.tolist()))


def simulate(trace: Trace, policy: str, service: ServiceTime, config: SimConfig, seed: int = 0) -> RunResult:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    rng = np.random.default_rng(seed)
    headroom = 0.5 if policy == "ours_headroom_0.5" else 0.2
    scaling = ScalingPolicy(config.target_p99_ms, config.min_replicas, config.max_replicas, tolerance=0.1, headroom=headroom,
                            max_step_up=4, max_step_down=1, scale_down_stabilization_s=config.scale_down_stabilization_s,
                            min_requests=20)  # fmt: skip
    ejection = EjectionPolicy(
        ratio=2.0, readmit_ratio=1.3, cooloff_s=30, min_in_rotation=0.5, min_requests=10
    )
    if policy in ("static_min", "static_max"):
        start = config.max_replicas if policy == "static_max" else config.min_replicas
    else:  # the dynamic policies start near their steady state (half load); the warm-up settles them
        start = max(
            config.min_replicas, min(config.max_replicas, math.ceil(trace.rate(0) * service.mean_s / 0.5))
        )
    replicas: list[Replica] = [Replica(ready_at=-math.inf, free_at=-math.inf) for _ in range(start)]
    stabilizer, ejected, strikes = Stabilizer(), {}, {}
    keda_history: list[tuple[float, np.ndarray]] = []
    windows, replica_seconds, ejection_periods = [], 0.0, 0
    dt = config.control_period_s
    t = -config.warmup_s
    while t < trace.duration_s:
        # --- traffic for one control period, one second at a time (the rate changes per second) ---
        slow_from = trace.slow_replica
        if slow_from and t >= slow_from[0] and replicas and replicas[0].slowness == 1.0:
            replicas[0].slowness = slow_from[1]  # the oldest replica turns slow and stays slow
        arrivals = []
        for second in range(int(dt)):
            n = rng.poisson(trace.rate(max(t + second, 0.0)))
            arrivals.append(t + second + np.sort(rng.random(n)))
        arrivals = np.concatenate(arrivals) if arrivals else np.zeros(0)
        names = [i for i, r in enumerate(replicas) if r.ready_at <= t and i not in ejected]
        if not names:  # nothing ready: requests queue on the first replica that will be
            names = [min(range(len(replicas)), key=lambda i: replicas[i].ready_at)]
        target = rng.integers(0, len(names), len(arrivals))
        all_lat = []
        for k, i in enumerate(names):
            rep = replicas[i]
            a = arrivals[target == k]
            s = service.sample(rng, len(a)) * rep.slowness
            if len(a):
                cum = np.cumsum(s)
                prev = np.concatenate([[0.0], cum[:-1]])
                start_free = max(rep.free_at, rep.ready_at)
                x = np.maximum.accumulate(np.concatenate([[start_free], a - prev]))[1:]
                departures = x + cum
                rep.free_at = float(departures[-1])
                lat = departures - a
                rep.latencies = lat
                rep.busy_s = float(s.sum())
                all_lat.append(lat)
            else:
                rep.latencies, rep.busy_s = np.zeros(0), 0.0
        for i, rep in enumerate(replicas):
            if i not in names:
                rep.latencies, rep.busy_s = np.zeros(0), 0.0
        pooled = np.concatenate(all_lat) if all_lat else np.zeros(0)
        now = t + dt
        if t >= 0:
            replica_seconds += len(replicas) * dt
            p99 = float(np.quantile(pooled, 0.99)) * 1000 if len(pooled) else 0.0
            windows.append({"t": now, "p99_ms": p99, "replicas": len(replicas), "rate": trace.rate(t),
                            "ready": sum(r.ready_at <= t for r in replicas), "ejected": len(ejected)})  # fmt: skip

        # --- the policy's decision at the end of the period ---
        current = len(replicas)
        if policy.startswith("ours"):
            p99s = {}
            reqs = {}
            for i, rep in enumerate(replicas):
                if rep.ready_at <= t:
                    h = histogram(np.asarray(rep.latencies))
                    p99s[i] = (quantile(h, 0.99) or 0) * 1000 if h[math.inf] else None
                    reqs[i] = h[math.inf]
            ejected = outliers(
                p99s, reqs, ejected, now, ejection, strikes, peer_ceiling_ms=config.target_p99_ms
            )
            ejection_periods += bool(ejected) and t >= 0
            pooled_h = merge([histogram(np.asarray(replicas[i].latencies)) for i in p99s if i not in ejected])
            observed = quantile(pooled_h, 0.99) if pooled_h else None
            wanted = desired_replicas(current, observed * 1000 if observed is not None else None,
                                      pooled_h.get(math.inf, 0), scaling)  # fmt: skip
            new = limit_step(current, stabilizer.recommend(now, current, wanted, scaling), scaling)
        elif policy in ("static_min", "static_max"):
            new = current
        elif policy == "cpu_hpa":
            ready = [r for r in replicas if r.ready_at <= t]  # HPA ignores unready pods' CPU
            util = float(np.mean([min(r.busy_s / dt, 1.0) for r in ready])) if ready else None
            wanted = current if util is None or abs(util / config.cpu_target - 1) <= 0.1 else \
                max(config.min_replicas, min(config.max_replicas, math.ceil(len(ready) * util / config.cpu_target)))  # fmt: skip
            wanted = min(wanted, max(2 * current, current + 4))  # HPA default: +100% or +4 pods per period
            new = stabilizer.recommend(now, current, wanted, scaling)
        else:  # keda_p99
            keda_history.append((now, pooled))
            keda_history = [(u, lat) for u, lat in keda_history if now - u < config.keda_window_s]
            if int(now) % int(config.keda_polling_s) < dt:
                window_lat = np.concatenate([lat for _, lat in keda_history])
                value = quantile(histogram(window_lat), 0.99) if len(window_lat) else None
                wanted = current if value is None else max(config.min_replicas, min(config.max_replicas, math.ceil(
                    current * value * 1000 / config.target_p99_ms)))  # fmt: skip
                if value is not None and abs(value * 1000 / config.target_p99_ms - 1) <= 0.1:
                    wanted = current
                wanted = min(wanted, max(2 * current, current + 4))
                new = stabilizer.recommend(now, current, wanted, scaling)
            else:
                new = current
        if new > current:
            for _ in range(new - current):
                replicas.append(Replica(ready_at=now + rng.uniform(*config.startup_s)))
        elif new < current:
            for _ in range(current - new):  # the newest go first (ReplicaSet picks unready / newest)
                gone = len(replicas) - 1
                replicas.pop()
                ejected.pop(gone, None)
        t = now

    attained = [w["p99_ms"] <= config.target_p99_ms for w in windows]
    return RunResult(float(np.mean(attained)), replica_seconds, ejection_periods, windows)


def traces(base_rps: float, duration_s: int = 1800) -> list[Trace]:
    """The four scenarios: step ×2, spike ×5 for 60 s, diurnal, one replica 3× slower."""
    d = duration_s
    return [
        Trace("step_x2", d, lambda t: base_rps * (2.0 if t >= d / 3 else 1.0)),
        Trace("spike_x5", d, lambda t: base_rps * (5.0 if d / 2 <= t < d / 2 + 60 else 1.0)),
        Trace("diurnal", d, lambda t: base_rps * (1.0 + 0.8 * math.sin(2 * math.pi * t / d - math.pi / 2))),
        Trace("slow_replica", d, lambda t: base_rps, slow_replica=(d / 3, 3.0)),
    ]  # fmt: skip
