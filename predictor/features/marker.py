"""What materialization loaded, kept in the online store itself: a store that lost its data loses it too.

The registry remembers every materialization interval, so after a Redis restart without persistence
``materialize-incremental`` believes the rows are loaded and writes nothing. ``recsys features
materialize`` writes one marker per feature view next to the rows (a Redis hash
``recsys:materialized:<project>``, or a table in the SQLite online store); a view the registry says was
materialized but that has no marker is *lost*: the predictor reports it and the next materialization
reloads the full range.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime

from feast import FeatureStore

from predictor.config import Settings

REDIS_KEY = "recsys:materialized:{project}"
SQLITE_TABLE = "recsys_materialized"


class MaterializationMarker:
    """Read and write the markers of one Feast project's online store (Redis or SQLite)."""

    def __init__(self, store: FeatureStore, settings: Settings, timeout: float = 2.0):
        self.store, self.project = store, store.project
        kind = store.config.online_store.type
        if kind == "redis":
            from predictor.features.redis_reader import redis_client

            self.redis = redis_client(settings, timeout=timeout)
            self.key = REDIS_KEY.format(project=self.project)
        elif kind == "sqlite":
            self.redis = None
            self.path = store.config.online_store.path
        else:
            raise ValueError(f"no materialization marker for online store type {kind!r}")

    def write(self, views: Iterable[str], until: datetime) -> None:
        stamps = {view: until.isoformat() for view in views}
        if self.redis is not None:
            self.redis.hset(self.key, mapping=stamps)
            return
        with sqlite3.connect(self.path) as db:
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {SQLITE_TABLE} (project TEXT, view TEXT, until TEXT, "
                "PRIMARY KEY (project, view))"
            )
            db.executemany(
                f"INSERT OR REPLACE INTO {SQLITE_TABLE} VALUES (?, ?, ?)",
                [(self.project, v, t) for v, t in stamps.items()],
            )

    def read(self) -> dict[str, str]:
        """Feature view → the end of the last materialization that wrote it."""
        if self.redis is not None:
            return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}
        try:
            with sqlite3.connect(self.path) as db:
                rows = db.execute(
                    f"SELECT view, until FROM {SQLITE_TABLE} WHERE project = ?", (self.project,)
                )
                return dict(rows.fetchall())
        except sqlite3.OperationalError:  # no table: nothing was marked
            return {}

    def lost_views(self, allow_cache: bool = False) -> list[str]:
        """Online feature views the registry says were materialized whose marker is gone."""
        marked = self.read()
        materialized = [
            fv.name
            for fv in self.store.list_feature_views(allow_cache=allow_cache)
            if fv.online and fv.materialization_intervals
        ]
        return sorted(view for view in materialized if view not in marked)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
