"""Bad input gets an error naming file, row and column; duplicates are dropped and counted."""

import logging
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.data.loaders import load_table
from predictor.data.schema import DataValidationError, validate_event_rows, validate_events, validate_items

HEADER = "user_id,item_id,timestamp,event_type,weight\n"


def write_csv(tmp_path, body: str, name="events.csv"):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def test_valid_csv_becomes_canonical(tmp_path):
    path = write_csv(tmp_path, "1,10,2026-01-02T00:00:00Z,click,2\n2,11,2026-01-01T00:00:00Z,view,1\n")
    data = load_table(path)
    ev = data.events
    assert list(ev.columns) == ["user_id", "item_id", "timestamp", "event_type", "weight", "rating"]
    assert ev["user_id"].dtype == np.int64 and ev["item_id"].dtype == np.int64
    assert str(ev["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert ev["weight"].dtype == np.float32 and ev["rating"].isna().all()
    # sorted by time
    assert ev["user_id"].tolist() == [2, 1]
    assert data.items["item_id"].tolist() == [10, 11]


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,timestamp\n1,2026-01-01\n")
    with pytest.raises(DataValidationError, match=r"events\.csv, column 'item_id': missing required column"):
        load_table(path)


def test_non_integer_id_names_row_and_column(tmp_path):
    path = write_csv(tmp_path, "1,10,2026-01-01,view,1\n2,11,2026-01-01,view,1\n3,abc,2026-01-01,view,1\n")
    # line 1 is the header, so the third data row is row 4 of the file
    with pytest.raises(
        DataValidationError, match=r"events\.csv, row 4, column 'item_id': expected an integer id, got 'abc'"
    ):
        load_table(path)


def test_fractional_id_is_rejected(tmp_path):
    path = write_csv(tmp_path, "1.5,10,2026-01-01,view,1\n")
    with pytest.raises(DataValidationError, match=r"row 2, column 'user_id': expected an integer id"):
        load_table(path)


def test_unparsable_timestamp_names_row(tmp_path):
    path = write_csv(tmp_path, "1,10,2026-01-01,view,1\n1,10,yesterday-ish,view,1\n")
    with pytest.raises(
        DataValidationError, match=r"row 3, column 'timestamp': unparsable timestamp 'yesterday-ish'"
    ):
        load_table(path)


def test_negative_weight_names_row(tmp_path):
    path = write_csv(tmp_path, "1,10,2026-01-01,view,1\n1,10,2026-01-02,view,-3\n")
    with pytest.raises(DataValidationError, match=r"row 3, column 'weight': weight must be >= 0, got '-3'"):
        load_table(path)


def test_parquet_rows_count_from_one(tmp_path):
    frame = pd.DataFrame(
        {"user_id": [1, -2], "item_id": [1, 2], "timestamp": pd.to_datetime(["2026-01-01"] * 2)}
    )
    path = tmp_path / "events.parquet"
    frame.to_parquet(path)
    with pytest.raises(
        DataValidationError, match=r"events\.parquet, row 2, column 'user_id': ids must be >= 0"
    ):
        load_table(path)


def test_unsupported_format(tmp_path):
    path = tmp_path / "events.xlsx"
    path.write_bytes(b"not really")
    with pytest.raises(DataValidationError, match=r"unsupported format"):
        load_table(path)


def test_exact_duplicates_dropped_and_counted(tmp_path, caplog):
    body = "1,10,2026-01-01,view,1\n1,10,2026-01-01,view,1\n1,10,2026-01-01,click,2\n1,10,2026-01-01,view,1\n"
    path = write_csv(tmp_path, body)
    with caplog.at_level(logging.WARNING):
        data = load_table(path)
    assert data.duplicates_dropped == 2
    assert len(data.events) == 2  # the click differs in type and weight, so it stays
    assert "dropped 2 exact duplicate event rows" in caplog.text


def test_event_type_gives_default_weight():
    raw = pd.DataFrame(
        {
            "user_id": [1, 1],
            "item_id": [2, 3],
            "timestamp": ["2026-01-01", "2026-01-02"],
            "event_type": ["view", "purchase"],
        }
    )
    events, _ = validate_events(raw, "frame")
    assert events["weight"].tolist() == [1.0, 5.0]


def test_items_reject_duplicate_ids():
    raw = pd.DataFrame({"item_id": [1, 2, 1], "title": ["a", "b", "c"], "categories": ["x|y", "", "z"]})
    with pytest.raises(DataValidationError, match=r"items, row 3, column 'item_id': duplicate item id 1"):
        validate_items(raw, "items")


def test_item_categories_split():
    raw = pd.DataFrame({"item_id": [1, 2, 3], "categories": ["Drama|Comedy", "(no genres listed)", None]})
    items = validate_items(raw, "items")
    assert items["categories"].tolist() == [["Drama", "Comedy"], [], []]


# --- the row-wise validator of the events service keeps the file loader's rules ------------------------
_GOOD_IDS = st.one_of(st.integers(0, 2**40), st.sampled_from([1.0, "7", "1e2", True]))
_IDS = st.one_of(_GOOD_IDS, st.sampled_from([-1, 2.5, "x", None, float("nan")]))
_GOOD_STAMPS = st.one_of(
    st.datetimes(min_value=datetime(1678, 1, 1), max_value=datetime(2262, 4, 1)).map(lambda d: d.isoformat()),
    st.sampled_from(["2026-12-01T10:00:00Z", "2026-12-01 10:00", "2026-12-01T10:00:00.123456+02:00"]),
)
_STAMPS = st.one_of(_GOOD_STAMPS, st.sampled_from(["soon", None, "2263-01-01", "1600-01-01"]))
_GOOD_NUMBERS = st.one_of(st.floats(0, 6), st.sampled_from(["3", 2]))
_NUMBERS = st.one_of(_GOOD_NUMBERS, st.sampled_from([None, -1.0, "x", float("inf"), float("nan")]))


def _events(ids, stamps, numbers, types):
    row = st.fixed_dictionaries(
        {
            "user_id": ids,
            "item_id": ids,
            "timestamp": stamps,
            "event_type": types,
            "weight": numbers,
            "rating": numbers,
        }
    )
    return st.lists(row, min_size=1, max_size=3)


def _both_validators(rows) -> tuple:
    rows = [{**row, "event_id": f"e{k}"} for k, row in enumerate(rows)]
    outcomes = []
    for check in (
        lambda: validate_events(pd.DataFrame(rows), "s", 0, drop_duplicates=False, event_ids=True)[0],
        lambda: validate_event_rows(rows, "s", 0),
    ):
        try:
            outcomes.append(check())
        except DataValidationError as exc:
            outcomes.append((exc.row, exc.column))
    return tuple(outcomes)


@settings(max_examples=200, deadline=None)
@given(_events(_GOOD_IDS, _GOOD_STAMPS, _GOOD_NUMBERS, st.sampled_from(["view", "click", "purchase"])))
def test_row_validator_accepts_what_the_file_validator_accepts_with_the_same_values(rows):
    by_frame, by_rows = _both_validators(rows)
    assert not isinstance(by_frame, tuple), by_frame
    pd.testing.assert_frame_equal(by_rows, by_frame)


@settings(max_examples=300, deadline=None)
@given(_events(_IDS, _STAMPS, _NUMBERS, st.sampled_from(["view", "click", None])))
def test_row_validator_rejects_where_the_file_validator_does_naming_the_same_row_and_column(rows):
    by_frame, by_rows = _both_validators(rows)
    if isinstance(by_frame, tuple) or isinstance(by_rows, tuple):
        assert by_frame == by_rows
    else:
        pd.testing.assert_frame_equal(by_rows, by_frame)
