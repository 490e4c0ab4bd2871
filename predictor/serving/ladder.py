"""The quality ladder's control law: at which level the next micro-batch is served, from queue and latency.

A replica that falls behind does less per request before its p99 breaks: each batch runs at a rung of
the model's ladder (``predictor.models.inference.LEVELS``: ranker over all candidates, over fewer,
retrieval order, popularity), chosen here with no Kubernetes call on the request path.

* :func:`next_level` is the decision, a pure function that tests and ``bench/sim.py`` drive directly.
  Its input is the latency the newest queued request would see at each level: the head of the queue's
  wait so far plus the time to drain the queue at that level (an upper bound on everyone's). A forecast
  past ``down_at × target`` is a *miss*; a p99 target allows 1 % of them, so the controller keeps a
  running miss rate over about ``memory`` users, each decision counted once per user of its batch.
  **Down fast**: at a miss while that rate is over ``allowance``, go straight to the best level
  forecast within the ceiling (the cheapest when none is); under overload every forecast misses and
  the rate passes 1 % within a handful of lone decisions, or (defaults) at the first missed batch of
  6 users or more.
  **Up slowly**: one level up at the end of a ``hold_s`` window in which at most ``allowance`` of the
  decisions' users forecast the better level above ``up_at × target`` (``up_at < down_at``: hysteresis); a
  window that fails starts the next one.
* :class:`LevelCosts` predicts a batch's seconds at each level, ``a + b × users``, calibrated by timing
  the engine at load and scaled by a running ratio of measured to predicted times (a slower node, a
  noisy neighbour).
* :class:`QualityLadder` holds one replica's state and is what the predictor calls.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LadderPolicy:
    target_s: float  # the replica's p99 target
    down_at: float = 0.9  # step down once a request is predicted past this share of the target
    up_at: float = 0.7  # step up once the better level's p99 prediction stays within this share ...
    hold_s: float = 5.0  # ... over a window this long
    allowance: float = 0.01  # the share of forecasts allowed past a ceiling (a p99 target, not a max)
    memory: int = 500  # decisions the running miss rate remembers (about)

    def __post_init__(self):
        if self.target_s <= 0:
            raise ValueError(f"the p99 target must be positive, got {self.target_s} s")
        if not 0 < self.up_at < self.down_at <= 1:
            raise ValueError(f"need 0 < up_at < down_at <= 1, got up_at={self.up_at}, down_at={self.down_at}")
        if self.hold_s < 0 or not 0 <= self.allowance < 1 or self.memory < 1:
            raise ValueError(
                f"need hold_s >= 0, 0 <= allowance < 1 and memory >= 1, got {self.hold_s}, "
                f"{self.allowance}, {self.memory}"
            )


@dataclass(frozen=True)
class LadderState:
    level: int = 0  # index into the ladder, 0 = best
    since: float = -math.inf  # start of the current hold window (the last level change)
    decisions: int = 0  # decisions in the window ...
    over: int = 0  # ... and how many predicted the better level above up_at × target
    miss_rate: float = 0.0  # running share of forecasts past down_at × target at the level served


def next_level(
    state: LadderState, predicted_s: Sequence[float], now: float, policy: LadderPolicy, users: int = 1
) -> LadderState:
    """The state after one decision. ``predicted_s[l]``: seconds the newest queued request would take if
    the queue were served at level ``l`` (best first, one entry per level of the ladder). ``users``: how
    many users the decision serves (the batch's): a p99 allows 1 % of *requests* past the ceiling, so a
    decision counts once per user, in the miss rate and in the hold window alike."""
    current = min(state.level, len(predicted_s) - 1)
    ceiling = policy.down_at * policy.target_s
    miss = predicted_s[current] > ceiling
    # ``users`` updates of the running mean with the same observation, in one step
    miss_rate = miss + (state.miss_rate - miss) * (1 - 1 / policy.memory) ** max(users, 1)
    if miss and miss_rate > policy.allowance:  # down fast: straight to the best level that fits
        fits = [lv for lv in range(current + 1, len(predicted_s)) if predicted_s[lv] <= ceiling]
        return LadderState(fits[0] if fits else len(predicted_s) - 1, now, miss_rate=miss_rate)
    if current == 0:
        return LadderState(0, state.since, miss_rate=miss_rate)
    decisions = state.decisions + max(users, 1)
    over = state.over + max(users, 1) * (predicted_s[current - 1] > policy.up_at * policy.target_s)
    if now - state.since < policy.hold_s:
        return LadderState(current, state.since, decisions, over, miss_rate)
    if over <= policy.allowance * decisions:
        return LadderState(
            current - 1, now, miss_rate=miss_rate
        )  # one level up; the next needs its own window
    return LadderState(current, now, miss_rate=miss_rate)  # not calm enough: a new window


@dataclass
class LevelCosts:
    """Seconds of one batch of B users at each level: ``speed × (fixed[l] + per_user[l] × B)``."""

    fixed: list[float]
    per_user: list[float]
    speed: float = 1.0  # measured / predicted, a running mean (1: as calibrated)
    smoothing: float = 0.1

    def batch_s(self, level: int, users: int) -> float:
        return self.speed * (self.fixed[level] + self.per_user[level] * users)

    def drain_s(self, level: int, users: int, max_batch: int) -> float:
        """Seconds to serve ``users`` queued users at ``level`` in batches of at most ``max_batch``."""
        full, rest = divmod(users, max_batch)
        return full * self.batch_s(level, max_batch) + (self.batch_s(level, rest) if rest else 0.0)

    def observe(self, level: int, users: int, seconds: float) -> None:
        predicted = self.fixed[level] + self.per_user[level] * users
        if predicted > 0 and seconds > 0:
            ratio = min(max(seconds / predicted, 0.25), 20.0)  # one outlier (a GC pause) moves it a little
            self.speed += self.smoothing * (ratio - self.speed)

    @classmethod
    def calibrate(
        cls, run: Callable[[int, int], float], levels: int, small: int = 1, large: int = 16
    ) -> LevelCosts:
        """``run(level, users)`` → seconds of one batch; each level timed at ``small`` and ``large``
        users, best of three, and fitted by the line through both."""
        fixed, per_user = [], []
        for level in range(levels):
            t_small = min(run(level, small) for _ in range(3))
            t_large = min(run(level, large) for _ in range(3))
            slope = max((t_large - t_small) / (large - small), 0.0)
            fixed.append(max(t_small - slope * small, 0.0))
            per_user.append(slope)
        return cls(fixed, per_user)


class QualityLadder:
    """One replica's ladder: ``choose`` before a batch, ``observe`` after it. Thread-safe (the event loop
    chooses, the model thread observes). ``pinned`` serves one level always (no control)."""

    def __init__(
        self,
        levels: Sequence[str],
        costs: LevelCosts,
        policy: LadderPolicy | None,
        max_batch: int,
        overhead_s: float = 0.0,
        pinned: str | None = None,
    ):
        self.levels, self.costs, self.policy, self.max_batch = tuple(levels), costs, policy, max_batch
        self.overhead_s = overhead_s  # latency outside the model queue (online read, parsing): a running mean
        self.pinned = None if pinned is None else self.levels.index(pinned)
        self.state = LadderState()
        self._lock = threading.Lock()

    def predicted(self, queued_users: int, head_wait_s: float) -> list[float]:
        return [
            self.overhead_s + head_wait_s + self.costs.drain_s(lv, queued_users, self.max_batch)
            for lv in range(len(self.levels))
        ]

    def choose(
        self, queued_users: int, head_wait_s: float, now: float, batch_users: int | None = None
    ) -> str:
        """The level of the batch about to start, with ``queued_users`` waiting (that batch included), its
        oldest request queued ``head_wait_s`` ago, and ``batch_users`` in it (default: as many as the queue
        fills, up to ``max_batch``)."""
        if self.pinned is not None:
            return self.levels[self.pinned]
        if self.policy is None:
            return self.levels[0]
        users = min(queued_users, self.max_batch) if batch_users is None else batch_users
        with self._lock:
            predicted = self.predicted(queued_users, head_wait_s)
            self.state = next_level(self.state, predicted, now, self.policy, users)
            return self.levels[self.state.level]

    def observe(self, level: str, users: int, seconds: float) -> None:
        with self._lock:
            self.costs.observe(self.levels.index(level), users, seconds)

    def observe_overhead(self, seconds: float, smoothing: float = 0.05) -> None:
        with self._lock:
            self.overhead_s += smoothing * (seconds - self.overhead_s)
