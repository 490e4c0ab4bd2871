"""Prometheus metrics of the events service and its consumers (each runs in its own process)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

ACCEPTED = Counter("recsys_events_accepted", "Events accepted by POST /v1/events.")
REJECTED = Counter("recsys_events_rejected", "Events in requests rejected with a 4xx.", ["reason"])
APPLIED = Counter("recsys_events_applied", "Events appended to the event log and pushed online (new ones).")
DUPLICATES = Counter("recsys_events_duplicate", "Events skipped because their event_id was in the log.")
DEAD_LETTERED = Counter("recsys_events_dead_lettered", "Stream messages moved to the dead-letter stream.")
APPLY_FAILURES = Counter("recsys_events_apply_failures", "Batches left for redelivery after a store failure.")
CONSUMER_LAG = Gauge("recsys_events_consumer_lag", "Stream messages not yet acknowledged by the consumer.")
ONLINE_LATENCY = Histogram(
    "recsys_events_online_latency_seconds",
    "From the service receiving an event to its user's sequence in the online store.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60),
)


def count_applied(events: int, new: int, received_at: list[float]) -> None:
    """An applied batch: new events, skipped duplicates, and receipt-to-online latency per request."""
    APPLIED.inc(new)
    DUPLICATES.inc(events - new)
    now = time.time()
    for at in received_at:
        ONLINE_LATENCY.observe(max(0.0, now - at))


REQUEST_SECONDS = Histogram(
    "recsys_events_request_seconds",
    "POST /v1/events handling time.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5),
)
