"""From interactions to model inputs: id indexes, per-user sequences, the temporal split, feature tensors.

Shapes and dtypes used throughout ``predictor.models``:

* item and user *indexes* are int64, ``0`` is padding / unknown, real ones start at 1;
* a *history* (window) is ``[B, L]`` int64 of item indexes, oldest first and left-aligned: a user's items
  fill positions ``0 .. length - 1`` in the order they were read and 0 pads the rest (the online
  ``recent_items`` feature stores the list most recent first; the serving path reverses it);
* ``user_dense`` is ``[B, F_u]`` float32, ``item_dense`` is ``[n_items + 1, F_i]`` float32, and
  ``item_categories`` is ``[n_items + 1, C]`` float32 multi-hot.

The default split is temporal leave-last-out per user: the last event is the test target, the one before
it the validation target, the rest is training data; users with fewer than 3 events only train. A
*random* split (``protocol="random"``, for published splits whose test items are a random sample of each
user's items) orders each user's events at random and holds out a random share of them for validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from predictor.data.schema import Interactions
from predictor.features.batch import compute_features, daily_snapshots
from predictor.features.schema import ITEM_DENSE_COLUMNS, ITEM_PROFILE, USER_DENSE_COLUMNS, USER_PROFILE


def user_dense_matrix(frame: pd.DataFrame, n_categories: int) -> np.ndarray:
    """``[N, 7 + C]`` float32 from user_profile rows (offline or online): log-scaled counts, affinity."""
    x = np.zeros((len(frame), len(USER_DENSE_COLUMNS) + n_categories), dtype=np.float32)
    if len(frame) == 0:
        return x
    x[:, : len(USER_DENSE_COLUMNS)] = _scale_user_columns(
        frame[USER_DENSE_COLUMNS].fillna(0).to_numpy(np.float64)
    )
    if n_categories:
        _fill_affinity(x, frame["category_affinity"].to_numpy(), n_categories)
    return x


def user_dense_rows(rows: list[dict], n_categories: int) -> np.ndarray:
    """:func:`user_dense_matrix` for online feature dicts (``{feature: value or None}``), without pandas:
    the predictor's per-request path."""
    x = np.zeros((len(rows), len(USER_DENSE_COLUMNS) + n_categories), dtype=np.float32)
    if not rows:
        return x
    cols = np.array([[row.get(c) or 0 for c in USER_DENSE_COLUMNS] for row in rows], dtype=np.float64)
    x[:, : len(USER_DENSE_COLUMNS)] = _scale_user_columns(cols)
    if n_categories:
        _fill_affinity(x, [row.get("category_affinity") for row in rows], n_categories)
    return x


def _scale_user_columns(cols: np.ndarray) -> np.ndarray:
    cols = cols.copy()
    cols[:, 4] = cols[:, 4] / 3600.0  # recency in hours
    cols[:, 5] = cols[:, 5] / 5.0  # ratings are on a 0-5 scale
    scaled = np.log1p(np.clip(cols, 0, None))
    scaled[:, 5] = cols[:, 5]
    return scaled


def _fill_affinity(x: np.ndarray, affinity, n_categories: int) -> None:
    """Category affinity into the last ``n_categories`` columns, where a row has a vector of that width."""
    filled = [
        row for row, a in enumerate(affinity) if isinstance(a, (list, np.ndarray)) and len(a) == n_categories
    ]
    if filled:  # one assignment for all rows: this runs over every training label's features
        x[filled, len(USER_DENSE_COLUMNS) :] = np.stack(
            [np.asarray(affinity[row], np.float32) for row in filled]
        )


def item_dense_matrix(frame: pd.DataFrame) -> np.ndarray:
    """``[N, 7]`` float32 from item_profile rows."""
    cols = frame[ITEM_DENSE_COLUMNS].fillna(0).to_numpy(np.float64)
    cols[:, 6] = cols[:, 6] / 86400.0  # age in days
    cols[:, 4] = cols[:, 4] / 5.0
    scaled = np.log1p(np.clip(cols, 0, None))
    scaled[:, 4] = cols[:, 4]
    return scaled.astype(np.float32)


@dataclass
class IdIndex:
    """Raw ids ↔ contiguous indexes (1-based; 0 is padding and unknown)."""

    ids: np.ndarray  # int64 [n], sorted; ids[k] has index k + 1

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, raw: np.ndarray | list[int]) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64)
        pos = np.searchsorted(self.ids, raw).clip(0, max(len(self.ids) - 1, 0))
        found = (len(self.ids) > 0) & (self.ids[pos] == raw) if len(self.ids) else np.zeros(raw.shape, bool)
        return np.where(found, pos + 1, 0).astype(np.int64)

    def raw(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        return np.where(index > 0, self.ids[np.clip(index - 1, 0, None)], -1)

    def extended(self, raw: np.ndarray) -> IdIndex:
        """A new index that keeps every existing index and appends unseen ids at the end.

        Warm-started models keep their embedding rows: ids are not re-sorted, new ones go last.
        """
        new = np.setdiff1d(np.asarray(raw, np.int64), self.ids)
        return _AppendOnlyIndex(np.concatenate([self.ids, np.sort(new)]))


class _AppendOnlyIndex(IdIndex):
    """An index whose ids are not sorted (after extension); lookups go through a sorter."""

    def __post_init__(self):
        super().__post_init__()
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]

    def index(self, raw):
        raw = np.asarray(raw, dtype=np.int64)
        if not len(self.ids):
            return np.zeros(raw.shape, np.int64)
        pos = np.searchsorted(self._sorted, raw).clip(0, len(self.ids) - 1)
        found = self._sorted[pos] == raw
        return np.where(found, self._order[pos] + 1, 0).astype(np.int64)


def make_index(ids) -> IdIndex:
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and np.all(ids[1:] > ids[:-1]):
        return IdIndex(ids)
    return _AppendOnlyIndex(ids)


@dataclass
class SplitData:
    """Everything training and evaluation need, as arrays.

    ``sequences``: per user index (row), all of the user's item indexes in time order (in a seeded random
    order when ``protocol`` is "random"), padded. ``train_len[u]``: how many of them are training events.
    The ``validation_len[u]`` validation targets follow them, and the test target (when ``has_holdout``
    and the split holds one) follows those, at ``train_len + validation_len``.
    """

    users: IdIndex
    items: IdIndex
    sequences: np.ndarray  # int64 [n_users + 1, max_len], oldest first, 0-padded
    timestamps: np.ndarray  # int64 ns [n_users + 1, max_len]
    lengths: np.ndarray  # int64 [n_users + 1]
    train_len: np.ndarray  # int64 [n_users + 1]
    has_holdout: np.ndarray  # bool [n_users + 1]
    item_dense: np.ndarray  # float32 [n_items + 1, F_i]
    item_categories: np.ndarray  # float32 [n_items + 1, C]
    item_popularity: np.ndarray  # float64 [n_items + 1], training-event counts
    n_categories: int
    validation_len: np.ndarray  # int64 [n_users + 1], validation targets per user
    protocol: str  # how validation targets were drawn: "temporal" (the next) or "random"

    @property
    def validates(self) -> bool:
        """Whether anything is held out for validation (not: a final fit on every event)."""
        return bool(self.validation_len.any())

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def window(self, user_idx: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``max_len`` items before position ``end``: ``[B, max_len]`` oldest first, left-aligned,
        0-padded after the last item, and the lengths ``[B]``."""
        lengths = np.minimum(end, max_len)
        start = end - lengths
        offsets = start[:, None] + np.arange(max_len)[None, :]
        valid = np.arange(max_len)[None, :] < lengths[:, None]
        items = self.sequences[user_idx[:, None], np.clip(offsets, 0, self.sequences.shape[1] - 1)]
        return np.where(valid, items, 0), lengths


def build_split(
    data: Interactions,
    users: IdIndex | None = None,
    items: IdIndex | None = None,
    holdout: int = 2,
    protocol: str = "temporal",
    validation_share: float = 0.2,
    seed: int = 0,
) -> SplitData:
    """Index the log, order each user's events in time, mark the leave-last-out targets.

    Item features come from a snapshot over *training* events only, so no held-out event leaks into them.
    Pass ``users``/``items`` to keep an existing model's indexes (they are extended with unseen ids).
    ``holdout=1`` keeps only the validation event out of training (the test targets then come from
    elsewhere, e.g. a published split's test file); ``holdout=0`` holds nothing out (a final fit).

    ``protocol="random"`` (with ``holdout`` 0 or 1; the test targets come from elsewhere): each user's
    events in an order drawn with ``seed``, and the last ``validation_share`` of them (at least one, for
    users with two or more events; ``holdout=0``: none) are the validation targets.
    """
    if holdout not in (0, 1, 2):
        raise ValueError(f"holdout must be 0, 1 or 2, got {holdout}")
    if protocol not in ("temporal", "random"):
        raise ValueError(f"protocol must be 'temporal' or 'random', got {protocol!r}")
    if protocol == "random" and holdout == 2:
        raise ValueError(
            "a random split holds out validation targets only (holdout 0 or 1): the test comes from elsewhere"
        )
    if not 0 < validation_share < 1:
        raise ValueError(f"validation_share must be in (0, 1), got {validation_share}")
    ev = data.events
    users = (
        users.extended(ev["user_id"].unique())
        if users is not None
        else make_index(np.sort(ev["user_id"].unique()))
    )
    all_items = data.items["item_id"].to_numpy()
    items = items.extended(all_items) if items is not None else make_index(np.sort(all_items))
    u = users.index(ev["user_id"].to_numpy())
    i = items.index(ev["item_id"].to_numpy())
    ts = ev["timestamp"].astype("int64").to_numpy()

    # by user, then time (random: a seeded draw), then log order
    within = ts if protocol == "temporal" else np.random.default_rng(seed).permutation(len(ev))
    order = np.lexsort((np.arange(len(ev)), within, u))
    u, i, ts = u[order], i[order], ts[order]
    n_rows = len(users) + 1
    lengths = np.bincount(u, minlength=n_rows).astype(np.int64)
    max_len = int(lengths.max()) if len(lengths) else 0
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(u)) - starts[u]
    sequences = np.zeros((n_rows, max_len), dtype=np.int64)
    timestamps = np.zeros((n_rows, max_len), dtype=np.int64)
    sequences[u, pos] = i
    timestamps[u, pos] = ts
    if protocol == "random":
        validation_len = np.where(lengths >= 2, np.maximum(1, np.round(validation_share * lengths)), 0)
        validation_len = np.minimum(validation_len, lengths - 1).clip(min=0).astype(np.int64) * holdout
        has_holdout = validation_len > 0
        train_len = lengths - validation_len
    else:
        has_holdout = lengths >= holdout + 1 if holdout else np.zeros(len(lengths), bool)
        validation_len = has_holdout.astype(np.int64)
        train_len = lengths - holdout * has_holdout

    train_mask = pos < train_len[u]
    popularity = np.bincount(i[train_mask], minlength=len(items) + 1).astype(np.float64)

    # item features from training events only
    train_events = ev.iloc[order[train_mask]].sort_values("timestamp", kind="stable")
    vocabulary = data.category_vocabulary()
    snapshot = (
        compute_features(Interactions(train_events, data.items), tables=[ITEM_PROFILE]).item_profile
        if len(train_events)
        else None
    )
    item_dense = np.zeros((len(items) + 1, len(ITEM_DENSE_COLUMNS)), dtype=np.float32)
    item_cats = np.zeros((len(items) + 1, len(vocabulary)), dtype=np.float32)
    if snapshot is not None:
        rows = items.index(snapshot["item_id"].to_numpy())
        item_dense[rows] = item_dense_matrix(snapshot)
        for r, cats in zip(rows, snapshot["categories"]):
            item_cats[r, cats] = 1.0
    item_dense[0] = 0
    item_cats[0] = 0
    return SplitData(
        users,
        items,
        sequences,
        timestamps,
        lengths,
        train_len,
        has_holdout,
        item_dense,
        item_cats,
        popularity,
        len(vocabulary),
        validation_len,
        protocol,
    )


def user_feature_snapshots(
    data: Interactions, every: str | None = None, max_snapshots: int = 200
) -> pd.DataFrame:
    """user_profile rows at regular snapshots: the history the point-in-time join reads.

    ``every`` defaults to daily, coarsened so that there are at most ``max_snapshots`` (a log spanning
    22 years, like MovieLens latest, gets one snapshot every 41 days).
    """
    if every is None:
        span = data.events["timestamp"].max() - data.events["timestamp"].min()
        days = max(1, int(np.ceil(span / pd.Timedelta(days=1) / max_snapshots)))
        every = f"{days}D"
    return compute_features(data, daily_snapshots(data, every), tables=[USER_PROFILE]).user_profile


class UserFeatureIndex:
    """The point-in-time join over user_profile rows, prepared once: every row's feature vector computed
    and the rows ordered by (user, snapshot time), so that a join of B labels is two ``searchsorted``.

    Same rule as Feast's ``get_historical_features`` except that a row stamped exactly at the label
    time is not used (its snapshot may already contain the label event). Users with no earlier row get
    zeros.
    """

    def __init__(self, user_profile: pd.DataFrame, n_categories: int):
        self.width = len(USER_DENSE_COLUMNS) + n_categories
        times = (
            pd.to_datetime(user_profile["event_timestamp"], utc=True)
            .to_numpy("datetime64[ns]")
            .astype(np.int64)
        )
        users = user_profile["user_id"].to_numpy(np.int64)
        order = np.lexsort((times, users))
        self.users = users[order]  # int64 [R], sorted
        self.dense = user_dense_matrix(user_profile.iloc[order], n_categories)  # float32 [R, F_u]
        # one key that orders rows by user, then time: user rank × (T + 1) + the time's rank among the
        # T distinct snapshot times, so that all users' blocks are searched together
        self._distinct_users = np.unique(self.users)
        self._distinct_times = np.unique(times)
        self._key = np.searchsorted(self._distinct_users, self.users) * (
            len(self._distinct_times) + 1
        ) + np.searchsorted(self._distinct_times, times[order])

    def at(self, user_ids: np.ndarray, label_times: np.ndarray) -> np.ndarray:
        """``[N, F_u]`` float32: for each (user, label time in ns) the newest row strictly before it."""
        user_ids, label_times = np.asarray(user_ids, np.int64), np.asarray(label_times, np.int64)
        out = np.zeros((len(user_ids), self.width), np.float32)
        if not len(self.users) or not len(user_ids):
            return out
        # the last row before the (user, label time) key; it is the user's own row or none is
        query = np.searchsorted(self._distinct_users, user_ids) * (
            len(self._distinct_times) + 1
        ) + np.searchsorted(self._distinct_times, label_times, side="left")
        row = np.searchsorted(self._key, query, side="left") - 1
        found = (row >= 0) & (self.users[row.clip(min=0)] == user_ids)
        out[found] = self.dense[row[found]]
        return out


def to_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)
