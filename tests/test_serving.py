"""The predictor as users meet it: a real KServe ModelServer (``recsys serve``) over HTTP, on the production
profile (PostgreSQL registry and offline store, Redis online store), with a trained tiny model."""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import redis
import torch

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.data.synthetic import generate
from predictor.features.offline import read_offline
from predictor.features.pipeline import build_features
from predictor.features.realtime import push_events_with_settings
from predictor.features.schema import USER_PROFILE
from predictor.features.store import apply, materialize
from predictor.models.config import TrainConfig, model_config
from predictor.models.lifecycle import MODEL_NAME, train_and_register
from predictor.models.recommender import TwoStageRecommender
from predictor.models.registry import ModelRegistry
from predictor.serving.process import ServerProcess
from tests.conftest import REDIS_DB, fresh_database

pytestmark = pytest.mark.integration

RECSYS = str(Path(sys.executable).parent / "recsys")
TINY = model_config("tiny")
FAST = TrainConfig(epochs=3, ranker_epochs=1, batch_size=32, patience=5, seed=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Event log, features (offline + materialized online), a trained and promoted tiny model, in a database
    of its own (modules that reuse this fixture must not see each other's registry versions)."""
    with fresh_database() as database:
        yield from _stack(tmp_path_factory, database)


def _stack(tmp_path_factory, pg_database):
    home = tmp_path_factory.mktemp("serving")
    settings = Settings(
        profile=Profile.production,
        home=home / "home",
        pg_database=pg_database,
        feast_project=f"s{uuid.uuid4().hex[:12]}",
        redis_db=REDIS_DB,
        recent_items=10,
    )
    data = generate(n_events=6_000, n_users=200, n_items=300, n_categories=6, seed=3)
    log = EventLog(settings.database_url)
    log.replace(data)
    log.engine.dispose()
    build_features(settings, snapshot_every="7D")
    store = apply(settings)
    materialize(settings, store=store)
    registry = ModelRegistry(settings.database_url)
    version, _ = train_and_register(
        data,
        registry,
        settings.artifacts_uri,
        TINY,
        FAST,
        read_offline(USER_PROFILE, settings),
        progress=False,
    )
    yield settings, data, registry, version
    registry.engine.dispose()
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=REDIS_DB)
    keys = [k for k in client.scan_iter(count=10_000) if settings.feast_project.encode() in k]
    if keys:
        client.delete(*keys)


class Server(ServerProcess):
    """``recsys serve`` in a subprocess (started on construction), with request helpers."""

    def __init__(self, settings: Settings, **env):
        super().__init__(settings, env={"RECSYS_SERVE_ITEM_REFRESH_SECONDS": "0", **env}, timeout=120)
        self.__enter__()

    def v1(self, instances, **kw) -> httpx.Response:
        return self.client.post("/v1/models/recsys:predict", json={"instances": instances}, **kw)

    def v2(self, body, **kw) -> httpx.Response:
        return self.client.post("/v2/models/recsys/infer", json=body, **kw)

    def metric(self, name: str, **labels) -> float:
        text = self.client.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + ("{" + want + "}" if want else " ")):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name}{{{want}}} not in /metrics")

    def metric_levels(self) -> set[str]:
        """The quality-ladder levels this server's model has (those with a cost gauge)."""
        text = self.client.get("/metrics").text
        return {
            line.split('level="')[1].split('"')[0]
            for line in text.splitlines()
            if line.startswith("recsys_level_cost_seconds{")
        }

    def stop(self) -> None:
        self.__exit__()


@pytest.fixture(scope="module")
def server(stack):
    srv = Server(stack[0])
    yield srv
    srv.stop()


def active_user(data, rank: int = 0) -> int:
    counts = data.events["user_id"].value_counts()
    return int(counts.index[rank])


def recent(settings: Settings, user_id: int) -> list[int]:
    log = EventLog(settings.database_url)
    try:
        with log.engine.connect() as conn:
            rows = log.recent_items(conn, [user_id], settings.recent_items)
    finally:
        log.engine.dispose()
    return list(rows["recent_items"].iloc[0])


def test_load_stages_are_exported_and_account_for_the_load(server):
    """``recsys_model_load_seconds`` carries each load stage of the serving model (what a scale-up waits
    for, read by bench/frontier.py); together they fit inside the replica's measured start-up."""
    stages = {
        s: server.metric("recsys_model_load_seconds", stage=s)
        for s in ("artifact", "item_features", "item_side", "self_check")
    }
    assert all(v >= 0 for v in stages.values()) and stages["artifact"] > 0 and stages["item_side"] > 0
    assert sum(stages.values()) < server.startup_seconds


def test_v1_round_trip(server, stack):
    settings, data, _, version = stack
    users = [active_user(data, 0), active_user(data, 1)]
    response = server.v1(
        [{"user_id": users[0], "k": 7}, {"user_id": users[1], "k": 3, "exclude_seen": False}]
    )
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    assert first["user_id"] == users[0] and len(first["item_ids"]) == 7 and len(second["item_ids"]) == 3
    assert first["model_version"] == str(version.version) and first["fallback"] is None
    assert len(set(first["item_ids"])) == 7
    assert first["scores"] == sorted(first["scores"], reverse=True)
    assert not set(first["item_ids"]) & set(recent(settings, users[0])), "seen items must be excluded"
    catalog = set(data.items["item_id"].tolist())
    assert set(first["item_ids"]) <= catalog


def test_http_top_k_equals_offline_top_k(server, stack):
    """Parity: what the running predictor answers over HTTP is what offline evaluation computes for the same
    model on the same features — the same ids in the same order, scores within 1e-4 (fp32). The users
    include ones whose history is longer than the online recent-items window, so exclusion must read
    their whole seen set."""
    from predictor.features.store import open_store
    from predictor.models.data import build_split, item_dense_matrix, user_dense_rows
    from predictor.models.inference import batch_from_split
    from predictor.serving.online import FeastOnlineFeatures

    settings, _, registry, _ = stack
    production = registry.production(MODEL_NAME)
    log = EventLog(settings.database_url)
    data = log.read()
    log.engine.dispose()
    counts = data.events["user_id"].value_counts()
    users = [int(u) for u in counts.index[:6]] + [int(u) for u in counts.index[40:46]]
    assert counts.iloc[0] > 2 * settings.recent_items
    response = server.v1([{"user_id": u, "k": 10} for u in users])
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert all(p["fallback"] is None for p in served)

    model = TwoStageRecommender.load(production.artifact_uri, "cpu")
    split = build_split(data, model.catalog.users, model.catalog.items)
    reader = FeastOnlineFeatures(open_store(settings))
    online = asyncio.run(reader.users(users))
    # the predictor reads the materialized item features at start-up: the same ones here
    item_rows = reader.items_sync(model.catalog.items.ids)
    present = item_rows.notna().any(axis=1).to_numpy()
    rows = torch.from_numpy(model.catalog.items.index(model.catalog.items.ids[present]))
    model.item_dense[rows] = torch.from_numpy(item_dense_matrix(item_rows[present].reset_index(drop=True)))
    dense = user_dense_rows([u.values for u in online], split.n_categories) * model.uses_user_features
    index = split.users.index(np.array(users))
    batch = batch_from_split(split, index, split.lengths[index], model.config.max_history, dense)
    top, scores = model.inference().recommend(batch, 10)
    for row, pred in enumerate(served):
        assert pred["item_ids"] == split.items.raw(top[row]).tolist(), pred["user_id"]
        np.testing.assert_allclose(pred["scores"], scores[row], atol=1e-4)
        seen = set(data.events.loc[data.events["user_id"] == pred["user_id"], "item_id"])
        assert not set(pred["item_ids"]) & seen


def test_v2_round_trip_without_id(server, stack):
    _, data, _, version = stack
    users = [active_user(data, 2), active_user(data, 3)]
    body = {
        "inputs": [
            {"name": "user_id", "shape": [2], "datatype": "INT64", "data": users},
            {"name": "k", "shape": [1], "datatype": "INT32", "data": [5]},
        ]
    }
    response = server.v2(body)
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}
    assert response.json()["model_version"] == str(version.version)
    assert out["item_ids"]["shape"] == [2, 5] and out["scores"]["shape"] == [2, 5]
    assert out["fallback"]["data"] == ["", ""]
    # the same users over V1 get the same answer
    v1 = server.v1([{"user_id": u, "k": 5} for u in users]).json()["predictions"]
    assert out["item_ids"]["data"] == v1[0]["item_ids"] + v1[1]["item_ids"]


V1_BAD = [
    ({"instances": [{"k": 5}]}, "instances[0].user_id is missing"),
    ({"instances": [{"user_id": "42"}]}, "instances[0].user_id must be an integer"),
    ({"instances": [{"user_id": 4.5}]}, "instances[0].user_id must be an integer"),
    ({"instances": [{"user_id": True}]}, "instances[0].user_id must be an integer"),
    ({"instances": [{"user_id": 1, "k": 0}]}, "instances[0].k must be between 1 and 100"),
    ({"instances": [{"user_id": 1, "k": 101}]}, "instances[0].k must be between 1 and 100"),
    ({"instances": [{"user_id": 1, "exclude_seen": "yes"}]}, "instances[0].exclude_seen"),
    ({"instances": [{"user_id": i} for i in range(65)]}, "at most 64 users per request"),
    ({"instances": []}, "instances is empty"),
    ({"instances": {"user_id": 1}}, "'instances' must be a list"),
    ({"users": [1]}, "'instances' is missing"),
    ({"instances": [{"user_id": 1, "kk": 3}]}, "unknown field(s) ['kk']"),
]


@pytest.mark.parametrize(("body", "message"), V1_BAD)
def test_v1_bad_input_is_400_naming_the_field(server, body, message):
    response = server.client.post("/v1/models/recsys:predict", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def user_input(data, datatype="INT64", shape=None):
    return {"name": "user_id", "shape": shape or [len(data)], "datatype": datatype, "data": data}


V2_BAD = [
    ({"inputs": [user_input([1.5], "FP32")]}, "input 'user_id' has datatype FP32"),
    ({"inputs": [user_input([1, 2], shape=[3])]}, "input 'user_id'"),
    (
        {"inputs": [{"name": "k", "shape": [1], "datatype": "INT32", "data": [3]}]},
        "input 'user_id' is missing",
    ),
    (
        {"inputs": [user_input([1]), {"name": "k", "shape": [1], "datatype": "INT32", "data": [0]}]},
        "input 'k'",
    ),
    (
        {"inputs": [user_input([1]), {"name": "k", "shape": [1], "datatype": "FP32", "data": [3.0]}]},
        "input 'k' has datatype FP32",
    ),
    (
        {
            "inputs": [
                user_input([1]),
                {"name": "exclude_seen", "shape": [1], "datatype": "INT32", "data": [1]},
            ]
        },
        "input 'exclude_seen' has datatype INT32",
    ),
    ({"inputs": [{"name": "user_id", "shape": [1]}]}, "datatype"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": [user_input(list(range(65)))]}, "at most 64 users"),
]


@pytest.mark.parametrize(("body", "message"), V2_BAD)
def test_v2_bad_input_is_400_naming_the_field(server, body, message):
    response = server.v2(body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_malformed_json_and_oversized_body(server):
    for path in ("/v1/models/recsys:predict", "/v2/models/recsys/infer"):
        response = server.client.post(
            path, content=b'{"instances": [', headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
    # no content-type: V1 still parses the JSON
    ok = server.client.post("/v1/models/recsys:predict", content=b'{"instances": [{"user_id": 1}]}')
    assert ok.status_code == 200, ok.text
    huge = b'{"instances": [' + b'{"user_id": 1},' * 30_000 + b'{"user_id": 1}]}'
    assert server.client.post("/v1/models/recsys:predict", content=huge).status_code == 413


def test_unknown_user_gets_flagged_popularity_fallback(server, stack):
    _, data, _, _ = stack
    before = server.metric("recsys_fallbacks_total", reason="cold_start")
    response = server.v1([{"user_id": 987_654_321, "k": 5}])
    assert response.status_code == 200
    (pred,) = response.json()["predictions"]
    assert pred["fallback"] == "cold_start"
    assert len(pred["item_ids"]) == 5 and pred["scores"] == sorted(pred["scores"], reverse=True)
    assert set(pred["item_ids"]) <= set(
        data.events["item_id"].value_counts().index[:10]
    )  # training popularity
    assert server.metric("recsys_fallbacks_total", reason="cold_start") == before + 1


def test_pushed_event_changes_next_recommendations(server, stack):
    settings, data, _, _ = stack
    user = active_user(data, 5)
    before = server.v1([{"user_id": user, "k": 10}]).json()["predictions"][0]
    # the user suddenly watches a run of items they never saw, all from one category
    items = data.items
    seen = set(data.events.loc[data.events["user_id"] == user, "item_id"])
    category = items["categories"].map(lambda c: c[0] if len(c) else -1)
    usual = category[items["item_id"].isin(seen)].mode().iloc[0]
    fresh = items.loc[(category != usual) & ~items["item_id"].isin(seen), "item_id"].head(8).tolist()
    now = pd.Timestamp.now(tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": [user] * len(fresh),
            "item_id": fresh,
            "timestamp": [now + pd.Timedelta(milliseconds=i) for i in range(len(fresh))],
        }
    )
    push_events_with_settings(events, settings)
    after = server.v1([{"user_id": user, "k": 10}]).json()["predictions"][0]
    assert after["fallback"] is None
    assert after["item_ids"] != before["item_ids"]
    assert not set(after["item_ids"]) & set(fresh), "just-pushed items are seen items now"


def timed_fallback(srv: Server, user: int) -> tuple[dict, float]:
    """One V1 request for ``user``: its prediction (a 200 with 5 items, or it fails) and its seconds."""
    started = time.perf_counter()
    response = srv.v1([{"user_id": user, "k": 5}])
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    (pred,) = response.json()["predictions"]
    assert len(pred["item_ids"]) == 5
    return pred, elapsed


def test_online_store_down_falls_back_without_5xx(stack):
    settings, data, _, _ = stack
    srv = Server(settings, RECSYS_REDIS_PORT=1, RECSYS_SERVE_FEATURE_TIMEOUT_MS=200)
    try:
        # the median of three requests: a loaded CI machine may stall one, a hang stalls all three
        answers = [timed_fallback(srv, active_user(data, 0)) for _ in range(3)]
        pred = answers[-1][0]
        assert {p["fallback"] for p, _ in answers} <= {"online_store_unavailable", "online_store_timeout"}
        assert statistics.median(elapsed for _, elapsed in answers) < 2.0  # a 200 ms deadline, not a hang
        assert srv.metric("recsys_fallbacks_total", reason=pred["fallback"]) >= 1
        assert srv.metric("recsys_errors_total", kind="online_store") >= 1
    finally:
        srv.stop()


def test_slow_online_store_falls_back_within_the_deadline(stack):
    """A Redis that accepts connections and never answers: the deadline fires, popularity answers."""
    settings, data, _, _ = stack
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    accepted = []
    stop = threading.Event()

    def swallow():  # accept and hold every connection, reply nothing
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    srv = Server(settings, RECSYS_REDIS_PORT=silent.getsockname()[1], RECSYS_SERVE_FEATURE_TIMEOUT_MS=50)
    try:
        answers = [timed_fallback(srv, active_user(data, 0)) for _ in range(3)]
        assert [p["fallback"] for p, _ in answers] == ["online_store_timeout"] * 3
        elapsed = statistics.median(elapsed for _, elapsed in answers)
        assert elapsed < 1.0, elapsed  # 50 ms deadline plus the fallback, not a hang
        assert srv.metric("recsys_fallbacks_total", reason="online_store_timeout") >= 1
    finally:
        srv.stop()
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        silent.close()


def test_hot_swap_under_load_with_zero_failures(stack, tmp_path):
    settings, data, registry, version = stack
    srv = Server(settings, RECSYS_SERVE_MODEL_POLL_SECONDS="0.3")
    failures, versions, stop = [], set(), threading.Event()
    users = [active_user(data, r) for r in range(8)]

    def hammer():
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            while not stop.is_set():
                r = client.post(
                    "/v1/models/recsys:predict", json={"instances": [{"user_id": u} for u in users[:3]]}
                )
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    versions.update(p["model_version"] for p in r.json()["predictions"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        # a new production version (the same weights re-registered is still a new version to load)
        new = registry.register(
            MODEL_NAME, version.artifact_uri, version.data_cutoff, version.metrics, version.id
        )
        registry.promote(new.id, registry.production(MODEL_NAME).id)
        deadline = time.monotonic() + 60
        while str(new.version) not in versions and time.monotonic() < deadline:
            time.sleep(0.2)
        assert str(new.version) in versions, srv.output()[-3000:]
        # a broken version: checksum mismatch; the server must keep serving the previous one
        broken = tmp_path / "broken"
        shutil.copytree(version.artifact_uri, broken)
        with open(broken / "retrieval.pt", "ab") as f:
            f.write(b"corrupt")
        bad = registry.register(MODEL_NAME, str(broken), version.data_cutoff, version.metrics, new.id)
        registry.promote(bad.id, new.id)
        deadline = time.monotonic() + 30
        while srv.metric("recsys_errors_total", kind="model_load") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.metric("recsys_errors_total", kind="model_load") >= 1
        time.sleep(0.5)
        versions.clear()
        time.sleep(0.5)
        assert versions == {str(new.version)}
    finally:
        stop.set()
        for t in threads:
            t.join()
        srv.stop()
        # leave a loadable production model for whatever runs next
        again = registry.register(
            MODEL_NAME, version.artifact_uri, version.data_cutoff, version.metrics, version.id
        )
        registry.promote(again.id, registry.production(MODEL_NAME).id)
    assert failures == []


def test_overload_degrades_level_by_level_without_5xx_and_recovers(stack):
    """One predictor, far past its capacity at full quality: responses name cheaper levels, none fails;
    once the load drops, lone requests climb back to full quality, one level per hold time."""
    _, data, _, _ = stack
    # a lone request takes a few ms; 64 concurrent ones queue far past 60 ms at full quality
    srv = Server(
        stack[0],
        RECSYS_SERVE_RANKER="on",
        RECSYS_SERVE_P99_TARGET_MS="60",
        RECSYS_SERVE_LADDER_HOLD_SECONDS="0.5",
        RECSYS_SERVE_MAX_BATCH="2",
    )
    users = [active_user(data, r) for r in range(40)]
    try:
        assert srv.v1([{"user_id": users[0]}]).json()["predictions"][0]["level"] == "full"
        before = {
            lv: srv.metric("recsys_served_level_total", level=lv)
            for lv in ("full", "reduced", "retrieval", "popularity")
        }

        async def burst(seconds: float, concurrency: int) -> list[tuple[int, str | None]]:
            out: list[tuple[int, str | None]] = []
            stop_at = time.monotonic() + seconds
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:

                async def worker(w: int) -> None:
                    i = w
                    while time.monotonic() < stop_at:
                        body = {"instances": [{"user_id": users[i % len(users)], "k": 20}]}
                        r = await client.post("/v1/models/recsys:predict", json=body)
                        out.append(
                            (
                                r.status_code,
                                r.json()["predictions"][0]["level"] if r.status_code == 200 else None,
                            )
                        )
                        i += concurrency

                await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return out

        answers = asyncio.run(burst(4.0, 64))
        statuses = {code for code, _ in answers}
        levels = [lv for _, lv in answers]
        assert statuses == {200}, statuses
        assert set(levels) - {"full"}, f"no degraded answer under overload: {set(levels)}"
        after = {lv: srv.metric("recsys_served_level_total", level=lv) for lv in before}
        assert sum(after[lv] - before[lv] for lv in ("reduced", "retrieval", "popularity")) > 0
        assert (
            srv.metric("recsys_level_cost_seconds", level="full")
            > srv.metric("recsys_level_cost_seconds", level="popularity")
            > 0
        )
        # load gone: lone requests; three levels up at 0.5 s each at most
        seen, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            r = srv.v1([{"user_id": users[0]}])
            assert r.status_code == 200
            seen.append(r.json()["predictions"][0]["level"])
            if seen[-1] == "full" and len(seen) > 1:
                break
            time.sleep(0.05)
        costs = {lv: srv.metric("recsys_level_cost_seconds", level=lv) for lv in before}
        assert seen[-1] == "full", (seen, costs)
        assert len(set(seen)) > 1  # it climbed back from a degraded level
        v2 = srv.v2({"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [users[0]]}]})
        assert {o["name"]: o for o in v2.json()["outputs"]}["level"]["data"][0] in srv.metric_levels()
    finally:
        srv.stop()


def test_async_redis_reads_equal_get_online_features(stack):
    from predictor.features.store import open_store
    from predictor.serving.online import FeastOnlineFeatures, RedisOnlineFeatures

    settings, data, _, _ = stack
    store = open_store(settings)
    users = [active_user(data, r) for r in range(5)] + [987_654_321]

    async def both():
        fast = RedisOnlineFeatures(store, settings, timeout=1.0)
        try:
            return await fast.users(users), await FeastOnlineFeatures(store).users(users)
        finally:
            await fast.close()

    fast, feast_rows = asyncio.run(both())
    for a, b in zip(fast, feast_rows):
        assert a.user_id == b.user_id and a.found == b.found
        np.testing.assert_array_equal(a.history, b.history)
        assert a.values.keys() == b.values.keys()
        for name in a.values:
            x, y = a.values[name], b.values[name]
            if isinstance(x, list):
                np.testing.assert_allclose(x, y)
            else:
                assert x == pytest.approx(y), name
    assert fast[-1].found is False and len(fast[-1].history) == 0
    items = data.items["item_id"].to_numpy()[:20]
    fast_items = RedisOnlineFeatures(store, settings, timeout=1.0).items_sync(items)
    feast_items = FeastOnlineFeatures(store).items_sync(items)
    pd.testing.assert_frame_equal(
        fast_items.drop(columns="categories"), feast_items.drop(columns="categories"), check_dtype=False
    )


def test_serve_help_is_ours_not_kserves():
    done = subprocess.run(
        [RECSYS, "serve", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--model-uri" in done.stdout and "--http_port" not in done.stdout


def test_a_wiped_online_store_is_reported_and_healed_by_the_next_materialize(stack):
    """Redis loses the project's keys under a running predictor (a restart without persistence): the
    replica says so (health, gauge, log, flagged fallbacks) without a 5xx, and `materialize` notices the
    loss, reloads the full range and the log's sequences, and model answers resume."""
    settings, data, _, _ = stack
    user = active_user(data, 0)
    srv = Server(settings, RECSYS_SERVE_ONLINE_CHECK_SECONDS="0.5")
    statuses: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            while not stop.is_set():
                statuses.append(
                    client.post(
                        "/v1/models/recsys:predict", json={"instances": [{"user_id": user, "k": 5}]}
                    ).status_code
                )
                time.sleep(0.02)

    def wait_for_lost(value: bool) -> None:
        deadline = time.monotonic() + 20
        while srv.client.get("/healthz").json()["online_store"]["lost"] is not value:
            assert time.monotonic() < deadline, f"/healthz never said lost={value}"
            time.sleep(0.1)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        before, _ = timed_fallback(srv, user)
        assert before["fallback"] is None
        assert srv.client.get("/healthz").json()["online_store"] == {"lost": False, "lost_views": []}
        with EventLog(settings.database_url).engine.connect() as conn:  # the log's sequence, to compare after
            want = EventLog(settings.database_url).recent_items(conn, [user], settings.recent_items)

        client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=REDIS_DB)
        client.delete(*[k for k in client.scan_iter(count=10_000) if settings.feast_project.encode() in k])
        wait_for_lost(True)
        assert srv.client.get("/healthz").json()["online_store"]["lost_views"] == [
            "item_profile",
            "user_profile",
            "user_recent_items",
        ]
        assert srv.metric("recsys_online_store_lost") == 1
        lost_answer, _ = timed_fallback(srv, user)
        assert lost_answer["fallback"] == "online_store_lost"
        assert "the online store lost" in srv.output()

        assert sorted(materialize(settings)) == ["item_profile", "user_profile", "user_recent_items"]
        wait_for_lost(False)
        healed, _ = timed_fallback(srv, user)
        assert healed["fallback"] is None
        assert srv.metric("recsys_online_store_lost") == 0
        assert materialize(settings) == []  # nothing lost now: an incremental run
        online = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=REDIS_DB)
        assert online.exists(f"recsys:materialized:{settings.feast_project}")
        from predictor.features.store import online_user_features, open_store

        got = online_user_features(open_store(settings), [user])["recent_items"].iloc[0]
        assert list(got) == list(want["recent_items"].iloc[0])  # the log's sequence, pushed events included
    finally:
        stop.set()
        asker.join()
        srv.stop()
    assert len(statuses) > 20 and set(statuses) == {200}
