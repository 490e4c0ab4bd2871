"""The replica-pool simulation behind ``bench/autoscale.py``: the ladder as the predictor runs it, the
baselines' control laws, and the frontier comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.sim import Ladder, Replica, ServiceTime, SimConfig, Trace, frontier_gap, serve_batched, simulate
from predictor.serving.ladder import Arrivals, LadderPolicy, LadderState, next_level

FULL = ServiceTime(0.004, 0.007)
LADDER = Ladder(
    ("full", "reduced", "retrieval", "popularity"),
    (FULL, ServiceTime(0.003, 0.005), ServiceTime(0.002, 0.0035), ServiceTime(0.0008, 0.0014)),
    (0.0, 0.02, 0.08, 0.5),
    per_user_s=(0.001, 0.0008, 0.0005, 0.0002),
    max_batch=16,
)
CONFIG = SimConfig(target_p99_ms=50, min_replicas=2, max_replicas=30, startup_s=(15, 18), warmup_s=120)


def exact(ladder: Ladder) -> Ladder:
    """``ladder`` without service-time noise, so a test can follow every batch by hand."""
    return Ladder(
        ladder.levels,
        tuple(ServiceTime(s.mean_s, s.mean_s) for s in ladder.service),
        ladder.drop,
        ladder.per_user_s,
        ladder.max_batch,
    )


def test_each_batch_takes_the_queue_up_to_max_batch_at_the_control_laws_level():
    """The simulated replica is the predictor's batcher: when free, it takes what has queued (at most
    ``max_batch``) as one call of ``fixed + per_user × b`` seconds, at the level ``next_level`` picks from
    the predictor's own forecasts (``LevelCosts.forecasts`` at the arrival rate ``Arrivals`` measures from
    the queue), counting the batch's users."""
    ladder = exact(LADDER)
    costs = ladder.costs()
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.random(1500)) * 0.5  # 3,000 req/s on one replica: far past full capacity
    policy = LadderPolicy(0.05)
    lat, levels, busy = serve_batched(Replica(ready_at=-math.inf), arrivals, ladder, rng, policy)
    state, seen, free, i, sizes, total = LadderState(), Arrivals(), -math.inf, 0, [], 0.0
    while i < len(arrivals):
        start = max(free, arrivals[i])
        queued = int(np.searchsorted(arrivals, start, side="right")) - i
        size = min(queued, 16)
        seen = seen.after(queued, size, start, policy.rate_tau_s)
        predicted, ahead = costs.forecasts(queued, start - arrivals[i], seen.rate, 16)
        state = next_level(state, predicted, start, policy, size, ahead)
        free = start + costs.batch_s(state.level, size)
        total += costs.batch_s(state.level, size)
        assert (levels[i : i + size] == state.level).all()
        np.testing.assert_allclose(lat[i : i + size], free - arrivals[i : i + size], rtol=1e-9)
        sizes.append(size)
        i += size
    assert busy == pytest.approx(total)
    assert max(sizes) == 16 and levels.max() > 0  # batched and degraded under the overload ...
    assert lat[len(lat) // 2 :].max() < 0.06  # ... and the queue held near the target once stepped down


def test_batching_serves_what_a_lone_request_fifo_cannot():
    """At 2.5x what lone requests can serve, the batcher keeps up: once a queue builds, each call takes
    the users that queued during the last one, so batches grow until ``fixed + per_user × b`` is served
    as fast as ``b`` users arrive. Without a batching gain (``per_user_s`` None) it is a FIFO of lone
    requests, whose backlog grows without bound."""
    rng = np.random.default_rng(1)
    arrivals = np.sort(rng.random(600))  # 600 req/s; a lone full-quality request takes 4.1 ms
    lat, levels, busy = serve_batched(Replica(ready_at=-math.inf), arrivals, exact(LADDER), rng, None)
    assert (levels == 0).all()
    assert busy < 1.05 and lat.max() < 0.03  # about 2 ms of work per user, batched: it keeps up
    fifo = exact(Ladder(LADDER.levels, LADDER.service, LADDER.drop))
    lone_lat, _, lone_busy = serve_batched(Replica(ready_at=-math.inf), arrivals, fifo, rng, None)
    departures, free = [], -math.inf
    for a in arrivals:
        free = max(free, a) + FULL.mean_s
        departures.append(free)
    np.testing.assert_allclose(lone_lat, np.array(departures) - arrivals, rtol=1e-9)
    assert lone_busy == pytest.approx(600 * FULL.mean_s)
    assert lone_lat.max() > 1.0  # 2.5 s of work arrived in 1 s


def test_a_lightly_loaded_replica_serves_lone_requests_at_full_quality():
    """No request waits: every batch is one request at the best level, each taking the lone cost."""
    rng = np.random.default_rng(2)
    arrivals = np.arange(50) * 0.02  # one every 20 ms, each served in about 4 ms
    rep = Replica(ready_at=-math.inf, ladder=LadderState(miss_rate=0.5))
    lat, levels, _ = serve_batched(rep, arrivals, exact(LADDER), rng, LadderPolicy(0.05))
    assert (levels == 0).all()
    np.testing.assert_allclose(lat, FULL.mean_s, rtol=1e-9)
    assert rep.ladder.level == 0 and rep.ladder.miss_rate == pytest.approx(0.5 * (1 - 1 / 500) ** 50)


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
