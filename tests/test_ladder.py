"""The quality ladder: its control law as a pure function (property tests), the level costs, and each level
through the serving engine."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.data.synthetic import generate
from predictor.models.config import TrainConfig, model_config
from predictor.models.data import build_split
from predictor.models.inference import LEVELS
from predictor.models.persistence import model_files, model_from_files
from predictor.models.recommender import TwoStageRecommender
from predictor.serving.engine import OnlineUsers, ServingEngine
from predictor.serving.ladder import (
    Arrivals,
    LadderPolicy,
    LadderState,
    LevelCosts,
    QualityLadder,
    next_level,
)

POLICY = LadderPolicy(target_s=0.05, down_at=0.9, up_at=0.7, hold_s=5.0)
# predicted seconds per level, best (dearest) first: what a queue costs at each rung
predictions = st.lists(st.floats(0.0, 0.5), min_size=2, max_size=4).map(lambda xs: sorted(xs, reverse=True))


def run(state: LadderState, predicted, times) -> list[int]:
    levels = []
    for now in times:
        state = next_level(state, predicted, now, POLICY)
        levels.append(state.level)
    return levels


@settings(max_examples=300, deadline=None)
@given(predicted=predictions, start=st.integers(0, 3), step=st.floats(0.005, 2.0))
def test_steady_load_never_oscillates(predicted, start, step):
    """Under a steady load the level moves one way only (down, or up) and then stays: no flapping."""
    # long enough for every step up (one hold window each) and 50 decisions after the last
    n = max(400, math.ceil(len(predicted) * POLICY.hold_s / step) + 50)
    levels = run(
        LadderState(min(start, len(predicted) - 1), 0.0), predicted, [step * (i + 1) for i in range(n)]
    )
    changes = np.sign(np.diff([min(start, len(predicted) - 1), *levels]))
    moves = changes[changes != 0]
    assert len(set(moves.tolist())) <= 1, levels
    assert len(set(levels[-50:])) == 1  # settled


@settings(max_examples=300, deadline=None)
@given(
    predicted=predictions,
    ahead_factor=st.lists(st.floats(0.0, 2.0), min_size=4, max_size=4),
    start=st.integers(0, 3),
    now=st.floats(0, 1e4),
    since=st.floats(-1e4, 1e4),
    rate=st.floats(0, 1),
)
def test_a_miss_past_the_allowance_steps_down_to_the_best_level_that_keeps_up(
    predicted, ahead_factor, start, now, since, rate
):
    """The miss is judged on the queue now; where to go, on what the requests still to come will see
    (``ahead``, never above the level's ``now`` forecast in the predictor, but any vector here)."""
    current = min(start, len(predicted) - 1)
    ceiling = POLICY.down_at * POLICY.target_s
    ahead = [p * f for p, f in zip(predicted, ahead_factor)]
    after = next_level(LadderState(current, since, 7, 3, rate), predicted, now, POLICY, ahead_s=ahead)
    miss = predicted[current] > ceiling
    assert after.miss_rate == pytest.approx(rate + (miss - rate) / POLICY.memory)
    if miss and after.miss_rate > POLICY.allowance:
        fits = [lv for lv in range(current, len(predicted)) if ahead[lv] <= ceiling]
        assert after.level == (fits[0] if fits else len(predicted) - 1)
        assert after.level >= current  # never up on a miss
        assert (after.since, after.decisions, after.over) == (now, 0, 0)  # the way back up starts afresh
    else:
        assert after.level <= current  # no step down without a miss past the allowance


def test_without_a_separate_ahead_forecast_a_miss_always_steps_down():
    """``ahead`` defaults to the forecast itself: the current level missed, so it cannot be kept."""
    overload = [0.2, 0.1, 0.03, 0.001]
    assert next_level(LadderState(1, 0.0), overload, 1.0, POLICY, users=32).level == 2
    # the head's wait is spent, but the queue drains within the ceiling at level 1: kept, window restarted
    kept = next_level(LadderState(1, 0.0, 50, 0), overload, 1.0, POLICY, 32, [0.2, 0.04, 0.01, 0.001])
    assert (kept.level, kept.since, kept.decisions) == (1, 1.0, 0)


def test_overload_steps_down_within_a_handful_of_decisions_and_rare_misses_do_not():
    overload = [0.2, 0.1, 0.03, 0.001]  # every level but the last two misses
    state, steps = LadderState(), 0
    while state.level == 0:
        state = next_level(state, overload, 0.001 * steps, POLICY)
        steps += 1
    assert steps <= 6 and state.level == 2  # the best level within the ceiling, not the cheapest
    # steady load, one miss in 200 forecasts (0.5 %, within a p99's 1 %): the level holds
    state = LadderState()
    for i in range(20_000):
        state = next_level(
            state, overload if i % 200 == 0 else [0.01, 0.008, 0.005, 0.001], 0.001 * i, POLICY
        )
        assert state.level == 0


@settings(max_examples=200, deadline=None)
@given(predicted=predictions, users=st.integers(1, 64), rate=st.floats(0, 0.05))
def test_a_batch_decision_counts_once_per_user(predicted, users, rate):
    """A decision for a batch of ``users`` is ``users`` lone decisions with the same forecast, in the
    miss rate and in the way back up."""
    start = LadderState(len(predicted) - 1, 0.0, 3, 1, rate)
    batched = next_level(start, predicted, 1.0, POLICY, users)
    lone = start
    for _ in range(users):
        lone = next_level(lone, predicted, 1.0, POLICY)
        if lone.level != start.level:
            break
    if lone.level == start.level:  # no step within the window: the same counts
        assert batched.level == start.level
        assert batched.miss_rate == pytest.approx(lone.miss_rate)
        assert (batched.decisions, batched.over) == (lone.decisions, lone.over)


def test_one_missed_batch_steps_down_where_one_missed_lone_request_does_not():
    overload = [0.2, 0.1, 0.03, 0.001]
    assert next_level(LadderState(), overload, 0.0, POLICY).level == 0  # 1 of 500: within the 1 %
    assert next_level(LadderState(), overload, 0.0, POLICY, users=5).level == 0  # 0.996 %
    assert next_level(LadderState(), overload, 0.0, POLICY, users=6).level == 2  # 1.2 %: down at once


@settings(max_examples=200, deadline=None)
@given(start=st.integers(1, 3), step=st.floats(0.01, 1.0), hold=st.floats(0.5, 20.0))
def test_back_up_one_level_per_hold_time_once_calm(start, step, hold):
    policy = LadderPolicy(0.05, hold_s=hold)
    calm = [0.001] * 4  # every level far within up_at × target
    state, now, ups = LadderState(start, 0.0), 0.0, []
    while state.level > 0 and now < 1e4:
        now += step
        before = state.level
        state = next_level(state, calm, now, policy)
        if state.level != before:
            assert state.level == before - 1  # one level at a time
            ups.append(now)
    assert state.level == 0
    assert ups[0] >= hold  # not before the hold time
    assert all(b - a >= hold - 1e-9 for a, b in itertools.pairwise(ups))  # each step waits its own hold


def test_up_needs_a_window_whose_p99_prediction_is_calm_not_every_decision():
    """One busy decision in a hundred (the allowance) does not hold the level down; two do."""
    busy, calm = [0.06, 0.04, 0.001], [0.06, 0.01, 0.001]  # the better level at 0.04 > up_at × target (0.035)

    def window(n_busy: int) -> LadderState:
        state = LadderState(2, 0.0)
        for i in range(100):
            state = next_level(state, busy if i < n_busy else calm, 0.04 * i, POLICY)
        return next_level(state, calm, 5.0, POLICY)  # the window closes

    assert window(1).level == 1
    failed = window(2)
    assert (failed.level, failed.since, failed.decisions) == (2, 5.0, 0)  # a new window starts


def test_policy_rejects_settings_without_hysteresis():
    with pytest.raises(ValueError, match="up_at < down_at"):
        LadderPolicy(0.05, down_at=0.5, up_at=0.5)
    with pytest.raises(ValueError, match="allowance"):
        LadderPolicy(0.05, allowance=1.0)
    with pytest.raises(ValueError, match="memory"):
        LadderPolicy(0.05, memory=0)
    with pytest.raises(ValueError, match="positive"):
        LadderPolicy(0.0)


def test_level_costs_fit_the_timings_and_follow_a_slower_machine():
    true = {0: (0.002, 0.0005), 1: (0.001, 0.0001)}
    costs = LevelCosts.calibrate(lambda level, users: true[level][0] + true[level][1] * users, 2)
    for level, (fixed, per_user) in true.items():
        assert costs.fixed[level] == pytest.approx(fixed) and costs.per_user[level] == pytest.approx(per_user)
    # 40 users in batches of 16: 16 + 16 + 8
    assert costs.drain_s(0, 40, 16) == pytest.approx(2 * (0.002 + 0.008) + (0.002 + 0.004))
    for _ in range(100):  # the node became twice as slow
        costs.observe(0, 4, 2 * (0.002 + 0.0005 * 4))
    assert costs.speed == pytest.approx(2.0, rel=1e-3)
    assert costs.batch_s(1, 1) == pytest.approx(2 * 0.0011, rel=1e-3)


def batcher(costs: LevelCosts, rate: float, max_batch: int, seconds: float = 5.0) -> tuple[float, Arrivals]:
    """A deterministic micro-batcher at level 0 fed ``rate`` evenly spaced users a second: the worst
    latency over the second half, and the arrival rate its decisions measured there (``tau_s`` 0.1;
    the last decisions, after the stream ends, left out)."""
    times = np.arange(0.0, seconds, 1.0 / rate)
    free, i, worst, seen, measured = 0.0, 0, 0.0, Arrivals(), Arrivals()
    while i < len(times):
        start = max(free, times[i])
        queued = int(np.searchsorted(times, start, side="right")) - i
        size = min(queued, max_batch)
        seen = seen.after(queued, size, start, 0.1)
        free = start + costs.batch_s(0, size)
        if seconds / 2 < times[i] < seconds - 0.5:
            worst, measured = max(worst, free - times[i]), seen
        i += size
    return worst, measured


@pytest.mark.parametrize("rate", [250.0, 300.0, 400.0])
def test_the_settled_latency_is_what_a_busy_batcher_settles_at(rate):
    """``T = fixed + per_user × rate × T``, and the worst request waits one cycle and is served in the
    next; the arrival rate is measured from the queue at each decision alone."""
    costs = LevelCosts([0.01], [0.002])
    worst, seen = batcher(costs, rate, max_batch=32)
    assert seen.rate == pytest.approx(rate, rel=0.05)
    assert costs.settled_s(0, rate, 32) == pytest.approx(worst, rel=0.12)


def test_the_settled_latency_bounds_a_quiet_replica_and_is_infinite_where_a_level_cannot_keep_up():
    costs = LevelCosts([0.01, 0.001], [0.002, 0.0001])
    worst, _ = batcher(costs, 20.0, max_batch=32)  # a lone request each 50 ms: no one waits
    assert worst == pytest.approx(0.012)
    assert worst <= costs.settled_s(0, 20.0, 32) <= 1.3 * worst  # room for Poisson's chance of a wait
    assert costs.settled_s(0, 500.0, 32) == math.inf  # per_user × rate = 1: no fixed point
    assert costs.settled_s(0, 460.0, 32) == math.inf  # the fixed point's batch is 58 users, past 32 ...
    short, _ = batcher(costs, 460.0, max_batch=32, seconds=5.0)
    long, _ = batcher(costs, 460.0, max_batch=32, seconds=10.0)
    assert long > 1.5 * short  # ... and indeed the queue grows without bound (32 per 74 ms: 432 a second)
    assert costs.settled_s(1, 460.0, 32) < 0.01  # a cheaper level keeps up with the same rate


def test_arrivals_count_each_user_once_even_when_decisions_share_an_instant():
    tau = 0.1
    one = Arrivals(at=0.9).after(6, 2, 1.0, tau).after(4 + 10, 3, 1.1, tau)
    # the same arrivals, with a second decision at t = 1.0 that saw 4 more users arrive at that instant
    two = Arrivals(at=0.9).after(6, 2, 1.0, tau).after(4 + 4, 3, 1.0, tau).after(5 + 10, 3, 1.1, tau)
    assert two.rate == pytest.approx(
        Arrivals(at=0.9).after(6, 2, 1.0, tau).after(4 + 4 + 10, 3, 1.1, tau).rate
    )
    assert two.rate > one.rate  # four more users arrived, and they counted
    assert Arrivals().after(5, 2, 3.0, tau) == Arrivals(0.0, 3, 3.0)  # the first decision sets no rate


def test_the_forecast_is_the_worse_of_the_head_and_the_newest_request():
    costs = LevelCosts([0.002], [0.0005])
    # 40 queued in batches of 16: the head leaves with the first batch, the newest after all three
    assert costs.forecast_s(0, 40, 0.001, 16) == pytest.approx(costs.drain_s(0, 40, 16))
    assert costs.forecast_s(0, 40, 0.5, 16) == pytest.approx(0.5 + costs.batch_s(0, 16))
    now, ahead = costs.forecasts(40, 0.5, rate=100.0, max_batch=16)
    assert now == [costs.forecast_s(0, 40, 0.5, 16)]
    assert ahead == [max(costs.drain_s(0, 40, 16), costs.settled_s(0, 100.0, 16))]


def test_quality_ladder_degrades_under_a_queue_and_pins_when_asked():
    costs = LevelCosts([0.004, 0.002, 0.001, 0.0001], [0.003, 0.001, 0.0002, 0.00001])
    ladder = QualityLadder(LEVELS, costs, POLICY, max_batch=32)
    assert ladder.choose(1, 0.0, now=0.0) == "full"
    # 50 users in batches of 32 + 18: full 0.158 s, reduced 0.054 s > 0.045 (down_at × target),
    # retrieval 0.012;
    # a sustained queue served one user at a time: the miss rate passes the allowance after a few decisions
    chosen = [ladder.choose(50, 0.0, now=0.1 + 0.001 * i, batch_users=1) for i in range(10)]
    assert chosen[0] == "full" and chosen[-1] == "retrieval"
    # the batch the queue fills (32 of the 50 users) is 32 forecasts past the ceiling: down at once
    assert QualityLadder(LEVELS, costs, POLICY, max_batch=32).choose(50, 0.0, now=0.1) == "retrieval"
    # the head already waited past the target: a miss at every level, but retrieval drains the rest in time
    assert ladder.choose(50, 0.5, now=0.2) == "retrieval"
    # a queue no level but popularity drains within the ceiling (800 users: retrieval 0.19 s)
    assert ladder.choose(800, 0.5, now=0.3) == "popularity"
    pinned = QualityLadder(LEVELS, costs, POLICY, max_batch=32, pinned="reduced")
    assert pinned.choose(10_000, 10.0, now=0.0) == "reduced"
    assert QualityLadder(LEVELS, costs, None, max_batch=32).choose(10_000, 10.0, now=0.0) == "full"


# --- the levels through the engine ------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    data = generate(n_events=4_000, n_users=150, n_items=200, n_categories=5, seed=11)
    model = TwoStageRecommender(
        model_config("tiny"), TrainConfig(epochs=2, ranker_epochs=1, batch_size=32, seed=0)
    )
    split = build_split(data)
    model.fit(split, None, progress=False)
    model.use_ranker = True  # exercise every level whatever validation decided
    files, _ = model_files(model)
    return (
        ServingEngine(model_from_files(files, "cpu"), "1", device="cpu", reduced_candidates=20),
        split,
        model,
    )


def users_of(engine: ServingEngine, n: int) -> OnlineUsers:
    return engine.probe_users(n, seed=3)


def test_each_level_serves_what_it_names(engine):
    engine, _, _ = engine
    users = users_of(engine, 6)
    k = 10
    full = engine.recommend(users, k)
    assert engine.levels == LEVELS
    np.testing.assert_array_equal(engine.recommend(users, k, level="full").item_ids, full.item_ids)
    inference = engine.inference
    batch = engine.batch(users)
    window, lengths, dense = inference.tensors(batch)
    user = inference.user_vectors(window, lengths, dense)
    # reduced: the ranker's order over only the best reduced_candidates retrieved items
    retrieved, _ = inference.retrieve(user, batch, inference.reduced_candidates)
    reduced = engine.recommend(users, k, level="reduced")
    index = engine.item_index(reduced.item_ids)
    assert all(set(index[b]) <= set(retrieved[b]) for b in range(len(users)))
    expected, _ = inference.rank(user, window, lengths, dense, retrieved, k)
    np.testing.assert_array_equal(index, expected)
    # retrieval: the retrieval order itself
    top, _ = inference.retrieve(user, batch, k)
    np.testing.assert_array_equal(
        engine.item_index(engine.recommend(users, k, level="retrieval").item_ids), top
    )
    # popularity: the training popularity order, each user's seen items left out
    popular = engine.recommend(users, k, level="popularity")
    counts = np.asarray(engine.catalog.item_popularity)
    for b in range(len(users)):
        seen = set(users.seen[users.seen_offsets[b] : users.seen_offsets[b + 1]].tolist())
        order = [i for i in engine.item_ids[inference.popular_index - 1].tolist() if i not in seen][:k]
        assert popular.item_ids[b].tolist() == order
        assert not seen & set(popular.item_ids[b].tolist())
        got = counts[engine.item_index(popular.item_ids[b])]
        assert (np.diff(got) <= 0).all()


def test_a_model_without_its_ranker_has_the_short_ladder(engine):
    engine, _, _ = engine
    engine.use_ranker = False
    try:
        assert engine.levels == ("retrieval", "popularity")
        assert (
            engine.nearest_level("full") == "retrieval" and engine.nearest_level("popularity") == "popularity"
        )
        with pytest.raises(ValueError, match="level must be one of retrieval, popularity"):
            engine.inference.recommend(engine.batch(users_of(engine, 1)), 5, level="full")
    finally:
        engine.use_ranker = True


def test_offline_evaluation_ranks_each_level_through_the_serving_path(engine):
    """``TwoStageRecommender.rank(level=...)`` is the same inference call: popularity offline equals the
    popularity level, and full differs from retrieval only by the ranker."""
    _, split, model = engine
    users = np.arange(1, 21)
    end = split.train_len[users]
    for level in LEVELS:
        got = model.rank(split, level=level)(users, end, 10)
        assert got.shape == (20, 10) and (got > 0).all()
    pop = model.rank(split, level="popularity")(users, end, 10)
    order = model.inference().popular_index.tolist()
    for row, u, e in zip(pop, users, end):
        seen = set(split.sequences[u, :e].tolist())
        assert row.tolist() == [i for i in order if i not in seen][:10]
    full = model.rank(split, level="full")(users, end, 10)
    retrieval = model.rank(split, level="retrieval")(users, end, 10)
    assert not np.array_equal(full, retrieval)  # the ranker reorders (a trained one, on 20 users)
