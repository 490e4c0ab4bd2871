"""Real-time events: append to the event log, then push each affected user's new last-N sequence and
full distinct seen set (``recent_items`` and ``seen_items`` of ``user_recent_items``).

The batch is all-or-nothing in the log: it is validated (schema, known items), inserted and the new
sequences are read back inside one transaction; the transaction commits only after Feast accepted the
push, so a failed push leaves the log as it was. One Feast push call per batch, not per user.

Events with an ``event_id`` are idempotent: ids already in the log are skipped, and the users' sequences
are pushed again all the same, so a batch redelivered after its commit but before its acknowledgement
still leaves the online store equal to the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
from feast import FeatureStore
from feast.data_source import PushMode

from predictor.config import Settings
from predictor.data.eventlog import EventLog
from predictor.data.schema import validate_events

log = logging.getLogger(__name__)

PUSH_SOURCE = "user_recent_items_push"


@dataclass
class PushResult:
    events: int  # in the batch
    new: int  # appended to the log (fewer when some event_ids were already there)
    users: int
    sequences: pd.DataFrame  # user_id, recent_items, seen_items, event_timestamp, created: what was pushed


def push_events(
    events: pd.DataFrame,
    store: FeatureStore,
    event_log: EventLog,
    recent_n: int,
    source: str = "push",
    first_row_number: int = 1,
) -> PushResult:
    """Validate, append and push a batch of events (canonical columns; see ``predictor.data.schema``).

    ``source`` and ``first_row_number`` only make error messages point at the right file and row.
    """
    with_ids = "event_id" in events.columns
    batch, _ = validate_events(events, source, first_row_number, drop_duplicates=False, event_ids=with_ids)
    if batch.empty:
        raise ValueError(f"{source}: the batch holds no events")
    user_ids = [int(u) for u in batch["user_id"].unique()]
    with event_log.begin() as conn:
        event_log.lock_users(conn, user_ids)
        new = event_log.append(conn, batch)
        sequences = event_log.recent_items(conn, user_ids, recent_n)
        now = pd.Timestamp.now(tz="UTC")
        pushed = pd.DataFrame(
            {
                "user_id": sequences["user_id"].astype("int64"),
                "recent_items": sequences["recent_items"],
                "seen_items": sequences["seen_items"],
                # Valid from when we learned it. Online stores keep the row with the newest
                # event_timestamp, so stamping with the (possibly older) event time could lose the
                # push to a batch snapshot taken after that event.
                "event_timestamp": pd.to_datetime(sequences["last_event"], utc=True).clip(lower=now),
                "created": now,
            }
        )
        store.push(PUSH_SOURCE, pushed, to=PushMode.ONLINE)
    log.info("pushed %d events (%d new) for %d users", len(batch), new, len(user_ids))
    return PushResult(events=len(batch), new=new, users=len(user_ids), sequences=pushed)


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
