"""Loaders from common formats into the canonical :class:`Interactions`.

* :func:`load_movielens_100k` — ``u.data`` (tab separated, no header) and ``u.item`` (``|`` separated,
  latin-1)
* :func:`load_movielens_latest` — ``ratings.csv`` and ``movies.csv`` (MovieLens latest / latest-small)
* :func:`load_table` — any CSV or Parquet file with the canonical column names (or a mapping to them)
* :func:`load_sql` — a SQL event-log table through SQLAlchemy (PostgreSQL, SQLite, ...)
* :func:`load_dataset` — one entry point for the names the CLI accepts
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from predictor.data.schema import (
    DataValidationError,
    Interactions,
    complete_items,
    items_from_events,
    validate_events,
    validate_items,
)
from predictor.data.splits import LINE_ORDER

log = logging.getLogger(__name__)

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def _read_csv_strict(path: Path, **kwargs) -> pd.DataFrame:
    """Read every column as text, so parsing and its errors happen in the validators with row numbers."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], **kwargs)
    except pd.errors.ParserError as exc:
        raise DataValidationError(str(path), None, None, f"not a well-formed table: {exc}") from exc


def load_movielens_100k(directory: str | Path) -> Interactions:
    """MovieLens-100K: ``u.data`` (user, item, rating, unix time), ``u.item`` (title, 19 genre flags)."""
    directory = Path(directory)
    data_path = _require_file(directory / "u.data")
    raw = _read_csv_strict(
        data_path, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"]
    )
    raw["weight"] = raw["rating"]
    events, dropped = validate_events(raw, str(data_path), first_row_number=1, timestamp_unit="s")

    item_path = _require_file(directory / "u.item")
    cols = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES]
    raw_items = pd.read_csv(item_path, sep="|", header=None, names=cols, encoding="latin-1", dtype=str)
    flags = raw_items[ML100K_GENRES].astype(int).to_numpy().astype(bool)
    genres = np.array(ML100K_GENRES)
    raw_items["categories"] = [list(genres[row & (genres != "unknown")]) for row in flags]
    items = validate_items(raw_items[["item_id", "title", "categories"]], str(item_path), first_row_number=1)
    return Interactions(events, complete_items(events, items), "ml-100k", dropped)


def load_movielens_latest(directory: str | Path) -> Interactions:
    """MovieLens latest(-small): ``ratings.csv`` (userId, movieId, rating, timestamp) and ``movies.csv``."""
    directory = Path(directory)
    ratings_path = _require_file(directory / "ratings.csv")
    raw = _read_csv_strict(ratings_path)
    raw = raw.rename(columns={"userId": "user_id", "movieId": "item_id"})
    raw["weight"] = raw.get("rating")
    events, dropped = validate_events(raw, str(ratings_path), first_row_number=2, timestamp_unit="s")

    movies_path = directory / "movies.csv"
    if movies_path.is_file():
        raw_items = _read_csv_strict(movies_path).rename(
            columns={"movieId": "item_id", "genres": "categories"}
        )
        items = complete_items(events, validate_items(raw_items, str(movies_path), first_row_number=2))
    else:
        items = items_from_events(events)
    return Interactions(events, items, directory.name, dropped)


def load_table(
    path: str | Path,
    columns: dict[str, str] | None = None,
    items_path: str | Path | None = None,
    timestamp_unit: str | None = None,
) -> Interactions:
    """Events from a CSV or Parquet file with the canonical columns.

    ``columns`` maps the file's names to canonical ones (e.g. ``{"userId": "user_id"}``).
    ``items_path`` optionally gives item metadata in the same formats.
    """
    path = _require_file(Path(path))
    raw, first_row = read_table_file(path)
    if columns:
        raw = raw.rename(columns=columns)
    events, dropped = validate_events(
        raw, str(path), first_row_number=first_row, timestamp_unit=timestamp_unit
    )
    if items_path is not None:
        items_path = _require_file(Path(items_path))
        raw_items, first_item_row = read_table_file(items_path)
        if columns:
            raw_items = raw_items.rename(columns=columns)
        items = complete_items(events, validate_items(raw_items, str(items_path), first_item_row))
    else:
        items = items_from_events(events)
    return Interactions(events, items, path.stem, dropped)


def load_user_lines(path: str | Path) -> Interactions:
    """One line per user, ``user_id item_id item_id ...`` (the format of public benchmark splits such as
    LightGCN's ``train.txt``/``test.txt``). Items keep their line order; timestamps are synthetic (one
    second apart) and only encode that order, which ``meta["timestamps"]`` says."""
    path = _require_file(Path(path))
    users, items = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        for column, token in enumerate(parts):
            if not token.isdigit():
                raise DataValidationError(
                    str(path),
                    line_no,
                    "user_id" if column == 0 else "item_id",
                    f"expected an integer id, got {token!r}",
                )
        users.extend([int(parts[0])] * (len(parts) - 1))
        items.extend(int(t) for t in parts[1:])
    order = np.arange(len(items), dtype=np.int64)
    raw = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": order})
    events, dropped = validate_events(raw, str(path), timestamp_unit="s", drop_duplicates=False)
    return Interactions(
        events, items_from_events(events), path.stem, dropped, meta={"timestamps": LINE_ORDER}
    )


def load_any(path: str | Path) -> Interactions:
    """A file in any supported format: ``.txt`` one line per user, else CSV/TSV/Parquet."""
    path = Path(path)
    return load_user_lines(path) if path.suffix.lower() == ".txt" else load_table(path)


def read_table_file(path: Path) -> tuple[pd.DataFrame, int]:
    """(frame, row number of its first data row as the user counts it)."""
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        return pd.read_parquet(path), 1
    if suffix.endswith((".csv", ".csv.gz", ".tsv")):
        return _read_csv_strict(path, sep="\t" if ".tsv" in suffix else ","), 2
    raise DataValidationError(
        str(path), None, None, "unsupported format (expected .csv, .csv.gz, .tsv or .parquet)"
    )


def load_sql(
    url: str | sa.Engine,
    table: str = "events",
    items_table: str | None = "items",
    since: pd.Timestamp | None = None,
) -> Interactions:
    """Events from a SQL table with the canonical columns, read through SQLAlchemy.

    ``since`` reads only events strictly after that time (used by incremental retraining).
    """
    engine = sa.create_engine(url) if isinstance(url, str) else url
    meta = sa.MetaData()
    source = f"{engine.url.render_as_string(hide_password=True)} table {table}"
    try:
        events_t = sa.Table(table, meta, autoload_with=engine)
    except sa.exc.NoSuchTableError as exc:
        raise DataValidationError(source, None, None, "no such table") from exc
    query = sa.select(events_t)
    if since is not None:
        query = query.where(events_t.c.timestamp > since.to_pydatetime())
    with engine.connect() as conn:
        raw = pd.read_sql(query, conn)
    # SQL rows have no line numbers; row 1 is the first row the query returned
    events, dropped = validate_events(raw, source, first_row_number=1)
    items = items_from_events(events)
    if items_table is not None and sa.inspect(engine).has_table(items_table):
        with engine.connect() as conn:
            raw_items = pd.read_sql(sa.select(sa.Table(items_table, meta, autoload_with=engine)), conn)
        items = complete_items(events, validate_items(raw_items, f"{source} ({items_table})"))
    return Interactions(events, items, table, dropped)


DATASETS = ("synthetic", "ml-100k", "ml-latest-small", "ml-latest")


def default_data_dir() -> Path:
    """``$RECSYS_DATA_DIR``, else ``../shared/data`` next to the checkout (where MovieLens lies on the
    team's machines)."""
    if os.environ.get("RECSYS_DATA_DIR"):
        return Path(os.environ["RECSYS_DATA_DIR"])
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def load_dataset(name: str, data_dir: str | Path | None = None, **synthetic_options) -> Interactions:
    """Load a named dataset (``synthetic``, ``ml-100k``, ``ml-latest-small``), or a file path."""
    if name == "synthetic":
        from predictor.data.synthetic import generate

        return generate(**synthetic_options)
    base = Path(data_dir) if data_dir else default_data_dir()
    if name == "ml-100k":
        return load_movielens_100k(base / "ml-100k")
    if name in ("ml-latest-small", "ml-latest"):
        return load_movielens_latest(base / name)
    path = Path(name)
    if path.exists():
        return load_table(path)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)} or a CSV/Parquet path")
