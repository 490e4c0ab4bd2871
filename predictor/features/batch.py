"""Batch features computed from the interaction log, stamped with the time they are valid at.

Every feature row carries ``event_timestamp`` = the snapshot time ``t`` and is computed only from events
with ``timestamp <= t``; so a point-in-time join on ``event_timestamp`` never sees the future. Several
snapshot times give the history that training joins against; the default single snapshot at the last
event time is what the online store serves.

Tables: one per feature view of ``predictor.features.schema`` (its columns, kinds and descriptions), each
keyed by the view's INT64 entity id, plus ``event_timestamp`` and ``created``; ``compute_features`` checks
that what it computed has exactly those columns.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from predictor.data.schema import Interactions
from predictor.features.schema import ITEM_PROFILE, USER_PROFILE, USER_RECENT_ITEMS, VIEWS

WINDOWS: dict[str, pd.Timedelta] = {
    "1d": pd.Timedelta(days=1),
    "7d": pd.Timedelta(days=7),
    "30d": pd.Timedelta(days=30),
}

FEATURE_TABLES = (USER_PROFILE, USER_RECENT_ITEMS, ITEM_PROFILE)


@dataclass
class FeatureTables:
    user_profile: pd.DataFrame
    user_recent_items: pd.DataFrame
    item_profile: pd.DataFrame
    categories: list[str]

    def as_dict(self) -> dict[str, pd.DataFrame]:
        return {
            USER_PROFILE: self.user_profile,
            USER_RECENT_ITEMS: self.user_recent_items,
            ITEM_PROFILE: self.item_profile,
        }


def compute_features(
    data: Interactions,
    snapshots: Sequence[pd.Timestamp] | None = None,
    recent_n: int = 50,
    created: pd.Timestamp | None = None,
    progress: bool = False,
    tables: Collection[str] = (USER_PROFILE, USER_RECENT_ITEMS, ITEM_PROFILE),
) -> FeatureTables:
    """The feature ``tables`` (default: all three) for each snapshot time (default: one, at the last
    event); a table not asked for comes back empty."""
    unknown = set(tables) - {USER_PROFILE, USER_RECENT_ITEMS, ITEM_PROFILE}
    if unknown:
        raise ValueError(f"unknown feature table(s) {sorted(unknown)}")
    events = data.events
    if events.empty:
        raise ValueError("cannot compute features from an empty event log")
    if snapshots is None or len(snapshots) == 0:
        snapshots = [events["timestamp"].max()]
    snapshots = sorted(
        pd.Timestamp(s).tz_convert("UTC") if pd.Timestamp(s).tzinfo else pd.Timestamp(s, tz="UTC")
        for s in snapshots
    )
    created = created or pd.Timestamp.now(tz="UTC")

    vocabulary = data.category_vocabulary()
    item_cats = _item_category_ids(data.items, vocabulary)
    first_seen = _FirstSeen(events) if USER_RECENT_ITEMS in tables else None
    users, recents, items, computed = [], [], [], False
    for t in tqdm(
        snapshots, desc="feature snapshots", unit="snapshot", disable=not progress or len(snapshots) < 2
    ):
        upto = events.iloc[: events["timestamp"].searchsorted(t, side="right")]
        if upto.empty:
            continue
        if USER_PROFILE in tables:
            users.append(_user_profile(upto, t, item_cats, len(vocabulary)))
        if USER_RECENT_ITEMS in tables:
            recents.append(_recent_items(upto, t, recent_n, first_seen))
        if ITEM_PROFILE in tables:
            items.append(_item_profile(upto, t, data.items, item_cats))
        computed = True
    if not computed:
        raise ValueError(f"no events at or before the earliest snapshot {snapshots[0]}")

    def finish(frames: list[pd.DataFrame], view: str) -> pd.DataFrame:
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        out["created"] = created
        expected = [VIEWS[view].join_key, "event_timestamp", *VIEWS[view].column_names, "created"]
        if frames and list(out.columns) != expected:
            raise RuntimeError(f"{view}: computed columns {list(out.columns)}, the schema says {expected}")
        return out

    return FeatureTables(
        finish(users, USER_PROFILE),
        finish(recents, USER_RECENT_ITEMS),
        finish(items, ITEM_PROFILE),
        vocabulary,
    )


def daily_snapshots(data: Interactions, every: str = "1D") -> list[pd.Timestamp]:
    """Snapshot times at a fixed frequency across the log, ending with the last event."""
    first, last = data.events["timestamp"].min(), data.events["timestamp"].max()
    grid = pd.date_range(first.ceil(every), last, freq=every, tz="UTC")
    return [*grid[grid < last], last]


def _item_category_ids(items: pd.DataFrame, vocabulary: list[str]) -> pd.DataFrame:
    """Long table item_id, category_id, share (1 / number of categories of the item)."""
    index = {c: i for i, c in enumerate(vocabulary)}
    exploded = items[["item_id", "categories"]].explode("categories").dropna(subset=["categories"])
    exploded["category_id"] = exploded["categories"].map(index).astype("int64")
    exploded["share"] = 1.0 / exploded.groupby("item_id")["category_id"].transform("size")
    return exploded[["item_id", "category_id", "share"]].reset_index(drop=True)


def _window_counts(events: pd.DataFrame, key: str, t: pd.Timestamp, prefix: str) -> pd.DataFrame:
    out = events.groupby(key).size().rename(f"{prefix}_total").to_frame()
    for name, width in WINDOWS.items():
        recent = events[events["timestamp"] > t - width]
        out[f"{prefix}_{name}"] = recent.groupby(key).size()
    return out.fillna(0).astype("int64")


def _ratings(events: pd.DataFrame, key: str) -> pd.DataFrame:
    rated = events.dropna(subset=["rating"])
    grouped = rated.groupby(key)["rating"]
    return pd.DataFrame({"mean_rating": grouped.mean(), "rating_count": grouped.size()})


def _user_profile(
    events: pd.DataFrame, t: pd.Timestamp, item_cats: pd.DataFrame, n_categories: int
) -> pd.DataFrame:
    out = _window_counts(events, "user_id", t, "events")
    last = events.groupby("user_id")["timestamp"].max()
    out["seconds_since_last_event"] = ((t - last).dt.total_seconds()).astype("float32")
    out = out.join(_ratings(events, "user_id"))
    out["mean_rating"] = out["mean_rating"].fillna(0.0).astype("float32")
    out["rating_count"] = out["rating_count"].fillna(0).astype("int64")

    # category affinity: each event's weight spread over its item's categories, normalised per user
    affinity = np.zeros((len(out), n_categories), dtype=np.float32)
    if n_categories and not item_cats.empty:
        joined = events[["user_id", "item_id", "weight"]].merge(item_cats, on="item_id")
        sums = (joined["weight"] * joined["share"]).groupby([joined["user_id"], joined["category_id"]]).sum()
        rows = out.index.get_indexer(sums.index.get_level_values(0))
        affinity[rows, sums.index.get_level_values(1).to_numpy()] = sums.to_numpy()
        totals = affinity.sum(axis=1, keepdims=True)
        np.divide(affinity, totals, out=affinity, where=totals > 0)
    out["category_affinity"] = list(affinity)

    out = out.reset_index()
    out.insert(1, "event_timestamp", t)
    return out[[VIEWS[USER_PROFILE].join_key, "event_timestamp", *VIEWS[USER_PROFILE].column_names]]


def _recent_items(events: pd.DataFrame, t: pd.Timestamp, n: int, first_seen: _FirstSeen) -> pd.DataFrame:
    # newest first within each user; stable sorts keep the log order for equal timestamps
    ordered = events[["user_id", "item_id"]].iloc[::-1]
    ordered = ordered.sort_values("user_id", kind="stable")
    ordered = ordered[ordered.groupby("user_id").cumcount() < n]
    user_ids = ordered["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    sequences = np.split(ordered["item_id"].to_numpy(np.int64), starts[1:])
    seen_users, seen = first_seen.at(t)
    if not np.array_equal(seen_users, user_ids[starts]):  # both: every user with an event by t, ascending
        raise AssertionError("seen_items and recent_items disagree on the users at the snapshot")
    return pd.DataFrame(
        {
            "user_id": user_ids[starts],
            "event_timestamp": t,
            "recent_items": [s.tolist() for s in sequences],
            "seen_items": seen,
        }
    )


class _FirstSeen:
    """Every distinct (user, item) pair of the log with the time of its first event, sorted by user then
    item: one sort for all snapshots. The seen set at ``t`` is the pairs first seen at or before ``t``."""

    def __init__(self, events: pd.DataFrame):
        users = events["user_id"].to_numpy(np.int64)
        items = events["item_id"].to_numpy(np.int64)
        # nanoseconds since the epoch, UTC
        times = events["timestamp"].dt.tz_convert("UTC").astype("datetime64[ns, UTC]").array.asi8
        # stable, and the log is in time order (compute_features relies on it): a pair's first row is its
        # earliest
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        first = np.r_[True, (users[1:] != users[:-1]) | (items[1:] != items[:-1])]
        self.users, self.items, self.times = users[first], items[first], times[order][first]

    def at(self, t: pd.Timestamp) -> tuple[np.ndarray, list[list[int]]]:
        """Ascending user ids with a pair by ``t``, and per user the ascending distinct item ids."""
        mask = self.times <= t.value
        users, flat = self.users[mask], self.items[mask].tolist()
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]).tolist()
        return users[starts], [flat[a:b] for a, b in zip(starts, [*starts[1:], len(flat)])]


def _item_profile(
    events: pd.DataFrame, t: pd.Timestamp, items: pd.DataFrame, item_cats: pd.DataFrame
) -> pd.DataFrame:
    out = items[["item_id"]].set_index("item_id")
    out = out.join(_window_counts(events, "item_id", t, "popularity")).fillna(0)
    count_cols = ["popularity_1d", "popularity_7d", "popularity_30d", "popularity_total"]
    out[count_cols] = out[count_cols].astype("int64")
    out = out.join(_ratings(events, "item_id"))
    out["mean_rating"] = out["mean_rating"].fillna(0.0).astype("float32")
    out["rating_count"] = out["rating_count"].fillna(0).astype("int64")
    first = events.groupby("item_id")["timestamp"].min()
    out["age_seconds"] = (t - first).dt.total_seconds().reindex(out.index).fillna(0.0).astype("float32")
    cats = item_cats.groupby("item_id")["category_id"].agg(list)
    out["categories"] = [list(map(int, c)) if isinstance(c, list) else [] for c in cats.reindex(out.index)]
    out = out.reset_index()
    out.insert(1, "event_timestamp", t)
    return out[[VIEWS[ITEM_PROFILE].join_key, "event_timestamp", *VIEWS[ITEM_PROFILE].column_names]]
