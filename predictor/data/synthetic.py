"""Seeded synthetic interaction generator — the demo's default data.

The structure is chosen so that models have something real to learn, and so that a test can know
the right answer:

* item popularity follows a power law (Zipf exponent ``popularity_exponent``) within each category;
* every item belongs to one primary category (and sometimes a second one);
* users belong to taste clusters; a cluster is a Dirichlet preference over categories;
* each user's events come in time-ordered sessions; a session sticks to one category drawn from the
  user's cluster, so the recent items predict the next ones;
* user activity is itself power-law distributed.

Everything is vectorised with NumPy: 10 M events take seconds, not minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from predictor.data.schema import DEFAULT_EVENT_WEIGHTS, Interactions

EVENT_TYPES = np.array(["view", "click", "purchase"])
EVENT_TYPE_PROBS = np.array([0.70, 0.22, 0.08])


@dataclass(frozen=True)
class SyntheticConfig:
    n_events: int = 100_000
    n_users: int | None = None  # default: n_events // 20
    n_items: int | None = None  # default: n_events // 50
    n_categories: int = 20
    n_clusters: int = 8
    popularity_exponent: float = 0.8
    session_length_mean: float = 6.0
    in_category_share: float = 0.85
    start: str = "2026-01-01"
    days: int = 90
    seed: int = 0

    def sizes(self) -> tuple[int, int]:
        if self.n_events < 1:
            raise ValueError(f"n_events must be >= 1, got {self.n_events}")
        n_users = self.n_users or max(10, self.n_events // 20)
        n_items = self.n_items or max(20, self.n_events // 50)
        return n_users, n_items


def generate(config: SyntheticConfig | None = None, **overrides) -> Interactions:
    """Generate events and item metadata. Same config and seed → identical output."""
    cfg = config or SyntheticConfig()
    if overrides:
        cfg = SyntheticConfig(**{**cfg.__dict__, **overrides})
    n_users, n_items = cfg.sizes()
    n_cat = min(cfg.n_categories, n_items)
    rng = np.random.default_rng(cfg.seed)

    # --- items: category, popularity inside the category --------------------------------------
    item_cat = rng.integers(0, n_cat, size=n_items)
    item_cat[:n_cat] = np.arange(n_cat)  # every category has at least one item
    pop = 1.0 / np.power(rng.permutation(n_items) + 1.0, cfg.popularity_exponent)
    order = np.lexsort((-pop, item_cat))  # items grouped by category, most popular first
    cat_start = np.searchsorted(item_cat[order], np.arange(n_cat))
    cat_end = np.append(cat_start[1:], n_items)
    # per-category cumulative popularity, laid out in `order`; normalised inside each category
    pop_sorted = pop[order]
    cum = np.cumsum(pop_sorted)
    before = np.where(cat_start > 0, cum[np.maximum(cat_start - 1, 0)], 0.0)
    totals = cum[cat_end - 1] - before
    global_cdf = np.cumsum(pop) / pop.sum()

    # --- users: cluster, activity ---------------------------------------------------------------
    cluster_pref = rng.dirichlet(np.full(n_cat, 0.3), size=cfg.n_clusters)
    cluster_cdf = np.cumsum(cluster_pref, axis=1)
    user_cluster = rng.integers(0, cfg.n_clusters, size=n_users)
    activity = 1.0 / np.power(rng.permutation(n_users) + 1.0, 0.8)
    user_of_event = np.sort(rng.choice(n_users, size=cfg.n_events, p=activity / activity.sum()))

    # --- sessions: a new session starts with probability 1/mean_length ---------------------------
    first_of_user = np.r_[True, user_of_event[1:] != user_of_event[:-1]]
    new_session = first_of_user | (rng.random(cfg.n_events) < 1.0 / cfg.session_length_mean)
    session_id = np.cumsum(new_session) - 1
    n_sessions = int(session_id[-1]) + 1
    session_user = user_of_event[new_session]
    u = rng.random(n_sessions)
    session_cat = (u[:, None] > cluster_cdf[user_cluster[session_user]]).sum(axis=1).clip(0, n_cat - 1)

    # --- items per event: the session's category, or anything popular ---------------------------
    event_cat = session_cat[session_id]
    r = rng.random(cfg.n_events)
    target = before[event_cat] + r * totals[event_cat]
    in_cat_pos = np.searchsorted(cum, target).clip(cat_start[event_cat], cat_end[event_cat] - 1)
    item_in_cat = order[in_cat_pos]
    item_global = np.searchsorted(global_cdf, rng.random(cfg.n_events)).clip(0, n_items - 1)
    item_of_event = np.where(rng.random(cfg.n_events) < cfg.in_category_share, item_in_cat, item_global)

    # --- time: users start at random points, short gaps inside sessions, long ones between -------
    gaps = np.where(
        new_session, rng.exponential(36 * 3600.0, cfg.n_events), rng.exponential(90.0, cfg.n_events)
    )
    gaps[first_of_user] = 0.0
    user_offset = np.cumsum(gaps)
    user_offset -= np.maximum.accumulate(np.where(first_of_user, user_offset, 0.0))
    # fit every user's history inside the span (compressing the longest), starting anywhere it fits
    span = cfg.days * 86400.0
    user_length = np.zeros(n_users)
    np.maximum.at(user_length, user_of_event, user_offset)
    scale = np.minimum(1.0, (span - 1.0) / np.maximum(user_length, 1.0))
    user_start = rng.random(n_users) * np.maximum(span - 1.0 - user_length * scale, 0.0)
    seconds = user_start[user_of_event] + user_offset * scale[user_of_event]
    start_ms = pd.Timestamp(cfg.start, tz="UTC").value // 1_000_000
    timestamp = pd.to_datetime(start_ms + (seconds * 1000).astype(np.int64), unit="ms", utc=True)

    event_type = EVENT_TYPES[np.searchsorted(np.cumsum(EVENT_TYPE_PROBS), rng.random(cfg.n_events))]
    weight = pd.Series(event_type).map(DEFAULT_EVENT_WEIGHTS).to_numpy(np.float32)
    # purchases carry a 1-5 rating, higher for items of the user's favourite category
    fav = cluster_pref[user_cluster[user_of_event], item_cat[item_of_event]]
    rating = np.clip(np.round(2.5 + 6.0 * fav + rng.normal(0, 0.8, cfg.n_events)), 1, 5).astype(np.float32)
    rating[event_type != "purchase"] = np.nan

    events = pd.DataFrame(
        {
            "user_id": user_of_event.astype(np.int64),
            "item_id": item_of_event.astype(np.int64),
            "timestamp": timestamp,
            "event_type": event_type,
            "weight": weight,
            "rating": rating,
        }
    )
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)

    cat_names = np.array([f"category_{c:02d}" for c in range(n_cat)])
    second = rng.integers(0, n_cat, size=n_items)
    has_second = (rng.random(n_items) < 0.3) & (second != item_cat)
    categories = [
        [cat_names[c]] + ([cat_names[s]] if h else []) for c, s, h in zip(item_cat, second, has_second)
    ]
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int64),
            "title": [f"Item {i} ({cat_names[c]})" for i, c in enumerate(item_cat)],
            "categories": categories,
        }
    )
    return Interactions(
        events=events,
        items=items,
        name=f"synthetic(n_events={cfg.n_events}, seed={cfg.seed})",
        meta={"user_cluster": user_cluster, "item_category": item_cat, "cluster_preference": cluster_pref},
    )
