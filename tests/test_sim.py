"""The replica-pool simulation behind ``bench/autoscale.py``: the ladder as the predictor runs it, the
baselines' control laws, and the frontier comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.sim import Ladder, Replica, ServiceTime, SimConfig, Trace, frontier_gap, serve_fifo, simulate
from predictor.serving.ladder import LadderPolicy, LadderState, next_level

FULL = ServiceTime(0.004, 0.007)
LADDER = Ladder(
    ("full", "reduced", "retrieval", "popularity"),
    (FULL, ServiceTime(0.003, 0.005), ServiceTime(0.002, 0.0035), ServiceTime(0.0008, 0.0014)),
    (0.0, 0.02, 0.08, 0.5),
)
CONFIG = SimConfig(target_p99_ms=50, min_replicas=2, max_replicas=30, startup_s=(15, 18), warmup_s=120)


def test_fifo_with_the_ladder_is_the_control_law_request_by_request():
    """The simulated replica picks each request's level with ``next_level`` from the backlog it finds."""
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.random(400)) * 0.5  # 800 req/s on one replica: far past full capacity
    samples = [s.sample(rng, len(arrivals)) for s in LADDER.service]
    policy = LadderPolicy(0.05)
    lat, levels = serve_fifo(Replica(ready_at=-math.inf), arrivals, LADDER, samples, policy)
    state, free = LadderState(), -math.inf
    for i, a in enumerate(arrivals):
        backlog = max(free - a, 0.0)
        state = next_level(state, [backlog + s.mean_s for s in LADDER.service], a, policy)
        assert levels[i] == state.level
        free = max(free, a) + samples[state.level][i]
        assert lat[i] == pytest.approx(free - a)
    assert levels.max() > 0 and lat.max() < 0.06  # degraded, and the queue held near the target


def test_without_a_ladder_every_request_is_full_and_lindley_holds():
    rng = np.random.default_rng(1)
    arrivals = np.sort(rng.random(100))
    samples = [FULL.sample(rng, 100)]
    lat, levels = serve_fifo(Replica(ready_at=-math.inf), arrivals, LADDER, samples, None)
    departures, free = [], -math.inf
    for a, s in zip(arrivals, samples[0]):
        free = max(free, a) + s
        departures.append(free)
    np.testing.assert_allclose(lat, np.array(departures) - arrivals)
    assert (levels == 0).all()


def test_the_ladder_holds_a_spike_that_replicas_alone_miss():
    base = 3 / FULL.mean_s  # six replicas at half load
    spike = Trace("spike", 300, lambda t: base * (5.0 if 150 <= t < 210 else 1.0))
    with_ladder = simulate(spike, "ours_ladder", LADDER, CONFIG)
    without = simulate(spike, "ours", LADDER, CONFIG)
    assert with_ladder.slo_attainment > without.slo_attainment
    assert with_ladder.slo_attainment == 1.0
    # degraded under the overload: full quality while the pool has room, and again within a minute after it
    assert without.degraded_share == 0.0
    assert all(w["degraded"] == 0.0 for w in with_ladder.windows if w["t"] <= 100)
    assert any(w["degraded"] > 0.5 for w in with_ladder.windows if 150 < w["t"] <= 210)
    assert all(w["degraded"] == 0.0 for w in with_ladder.windows if w["t"] >= 270)
    assert 0 < with_ladder.ndcg_loss < with_ladder.degraded_share * max(LADDER.drop)


def test_static_pools_keep_their_size_and_kpa_follows_concurrency():
    base = 3 / FULL.mean_s
    flat = Trace("flat", 120, lambda t: base)
    static = simulate(flat, "static_max", LADDER, CONFIG)
    assert static.replica_seconds == CONFIG.max_replicas * 120
    kpa = simulate(flat, "kpa", LADDER, CONFIG, setpoint=0.5)
    # 3 replicas' worth of busy time at 0.5 in flight per pod: about 6 replicas
    assert 4 <= kpa.windows[-1]["replicas"] <= 9


def test_frontier_gap_compares_pareto_staircases_over_the_common_range():
    ours = [(10.0, 0.9), (20.0, 0.99), (30.0, 1.0)]
    base = [(15.0, 0.8), (25.0, 0.95), (40.0, 1.0)]
    gap = frontier_gap(ours, base)
    assert gap["range"] == [15.0, 30.0] and gap["worst_gap"] == pytest.approx(0.04, abs=1e-9)
    worse = frontier_gap([(15.0, 0.7), (30.0, 0.9)], base)
    assert worse["worst_gap"] < 0
    assert frontier_gap([(1.0, 1.0)], [(5.0, 1.0)])["worst_gap"] is None  # no common range
