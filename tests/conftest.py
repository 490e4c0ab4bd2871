"""Shared fixtures. Integration tests use the real PostgreSQL and Redis on 127.0.0.1.

Each test session gets its own PostgreSQL database and each test its own Feast project name, so runs
never see each other's rows; Redis keys are prefixed by the Feast project and deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

import pandas as pd
import psycopg
import pytest
import redis

from predictor.config import Profile, Settings
from predictor.data.schema import Interactions

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_DB = 3


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """Settings and Feast read RECSYS_* and FEAST_* variables: keep each test's own."""
    for key in list(os.environ):
        if key.startswith(("RECSYS_", "FEAST_FS_YAML")) and key != "RECSYS_DATA_DIR":
            monkeypatch.delenv(key)


@contextlib.contextmanager
def fresh_database():
    """A new, empty PostgreSQL database (its name), dropped on exit."""
    name = f"recsys_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with fresh_database() as name:
        yield name


@pytest.fixture
def production_settings(tmp_path, pg_database) -> Settings:
    project = f"t{uuid.uuid4().hex[:12]}"
    settings = Settings(
        profile=Profile.production,
        home=tmp_path / "home",
        pg_database=pg_database,
        feast_project=project,
        redis_db=REDIS_DB,
        recent_items=10,
    )
    yield settings
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=REDIS_DB)
    keys = [k for k in client.scan_iter(count=10_000) if project.encode() in k]
    if keys:
        client.delete(*keys)


@pytest.fixture
def embedded_settings(tmp_path) -> Settings:
    """Embedded profile with PostgreSQL and Redis settings pointing at a port nothing listens on."""
    return Settings(
        profile=Profile.embedded,
        home=tmp_path / "home",
        pg_port=1,
        redis_port=1,
        recent_items=10,
    )


@pytest.fixture(scope="session")
def small_data() -> Interactions:
    from predictor.data.synthetic import generate

    return generate(n_events=3_000, n_users=120, n_items=150, n_categories=6, seed=7)


def shared_dataset(name: str) -> Path:
    from predictor.data.loaders import default_data_dir

    path = default_data_dir() / name
    if not path.is_dir():
        pytest.skip(f"MovieLens {name} is not at {path} (the team's machines and CI have it there)")
    return path


def events_frame(rows: list[tuple]) -> pd.DataFrame:
    """Events from (user, item, 'YYYY-MM-DD HH:MM', event_type, rating) tuples."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": pd.to_datetime([r[2] for r in rows], utc=True),
            "event_type": [r[3] if len(r) > 3 else "view" for r in rows],
            "rating": [r[4] if len(r) > 4 else None for r in rows],
        }
    )


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    paths = {k: directory / f"{k}.pem" for k in ("ca", "ca_key", "cert", "key")}

    def run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True)

    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=recsys-test-ca",
        "-keyout",
        paths["ca_key"],
        "-out",
        paths["ca"],
    )
    csr = directory / "server.csr"
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        paths["key"],
        "-out",
        csr,
    )
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        paths["ca"],
        "-CAkey",
        paths["ca_key"],
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        paths["cert"],
    )
    return paths
