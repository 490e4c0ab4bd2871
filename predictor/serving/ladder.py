"""The quality ladder's control law: at which level the next micro-batch is served, from queue and latency.

A replica that falls behind does less per request before its p99 breaks: each batch runs at a rung of
the model's ladder (``predictor.models.inference.LEVELS``: ranker over all candidates, over fewer,
retrieval order, popularity), chosen here with no Kubernetes call on the request path.

* :func:`next_level` is the decision, a pure function that tests and ``bench/sim.py`` drive directly.
  It reads two forecasts per level (:meth:`LevelCosts.forecasts`). *Now*: the latency of the worst-off
  queued request if the queue were served at that level (the head's wait so far plus its batch, or the
  drain of the whole queue for the newest, whichever is longer). *Ahead*: the latency of requests
  still to come (the queue's drain, or the latency the replica settles at for the recent arrival
  rate, :class:`Arrivals`, whichever is longer). A *now* forecast past ``down_at × target`` is a
  *miss*; a p99 target allows 1 % of them, so the controller keeps a running miss rate over about
  ``memory`` users, each decision counted once per user of its batch.
  **Down fast**: at a miss while that rate is over ``allowance``, go straight to the best level, the
  current one included, whose *ahead* forecast is within the ceiling (the cheapest when none is). The
  head's wait is spent whatever this batch does; what the level decides is whether the queue comes
  back, so a level that keeps up with the arrivals is kept rather than dropped for a cheaper one
  (which would then serve a whole hold window at a needless price). Under overload every forecast
  misses and the rate passes 1 % within a handful of lone decisions, or (defaults) at the first
  missed batch of 6 users or more.
  **Up slowly**: one level up at the end of a ``hold_s`` window in which at most ``allowance`` of the
  decisions' users forecast the better level (*now*) above ``up_at × target`` (``up_at < down_at``:
  hysteresis); a window that fails starts the next one.
* :class:`LevelCosts` predicts a batch's seconds at each level, ``a + b × users``, calibrated by timing
  the engine at load and scaled by a running ratio of measured to predicted times (a slower node, a
  noisy neighbour).
* :class:`QualityLadder` holds one replica's state and is what the predictor calls.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LadderPolicy:
    target_s: float  # the replica's p99 target
    down_at: float = 0.9  # step down once a request is predicted past this share of the target
    up_at: float = 0.7  # step up once the better level's p99 prediction stays within this share ...
    hold_s: float = 5.0  # ... over a window this long
    allowance: float = 0.01  # the share of forecasts allowed past a ceiling (a p99 target, not a max)
    memory: int = 500  # decisions the running miss rate remembers (about)
    # the arrival rate's averaging time, as a share of the target: a burst shows within one target's time,
    # while a lone batch's arrivals do not set the rate alone
    rate_tau: float = 0.7

    def __post_init__(self):
        if self.target_s <= 0:
            raise ValueError(f"the p99 target must be positive, got {self.target_s} s")
        if not 0 < self.up_at < self.down_at <= 1:
            raise ValueError(f"need 0 < up_at < down_at <= 1, got up_at={self.up_at}, down_at={self.down_at}")
        if self.hold_s < 0 or not 0 <= self.allowance < 1 or self.memory < 1 or self.rate_tau <= 0:
            raise ValueError(
                f"need hold_s >= 0, 0 <= allowance < 1, memory >= 1 and rate_tau > 0, got {self.hold_s}, "
                f"{self.allowance}, {self.memory}, {self.rate_tau}"
            )

    @property
    def rate_tau_s(self) -> float:
        """The arrival rate's averaging time in seconds (:meth:`Arrivals.after`'s ``tau_s``)."""
        return self.rate_tau * self.target_s


@dataclass(frozen=True)
class LadderState:
    level: int = 0  # index into the ladder, 0 = best
    since: float = -math.inf  # start of the current hold window (the last level change)
    decisions: int = 0  # decisions in the window ...
    over: int = 0  # ... and how many predicted the better level above up_at × target
    miss_rate: float = 0.0  # running share of forecasts past down_at × target at the level served


def next_level(
    state: LadderState,
    predicted_s: Sequence[float],
    now: float,
    policy: LadderPolicy,
    users: int = 1,
    ahead_s: Sequence[float] | None = None,
) -> LadderState:
    """The state after one decision. ``predicted_s[l]``: seconds the worst-off queued request would take
    if the queue were served at level ``l`` (best first, one entry per level of the ladder); ``ahead_s[l]``
    (default ``predicted_s``): seconds of the requests still to come at that level, which pick the level
    a miss steps down to. ``users``: how many users the decision serves (the batch's): a p99 allows 1 %
    of *requests* past the ceiling, so a decision counts once per user, in the miss rate and in the hold
    window alike."""
    current = min(state.level, len(predicted_s) - 1)
    ceiling = policy.down_at * policy.target_s
    miss = predicted_s[current] > ceiling
    # ``users`` updates of the running mean with the same observation, in one step
    miss_rate = miss + (state.miss_rate - miss) * (1 - 1 / policy.memory) ** max(users, 1)
    if miss and miss_rate > policy.allowance:  # down fast: straight to the best level that keeps up
        ahead_s = predicted_s if ahead_s is None else ahead_s
        fits = [lv for lv in range(current, len(predicted_s)) if ahead_s[lv] <= ceiling]
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


@dataclass(frozen=True)
class Arrivals:
    """A running estimate of users arriving per second, from the queue at each decision: what arrived
    since the last decision is the queue now less what that decision left queued. An exponential mean
    over irregular gaps (weight ``1 − exp(−gap / tau_s)``), so decisions close together move it no more
    than one decision after the same gap."""

    rate: float = 0.0
    left: int = 0  # users the last decision left queued, less arrivals not yet counted
    at: float = -math.inf  # when it was made

    def after(self, queued_users: int, batch_users: int, now: float, tau_s: float) -> Arrivals:
        left = max(queued_users - batch_users, 0)
        gap = now - self.at
        if not math.isfinite(gap):  # the first decision: nothing to measure a rate over
            return replace(self, left=left, at=now)
        arrived = max(queued_users - self.left, 0)
        if gap <= 0:  # two decisions at one instant: these arrivals count with the next gap
            return replace(self, left=left - arrived)
        weight = 1.0 - math.exp(-gap / tau_s)
        return replace(self, rate=self.rate + weight * (arrived / gap - self.rate), left=left, at=now)


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

    def forecast_s(self, level: int, queued_users: int, head_wait_s: float, max_batch: int) -> float:
        """Seconds the worst-off of ``queued_users`` would see if the queue were served at ``level``: the
        head of the queue, ``head_wait_s`` in, leaves with the first batch; the newest, just in, leaves
        once the whole queue is drained. With arrivals spread evenly over the head's wait, the requests in
        between see no more than the longer of the two, which is the forecast (their sum would count the
        queue's wait twice)."""
        head = head_wait_s + self.batch_s(level, min(queued_users, max_batch))
        return max(head, self.drain_s(level, queued_users, max_batch))

    def forecasts(
        self, queued_users: int, head_wait_s: float, rate: float, max_batch: int
    ) -> tuple[list[float], list[float]]:
        """Two forecasts per level, what :func:`next_level` decides on: the worst-off queued request's
        seconds (:meth:`forecast_s`), and the seconds of a request arriving from now on: the queue's
        drain, or the latency the replica settles at for ``rate`` users a second, whichever is longer."""
        levels = range(len(self.fixed))
        now = [self.forecast_s(lv, queued_users, head_wait_s, max_batch) for lv in levels]
        ahead = [
            max(self.drain_s(lv, queued_users, max_batch), self.settled_s(lv, rate, max_batch))
            for lv in levels
        ]
        return now, ahead

    def settled_s(self, level: int, rate: float, max_batch: int) -> float:
        """Seconds the worst-off request sees once ``rate`` users a second are served at ``level``: each
        batch takes the users that arrived during the last, so a busy batcher's cycle ``T`` solves
        ``T = fixed + per_user × rate × T``, and a request arriving as a batch starts waits one cycle and
        is served in the next (``2 T``); at a rate below one user a cycle, ``T (1 + rate × T)``.
        Infinite where the level cannot keep up (no fixed point, or batches past ``max_batch``)."""
        fixed, per_user = self.speed * self.fixed[level], self.speed * self.per_user[level]
        lone = fixed + per_user
        if rate * lone <= 1.0:
            return lone * (1.0 + rate * lone)
        if per_user * rate >= 1.0 or rate * fixed / (1.0 - per_user * rate) > max_batch:
            return math.inf
        return 2.0 * fixed / (1.0 - per_user * rate)

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
        self.arrivals = Arrivals()
        self._lock = threading.Lock()

    def forecasts(self, queued_users: int, head_wait_s: float) -> tuple[list[float], list[float]]:
        """:meth:`LevelCosts.forecasts` at this replica's arrival rate, plus the latency outside the queue."""
        now, ahead = self.costs.forecasts(queued_users, head_wait_s, self.arrivals.rate, self.max_batch)
        return [self.overhead_s + s for s in now], [self.overhead_s + s for s in ahead]

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
            self.arrivals = self.arrivals.after(queued_users, users, now, self.policy.rate_tau_s)
            predicted, ahead = self.forecasts(queued_users, head_wait_s)
            self.state = next_level(self.state, predicted, now, self.policy, users, ahead)
            return self.levels[self.state.level]

    def observe(self, level: str, users: int, seconds: float) -> None:
        with self._lock:
            self.costs.observe(self.levels.index(level), users, seconds)

    def observe_overhead(self, seconds: float, smoothing: float = 0.05) -> None:
        with self._lock:
            self.overhead_s += smoothing * (seconds - self.overhead_s)
