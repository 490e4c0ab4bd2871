"""Batch features against hand-computed values, and point-in-time correctness of snapshots."""

import numpy as np
import pandas as pd
import pytest

from predictor.data.schema import Interactions, validate_events, validate_items
from predictor.features.batch import compute_features, daily_snapshots
from tests.conftest import events_frame

T = pd.Timestamp("2026-03-10 12:00", tz="UTC")


@pytest.fixture
def tiny() -> Interactions:
    events, _ = validate_events(
        events_frame(
            [
                (1, 10, "2026-01-01 00:00", "view"),  # 68.5 days before T
                (1, 11, "2026-03-05 12:00", "purchase", 4.0),  # 5 days before T
                (1, 12, "2026-03-10 06:00", "click"),  # 6 hours before T
                (2, 10, "2026-03-10 11:00", "purchase", 2.0),  # 1 hour before T
                (1, 13, "2026-03-11 00:00", "purchase", 1.0),  # after T: must never count at T
            ]
        ),
        "tiny",
    )
    items = validate_items(
        pd.DataFrame({"item_id": [10, 11, 12, 13, 14], "categories": ["a", "b", "a|b", "c", ""]}), "items"
    )
    return Interactions(events, items)


def test_user_profile_by_hand(tiny):
    up = compute_features(tiny, [T]).user_profile.set_index("user_id")
    u1 = up.loc[1]
    assert (u1["events_1d"], u1["events_7d"], u1["events_30d"], u1["events_total"]) == (1, 2, 2, 3)
    assert u1["seconds_since_last_event"] == pytest.approx(6 * 3600)
    assert (u1["mean_rating"], u1["rating_count"]) == (4.0, 1)
    # weights: view 1 on a, purchase 5 on b, click 2 split over a and b → a=2, b=6 of 8
    np.testing.assert_allclose(u1["category_affinity"], [2 / 8, 6 / 8, 0.0], rtol=1e-6)
    u2 = up.loc[2]
    assert (u2["events_1d"], u2["events_total"], u2["mean_rating"]) == (1, 1, 2.0)
    assert u1["event_timestamp"] == T


def test_recent_items_newest_first_and_capped(tiny):
    recent = compute_features(tiny, [T], recent_n=2).user_recent_items.set_index("user_id")["recent_items"]
    assert recent.loc[1] == [12, 11]
    assert recent.loc[2] == [10]


def test_item_profile_by_hand(tiny):
    ip = compute_features(tiny, [T]).item_profile.set_index("item_id")
    assert ip.loc[10, "popularity_total"] == 2 and ip.loc[10, "popularity_1d"] == 1
    assert ip.loc[10, "mean_rating"] == 2.0 and ip.loc[10, "rating_count"] == 1
    assert ip.loc[10, "age_seconds"] == pytest.approx(
        (T - pd.Timestamp("2026-01-01", tz="UTC")).total_seconds()
    )
    assert ip.loc[12, "categories"] == [0, 1]
    # no events before T: still in the catalog, with zero counts
    assert ip.loc[13, "popularity_total"] == 0 and ip.loc[14, "categories"] == []


def test_snapshots_never_see_the_future(small_data):
    """Every feature value at snapshot t equals the value computed from the log cut at t."""
    snapshots = daily_snapshots(small_data, "7D")
    assert len(snapshots) > 3
    tables = compute_features(small_data, snapshots)
    for t in snapshots[1:-1:3]:
        cut = Interactions(small_data.events[small_data.events["timestamp"] <= t], small_data.items)
        alone = compute_features(cut, [t])
        got = tables.user_profile[tables.user_profile["event_timestamp"] == t].reset_index(drop=True)
        pd.testing.assert_frame_equal(got.drop(columns="created"), alone.user_profile.drop(columns="created"))
        seq = tables.user_recent_items[tables.user_recent_items["event_timestamp"] == t].reset_index(
            drop=True
        )
        pd.testing.assert_frame_equal(
            seq.drop(columns="created"), alone.user_recent_items.drop(columns="created")
        )
        # and the head of each sequence is the user's last event at or before t, not a later one
        last_at_t = cut.events.groupby("user_id")["item_id"].last()
        assert [s[0] for s in seq["recent_items"]] == last_at_t.loc[seq["user_id"]].tolist()
        assert tables.item_profile[tables.item_profile["event_timestamp"] == t][
            "popularity_total"
        ].sum() == len(cut.events)


def test_empty_log_is_an_error(tiny):
    empty = Interactions(tiny.events.iloc[:0], tiny.items)
    with pytest.raises(ValueError, match="cannot compute features from an empty event log"):
        compute_features(empty)


def test_one_table_asked_for_is_the_same_table_and_the_others_stay_empty(small_data):
    snapshots = daily_snapshots(small_data, "7D")
    full = compute_features(small_data, snapshots)
    only = compute_features(small_data, snapshots, tables=["user_profile"])
    pd.testing.assert_frame_equal(
        only.user_profile.drop(columns="created"), full.user_profile.drop(columns="created")
    )
    assert only.item_profile.empty and only.user_recent_items.empty
    with pytest.raises(ValueError, match="unknown feature table"):
        compute_features(small_data, tables=["user_profiles"])
