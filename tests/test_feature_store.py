"""The Feast repo on both profiles: offline → materialize → online equals offline; push → visible."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from predictor.config import Settings
from predictor.data.eventlog import EventLog, UnknownItemError
from predictor.features.offline import read_offline
from predictor.features.pipeline import build_features
from predictor.features.realtime import push_events
from predictor.features.schema import (
    ITEM_FEATURES,
    ITEM_PROFILE,
    ITEM_SERVICE,
    USER_FEATURES,
    USER_PROFILE,
    USER_RECENT_ITEMS,
    USER_SERVICE,
)
from predictor.features.store import (
    apply,
    materialize,
    online_item_features,
    online_user_features,
    service_features,
)
from tests.conftest import events_frame

USER_COLUMNS = [
    "events_1d",
    "events_7d",
    "events_30d",
    "events_total",
    "seconds_since_last_event",
    "mean_rating",
    "rating_count",
    "category_affinity",
]
ITEM_COLUMNS = [
    "popularity_1d",
    "popularity_7d",
    "popularity_30d",
    "popularity_total",
    "mean_rating",
    "rating_count",
    "age_seconds",
    "categories",
]


def build_and_materialize(settings: Settings, data, snapshot_every=None):
    event_log = EventLog(settings.database_url)
    event_log.replace(data)
    build_features(settings, snapshot_every=snapshot_every)
    store = apply(settings)
    materialize(settings, datetime.now(timezone.utc), store=store)
    return store, event_log


def latest(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    return frame.sort_values("event_timestamp").groupby(key).tail(1).set_index(key)


def assert_same_values(online: pd.DataFrame, offline: pd.DataFrame, key: str, columns: list[str]):
    online = online.set_index(key)
    for entity in online.index:
        for col in columns:
            got, want = online.loc[entity, col], offline.loc[entity, col]
            if isinstance(want, (list, np.ndarray)):
                want = np.asarray(want)
                if want.dtype.kind == "f":  # Array(Float32): compare at float32
                    want = want.astype(np.float32)
                    got = np.asarray(got, dtype=np.float32)
                np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{key}={entity} {col}")
            elif isinstance(want, (float, np.floating)):
                # Float32 features: equal at the declared precision (drivers hand back float64)
                assert np.float32(got) == np.float32(want), (
                    f"{key}={entity} {col}: online {got!r} != offline {want!r}"
                )
            else:
                assert got == want, f"{key}={entity} {col}: online {got!r} != offline {want!r}"


def check_online_equals_offline(settings: Settings, store, rng):
    users = latest(read_offline(USER_PROFILE, settings), "user_id")
    recent = latest(read_offline(USER_RECENT_ITEMS, settings), "user_id")
    items = latest(read_offline(ITEM_PROFILE, settings), "item_id")
    sample_users = rng.choice(users.index.to_numpy(), size=25, replace=False)
    sample_items = rng.choice(items.index.to_numpy(), size=25, replace=False)

    online_users = online_user_features(store, sample_users)
    assert_same_values(online_users, users, "user_id", USER_COLUMNS)
    assert_same_values(online_users, recent, "user_id", ["recent_items"])
    assert_same_values(online_item_features(store, sample_items), items, "item_id", ITEM_COLUMNS)


def check_push_is_visible(settings: Settings, store, event_log: EventLog, data):
    user = int(data.events["user_id"].iloc[-1])
    old = online_user_features(store, [user])["recent_items"].iloc[0]
    new_items = [int(i) for i in data.items["item_id"].iloc[:2]]
    now = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S.%f")
    result = push_events(
        events_frame([(user, new_items[0], now, "click"), (user, new_items[1], now, "view")]),
        store,
        event_log,
        settings.recent_items,
    )
    assert result.events == 2 and result.users == 1
    seq = online_user_features(store, [user])["recent_items"].iloc[0]
    # same timestamp: the later row of the batch is the newer event
    assert list(seq[:2]) == new_items[::-1]
    assert list(seq[2:]) == list(old[: settings.recent_items - 2])
    return user, list(seq)


def check_unknown_item_rejected(settings: Settings, store, event_log: EventLog, user: int, seq: list[int]):
    before = event_log.count()
    bad = events_frame(
        [(user, int(seq[-1]), "2026-11-01 00:00", "click"), (user, 987_654_321, "2026-11-01 00:00", "view")]
    )
    with pytest.raises(UnknownItemError, match=r"unknown item_id\(s\) not in the item catalog: 987654321"):
        push_events(bad, store, event_log, settings.recent_items)
    assert event_log.count() == before  # all-or-nothing in the log
    assert list(online_user_features(store, [user])["recent_items"].iloc[0]) == seq  # and nothing pushed


@pytest.mark.integration
def test_production_profile_postgres_and_redis(production_settings, small_data):
    settings = production_settings
    store, event_log = build_and_materialize(settings, small_data, snapshot_every="7D")
    assert store.config.online_store.type == "redis"
    assert store.config.offline_store.type == "postgres"
    check_online_equals_offline(settings, store, np.random.default_rng(0))
    user, seq = check_push_is_visible(settings, store, event_log, small_data)
    check_unknown_item_rejected(settings, store, event_log, user, seq)
    event_log.engine.dispose()


def test_embedded_profile_without_servers(embedded_settings, small_data):
    """PostgreSQL and Redis settings point at a dead port: the embedded profile must not touch them."""
    settings = embedded_settings
    store, event_log = build_and_materialize(settings, small_data)
    assert store.config.online_store.type == "sqlite"
    assert settings.database_url.startswith("sqlite:///")
    assert (settings.offline_dir / "user_profile.parquet").is_file()
    # the online reads go through the feature services, which hold exactly the schema's columns
    assert service_features(store, USER_SERVICE) == USER_FEATURES  # as the registry has the services
    assert service_features(store, ITEM_SERVICE) == ITEM_FEATURES
    user_id = int(small_data.events["user_id"].iloc[0])
    columns = {f.split(":", 1)[1] for f in USER_FEATURES}
    assert set(online_user_features(store, [user_id]).columns) == {"user_id"} | columns
    item_columns = {f.split(":", 1)[1] for f in ITEM_FEATURES}
    item_id = int(small_data.events["item_id"].iloc[0])
    assert set(online_item_features(store, [item_id]).columns) == {"item_id"} | item_columns
    check_online_equals_offline(settings, store, np.random.default_rng(1))
    user, seq = check_push_is_visible(settings, store, event_log, small_data)
    check_unknown_item_rejected(settings, store, event_log, user, seq)
    event_log.engine.dispose()


@pytest.mark.integration
@pytest.mark.parametrize("profile_fixture", ["embedded_settings", "production_settings"])
def test_plain_feast_cli_apply_and_materialize(profile_fixture, request, small_data):
    """`feast apply` and `feast materialize-incremental` work on both profiles with only env vars set."""
    settings: Settings = request.getfixturevalue(profile_fixture)
    EventLog(settings.database_url).replace(small_data)
    build_features(settings)
    env = {**os.environ, **settings.feast_environment()}
    feast = [
        sys.executable,
        "-m",
        "feast.cli.cli",
        "-c",
        str(settings.feature_repo),
        "-f",
        str(settings.feature_store_yaml),
    ]
    for args in (
        ["apply"],
        ["materialize-incremental", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")],
    ):
        done = subprocess.run(feast + args, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    from predictor.features.store import open_store

    online = online_user_features(open_store(settings), [int(small_data.events["user_id"].iloc[0])])
    assert online["events_total"].iloc[0] > 0


@pytest.mark.integration
def test_raw_redis_reader_returns_what_feast_returns(production_settings, small_data):
    from predictor.features.redis_reader import RawRedisReader
    from predictor.features.schema import ITEM_FEATURES, USER_FEATURES

    store, event_log = build_and_materialize(production_settings, small_data)
    users = [int(u) for u in small_data.events["user_id"].unique()[:10]] + [10_000_000]  # last one: unknown
    items = [int(i) for i in small_data.items["item_id"][:30]]
    reader = RawRedisReader(store, production_settings)
    raw_users, raw_items = reader.read([("user_id", users, USER_FEATURES), ("item_id", items, ITEM_FEATURES)])
    for frame, raw, key in (
        (online_user_features(store, users), raw_users, "user_id"),
        (online_item_features(store, items), raw_items, "item_id"),
    ):
        for row, got in zip(frame.to_dict("records"), raw):
            for name, value in got.items():
                want = row[name]
                if isinstance(want, (list, np.ndarray)):
                    np.testing.assert_array_equal(
                        np.asarray(value), np.asarray(want), err_msg=f"{key} {name}"
                    )
                else:
                    assert value == want or (value is None and pd.isna(want)), (key, name, value, want)
    assert all(v is None for v in raw_users[-1].values())
    # the keys come from a frame found once around the int64 bytes: equal to Feast's serialiser everywhere
    for value in (*users, *items, 0, -1, 2**63 - 1, -(2**63)):
        assert reader.entity_key("user_id", value) == reader._feast_key("user_id", value)
    assert reader._frames["user_id"] is not False  # the fast layout was found, not the fallback
    reader.close()
    event_log.engine.dispose()


@pytest.mark.parametrize(
    "value",
    [
        {"int32_val": -7},
        {"int64_val": 2**40},
        {"float_val": 0.25},
        {"double_val": 1e-300},
        {"bool_val": True},
        {"string_val": "é"},
        {"bytes_val": b"\x00\x01"},
        {"int64_list_val": {"val": [3, 1, 2]}},
        {"double_list_val": {"val": [0.5, -1.0]}},
        {"float_list_val": {"val": []}},
        {"string_list_val": {"val": ["a", "b"]}},
        {"int32_list_val": {"val": [1]}},
        {"bool_list_val": {"val": [True, False]}},
        {"bytes_list_val": {"val": [b"x"]}},
        {"unix_timestamp_val": 1_700_000_000},
        {"int64_set_val": {"val": [1, 2]}},
        {},
    ],
)
def test_raw_decoding_equals_feasts_for_every_value_type(value):
    """The raw reader's short cut for plain scalars and lists gives exactly Feast's Python values (type
    included); other types (timestamps, sets, ...) and a missing value go through Feast itself."""
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    from predictor.features.redis_reader import _decode

    proto = Value(**value)
    ours, feasts = _decode(proto.SerializeToString()), feast_value_type_to_python_type(proto)
    assert ours == feasts and type(ours) is type(feasts)
