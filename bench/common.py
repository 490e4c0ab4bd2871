"""Set-up and reporting that several benchmarks share: fresh stores, a log with its features, doc tables."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import redis

from predictor.config import Settings
from predictor.data.eventlog import EventLog
from predictor.data.schema import Interactions
from predictor.features.pipeline import build_features
from predictor.features.store import apply, materialize


def fresh_database(name: str, redis_db: int | None = None) -> None:
    """Drop and create PostgreSQL database ``name`` (and empty Redis database ``redis_db``)."""
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    if redis_db is not None:
        redis.Redis(db=redis_db).flushdb()


def log_with_features(settings: Settings, data: Interactions, snapshot_every: str = "14D") -> None:
    """``data`` as the event log, its features built (history snapshots) and materialized online."""
    log = EventLog(settings.database_url)
    log.replace(data)
    log.engine.dispose()
    build_features(settings, snapshot_every=snapshot_every)
    materialize(settings, store=apply(settings))


def write_between_markers(path: Path, name: str, block: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended when absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    section = f"{start}\n{block}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + f"\n\n{section}\n"
    path.write_text(text)
