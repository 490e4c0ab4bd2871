"""Real-time events: append to the event log, then write each affected user's new last-N sequence and
full distinct seen set (``recent_items`` and ``seen_items`` of ``user_recent_items``) to the online store.

The batch is all-or-nothing in the log: it is validated (schema, known items), inserted and the new
sequences are read back inside one transaction; the transaction commits only after the online store
took the write, so a failed write leaves the log as it was. One online write per batch, not per user.

Events with an ``event_id`` are idempotent: ids already in the log are skipped, and the users' sequences
are written again all the same, so a batch redelivered after its commit but before its acknowledgement
still leaves the online store equal to the log.

The write goes through the profile's Feast provider (``online_write_batch``, where ``FeatureStore.push``
ends too) with the feature view read from the registry once a minute: ``push`` lists every feature
service from the registry and converts through Arrow on each call (17.1x the provider write's median for one
user in the same run of ``bench/event_path.py``).
What Feast's feature server accepts at ``/push`` (source ``user_recent_items_push``) lands in the same rows.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property

import pandas as pd
import sqlalchemy as sa
from feast import FeatureStore
from feast.infra.provider import Provider, get_provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Int64List, Value

from predictor.config import Settings
from predictor.data.eventlog import EventLog, events_table
from predictor.data.schema import validate_events

log = logging.getLogger(__name__)

PUSH_SOURCE = "user_recent_items_push"
SEQUENCE_VIEW = "user_recent_items"
VIEW_REFRESH_SECONDS = 60.0  # the registry's own cache_ttl_seconds


@dataclass
class PushResult:
    events: int  # in the batch
    new: int  # appended to the log (fewer when some event_ids were already there)
    users: int
    written: dict = field(repr=False)  # the columns written online

    @cached_property
    def sequences(self) -> pd.DataFrame:
        """user_id, recent_items, seen_items, event_timestamp, created: what was written."""
        return pd.DataFrame(self.written)


class SequenceWriter:
    """Writes users' ``recent_items`` / ``seen_items`` rows through the store's Feast provider."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.provider: Provider = get_provider(store.config)
        self._view, self._view_read = None, 0.0

    def view(self):
        if self._view is None or time.monotonic() - self._view_read > VIEW_REFRESH_SECONDS:
            self._view = self.store.get_feature_view(SEQUENCE_VIEW, allow_registry_cache=True)
            self._view_read = time.monotonic()
        return self._view

    def write(
        self, users: list[int], recent: list[list[int]], seen: list[list[int]], last_event: list
    ) -> dict:
        """Write the sequences, each stamped with the later of its last event and now; returns the columns.

        Valid from when we learned it: online stores keep the row with the newest event_timestamp, so
        stamping with the (possibly older) event time could lose the write to a batch snapshot taken after
        that event.
        """
        now = datetime.now(timezone.utc)
        stamps = [max(_aware(last), now) for last in last_event]
        rows = [
            (
                EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=int(user))]),
                {
                    "recent_items": Value(int64_list_val=Int64List(val=r)),
                    "seen_items": Value(int64_list_val=Int64List(val=s)),
                },
                stamp,
                now,
            )
            for user, r, s, stamp in zip(users, recent, seen, stamps)
        ]
        self.provider.online_write_batch(self.store.config, self.view(), rows, progress=None)
        return {
            "user_id": users,
            "recent_items": recent,
            "seen_items": seen,
            "event_timestamp": stamps,
            "created": [now] * len(users),
        }


def _aware(stamp) -> datetime:
    """A log timestamp as an aware UTC datetime (SQLite hands them back naive, in UTC)."""
    stamp = pd.Timestamp(stamp).to_pydatetime()
    return stamp.replace(tzinfo=timezone.utc) if stamp.tzinfo is None else stamp.astimezone(timezone.utc)


_WRITERS: weakref.WeakKeyDictionary[FeatureStore, SequenceWriter] = weakref.WeakKeyDictionary()


def _writer(store: FeatureStore) -> SequenceWriter:
    """One writer per store, so that its provider connection and feature view are kept between batches."""
    if store not in _WRITERS:
        _WRITERS[store] = SequenceWriter(store)
    return _WRITERS[store]


def push_events(
    events: pd.DataFrame,
    store: FeatureStore,
    event_log: EventLog,
    recent_n: int,
    source: str = "push",
    first_row_number: int = 1,
) -> PushResult:
    """Validate, append and write a batch of events (canonical columns; see ``predictor.data.schema``).

    ``source`` and ``first_row_number`` only make error messages point at the right file and row.
    """
    with_ids = "event_id" in events.columns
    batch, _ = validate_events(events, source, first_row_number, drop_duplicates=False, event_ids=with_ids)
    if batch.empty:
        raise ValueError(f"{source}: the batch holds no events")
    return apply_events(batch, store, event_log, recent_n)


def apply_events(batch: pd.DataFrame, store: FeatureStore, event_log: EventLog, recent_n: int) -> PushResult:
    """Append already validated events (``validate_events`` or ``validate_event_rows`` output) and write
    their users' sequences online, in one transaction."""
    if batch.empty:
        raise ValueError("the batch holds no events")
    user_ids = sorted(set(batch["user_id"].tolist()))
    with event_log.begin() as conn:
        event_log.lock_users(conn, user_ids)
        new = event_log.append(conn, batch)
        written = _writer(store).write(*event_log.sequences(conn, user_ids, recent_n))
    log.info("applied %d events (%d new) for %d users", len(batch), new, len(user_ids))
    return PushResult(events=len(batch), new=new, users=len(user_ids), written=written)


def rewrite_sequences(store: FeatureStore, event_log: EventLog, recent_n: int, chunk: int = 5_000) -> int:
    """Write every user's sequence from the event log again (chunks of ``chunk`` users); returns the users.

    After a full materialization, which restores the batch snapshot: events appended since that snapshot
    are in the log but in no offline table, and only this brings them back online.
    """
    if not sa.inspect(event_log.engine).has_table("events"):
        return 0
    with event_log.engine.connect() as conn:
        users = [row[0] for row in conn.execute(sa.select(events_table.c.user_id).distinct())]
    writer = _writer(store)
    for at in range(0, len(users), chunk):
        with event_log.begin() as conn:
            sequences = event_log.sequences(conn, users[at : at + chunk], recent_n)
        writer.write(*sequences)
    return len(users)


def push_events_with_settings(
    events: pd.DataFrame, settings: Settings, source: str = "push", first_row_number: int = 1
) -> PushResult:
    from predictor.features.store import open_store

    store = open_store(settings)
    event_log = EventLog(settings.database_url)
    try:
        return push_events(events, store, event_log, settings.recent_items, source, first_row_number)
    finally:
        event_log.engine.dispose()
