"""The online ``seen_items`` feature: every distinct item of a user, not only the last ``recent_items``.

Offline evaluation excludes a user's whole history; serving reads ``user_recent_items:seen_items`` (same
view, so the same Redis hash and HMGET as the other user features) to exclude the same set.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import redis

from predictor.config import Settings
from predictor.data.eventlog import EventLog
from predictor.data.schema import Interactions, items_from_events, validate_events
from predictor.features.batch import compute_features, daily_snapshots
from predictor.features.offline import read_offline
from predictor.features.pipeline import build_features
from predictor.features.realtime import push_events
from predictor.features.schema import USER_RECENT_ITEMS
from predictor.features.store import apply, materialize, online_user_features
from predictor.serving.online import FeastOnlineFeatures, RedisOnlineFeatures, UserOnline, _user_from_values
from tests.conftest import events_frame

HEAVY_USER = 5_000
HEAVY_DISTINCT = 40


def expected_seen(events: pd.DataFrame) -> dict[int, list[int]]:
    """The reference: sorted distinct items per user, the slow obvious way."""
    return {int(u): sorted({int(i) for i in g}) for u, g in events.groupby("user_id")["item_id"]}


def with_heavy_user(data: Interactions) -> Interactions:
    """``data`` plus a user with 40 distinct items (each 3 times, shuffled) across the log's time span."""
    rng = np.random.default_rng(3)
    items = data.items["item_id"].to_numpy()[:HEAVY_DISTINCT]
    picks = rng.permutation(np.repeat(items, 3))
    first, last = data.events["timestamp"].min(), data.events["timestamp"].max()
    stamps = pd.date_range(first, last, periods=len(picks) + 2)[1:-1]  # strictly inside: last event is data's
    heavy, _ = validate_events(
        pd.DataFrame({"user_id": HEAVY_USER, "item_id": picks, "timestamp": stamps, "event_type": "view"}),
        "heavy",
    )
    events = pd.concat([data.events, heavy], ignore_index=True).sort_values("timestamp", kind="stable")
    return Interactions(events.reset_index(drop=True), data.items)


# --- batch -----------------------------------------------------------------------------------------
def test_batch_seen_items_is_the_whole_distinct_history(small_data):
    data = with_heavy_user(small_data)
    recent = compute_features(data, recent_n=10).user_recent_items.set_index("user_id")
    want = expected_seen(data.events)
    assert sorted(recent.index) == sorted(want)
    for user, items in want.items():
        assert recent.loc[user, "seen_items"] == items, user
    assert len(recent.loc[HEAVY_USER, "seen_items"]) == HEAVY_DISTINCT
    assert len(recent.loc[HEAVY_USER, "recent_items"]) == 10


def test_batch_seen_items_point_in_time(small_data):
    """Each snapshot's seen set holds exactly the items of events at or before the snapshot."""
    data = with_heavy_user(small_data)
    snapshots = daily_snapshots(data, "7D")
    table = compute_features(data, snapshots, recent_n=10).user_recent_items
    for t in snapshots[::3]:
        want = expected_seen(data.events[data.events["timestamp"] <= t])
        got = table[table["event_timestamp"] == t].set_index("user_id")["seen_items"]
        assert got.to_dict() == want, t


def test_batch_seen_items_by_hand():
    events, _ = validate_events(
        events_frame(
            [
                (1, 30, "2026-01-01 00:00"),
                (1, 10, "2026-01-02 00:00"),
                (1, 30, "2026-01-03 00:00"),
                (2, 20, "2026-01-03 00:00"),
                (1, 20, "2026-01-04 00:00"),
                (1, 99, "2026-01-09 00:00"),  # after the snapshot
            ]
        ),
        "x",
    )
    t = pd.Timestamp("2026-01-05", tz="UTC")
    recent = compute_features(Interactions(events, items_from_events(events)), [t], recent_n=2)
    frame = recent.user_recent_items.set_index("user_id")
    assert frame.loc[1, "recent_items"] == [20, 30] and frame.loc[1, "seen_items"] == [10, 20, 30]
    assert frame.loc[2, "seen_items"] == [20]


# --- event log -------------------------------------------------------------------------------------
def check_event_log_seen(event_log: EventLog):
    events, _ = validate_events(
        events_frame(
            [
                (1, 7, "2026-01-01"),
                (1, 5, "2026-01-02"),
                (1, 7, "2026-01-03"),
                (1, 9, "2026-01-04"),
                (1, 5, "2026-01-05"),
                (2, 5, "2026-01-01"),
                (3, 8, "2026-01-01"),
            ]
        ),
        "x",
    )
    event_log.replace(Interactions(events, items_from_events(events)))
    with event_log.begin() as conn:
        got = event_log.recent_items(conn, [1, 2, 4], n=2)
    assert got["user_id"].tolist() == [1, 2]
    assert got["recent_items"].tolist() == [[5, 9], [5]]
    assert got["seen_items"].tolist() == [[5, 7, 9], [5]]
    assert got["last_event"].tolist() == [
        pd.Timestamp("2026-01-05", tz="UTC"),
        pd.Timestamp("2026-01-01", tz="UTC"),
    ]
    with event_log.begin() as conn:
        empty = event_log.recent_items(conn, [4], n=2)
    assert empty.empty and "seen_items" in empty.columns


def test_event_log_seen_items_sqlite(tmp_path):
    event_log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    check_event_log_seen(event_log)
    event_log.engine.dispose()


@pytest.mark.integration
def test_event_log_seen_items_postgres(production_settings):
    event_log = EventLog(production_settings.database_url)
    check_event_log_seen(event_log)
    event_log.engine.dispose()


# --- online, both profiles -------------------------------------------------------------------------
def build_and_materialize(settings: Settings, data: Interactions):
    event_log = EventLog(settings.database_url)
    event_log.replace(data)
    build_features(settings, snapshot_every="7D")
    store = apply(settings)
    materialize(settings, datetime.now(timezone.utc), store=store)
    return store, event_log


def serving_clients(store, settings: Settings) -> list:
    clients = [lambda: FeastOnlineFeatures(store)]
    if store.config.online_store.type == "redis":
        clients.append(lambda: RedisOnlineFeatures(store, settings, timeout=1.0))
    return clients


def served(store, settings: Settings, users: list[int]) -> list[list[UserOnline]]:
    """What each predictor client the profile offers reads for ``users``."""

    async def read(make):
        client = make()
        try:
            return await client.users(users)
        finally:
            await client.close()

    return [asyncio.run(read(make)) for make in serving_clients(store, settings)]


def check_online_seen(settings: Settings, store, event_log: EventLog, users: list[int]):
    events = event_log.read().events
    want, counts = expected_seen(events), events.groupby("user_id").size()
    online = online_user_features(store, users).set_index("user_id")
    for user in users:
        assert list(online.loc[user, "seen_items"]) == want[user], user
        assert len(online.loc[user, "recent_items"]) == min(settings.recent_items, counts[user]), user
    for rows in served(store, settings, users):
        for row in rows:
            assert row.seen.dtype == np.int64
            np.testing.assert_array_equal(row.seen, want[row.user_id], err_msg=str(row.user_id))


def check_push_extends_seen(settings: Settings, store, event_log: EventLog, data: Interactions):
    before = expected_seen(event_log.read().events)[HEAVY_USER]
    new_item = int(next(i for i in data.items["item_id"] if int(i) not in before))
    old_item = before[0]  # seen long ago, no longer in the last 10
    now = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S.%f")
    result = push_events(
        events_frame([(HEAVY_USER, new_item, now, "click"), (HEAVY_USER, old_item, now, "view")]),
        store,
        event_log,
        settings.recent_items,
    )
    want = sorted({*before, new_item})
    assert result.sequences["seen_items"].iloc[0] == want
    online = online_user_features(store, [HEAVY_USER])
    assert list(online["seen_items"].iloc[0]) == want
    assert list(online["recent_items"].iloc[0][:2]) == [old_item, new_item]
    assert len(online["recent_items"].iloc[0]) == settings.recent_items
    for (row,) in served(store, settings, [HEAVY_USER]):
        np.testing.assert_array_equal(row.seen, want)
        assert row.history[-1] == old_item and len(row.history) == settings.recent_items


def check_unknown_user(settings: Settings, store):
    for (row,) in served(store, settings, [987_654_321]):
        assert row.found is False and row.seen.dtype == np.int64 and len(row.seen) == 0


def sample_users(data: Interactions) -> list[int]:
    counts = data.events["user_id"].value_counts().drop(HEAVY_USER)
    return [HEAVY_USER, *map(int, counts.index[:5]), *map(int, counts.index[-3:])]


@pytest.mark.integration
def test_production_seen_items_online(production_settings, small_data):
    settings = production_settings
    data = with_heavy_user(small_data)
    store, event_log = build_and_materialize(settings, data)
    assert store.config.online_store.type == "redis"
    offline = read_offline(USER_RECENT_ITEMS, settings)
    assert "seen_items" in offline.columns
    check_online_seen(settings, store, event_log, sample_users(data))
    check_push_extends_seen(settings, store, event_log, data)
    check_unknown_user(settings, store)
    event_log.engine.dispose()


def test_embedded_seen_items_online(embedded_settings, small_data):
    settings = embedded_settings
    data = with_heavy_user(small_data)
    store, event_log = build_and_materialize(settings, data)
    assert store.config.online_store.type == "sqlite"
    check_online_seen(settings, store, event_log, sample_users(data))
    check_push_extends_seen(settings, store, event_log, data)
    check_unknown_user(settings, store)
    event_log.engine.dispose()


@pytest.mark.integration
def test_redis_store_without_seen_items_falls_back_to_history(production_settings, small_data):
    """An online store materialized before seen_items existed: the field is absent from the hash."""
    from predictor.features.redis_reader import RawRedisReader

    settings = production_settings
    data = with_heavy_user(small_data)
    store, event_log = build_and_materialize(settings, data)
    reader = RawRedisReader(store, settings)
    key = reader.entity_key("user_id", HEAVY_USER)
    (field,) = reader.fields(["user_recent_items:seen_items"])
    reader.close()
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db)
    assert client.hdel(key, field) == 1
    client.close()
    for (row,) in served(store, settings, [HEAVY_USER]):
        assert row.values["seen_items"] is None
        assert len(row.history) == settings.recent_items
        np.testing.assert_array_equal(row.seen, np.unique(row.history))
    event_log.engine.dispose()


# --- UserOnline ------------------------------------------------------------------------------------
def test_user_online_seen_from_values_and_fallback():
    values = {"events_total": 3, "recent_items": [9, 4, 9], "seen_items": [1, 4, 9]}
    user = _user_from_values(1, values)
    np.testing.assert_array_equal(user.history, [9, 4, 9])
    np.testing.assert_array_equal(user.seen, [1, 4, 9])
    assert user.seen.dtype == np.int64

    old_store = _user_from_values(1, {"events_total": 3, "recent_items": [9, 4, 9], "seen_items": None})
    np.testing.assert_array_equal(old_store.seen, [4, 9])

    missing = _user_from_values(2, {"events_total": None, "recent_items": None, "seen_items": None})
    assert missing.found is False and missing.seen.dtype == np.int64 and len(missing.seen) == 0

    # made by hand: without seen, the distinct history; an unsorted seen is sorted and deduplicated
    np.testing.assert_array_equal(UserOnline(3, True, np.array([5, 2, 5]), {}).seen, [2, 5])
    np.testing.assert_array_equal(UserOnline(3, True, np.array([5]), {}, np.array([8, 1, 8])).seen, [1, 8])
