"""The canonical interaction schema every loader produces, and its validation.

Events (one row per interaction)::

    user_id     int64                 >= 0
    item_id     int64                 >= 0
    timestamp   datetime64[ns, UTC]
    event_type  str                   e.g. "view", "click", "purchase", "rating"
    weight      float32               >= 0, the implicit-feedback strength
    rating      float32               explicit rating, NaN when the event carries none
    event_id    str                   only real-time events (``event_ids=True``): the client's idempotency key

Items (item metadata, one row per item)::

    item_id     int64
    title       str
    categories  list[str]             may be empty

Bad input raises :class:`DataValidationError` naming the source, the row (as the user would count it in
the file) and the column. Exact duplicate rows are dropped on purpose and counted in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EVENT_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "event_type", "weight", "rating")
REQUIRED_EVENT_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title", "categories")
EVENT_ID_MAX_LENGTH = 128

# implicit-feedback weight per event type when a source gives a type but no weight
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "rating": 3.0,
    "cart": 4.0,
    "purchase": 5.0,
}


class DataValidationError(ValueError):
    """Input that does not fit the canonical schema. Names the source, row and column."""

    def __init__(self, source: str, row: int | None, column: str | None, problem: str):
        self.source, self.row, self.column, self.problem = source, row, column, problem
        where = [source]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {problem}")


@dataclass
class Interactions:
    """Events plus item metadata, already validated. ``name`` says where they came from."""

    events: pd.DataFrame
    items: pd.DataFrame
    name: str = "interactions"
    duplicates_dropped: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.events["user_id"].nunique())

    @property
    def n_items(self) -> int:
        return len(self.items)

    def category_vocabulary(self) -> list[str]:
        """Sorted category names; a category's id is its position here."""
        return sorted({c for cats in self.items["categories"] for c in cats})

    def summary(self) -> str:
        ev = self.events
        span = f"{ev['timestamp'].min():%Y-%m-%d} .. {ev['timestamp'].max():%Y-%m-%d}" if len(ev) else "empty"
        return (
            f"{self.name}: {len(ev):,} events, {self.n_users:,} users, {self.n_items:,} items, "
            f"{len(self.category_vocabulary())} categories, {span}"
        )


def _row_number(index_position: int, first_row_number: int) -> int:
    return int(index_position) + first_row_number


def _first_bad(mask: np.ndarray) -> int | None:
    bad = np.flatnonzero(mask)
    return int(bad[0]) if len(bad) else None


def _to_int64(col: pd.Series, name: str, source: str, first_row_number: int) -> pd.Series:
    numeric = pd.to_numeric(col, errors="coerce")
    bad = numeric.isna().to_numpy() | (np.asarray(numeric.fillna(0)) % 1 != 0)
    pos = _first_bad(bad)
    if pos is not None:
        raise DataValidationError(
            source, _row_number(pos, first_row_number), name, f"expected an integer id, got {col.iloc[pos]!r}"
        )
    values = numeric.astype("int64")
    pos = _first_bad((values < 0).to_numpy())
    if pos is not None:
        raise DataValidationError(
            source, _row_number(pos, first_row_number), name, f"ids must be >= 0, got {col.iloc[pos]!r}"
        )
    return values


_EARLIEST, _LATEST = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")


def _to_timestamp(col: pd.Series, source: str, first_row_number: int, unit: str | None) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = col
    elif unit is not None or pd.api.types.is_numeric_dtype(col):
        numeric = pd.to_numeric(col, errors="coerce")
        pos = _first_bad(numeric.isna().to_numpy())
        if pos is not None:
            raise DataValidationError(
                source,
                _row_number(pos, first_row_number),
                "timestamp",
                f"unparsable timestamp {col.iloc[pos]!r}",
            )
        ts = pd.to_datetime(numeric, unit=unit or "s", utc=True)
    else:
        ts = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
        pos = _first_bad(ts.isna().to_numpy())
        if pos is not None:
            raise DataValidationError(
                source,
                _row_number(pos, first_row_number),
                "timestamp",
                f"unparsable timestamp {col.iloc[pos]!r}",
            )
    if ts.dt.tz is None:
        ts = ts.dt.tz_localize("UTC")
    ts = ts.dt.tz_convert("UTC")
    # pandas parses dates past 2262 at a coarser unit; the schema's nanoseconds cannot hold them
    pos = _first_bad(((ts < _EARLIEST) | (ts > _LATEST)).to_numpy())
    if pos is not None:
        raise DataValidationError(
            source,
            _row_number(pos, first_row_number),
            "timestamp",
            f"timestamp out of range {col.iloc[pos]!r}",
        )
    return ts.astype("datetime64[ns, UTC]")


def _to_float(
    col: pd.Series, name: str, source: str, first_row_number: int, allow_missing: bool
) -> pd.Series:
    numeric = pd.to_numeric(col, errors="coerce")
    unparsable = numeric.isna().to_numpy() & ~col.isna().to_numpy()
    if not allow_missing:
        unparsable |= col.isna().to_numpy()
    pos = _first_bad(unparsable)
    if pos is not None:
        raise DataValidationError(
            source, _row_number(pos, first_row_number), name, f"expected a number, got {col.iloc[pos]!r}"
        )
    return numeric.astype("float32")


def validate_events(
    df: pd.DataFrame,
    source: str,
    first_row_number: int = 1,
    timestamp_unit: str | None = None,
    drop_duplicates: bool = True,
    event_ids: bool = False,
) -> tuple[pd.DataFrame, int]:
    """Check and convert raw events to the canonical schema.

    ``first_row_number`` is the row number the user sees for ``df``'s first row (2 for a CSV with a
    header line), so errors point at the right line. Returns ``(events, duplicates_dropped)``, sorted
    by timestamp (stable, so equal timestamps keep file order). With ``event_ids`` the frame must hold
    an ``event_id`` column of distinct non-empty strings, which is kept.
    """
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(
            source, None, missing[0], f"missing required column (have: {', '.join(map(str, df.columns))})"
        )
    df = df.reset_index(drop=True)
    out = pd.DataFrame(
        {
            "user_id": _to_int64(df["user_id"], "user_id", source, first_row_number),
            "item_id": _to_int64(df["item_id"], "item_id", source, first_row_number),
            "timestamp": _to_timestamp(df["timestamp"], source, first_row_number, timestamp_unit),
        }
    )
    if "event_type" in df.columns:
        event_type = df["event_type"].astype("string")
        pos = _first_bad(event_type.isna().to_numpy())
        if pos is not None:
            raise DataValidationError(
                source, _row_number(pos, first_row_number), "event_type", "empty event type"
            )
        out["event_type"] = event_type.astype(str)
    else:
        out["event_type"] = "rating" if "rating" in df.columns else "view"

    if "rating" in df.columns:
        out["rating"] = _to_float(df["rating"], "rating", source, first_row_number, allow_missing=True)
    else:
        out["rating"] = np.float32(np.nan)

    if "weight" in df.columns:
        weight = _to_float(df["weight"], "weight", source, first_row_number, allow_missing=False)
    else:
        weight = out["event_type"].map(DEFAULT_EVENT_WEIGHTS).fillna(1.0).astype("float32")
    pos = _first_bad((weight < 0).to_numpy() | ~np.isfinite(weight.to_numpy()))
    if pos is not None:
        raise DataValidationError(
            source,
            _row_number(pos, first_row_number),
            "weight",
            f"weight must be >= 0, got {df['weight'].iloc[pos]!r}",
        )
    out["weight"] = weight.astype("float32")
    out = out[list(EVENT_COLUMNS)]
    if event_ids:
        out["event_id"] = _event_ids(df, source, first_row_number)

    dropped = 0
    if drop_duplicates:
        dup = out.duplicated(keep="first")
        dropped = int(dup.sum())
        if dropped:
            log.warning("%s: dropped %d exact duplicate event rows", source, dropped)
            out = out[~dup.to_numpy()]
    out = out.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return out, dropped


def validate_event_rows(rows: list[dict], source: str, first_row_number: int = 0) -> pd.DataFrame:
    """:func:`validate_events` for a few events given as dicts, without its per-call pandas cost.

    The same rules, checked in the same order (column by column, then row by row), so the same input
    fails with the same row and column (``tests/test_data_schema.py`` holds both to that). Every row
    needs every canonical column plus ``event_id``; the events service fills the defaults first.
    Returns the events with ``event_id``, sorted by timestamp (stable).
    """
    for column in (*EVENT_COLUMNS, "event_id"):
        for pos, row in enumerate(rows):
            if column not in row:
                raise DataValidationError(source, _row_number(pos, first_row_number), column, "missing field")
    user_id = _int_ids([r["user_id"] for r in rows], "user_id", source, first_row_number)
    item_id = _int_ids([r["item_id"] for r in rows], "item_id", source, first_row_number)
    timestamp = [_row_timestamp(r["timestamp"], source, p + first_row_number) for p, r in enumerate(rows)]
    event_type = []
    for pos, row in enumerate(rows):
        if _missing(row["event_type"]):
            raise DataValidationError(
                source, _row_number(pos, first_row_number), "event_type", "empty event type"
            )
        event_type.append(str(row["event_type"]))
    rating = [
        _row_float(r["rating"], "rating", source, p + first_row_number, True) for p, r in enumerate(rows)
    ]
    weight = [
        _row_float(r["weight"], "weight", source, p + first_row_number, False) for p, r in enumerate(rows)
    ]
    for pos, value in enumerate(weight):
        if not (value >= 0 and np.isfinite(value)):
            raise DataValidationError(
                source,
                _row_number(pos, first_row_number),
                "weight",
                f"weight must be >= 0, got {rows[pos]['weight']!r}",
            )
    event_id = _check_event_ids([r["event_id"] for r in rows], source, first_row_number)
    nanos = np.array([t.value for t in timestamp], dtype=np.int64)
    order = np.argsort(nanos, kind="stable")  # the file validator's stable sort by time
    return pd.DataFrame(
        {
            "user_id": np.array(user_id, dtype=np.int64)[order],
            "item_id": np.array(item_id, dtype=np.int64)[order],
            "timestamp": pd.to_datetime(nanos[order], unit="ns", utc=True),
            "event_type": np.array(event_type, dtype=object)[order],
            "weight": np.array(weight, dtype=np.float32)[order],
            "rating": np.array(rating, dtype=np.float32)[order],
            "event_id": np.array(event_id, dtype=object)[order],
        }
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT


def _number(value) -> float | None:
    """What ``pd.to_numeric(errors="coerce")`` makes of one value: a float, or None where it gives NaN."""
    if _missing(value) or isinstance(value, (list, dict, tuple)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _int_ids(values: list, name: str, source: str, first_row_number: int) -> list[int]:
    numbers = [_number(v) for v in values]
    for pos, (value, number) in enumerate(zip(values, numbers)):
        if number is None or not np.isfinite(number) or number % 1 != 0:
            problem = f"expected an integer id, got {value!r}"
            raise DataValidationError(source, _row_number(pos, first_row_number), name, problem)
    for pos, (value, number) in enumerate(zip(values, numbers)):  # then the sign, as the file validator does
        if number < 0:
            raise DataValidationError(
                source, _row_number(pos, first_row_number), name, f"ids must be >= 0, got {value!r}"
            )
    return [int(v) if isinstance(v, (int, np.integer)) else int(n) for v, n in zip(values, numbers)]


def _row_timestamp(value, source: str, row: int) -> pd.Timestamp:
    try:
        if _missing(value) or isinstance(value, (bool, np.bool_)):
            raise ValueError
        if isinstance(value, (int, float, np.integer, np.floating)):
            stamp = pd.Timestamp(value, unit="s", tz="UTC")
        else:
            stamp = pd.Timestamp(value)
            stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    except (TypeError, ValueError, OverflowError, pd.errors.OutOfBoundsDatetime):
        raise DataValidationError(source, row, "timestamp", f"unparsable timestamp {value!r}") from None
    if pd.isna(stamp):
        raise DataValidationError(source, row, "timestamp", f"unparsable timestamp {value!r}")
    if not _EARLIEST <= stamp <= _LATEST:
        raise DataValidationError(source, row, "timestamp", f"timestamp out of range {value!r}")
    return stamp.as_unit("ns")


def _row_float(value, name: str, source: str, row: int, allow_missing: bool) -> float:
    number = _number(value)
    if number is None and not (allow_missing and _missing(value)):
        raise DataValidationError(source, row, name, f"expected a number, got {value!r}")
    return float("nan") if number is None else float(np.float32(number))


def _event_ids(df: pd.DataFrame, source: str, first_row_number: int) -> pd.Series:
    if "event_id" not in df.columns:
        raise DataValidationError(source, None, "event_id", "missing required column")
    return pd.Series(_check_event_ids(df["event_id"].tolist(), source, first_row_number), dtype=object)


def _check_event_ids(ids: list, source: str, first_row_number: int) -> list[str]:
    for pos, value in enumerate(ids):
        if not isinstance(value, str) or not value or len(value) > EVENT_ID_MAX_LENGTH:
            problem = (
                f"expected a non-empty string of at most {EVENT_ID_MAX_LENGTH} characters, got {value!r}"
            )
            raise DataValidationError(source, _row_number(pos, first_row_number), "event_id", problem)
    seen: set[str] = set()
    for pos, value in enumerate(ids):
        if value in seen:
            raise DataValidationError(
                source, _row_number(pos, first_row_number), "event_id", f"event_id {value!r} appears twice"
            )
        seen.add(value)
    return ids


def validate_items(df: pd.DataFrame, source: str, first_row_number: int = 1) -> pd.DataFrame:
    """Check and convert item metadata. ``categories`` may be a list or a ``|``-separated string."""
    if "item_id" not in df.columns:
        raise DataValidationError(
            source, None, "item_id", f"missing required column (have: {', '.join(map(str, df.columns))})"
        )
    df = df.reset_index(drop=True)
    out = pd.DataFrame({"item_id": _to_int64(df["item_id"], "item_id", source, first_row_number)})
    out["title"] = df["title"].fillna("").astype(str) if "title" in df.columns else ""
    if "categories" in df.columns:
        out["categories"] = [_split_categories(c) for c in df["categories"]]
    else:
        out["categories"] = [[] for _ in range(len(df))]
    dup = out["item_id"].duplicated()
    pos = _first_bad(dup.to_numpy())
    if pos is not None:
        raise DataValidationError(
            source,
            _row_number(pos, first_row_number),
            "item_id",
            f"duplicate item id {out['item_id'].iloc[pos]}",
        )
    return out.sort_values("item_id").reset_index(drop=True)


def _split_categories(value) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [c for c in value.split("|") if c and c != "(no genres listed)"]
    return [str(c) for c in value]


def items_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """Item table with no metadata, for sources that only have events."""
    ids = np.sort(events["item_id"].unique())
    return pd.DataFrame({"item_id": ids.astype("int64"), "title": "", "categories": [[] for _ in ids]})


def complete_items(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Add metadata-less rows for items that have events but no metadata row."""
    unknown = np.setdiff1d(events["item_id"].unique(), items["item_id"].to_numpy())
    if len(unknown) == 0:
        return items
    log.info(
        "%d items have events but no metadata; adding them with empty title and categories", len(unknown)
    )
    extra = pd.DataFrame(
        {"item_id": unknown.astype("int64"), "title": "", "categories": [[] for _ in unknown]}
    )
    return pd.concat([items, extra], ignore_index=True).sort_values("item_id").reset_index(drop=True)
