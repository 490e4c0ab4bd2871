"""The event log and item catalog as SQL tables (SQLAlchemy; PostgreSQL in production, SQLite embedded).

The log is the source of truth for interactions: batch features are computed from it, training reads it,
and real-time events are appended to it before they are pushed to the online store. A real-time event
may carry a client ``event_id``: the column is unique, so an event delivered twice is stored once.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from predictor.data.loaders import load_sql
from predictor.data.schema import EVENT_ID_MAX_LENGTH, Interactions

log = logging.getLogger(__name__)

metadata = sa.MetaData()

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("item_id", sa.BigInteger, nullable=False),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("event_type", sa.String(32), nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("rating", sa.Float, nullable=True),
    # NULL for bulk-loaded rows; NULLs never collide in a unique index (PostgreSQL and SQLite)
    sa.Column("event_id", sa.String(EVENT_ID_MAX_LENGTH), nullable=True),
    sa.Index("ix_events_user_time", "user_id", "timestamp"),
    sa.Index("ix_events_time", "timestamp"),
    sa.Index("ix_events_event_id", "event_id", unique=True),
)

items_table = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("title", sa.Text, nullable=False, default=""),
    sa.Column("categories", sa.JSON, nullable=False),
)


# The real-time path's statements, built once rather than per call: the window function, the subquery and
# their cache keys need not be constructed again for every batch.
_e = events_table.c
_USERS = sa.bindparam("users", expanding=True)
_KNOWN_ITEMS = sa.select(items_table.c.item_id).where(
    items_table.c.item_id.in_(sa.bindparam("items", expanding=True))
)
_RANKED = (
    sa.select(
        _e.user_id,
        _e.item_id,
        _e.timestamp,
        sa.func.row_number()
        .over(partition_by=_e.user_id, order_by=(_e.timestamp.desc(), _e.id.desc()))
        .label("rank"),
    )
    .where(_e.user_id.in_(_USERS))
    .subquery()
)
_RECENT = (
    sa.select(_RANKED.c.user_id, _RANKED.c.item_id, _RANKED.c.timestamp)
    .where(_RANKED.c.rank <= sa.bindparam("n"))
    .order_by(_RANKED.c.user_id, _RANKED.c.rank)
)
_SEEN = (
    sa.select(_e.user_id, _e.item_id)
    .where(_e.user_id.in_(_USERS))
    .distinct()
    .order_by(_e.user_id, _e.item_id)
)
_INSERTS: dict[str, sa.Insert] = {}


def _insert_new(dialect: str) -> sa.Insert:
    """``INSERT … ON CONFLICT (event_id) DO NOTHING RETURNING event_id`` for the dialect, built once."""
    if dialect not in _INSERTS:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        statement = insert(events_table).on_conflict_do_nothing(index_elements=["event_id"])
        _INSERTS[dialect] = statement.returning(events_table.c.event_id)
    return _INSERTS[dialect]


class UnknownItemError(ValueError):
    """An event refers to an item that is not in the catalog."""

    def __init__(self, item_ids: list[int]):
        self.item_ids = item_ids
        shown = ", ".join(map(str, item_ids[:10])) + (" ..." if len(item_ids) > 10 else "")
        super().__init__(f"unknown item_id(s) not in the item catalog: {shown}; the batch was not written")


def _utc_naive(ts: pd.Series) -> list:
    """Timestamps as naive UTC datetimes: SQLite has no time zones, so both backends store UTC."""
    # a tz-aware column's .values are its UTC instants as datetime64[ns]
    return ts.dt.tz_convert("UTC").values.astype("datetime64[us]").tolist()


class EventLog:
    """Append-only interaction log plus the item catalog it refers to."""

    def __init__(self, url: str | sa.Engine):
        self.engine = sa.create_engine(url) if isinstance(url, str) else url
        if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            Path(self.engine.url.database).parent.mkdir(parents=True, exist_ok=True)

    def create_tables(self) -> None:
        """Create missing tables, and add ``event_id`` to an events table made before it existed."""
        metadata.create_all(self.engine)
        columns = {c["name"] for c in sa.inspect(self.engine).get_columns("events")}
        if "event_id" not in columns:
            with self.begin() as conn:
                conn.execute(
                    sa.text(f"ALTER TABLE events ADD COLUMN event_id VARCHAR({EVENT_ID_MAX_LENGTH})")
                )
                conn.execute(
                    sa.text("CREATE UNIQUE INDEX IF NOT EXISTS ix_events_event_id ON events (event_id)")
                )
            log.info("event log: added the event_id column to the events table")

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- bulk load ------------------------------------------------------------------------------
    def replace(self, data: Interactions) -> None:
        """Replace the whole log and catalog with ``data`` (one transaction)."""
        self.create_tables()
        with self.begin() as conn:
            conn.execute(events_table.delete())
            conn.execute(items_table.delete())
            self._insert_items(conn, data.items)
            self._insert_events(conn, data.events)
        log.info("event log now holds %s", data.summary())

    def _insert_items(self, conn: sa.Connection, items: pd.DataFrame) -> None:
        rows = [
            {"item_id": int(i), "title": t, "categories": list(c)}
            for i, t, c in zip(items["item_id"], items["title"], items["categories"])
        ]
        if rows:
            conn.execute(items_table.insert(), rows)

    def _insert_events(self, conn: sa.Connection, events: pd.DataFrame) -> None:
        if events.empty:
            return
        if conn.dialect.name == "postgresql":
            self._copy_events(conn, events)
            return
        frame = pd.DataFrame(
            {
                "user_id": events["user_id"].astype("int64"),
                "item_id": events["item_id"].astype("int64"),
                "timestamp": _utc_naive(events["timestamp"]),
                "event_type": events["event_type"].astype(str),
                "weight": events["weight"].astype(float),
                "rating": events["rating"].astype(float).replace({np.nan: None}),
            }
        )
        conn.execute(events_table.insert(), frame.to_dict("records"))

    @staticmethod
    def _copy_events(conn: sa.Connection, events: pd.DataFrame) -> None:
        """PostgreSQL COPY: an order of magnitude faster than INSERT for millions of rows."""
        buf = io.StringIO()
        pd.DataFrame(
            {
                "user_id": events["user_id"],
                "item_id": events["item_id"],
                "timestamp": events["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S.%f+00"),
                "event_type": events["event_type"],
                "weight": events["weight"],
                "rating": events["rating"],
            }
        ).to_csv(buf, index=False, header=False, na_rep="\\N")
        dbapi = conn.connection.driver_connection
        with (
            dbapi.cursor() as cur,
            cur.copy(
                "COPY events (user_id, item_id, timestamp, event_type, weight, rating) "
                "FROM STDIN WITH (FORMAT csv, NULL '\\N')"
            ) as copy,
        ):
            copy.write(buf.getvalue())

    # --- real-time append -----------------------------------------------------------------------
    def append(self, conn: sa.Connection, events: pd.DataFrame) -> int:
        """Append validated events inside the caller's transaction; returns how many rows were new.

        Unknown items reject the whole batch. Rows whose ``event_id`` is already in the log are skipped
        (``ON CONFLICT DO NOTHING``), which makes a redelivered batch a no-op; rows without an
        ``event_id`` column are always appended.
        """
        unknown = self.unknown_items(conn, [int(i) for i in np.unique(events["item_id"].to_numpy())])
        if unknown:
            raise UnknownItemError(unknown)
        if "event_id" not in events.columns:
            self._insert_events(conn, events)
            return len(events)
        return self._insert_new_events(conn, events)

    @staticmethod
    def unknown_items(conn: sa.Connection, item_ids: list[int]) -> list[int]:
        """The ids of ``item_ids`` that are not in the catalog, ascending."""
        known = {row[0] for row in conn.execute(_KNOWN_ITEMS, {"items": [int(i) for i in item_ids]})}
        return sorted(set(item_ids) - known)

    @staticmethod
    def _insert_new_events(conn: sa.Connection, events: pd.DataFrame) -> int:
        columns = ("user_id", "item_id", "timestamp", "event_type", "weight", "rating", "event_id")
        values = zip(
            events["user_id"].astype("int64").tolist(),
            events["item_id"].astype("int64").tolist(),
            _utc_naive(events["timestamp"]),
            events["event_type"].astype(str).tolist(),
            events["weight"].astype(float).tolist(),
            [None if math.isnan(r) else r for r in events["rating"].astype(float).tolist()],  # NaN → NULL
            events["event_id"].astype(str).tolist(),
        )
        rows = [dict(zip(columns, row)) for row in values]
        # RETURNING lists only the rows that went in, so the count excludes the skipped duplicates
        return len(conn.execute(_insert_new(conn.dialect.name), rows).all())

    @staticmethod
    def lock_users(conn: sa.Connection, user_ids: list[int]) -> None:
        """Serialise writers per user until the caller's transaction ends (PostgreSQL advisory locks).

        Two consumers applying events of the same user at once would each read back a sequence
        without the other's uncommitted event and push it; the later push would then hide an event.
        Locks are taken in ascending order, so two batches never wait on each other in a cycle.
        SQLite needs none: it has one writer at a time.
        """
        if conn.dialect.name != "postgresql" or not user_ids:
            return
        conn.execute(
            sa.text(
                "SELECT count(pg_advisory_xact_lock(u)) "
                "FROM (SELECT u FROM unnest(CAST(:users AS bigint[])) AS u ORDER BY u) AS ordered"
            ),
            {"users": sorted({int(u) for u in user_ids})},
        )

    def recent_items(self, conn: sa.Connection, user_ids: list[int], n: int) -> pd.DataFrame:
        """Per user: the last ``n`` items, most recent first, and every distinct item, ascending.

        Columns user_id, recent_items (list), seen_items (list), last_event. Two queries for the whole
        batch, not two per user, both on the user_id index: a window function for the last ``n``, a
        DISTINCT for the seen set (one query with both window functions measured 3x slower).
        """
        users, recent, seen, last_event = self.sequences(conn, user_ids, n)
        if not users:
            return pd.DataFrame(columns=["user_id", "recent_items", "seen_items", "last_event"])
        return pd.DataFrame(
            {
                "user_id": np.array(users, dtype=np.int64),
                "recent_items": recent,
                "seen_items": seen,
                "last_event": pd.to_datetime(last_event, utc=True),
            }
        )

    @staticmethod
    def sequences(conn: sa.Connection, user_ids: list[int], n: int) -> tuple[list, list, list, list]:
        """:meth:`recent_items` as plain lists ``(users, recent, seen, last_event)``, users ascending: the
        real-time path's form, without a DataFrame per batch."""
        query = {"users": [int(u) for u in user_ids], "n": int(n)}
        recent: dict[int, list[int]] = {}
        last_event: dict[int, object] = {}
        for user, item, stamp in conn.execute(_RECENT, query):
            recent.setdefault(user, []).append(int(item))
            last_event.setdefault(user, stamp)  # rank 1 comes first: the newest
        seen: dict[int, list[int]] = {}
        if recent:
            for user, item in conn.execute(_SEEN, query):
                seen.setdefault(user, []).append(int(item))
        users = sorted(recent)  # the same users in both: those with an event
        return users, [recent[u] for u in users], [seen[u] for u in users], [last_event[u] for u in users]

    # --- reads ----------------------------------------------------------------------------------
    def read(self, since: pd.Timestamp | None = None) -> Interactions:
        return load_sql(self.engine, "events", "items", since=since)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar_one())

    def items(self) -> pd.DataFrame:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(items_table).order_by(items_table.c.item_id)).all()
        return pd.DataFrame(rows, columns=["item_id", "title", "categories"])
