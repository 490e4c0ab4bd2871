"""The synthetic generator: seeded, sized as asked, with the structure it promises."""

import numpy as np
import pandas as pd

from predictor.data.schema import validate_events
from predictor.data.synthetic import generate


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (
        generate(n_events=5_000, seed=1),
        generate(n_events=5_000, seed=1),
        generate(n_events=5_000, seed=2),
    )
    pd.testing.assert_frame_equal(a.events, b.events)
    assert not a.events["item_id"].equals(c.events["item_id"])


def test_sizes_and_schema():
    data = generate(n_events=1_000)
    assert len(data.events) == 1_000
    checked, dropped = validate_events(data.events, "synthetic")
    assert dropped == 0
    pd.testing.assert_frame_equal(checked, data.events)
    assert set(data.events["item_id"]) <= set(data.items["item_id"])
    assert all(len(c) >= 1 for c in data.items["categories"])


def test_power_law_popularity():
    data = generate(n_events=200_000, seed=3)
    counts = data.events["item_id"].value_counts().to_numpy()
    top_share = counts[: len(data.items) // 100].sum() / counts.sum()
    assert top_share > 0.05  # the top 1 % of items take far more than 1 % of events


def test_sessions_stick_to_a_category_and_taste_clusters_differ():
    data = generate(n_events=50_000, seed=4)
    ev = data.events.sort_values(["user_id", "timestamp"], kind="stable")
    cat = data.meta["item_category"][ev["item_id"].to_numpy()]
    same_user = ev["user_id"].to_numpy()[1:] == ev["user_id"].to_numpy()[:-1]
    gap = np.diff(ev["timestamp"].astype("int64").to_numpy()) / 1e9
    in_session = same_user & (gap < 600)
    same_cat = cat[1:] == cat[:-1]
    n_cat = len(data.category_vocabulary())
    # consecutive events in a session share a category far more often than chance (1 / n_cat)
    assert same_cat[in_session].mean() > 0.6 > 3 / n_cat
    # users in different taste clusters prefer different categories
    pref = data.meta["cluster_preference"]
    assert (pref.argmax(axis=1) != pref[0].argmax()).any()


def test_time_ordered_within_span():
    data = generate(n_events=20_000, days=30, seed=5)
    ts = data.events["timestamp"]
    assert ts.is_monotonic_increasing
    assert ts.min() >= pd.Timestamp("2026-01-01", tz="UTC")
    assert ts.max() < pd.Timestamp("2026-01-31", tz="UTC")
