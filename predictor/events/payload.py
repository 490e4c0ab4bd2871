"""Event batches on the wire: the JSON body of ``POST /v1/events``, and the stream message that carries it.

A request body is a JSON array of events in the canonical schema (``predictor.data.schema``)::

    [{"user_id": 7, "item_id": 42, "event_type": "click", "timestamp": "2026-12-02T10:00:00Z",
      "event_id": "web-7-1733133600"}]

Only ``user_id`` and ``item_id`` are required. ``timestamp`` defaults to when the service received the
event (ISO 8601, or epoch seconds); ``event_type`` to ``view``; ``weight`` to the type's default weight;
``rating`` to none. ``event_id`` is the client's idempotency key: an event whose id is already in the
log is not applied again, so a retried request is harmless. Events without one get a fresh id here,
which keeps the stream's own redeliveries idempotent (a client retry of such an event is not).

Validation follows the file loader's rules (``validate_event_rows``), rows counted from 0: the array index.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from predictor.data.schema import (
    DEFAULT_EVENT_WEIGHTS,
    EVENT_COLUMNS,
    DataValidationError,
    validate_event_rows,
)

SOURCE = "request"
FIELDS = frozenset((*EVENT_COLUMNS, "event_id"))
MESSAGE_COLUMNS = ("event_id", "user_id", "item_id", "timestamp", "event_type", "weight", "rating")
MAX_EVENTS_PER_REQUEST = 10_000


@dataclass
class EventBatch:
    """Validated events (canonical columns plus ``event_id``) and when the service received them."""

    events: pd.DataFrame  # sorted by timestamp, as validation leaves them
    received_at: float  # epoch seconds
    event_ids: list[str] = field(default_factory=list)  # in the order of the request

    def __len__(self) -> int:
        return len(self.events)


class TooManyEventsError(DataValidationError):
    """A request over ``MAX_EVENTS_PER_REQUEST`` events (HTTP 413)."""


def parse_request(body: bytes, received_at: float | None = None) -> EventBatch:
    """Validate a request body; raises :class:`DataValidationError` naming the row and field."""
    received_at = time.time() if received_at is None else received_at
    try:
        rows = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(SOURCE, None, None, f"the body is not JSON: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise DataValidationError(SOURCE, None, None, "expected a non-empty JSON array of events")
    if len(rows) > MAX_EVENTS_PER_REQUEST:
        raise TooManyEventsError(
            SOURCE, None, None, f"{len(rows)} events; at most {MAX_EVENTS_PER_REQUEST} per request"
        )
    now = pd.Timestamp(received_at, unit="s", tz="UTC")
    filled = []
    for row_number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataValidationError(SOURCE, row_number, None, f"expected a JSON object, got {row!r}")
        unknown = sorted(set(row) - FIELDS)
        if unknown:
            raise DataValidationError(
                SOURCE, row_number, unknown[0], f"unknown field (known: {', '.join(sorted(FIELDS))})"
            )
        for required in ("user_id", "item_id"):
            if row.get(required) is None:
                raise DataValidationError(SOURCE, row_number, required, "missing required field")
        event_type = row.get("event_type", "view")
        filled.append(
            {
                "user_id": row["user_id"],
                "item_id": row["item_id"],
                "timestamp": now if row.get("timestamp") is None else row["timestamp"],
                "event_type": event_type,
                "weight": row["weight"] if row.get("weight") is not None else _default_weight(event_type),
                "rating": row.get("rating"),
                "event_id": row["event_id"] if "event_id" in row else uuid.uuid4().hex,
            }
        )
    events = validate_event_rows(filled, SOURCE, first_row_number=0)
    return EventBatch(events, received_at, [row["event_id"] for row in filled])


def _default_weight(event_type) -> float:
    return DEFAULT_EVENT_WEIGHTS.get(event_type, 1.0) if isinstance(event_type, str) else 1.0


# --- the stream message ---------------------------------------------------------------------------
def encode_message(batch: EventBatch) -> bytes:
    """Column-wise JSON; timestamps as integer nanoseconds, so they survive the trip exactly."""
    ev = batch.events
    rating = ev["rating"].astype(float)
    return json.dumps(
        {
            "received_at": batch.received_at,
            "event_id": ev["event_id"].tolist(),
            "user_id": ev["user_id"].astype("int64").tolist(),
            "item_id": ev["item_id"].astype("int64").tolist(),
            "timestamp": ev["timestamp"].astype("int64").tolist(),
            "event_type": ev["event_type"].tolist(),
            "weight": ev["weight"].astype(float).tolist(),
            "rating": [None if np.isnan(r) else r for r in rating],
        },
        separators=(",", ":"),
    ).encode()


def decode_message(data: bytes, source: str = "stream message") -> EventBatch:
    """The events of a stream message, validated again: a producer may publish to the subject directly."""
    try:
        body = json.loads(data)
        received_at = float(body.pop("received_at"))
        columns = [body[name] for name in MESSAGE_COLUMNS]
        columns[MESSAGE_COLUMNS.index("timestamp")] = [
            pd.Timestamp(int(ns), unit="ns", tz="UTC") for ns in body["timestamp"]
        ]
        rows = [dict(zip(MESSAGE_COLUMNS, values)) for values in zip(*columns, strict=True)]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataValidationError(source, None, None, f"not an event batch message: {exc!r}") from None
    events = validate_event_rows(rows, source, first_row_number=0)
    return EventBatch(events, received_at, events["event_id"].tolist())


def message_id(batch: EventBatch) -> str:
    """JetStream's de-duplication key (``Nats-Msg-Id``): the same events published twice count once."""
    return uuid.uuid5(uuid.NAMESPACE_OID, "\n".join(sorted(batch.events["event_id"]))).hex
