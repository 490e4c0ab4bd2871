"""The batch feature job: event log → feature tables → offline store."""

from __future__ import annotations

from predictor.config import Settings
from predictor.data.eventlog import EventLog
from predictor.features.batch import compute_features, daily_snapshots
from predictor.features.offline import write_offline


def build_features(
    settings: Settings, snapshot_every: str | None = None, progress: bool = False
) -> dict[str, int]:
    """Compute features from the whole event log and replace the offline tables with them.

    Without ``snapshot_every`` there is one snapshot, at the last event; with it (e.g. ``"1D"``) there
    is one per period as well, the history a point-in-time training join needs.
    """
    event_log = EventLog(settings.database_url)
    try:
        data = event_log.read()
    finally:
        event_log.engine.dispose()
    snapshots = daily_snapshots(data, snapshot_every) if snapshot_every else None
    tables = compute_features(data, snapshots, settings.recent_items, progress=progress)
    return write_offline(tables, settings)
