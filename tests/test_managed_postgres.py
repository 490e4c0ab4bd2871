"""PostgreSQL over TLS, against a server the test starts on loopback (initdb, ssl=on, a CA made here, plain
connections refused): the event log, Feast's SQL registry and its offline store all connect with
``sslmode=verify-full`` and the CA, as a managed PostgreSQL demands."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import redis

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.features.pipeline import build_features
from predictor.features.store import apply, materialize, online_user_features
from predictor.serving.process import free_port
from tests.conftest import REDIS_DB, make_tls_files

# PostgreSQL's server binaries are on every machine of the project, CI included: missing ones are a failure
INITDB, PG_CTL = shutil.which("initdb") or "initdb", shutil.which("pg_ctl") or "pg_ctl"
pytestmark = pytest.mark.integration


def as_postgres(*command) -> list[str]:
    """PostgreSQL refuses to run as root: run as the postgres user when the tests are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *map(str, command)]
    return [str(c) for c in command]


@pytest.fixture(scope="module")
def tls_postgres():
    # not under pytest's tmp dir: that one is private to the test user, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="recsys-pg-tls-"))
    data = root / "data"
    tls = make_tls_files(root)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    subprocess.run(
        as_postgres(INITDB, "-D", data, "-U", "postgres", "--auth=trust"), check=True, capture_output=True
    )
    for name in ("cert", "key"):
        shutil.copy(tls[name], data / f"server-{name}.pem")
        os.chmod(data / f"server-{name}.pem", 0o600)
        if os.geteuid() == 0:
            shutil.chown(data / f"server-{name}.pem", "postgres")
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
            "ssl = on\nssl_cert_file = 'server-cert.pem'\nssl_key_file = 'server-key.pem'\n"
        )
    (data / "pg_hba.conf").write_text(
        "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n"
    )
    subprocess.run(
        as_postgres(PG_CTL, "-D", data, "-l", root / "server.log", "-w", "start"),
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full "
            f"sslrootcert={tls['ca']}",
            autocommit=True,
        ) as conn:
            conn.execute("CREATE DATABASE recsys")
        yield port, tls["ca"]
    finally:
        subprocess.run(
            as_postgres(PG_CTL, "-D", data, "-m", "fast", "stop"),
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_event_log_registry_and_offline_store_over_verified_tls(tls_postgres, tmp_path, small_data):
    port, ca = tls_postgres
    with pytest.raises(psycopg.OperationalError, match="no encryption|reject"):
        psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=recsys sslmode=disable").close()
    settings = Settings(
        profile=Profile.production,
        home=tmp_path / "home",
        pg_port=port,
        pg_sslmode="verify-full",
        pg_sslrootcert=ca,
        feast_project=f"tls{uuid.uuid4().hex[:10]}",
        redis_db=REDIS_DB,
        recent_items=10,
    )
    log = EventLog(settings.database_url)
    log.replace(small_data)
    assert log.count() == len(small_data.events)
    log.engine.dispose()
    build_features(settings)  # the offline tables, written over TLS
    store = apply(settings)  # Feast's SQL registry over TLS
    materialize(settings, datetime.now(timezone.utc), store=store)  # Feast's offline store reads over TLS
    user = int(small_data.events["user_id"].iloc[0])
    assert online_user_features(store, [user])["events_total"].iloc[0] > 0
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname=recsys sslmode=verify-full sslrootcert={ca}"
    ) as conn:
        ssl_rows = conn.execute("SELECT count(*) FROM pg_stat_ssl WHERE ssl").fetchone()[0]
    assert ssl_rows >= 1
    client = redis.Redis(db=REDIS_DB)
    client.delete(*[k for k in client.scan_iter(count=10_000) if settings.feast_project.encode() in k])
