"""Loaders: MovieLens files, CSV/Parquet round trip, SQL event-log tables (SQLite and PostgreSQL)."""

import pandas as pd
import pytest
import sqlalchemy as sa

from predictor.data.eventlog import EventLog, UnknownItemError
from predictor.data.loaders import load_movielens_100k, load_movielens_latest, load_sql, load_table
from predictor.data.schema import DataValidationError
from tests.conftest import events_frame, shared_dataset


def test_movielens_100k():
    data = load_movielens_100k(shared_dataset("ml-100k"))
    assert (len(data.events), data.n_users, data.n_items) == (100_000, 943, 1682)
    assert data.events["rating"].between(1, 5).all()
    assert (data.events["weight"] == data.events["rating"]).all()
    toy_story = data.items.set_index("item_id").loc[1]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["categories"] == ["Animation", "Children's", "Comedy"]
    assert data.events["timestamp"].is_monotonic_increasing


def test_movielens_latest_small():
    data = load_movielens_latest(shared_dataset("ml-latest-small"))
    assert (len(data.events), data.n_users) == (100_836, 610)
    assert data.n_items == 9742  # every movie in movies.csv, rated or not
    assert data.items.set_index("item_id").loc[1, "categories"] == [
        "Adventure",
        "Animation",
        "Children",
        "Comedy",
        "Fantasy",
    ]
    assert 0.5 <= data.events["rating"].min() and data.events["rating"].max() <= 5.0


def test_movielens_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"u\.data: no such file"):
        load_movielens_100k(tmp_path)


def test_movielens_bad_row(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t5\t881250949\n1\t3\t4\tnot-a-time\n")
    with pytest.raises(
        DataValidationError, match=r"u\.data, row 2, column 'timestamp': unparsable timestamp"
    ):
        load_movielens_100k(tmp_path)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_table_round_trip(tmp_path, small_data, suffix):
    path = tmp_path / f"events.{suffix}"
    items_path = tmp_path / f"items.{suffix}"
    if suffix == "csv":
        small_data.events.to_csv(path, index=False)
        small_data.items.assign(categories=small_data.items["categories"].str.join("|")).to_csv(
            items_path, index=False
        )
    else:
        small_data.events.to_parquet(path)
        small_data.items.to_parquet(items_path)
    loaded = load_table(path, items_path=items_path)
    pd.testing.assert_frame_equal(loaded.events, small_data.events, check_exact=False)
    assert loaded.items["categories"].tolist() == small_data.items["categories"].tolist()


def test_column_mapping(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,iid,ts\n7,8,1700000000\n")
    data = load_table(
        path, columns={"uid": "user_id", "iid": "item_id", "ts": "timestamp"}, timestamp_unit="s"
    )
    assert data.events.iloc[0]["timestamp"] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def event_log_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_database')}"


def test_event_log_round_trip(small_data, event_log_url):
    url = event_log_url
    log = EventLog(url)
    log.replace(small_data)
    assert log.count() == len(small_data.events)
    back = log.read()
    pd.testing.assert_frame_equal(back.events, small_data.events, check_exact=False, atol=1e-6)
    assert back.items["categories"].tolist() == small_data.items["categories"].tolist()
    # the generic SQL loader reads the same table
    again = load_sql(url, "events", "items")
    assert len(again.events) == len(small_data.events)
    log.engine.dispose()


def test_unknown_item_rejects_whole_batch(small_data, event_log_url):
    log = EventLog(event_log_url)
    log.replace(small_data)
    before = log.count()
    batch = events_frame([(1, 0, "2026-06-01 00:00"), (2, 999_999, "2026-06-01 00:01")])
    from predictor.data.schema import validate_events

    batch, _ = validate_events(batch, "batch")
    with (
        pytest.raises(UnknownItemError, match=r"unknown item_id\(s\) not in the item catalog: 999999"),
        log.begin() as conn,
    ):
        log.append(conn, batch)
    assert log.count() == before
    log.engine.dispose()


def test_recent_items_window_query(tmp_path):
    from predictor.data.schema import Interactions, items_from_events, validate_events

    events, _ = validate_events(
        events_frame(
            [(1, 5, "2026-01-01"), (1, 6, "2026-01-03"), (1, 7, "2026-01-02"), (2, 5, "2026-01-01")]
        ),
        "x",
    )
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.replace(Interactions(events, items_from_events(events)))
    with log.begin() as conn:
        recent = log.recent_items(conn, [1, 2, 3], n=2)
    assert recent["user_id"].tolist() == [1, 2]
    assert recent["recent_items"].tolist() == [[6, 7], [5]]


def test_sql_missing_table(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DataValidationError, match=r"table nope: no such table"):
        load_sql(engine, "nope")
