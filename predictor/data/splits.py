"""Benchmark splits as public leaderboards publish them: a seeded random per-user train/test split, the
one-line-per-user file format (``user item item ...``, LightGCN's ``train.txt`` / ``test.txt``), and how a
given split's test was drawn (temporal or random), which decides how models validate on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from predictor.data.schema import Interactions

LINE_ORDER = "line order"  # Interactions.meta["timestamps"] of files without time: they only encode order


def random_user_split(
    data: Interactions, test_share: float = 0.2, seed: int = 0
) -> tuple[Interactions, Interactions]:
    """(train, test): each user's distinct items split at random, ``test_share`` of them (rounded, at least
    one for users with two or more items, never all) to test, as in the NGCF / LightGCN splits."""
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    events = data.events.drop_duplicates(["user_id", "item_id"], keep="last").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(events)), events["user_id"].to_numpy()))
    users = events["user_id"].to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    n_test = np.where(counts >= 2, np.clip(np.round(test_share * counts), 1, counts - 1), 0).astype(np.int64)
    rank = np.arange(len(users)) - np.repeat(starts, counts)
    is_test = rank < np.repeat(n_test, counts)
    test_rows, train_rows = order[is_test], order[~is_test]
    return (
        Interactions(
            events.iloc[np.sort(train_rows)].reset_index(drop=True), data.items, f"{data.name} train"
        ),
        Interactions(events.iloc[np.sort(test_rows)].reset_index(drop=True), data.items, f"{data.name} test"),
    )


def write_user_lines(data: Interactions, path: str | Path) -> Path:
    """One line per user, ``user_id item_id ...``, users and each user's items in ascending id order
    (the order of the public files: it says nothing about time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    events = data.events.sort_values(["user_id", "item_id"], kind="stable")
    lines = [
        f"{user} " + " ".join(map(str, group.to_numpy()))
        for user, group in events.groupby("user_id")["item_id"]
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def split_protocol(train: Interactions, test: Interactions, share: float = 0.95) -> str:
    """ "temporal" when the test events of at least ``share`` of the users who have both come at or after
    their last train event (by real timestamps); otherwise "random" (test items are a sample of the user's
    items, as in one-line-per-user files, whose timestamps only encode line order)."""
    if LINE_ORDER in (train.meta.get("timestamps"), test.meta.get("timestamps")):
        return "random"
    last_train = train.events.groupby("user_id")["timestamp"].max()
    first_test = test.events.groupby("user_id")["timestamp"].min()
    both = first_test.index.intersection(last_train.index)
    if not len(both):
        return "random"
    after = (first_test.loc[both] >= last_train.loc[both]).mean()
    return "temporal" if after >= share else "random"
