"""Managed Redis, against real servers the tests start on loopback: a password (AUTH), TLS with a CA made
here, a three-node Redis Cluster, and Sentinel. On each, Feast materializes, our raw readers (blocking and
async) must return exactly what ``get_online_features`` returns, and the events path writes what Feast
reads."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.features.marker import MaterializationMarker
from predictor.features.pipeline import build_features
from predictor.features.realtime import push_events
from predictor.features.redis_reader import AsyncRawRedisReader, RawRedisReader, redis_client
from predictor.features.schema import ITEM_FEATURES, USER_FEATURES
from predictor.features.store import (
    apply,
    materialize,
    online_item_features,
    online_user_features,
)
from predictor.serving.process import free_port
from tests.conftest import events_frame, make_tls_files

pytestmark = pytest.mark.integration  # redis-server (built with TLS) is on every machine, CI included

PASSWORD = "s3cret-pass"


def _wait(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.1)


def cluster_ok(info) -> bool:
    """CLUSTER INFO as redis-py hands it back (a dict, or the raw text)."""
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    return b"cluster_state:ok" in info


class RedisServers:
    """redis-server processes in a scratch directory, all stopped on close."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []

    def start(self, name: str, *args: str) -> int:
        port = free_port()
        while "--cluster-enabled" in args and port > 55_535:  # the cluster bus listens on port + 10000
            port = free_port()
        workdir = self.root / name
        workdir.mkdir(parents=True, exist_ok=True)
        if "--tls-port" in args:  # the TLS port replaces the plain one
            args = tuple(str(port) if a == "{port}" else a for a in args)
            command = ["redis-server", "--port", "0", *args]
        else:
            command = ["redis-server", "--port", str(port), *args]
        command += ["--save", "", "--appendonly", "no", "--dir", str(workdir), "--bind", "127.0.0.1"]
        log = open(workdir / "redis.log", "w")  # noqa: SIM115 - open as long as the server; close() closes it
        self.procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        return port

    def close(self) -> None:
        for proc, log in self.procs:
            proc.terminate()
            proc.wait(10)
            log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """name → Settings fields for: auth, tls (with auth), cluster (3 masters), sentinel (1 master)."""
    root = tmp_path_factory.mktemp("redis-servers")
    procs = RedisServers(root)
    try:
        out: dict[str, dict] = {}
        port = procs.start("auth", "--requirepass", PASSWORD)
        _wait(lambda: redis.Redis(port=port, password=PASSWORD).ping(), "the AUTH server")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()  # the server really demands the password
        out["auth"] = {"redis_port": port, "redis_password": PASSWORD}

        tls = make_tls_files(root)
        port = procs.start(
            "tls",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            str(tls["cert"]),
            "--tls-key-file",
            str(tls["key"]),
            "--tls-ca-cert-file",
            str(tls["ca"]),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
        )
        _wait(
            lambda: redis.Redis(port=port, ssl=True, ssl_ca_certs=str(tls["ca"]), password=PASSWORD).ping(),
            "the TLS server",
        )
        out["tls"] = {
            "redis_port": port,
            "redis_tls": True,
            "redis_ca_file": tls["ca"],
            "redis_password": PASSWORD,
        }

        nodes = [
            procs.start(f"cluster-{i}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            for i in range(3)
        ]
        for p in nodes:
            _wait(lambda p=p: redis.Redis(port=p).ping(), f"cluster node {p}")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait(
            lambda: all(cluster_ok(redis.Redis(port=p).execute_command("CLUSTER INFO")) for p in nodes),
            "the cluster",
        )
        out["cluster"] = {
            "redis_type": "redis_cluster",
            "redis_nodes": ",".join(f"127.0.0.1:{p}" for p in nodes),
        }

        master = procs.start("sentinel-master")
        _wait(lambda: redis.Redis(port=master).ping(), "the Sentinel's master")
        conf = root / "sentinel.conf"
        sentinel_port = free_port()
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor recsys 127.0.0.1 {master} 1\n"
        )
        log = open(root / "sentinel.log", "w")  # noqa: SIM115 - closed with the servers
        procs.procs.append(
            (
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
        _wait(
            lambda: redis.Redis(port=sentinel_port).execute_command(
                "SENTINEL", "get-master-addr-by-name", "recsys"
            ),
            "the Sentinel",
        )
        out["sentinel"] = {
            "redis_type": "redis_sentinel",
            "redis_nodes": f"127.0.0.1:{sentinel_port}",
            "redis_sentinel_master": "recsys",
        }
        yield out
    finally:
        procs.close()


@pytest.mark.parametrize("kind", ["auth", "tls", "cluster", "sentinel"])
def test_raw_readers_return_what_feast_returns_on_managed_redis(
    kind, servers, tmp_path, pg_database, small_data
):
    settings = Settings(
        profile=Profile.production,
        home=tmp_path / "home",
        pg_database=pg_database,
        feast_project=f"m{uuid.uuid4().hex[:12]}",
        recent_items=10,
        **servers[kind],
    )
    log = EventLog(settings.database_url)
    log.replace(small_data)
    build_features(settings)
    store = apply(settings)
    materialize(settings, datetime.now(timezone.utc), store=store)
    assert MaterializationMarker(store, settings).lost_views() == []

    user = int(small_data.events["user_id"].iloc[-1])
    items = [int(i) for i in small_data.items["item_id"].iloc[:2]]
    now = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S.%f")
    push_events(
        events_frame([(user, items[0], now, "click"), (user, items[1], now, "view")]),
        store,
        log,
        settings.recent_items,
    )
    log.engine.dispose()

    rng = np.random.default_rng(0)
    users = sorted({user, *map(int, rng.choice(small_data.events["user_id"].unique(), 20, replace=False))})
    item_ids = [int(i) for i in rng.choice(small_data.items["item_id"], 20, replace=False)]
    want_users = online_user_features(store, users).set_index("user_id")
    want_items = online_item_features(store, item_ids).set_index("item_id")
    assert list(want_users.loc[user, "recent_items"][:2]) == items[::-1]  # the push is what Feast reads

    requests = [("user_id", users, USER_FEATURES), ("item_id", item_ids, ITEM_FEATURES)]
    reader = RawRedisReader(store, settings)
    blocking = reader.read(requests)
    reader.close()

    async def read_async():
        async_reader = AsyncRawRedisReader(store, settings, timeout=2.0)
        try:
            return await async_reader.read(requests)
        finally:
            await async_reader.close()

    for got in (blocking, asyncio.run(read_async())):
        for rows, ids, want in ((got[0], users, want_users), (got[1], item_ids, want_items)):
            assert len(rows) == len(ids)
            for entity, row in zip(ids, rows):
                for name, value in row.items():
                    expected = want.loc[entity, name]
                    if isinstance(expected, (list, np.ndarray)):
                        np.testing.assert_array_equal(
                            np.asarray(value), np.asarray(expected), err_msg=f"{entity} {name}"
                        )
                    else:
                        assert value == pytest.approx(expected), f"{entity} {name}"
    client = redis_client(settings)
    assert client.hgetall(f"recsys:materialized:{settings.feast_project}")  # the marker sits with the rows
    client.close()


def test_connection_string_is_what_feast_parses():
    """Settings build Feast's connection string; Feast's own parser reads back every field we set."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    settings = Settings(
        redis_type="redis_cluster",
        redis_nodes="10.0.0.1:7000, 10.0.0.2:7001",
        redis_username="app",
        redis_password="p@ss=word",
        redis_tls=True,
        redis_ca_file=Path("/etc/ca.pem"),
    )
    nodes, params = RedisOnlineStore._parse_connection_string(settings.redis_connection)
    assert nodes == [{"host": "10.0.0.1", "port": "7000"}, {"host": "10.0.0.2", "port": "7001"}]
    assert params == {"username": "app", "password": "p@ss=word", "ssl": True, "ssl_ca_certs": "/etc/ca.pem"}
    plain = RedisOnlineStore._parse_connection_string(Settings(redis_db=3).redis_connection)
    assert plain == ([{"host": "127.0.0.1", "port": "6379"}], {"db": 3})
    with pytest.raises(ValueError, match="must not contain ','"):
        Settings(redis_password="a,b")
