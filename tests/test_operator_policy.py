"""The operator's policy core: unit and property tests (no Kubernetes)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.policy import (
    EjectionPolicy,
    ScalingPolicy,
    Stabilizer,
    desired_replicas,
    limit_step,
    merge,
    outliers,
    quantile,
    window_delta,
)

BOUNDS = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, math.inf]


def cumulative(values_s: list[float]) -> dict[float, float]:
    return {le: float(sum(v <= le for v in values_s)) for le in BOUNDS}


def test_quantile_interpolates_like_prometheus():
    # 100 observations: 90 in (0.002, 0.004], 10 in (0.008, 0.016]
    h = {0.001: 0, 0.002: 0, 0.004: 90, 0.008: 90, 0.016: 100, 0.032: 100, 0.064: 100, math.inf: 100}
    assert quantile(h, 0.5) == pytest.approx(0.002 + 0.002 * 50 / 90)
    assert quantile(h, 0.99) == pytest.approx(0.008 + 0.008 * 9 / 10)
    assert quantile({math.inf: 0}, 0.99) is None
    assert quantile({0.004: 0, math.inf: 5}, 0.99) == 0.004  # all beyond the last bound


def test_window_delta_and_counter_reset():
    before = cumulative([0.003] * 50)
    now = cumulative([0.003] * 50 + [0.010] * 20)
    delta = window_delta(now, before)
    assert delta[math.inf] == 20 and delta[0.004] == 0 and delta[0.016] == 20
    restarted = cumulative([0.020] * 5)  # fewer in total than before: the pod restarted
    assert window_delta(restarted, before) == restarted
    assert window_delta(now, None) == {}


@given(st.lists(st.lists(st.floats(0.0001, 0.1), min_size=1, max_size=60), min_size=1, max_size=5))
@settings(max_examples=60, deadline=None)
def test_merged_p99_is_the_pooled_p99_not_an_average(pods):
    """Merging bucket counts equals bucketing the pooled observations; the estimate lands in the bucket
    that holds the true pooled p99."""
    merged = merge([cumulative(p) for p in pods])
    pooled = [v for p in pods for v in p]
    assert merged == cumulative(pooled)
    estimate = quantile(merged, 0.99)
    true = float(np.quantile(pooled, 0.99, method="inverted_cdf"))
    upper = next(le for le in BOUNDS if true <= le)
    lower = max([0.0] + [le for le in BOUNDS if le < upper])
    assert lower <= estimate <= (upper if math.isfinite(upper) else lower)


POLICY = ScalingPolicy(
    target_p99_ms=10,
    min_replicas=2,
    max_replicas=20,
    tolerance=0.1,
    headroom=0.0,
    max_step_up=4,
    max_step_down=1,
)


def test_headroom_aims_below_the_target():
    policy = ScalingPolicy(target_p99_ms=10, min_replicas=1, max_replicas=50, headroom=0.2)
    assert desired_replicas(10, 10.0, 1000, policy) == 13  # at the target is 25 % over the 8 ms setpoint
    assert desired_replicas(10, 8.0, 1000, policy) == 10


def test_desired_replicas_hpa_rule_band_steps_and_clamps():
    assert desired_replicas(4, 20.0, 1000, POLICY) == 8  # ceil(4 × 2)
    assert desired_replicas(4, 10.5, 1000, POLICY) == 4  # inside the tolerance band
    assert desired_replicas(4, 100.0, 1000, POLICY) == 20  # raw: ceil(40), clamped to max
    assert limit_step(4, 20, POLICY) == 8  # at most +4 (or +100 %) per decision
    assert limit_step(10, 30, POLICY) == 20  # +100 % is more than +4 from 10 (HPA's default scale-up)
    assert limit_step(10, 30, ScalingPolicy(10, 2, 40, max_step_up=4, max_step_up_percent=0)) == 14
    assert desired_replicas(4, 1.0, 1000, POLICY) == 2  # raw: ceil(0.4) = 1, clamped to min
    assert limit_step(4, 2, POLICY) == 3  # at most -1 per decision
    assert desired_replicas(2, 1.0, 1000, POLICY) == 2  # never below min
    assert desired_replicas(19, 100.0, 1000, POLICY) == 20  # never above max


@given(current=st.integers(1, 30), p99=st.none() | st.floats(0.01, 1000), requests=st.integers(0, 5))
def test_missing_or_thin_metrics_never_scale_down(current, p99, requests):
    wanted = desired_replicas(current, p99, requests, POLICY)  # under min_requests: too little data
    assert wanted >= min(max(current, POLICY.min_replicas), POLICY.max_replicas)
    assert POLICY.min_replicas <= wanted <= POLICY.max_replicas


@given(current=st.integers(1, 40), p99=st.floats(0.01, 10_000))
def test_desired_replicas_always_within_bounds_and_direction(current, p99):
    wanted = desired_replicas(current, p99, 10_000, POLICY)
    assert POLICY.min_replicas <= wanted <= POLICY.max_replicas
    if POLICY.min_replicas <= current <= POLICY.max_replicas:
        if p99 > POLICY.target_p99_ms * (1 + POLICY.tolerance):
            assert wanted >= current
        if p99 < POLICY.target_p99_ms * (1 - POLICY.tolerance):
            assert wanted <= current


@given(st.lists(st.floats(1, 40), min_size=5, max_size=80))
@settings(max_examples=80, deadline=None)
def test_stabilizer_changes_direction_at_most_once_per_window(p99s):
    """Under any sequence of observations, between two scale-downs there is no scale-up-then-down inside
    one stabilisation window, i.e. no flapping."""
    policy = ScalingPolicy(target_p99_ms=10, min_replicas=1, max_replicas=20, scale_down_stabilization_s=60)
    stab, size, changes = Stabilizer(), 5, []
    for step, p99 in enumerate(p99s):
        now = step * 15.0
        new = limit_step(
            size, stab.recommend(now, size, desired_replicas(size, p99, 1000, policy), policy), policy
        )
        if new != size:
            changes.append((now, 1 if new > size else -1))
        size = new
    for (t1, d1), (t2, d2) in itertools.pairwise(changes):
        if d1 == 1 and d2 == -1:
            assert t2 - t1 >= policy.scale_down_stabilization_s - 1e-9


def test_stabilizer_scales_down_only_after_the_window():
    policy = ScalingPolicy(target_p99_ms=10, min_replicas=1, max_replicas=20, scale_down_stabilization_s=60)
    stab = Stabilizer()
    assert stab.recommend(0, 6, 6, policy) == 6
    assert stab.recommend(15, 6, 5, policy) == 6  # 6 still in the window
    assert stab.recommend(45, 6, 5, policy) == 6
    assert stab.recommend(61, 6, 5, policy) == 5  # the 6 from t=0 left the window
    assert Stabilizer.from_list(stab.to_list()).history == stab.history


EJECT = EjectionPolicy(ratio=2.0, readmit_ratio=1.3, cooloff_s=30, min_in_rotation=0.5, min_requests=10)


def test_slow_pod_is_ejected_and_readmitted_with_hysteresis():
    p99 = {"a": 5.0, "b": 5.5, "c": 6.0, "d": 18.0}
    req = dict.fromkeys(p99, 100)
    state = outliers(p99, req, {}, now=0, policy=EJECT)
    assert state == {"d": 0}
    # better but not good enough (8 > 1.3 × 5.5) and within cool-off: stays out
    assert outliers({**p99, "d": 8.0}, req, state, now=40, policy=EJECT) == {"d": 0}
    # back under the re-admission ratio but still cooling off: stays out
    assert outliers({**p99, "d": 6.0}, req, state, now=20, policy=EJECT) == {"d": 0}
    assert outliers({**p99, "d": 6.0}, req, state, now=40, policy=EJECT) == {}


def test_ejection_never_goes_below_minimum_share_and_ignores_thin_data():
    p99 = {"a": 5.0, "b": 50.0, "c": 60.0, "d": 70.0}
    state = outliers(p99, dict.fromkeys(p99, 100), {}, now=0, policy=EJECT)
    assert len(state) <= 2 and "a" not in state
    assert outliers({"a": 5.0, "b": 5.0, "c": 40.0}, {"a": 100, "b": 100, "c": 3}, {}, 0, EJECT) == {}
    assert (
        outliers({"a": 5.0, "b": 40.0}, {"a": 100, "b": 100}, {"gone": 0}, 0, EjectionPolicy(enabled=False))
        == {}
    )


@given(
    st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=3), st.floats(0.1, 1000), min_size=1, max_size=12
    )
)
def test_minimum_share_in_rotation_always_holds(p99):
    state = outliers(p99, dict.fromkeys(p99, 100), {}, now=0, policy=EJECT)
    assert len(p99) - len(state) >= math.ceil(EJECT.min_in_rotation * len(p99))


# --- the quality ladder ------------------------------------------------------------------------------------
def test_operator_levels_are_the_predictors():
    from operators.policy import LEVELS
    from predictor.models.inference import LEVELS as PREDICTOR_LEVELS

    assert LEVELS == PREDICTOR_LEVELS


def test_degraded_share_and_full_quality_demand():
    from operators.policy import best_level, degraded_share, full_quality_demand

    costs = {"full": 0.004, "reduced": 0.002, "retrieval": 0.001, "popularity": 0.0005}
    served = {"full": 60.0, "reduced": 20.0, "retrieval": 0.0, "popularity": 20.0}
    assert best_level(costs) == "full" and best_level({"retrieval": 1, "popularity": 1}) == "retrieval"
    assert degraded_share(served, "full") == pytest.approx(0.4)
    assert degraded_share({}, "full") is None and degraded_share(served, None) is None
    # at full: 100 × 4 ms; done: 60 × 4 + 20 × 2 + 20 × 0.5 = 290 ms
    assert full_quality_demand([(served, costs)]) == pytest.approx(400 / 290)
    # a model without a ranker: its best is retrieval, and full-quality work is retrieval work
    short = {"retrieval": 0.001, "popularity": 0.0005}
    assert full_quality_demand([({"retrieval": 10.0, "popularity": 10.0}, short)]) == pytest.approx(20 / 15)
    assert full_quality_demand([]) == 1.0


def test_degradation_scales_up_with_p99_on_target_and_blocks_scale_down():
    from operators.policy import desired_with_ladder

    policy = ScalingPolicy(
        target_p99_ms=50, min_replicas=2, max_replicas=30, max_degraded_share=0.05, headroom=0.2
    )
    # p99 well under the setpoint (would scale down) but 30 % degraded, twice the work at full quality
    assert desired_replicas(10, 10.0, 1000, policy) < 10
    assert desired_with_ladder(10, 10.0, 1000, 0.3, 2.0, policy) == 20
    # a little degradation, under the threshold: no scale-up, but no scale-down either
    assert desired_with_ladder(10, 10.0, 1000, 0.01, 1.01, policy) == 10
    # nothing degraded: the plain rule
    assert desired_with_ladder(10, 10.0, 1000, 0.0, 1.0, policy) == desired_replicas(10, 10.0, 1000, policy)
    # no ladder data: the plain rule; over the threshold with demand ~1 (p99 at the 40 ms setpoint): still
    # one more replica
    assert desired_with_ladder(10, 10.0, 1000, None, 1.0, policy) == desired_replicas(10, 10.0, 1000, policy)
    assert desired_with_ladder(10, 40.0, 1000, 0.5, 1.0, policy) == 11
    # clamped at max
    assert desired_with_ladder(20, 40.0, 1000, 0.9, 5.0, policy) == 30
    with pytest.raises(ValueError, match="maxDegradedShare"):
        ScalingPolicy(target_p99_ms=50, max_degraded_share=1.5)


@settings(max_examples=200, deadline=None)
@given(current=st.integers(1, 40), p99=st.floats(0.1, 500), share=st.floats(0, 1), demand=st.floats(1, 10))
def test_never_fewer_replicas_while_degraded(current, p99, share, demand):
    from operators.policy import desired_with_ladder

    policy = ScalingPolicy(target_p99_ms=50, min_replicas=1, max_replicas=40)
    wanted = desired_with_ladder(current, p99, 1000, share, demand, policy)
    if share > 0:
        assert wanted >= current
    if share > policy.max_degraded_share:
        assert wanted >= min(current + 1, policy.max_replicas)


def test_online_store_condition():
    from operators.policy import online_store_condition

    assert online_store_condition({})["status"] == "Unknown"
    assert online_store_condition({"a": None})["status"] == "Unknown"  # an old predictor without the gauge
    assert online_store_condition({"a": False, "b": None})["status"] == "True"
    lost = online_store_condition({"a": False, "b": True, "c": True})
    assert (lost["status"], lost["reason"]) == ("False", "Lost")
    assert "2 of 3 pods" in lost["message"] and "b, c" in lost["message"]
