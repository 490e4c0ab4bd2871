"""The events service: request validation, direct application on the embedded profile, and the JetStream
path on the production profile against the real nats-server, PostgreSQL and Redis (a consumer killed
mid-stream, redelivery, poison messages to the dead-letter stream)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import nats
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from predictor.config import Settings
from predictor.data.eventlog import EventLog, events_table
from predictor.data.schema import DataValidationError
from predictor.events.payload import (
    MAX_EVENTS_PER_REQUEST,
    TooManyEventsError,
    decode_message,
    encode_message,
    parse_request,
)
from predictor.events.service import EventSink, ingest_app
from predictor.events.stream import DEAD_REASON, EventConsumer, dead_stream, dead_subject
from predictor.features.store import online_user_features
from predictor.serving.process import ServerProcess, recsys_command
from tests.test_feature_store import build_and_materialize


# --- the request body --------------------------------------------------------------------------------
def test_request_defaults_and_round_trip_through_the_stream_message():
    received = 1_764_700_000.25
    batch = parse_request(
        json.dumps(
            [
                {"user_id": 1, "item_id": 2},
                {
                    "user_id": 1,
                    "item_id": 3,
                    "event_type": "purchase",
                    "timestamp": "2026-12-01T10:00:00.123456789Z",
                    "rating": 4.5,
                    "event_id": "client-1",
                },
                {"user_id": 2, "item_id": 2, "timestamp": 1_764_600_000, "weight": 0.5},
            ]
        ).encode(),
        received_at=received,
    )
    assert len(batch.event_ids) == 3 and batch.event_ids[1] == "client-1"
    assert len(set(batch.event_ids)) == 3  # missing ids are made here, distinct
    ev = batch.events.set_index("event_id")
    first = ev.loc[batch.event_ids[0]]
    assert first["timestamp"] == pd.Timestamp(received, unit="s", tz="UTC")  # no timestamp: received time
    assert first["event_type"] == "view" and first["weight"] == 1.0 and np.isnan(first["rating"])
    assert ev.loc["client-1", "weight"] == 5.0  # the purchase's default weight
    assert ev.loc["client-1", "rating"] == 4.5
    assert ev.loc[batch.event_ids[2], "weight"] == 0.5
    assert ev.loc[batch.event_ids[2], "timestamp"] == pd.Timestamp(1_764_600_000, unit="s", tz="UTC")

    again = decode_message(encode_message(batch))
    assert again.received_at == received and again.event_ids == batch.events["event_id"].tolist()
    pd.testing.assert_frame_equal(again.events, batch.events)  # nanosecond timestamps survive


@pytest.mark.parametrize(
    ("body", "row", "field", "text"),
    [
        (b"{not json", None, None, "not JSON"),
        (b"[]", None, None, "non-empty JSON array"),
        (b'{"user_id": 1}', None, None, "non-empty JSON array"),
        (b'[{"user_id": 1, "item_id": 2}, 7]', 1, None, "expected a JSON object"),
        (b'[{"user_id": 1, "item_id": 2}, {"user_id": 1, "itemId": 2}]', 1, "itemId", "unknown field"),
        (b'[{"user_id": 1, "item_id": 2}, {"user_id": 1}]', 1, "item_id", "missing required field"),
        (b'[{"user_id": 1, "item_id": 2}, {"user_id": "u9", "item_id": 2}]', 1, "user_id", "integer id"),
        (b'[{"user_id": -1, "item_id": 2}]', 0, "user_id", ">= 0"),
        (b'[{"user_id": 1, "item_id": 2, "timestamp": "soon"}]', 0, "timestamp", "unparsable"),
        (b'[{"user_id": 1, "item_id": 2, "weight": -3}]', 0, "weight", ">= 0"),
        (b'[{"user_id": 1, "item_id": 2, "event_id": ""}]', 0, "event_id", "non-empty string"),
        (b'[{"user_id": 1, "item_id": 2, "event_id": 5}]', 0, "event_id", "non-empty string"),
        (
            b'[{"user_id": 1, "item_id": 2, "event_id": "a"}, {"user_id": 2, "item_id": 2, "event_id": "a"}]',
            1,
            "event_id",
            "appears twice",
        ),
    ],
)
def test_bad_requests_name_the_row_and_field(body, row, field, text):
    with pytest.raises(DataValidationError, match=text) as caught:
        parse_request(body)
    assert (caught.value.row, caught.value.column) == (row, field)


def test_too_many_events_in_one_request():
    body = json.dumps([{"user_id": 1, "item_id": 1}] * (MAX_EVENTS_PER_REQUEST + 1)).encode()
    with pytest.raises(TooManyEventsError):
        parse_request(body)


# --- embedded profile: applied directly ----------------------------------------------------------------
def test_embedded_service_applies_once_and_rejects_whole_requests(embedded_settings, small_data):
    settings = embedded_settings
    store, event_log = build_and_materialize(settings, small_data)
    user = int(small_data.events["user_id"].iloc[0])
    items = [int(i) for i in small_data.items["item_id"].iloc[:3]]
    before = event_log.count()
    with TestClient(ingest_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        body = [
            {"user_id": user, "item_id": items[0], "event_id": "e1"},
            {"user_id": user, "item_id": items[1], "event_id": "e2", "event_type": "click"},
        ]
        first = client.post("/v1/events", json=body)
        assert first.status_code == 200, first.text
        assert first.json() == {"accepted": 2, "applied": 2, "event_ids": ["e1", "e2"]}
        online = list(online_user_features(store, [user])["recent_items"].iloc[0])
        assert online[:2] == [items[1], items[0]]  # same received time: the later row is the newer event

        retried = client.post("/v1/events", json=body)  # a client retry: applied once
        assert retried.json()["applied"] == 0
        assert event_log.count() == before + 2

        unknown = client.post(
            "/v1/events",
            json=[{"user_id": user, "item_id": items[2]}, {"user_id": user, "item_id": 987_654_321}],
        )
        assert unknown.status_code == 400
        assert unknown.json()["row"] == 1 and unknown.json()["field"] == "item_id"
        bad = client.post("/v1/events", json=[{"user_id": user, "item_id": items[2]}, {"user_id": user}])
        assert bad.status_code == 400 and bad.json()["field"] == "item_id"
        assert event_log.count() == before + 2  # nothing of either request was written
        assert list(online_user_features(store, [user])["recent_items"].iloc[0]) == online

        exposition = client.get("/metrics").text
        assert 'recsys_events_rejected_total{reason="unknown_item"} 2.0' in exposition
        assert "recsys_events_duplicate_total 2.0" in exposition
    event_log.engine.dispose()


def test_an_event_log_made_before_event_ids_is_migrated(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id BIGINT NOT NULL, item_id BIGINT "
                "NOT NULL, timestamp DATETIME NOT NULL, event_type VARCHAR(32) NOT NULL, weight FLOAT "
                "NOT NULL, rating FLOAT)"
            )
        )
        conn.execute(sa.text("INSERT INTO events VALUES (1, 1, 1, '2026-01-01 00:00:00', 'view', 1.0, NULL)"))
    log = EventLog(engine)
    log.create_tables()
    log.create_tables()  # twice: idempotent
    columns = {c["name"] for c in sa.inspect(engine).get_columns("events")}
    assert "event_id" in columns
    indexes = {i["name"]: i["unique"] for i in sa.inspect(engine).get_indexes("events")}
    assert indexes.get("ix_events_event_id") in (True, 1)
    assert log.count() == 1


# --- production profile: through NATS JetStream ---------------------------------------------------------
@pytest.fixture
def stream_settings(production_settings):
    tag = uuid.uuid4().hex[:10]
    settings = production_settings.model_copy(
        update={
            "events_stream": f"TEST_{tag}",
            "events_subject": f"test.{tag}",
            "events_consumer": f"c{tag}",
            "events_ack_wait_seconds": 3.0,
        }
    )
    yield settings

    async def delete_streams():
        nc = await nats.connect(settings.nats_url)
        for name in (settings.events_stream, dead_stream(settings)):
            try:
                await nc.jetstream().delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
        await nc.close()

    asyncio.run(delete_streams())


def stream_env(settings: Settings) -> dict:
    return {
        "RECSYS_NATS_URL": settings.nats_url,
        "RECSYS_EVENTS_STREAM": settings.events_stream,
        "RECSYS_EVENTS_SUBJECT": settings.events_subject,
        "RECSYS_EVENTS_CONSUMER": settings.events_consumer,
        "RECSYS_EVENTS_ACK_WAIT_SECONDS": str(settings.events_ack_wait_seconds),
    }


def events_process(settings: Settings, *args: str, name: str) -> ServerProcess:
    recsys = recsys_command()[0]
    return ServerProcess(
        settings,
        env=stream_env(settings),
        command=[recsys, "events", *args],
        ready_path="/readyz",
        log_path=settings.home_dir / f"{name}.log",
        timeout=120,
    )


def new_events(data, n_requests: int, per_request: int, seed: int) -> list[list[dict]]:
    """Requests of events newer than anything in ``data``, each with a distinct client event_id."""
    rng = np.random.default_rng(seed)
    users = data.events["user_id"].unique()
    items = data.items["item_id"].to_numpy()
    start = pd.Timestamp.now(tz="UTC")
    requests, k = [], 0
    for r in range(n_requests):
        batch = []
        for _ in range(per_request):
            k += 1
            batch.append(
                {
                    "user_id": int(rng.choice(users)),
                    "item_id": int(rng.choice(items)),
                    "timestamp": (start + pd.Timedelta(milliseconds=k)).isoformat(),
                    "event_id": f"t{seed}-{k}",
                }
            )
        requests.append(batch)
    return requests


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def logged_ids(event_log: EventLog) -> pd.Series:
    with event_log.engine.connect() as conn:
        rows = conn.execute(
            sa.select(events_table.c.event_id).where(events_table.c.event_id.is_not(None))
        ).all()
    return pd.Series([r[0] for r in rows], dtype=object)


@pytest.mark.integration
@pytest.mark.slow
def test_a_consumer_killed_mid_stream_loses_and_duplicates_nothing(stream_settings, small_data):
    """Two consumers share the durable; one is killed (SIGKILL) mid-stream and started again. Every
    published event is in the log exactly once and each user's online sequence is the log's."""
    settings = stream_settings
    store, event_log = build_and_materialize(settings, small_data)
    requests = new_events(small_data, n_requests=120, per_request=10, seed=1)
    sent = {e["event_id"] for r in requests for e in r}
    with (
        events_process(settings, "serve", name="serve") as ingest,
        events_process(settings, "consume", "--fetch-batch", "4", name="consumer-b"),
    ):
        victim = events_process(settings, "consume", "--fetch-batch", "4", name="consumer-a").__enter__()

        def post(bodies):
            for k, body in enumerate(bodies):
                answer = ingest.client.post("/v1/events", json=body)
                assert answer.status_code == 202, answer.text
                if k % 10 == 0:  # a client retry of a whole request: stored once
                    assert ingest.client.post("/v1/events", json=body).status_code == 202

        post(requests[:40])
        wait_for(lambda: len(logged_ids(event_log)) >= 100, 60, "the consumers to apply 100 events")
        victim.proc.kill()  # mid-stream, no SIGTERM: its fetched, unacknowledged messages are redelivered
        victim.proc.wait()
        victim.log.close()
        post(requests[40:])
        with events_process(settings, "consume", "--fetch-batch", "4", name="consumer-a2"):
            wait_for(lambda: len(logged_ids(event_log)) >= len(sent), 120, "every event in the log")
            time.sleep(1.0)  # anything still in flight would show up as a duplicate now
        ids = logged_ids(event_log)
    assert set(ids) == sent
    assert not ids.duplicated().any()

    users = sorted({e["user_id"] for r in requests for e in r})
    with event_log.begin() as conn:
        expected = event_log.recent_items(conn, users, settings.recent_items).set_index("user_id")
    online = online_user_features(store, users).set_index("user_id")
    newest = (
        pd.DataFrame([e for r in requests for e in r])
        .sort_values("timestamp", ascending=False)
        .groupby("user_id")["item_id"]
        .agg(list)
    )
    for user in users:
        got = list(online.loc[user, "recent_items"])
        assert got == list(expected.loc[user, "recent_items"]), f"user {user}"
        head = newest.loc[user][: settings.recent_items]
        assert got[: len(head)] == head, f"user {user}: the new events lead the sequence, newest first"
    event_log.engine.dispose()


@pytest.mark.integration
def test_poison_messages_are_dead_lettered_and_the_stream_keeps_flowing(stream_settings, small_data):
    settings = stream_settings
    _, event_log = build_and_materialize(settings, small_data)
    good = [parse_request(json.dumps(body).encode()) for body in new_events(small_data, 3, 5, seed=2)]
    unknown_item = parse_request(
        json.dumps([{"user_id": 1, "item_id": 987_654_321, "event_id": "bad-1"}]).encode()
    )

    async def scenario():
        sink = EventSink(settings)
        consumer = EventConsumer(settings, sink.apply, fetch_batch=10)
        await consumer.start()  # creates the streams and the durable
        js = consumer.js
        await js.publish(settings.events_subject, encode_message(good[0]))
        await js.publish(settings.events_subject, b"this is not an event batch")
        await js.publish(settings.events_subject, encode_message(unknown_item))
        await js.publish(settings.events_subject, encode_message(good[1]))
        stop = asyncio.Event()
        run = asyncio.create_task(consumer.run(stop))
        deadline = time.monotonic() + 30
        while len(logged_ids(event_log)) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await js.publish(settings.events_subject, encode_message(good[2]))  # after the poison: still flows
        while len(logged_ids(event_log)) < 15 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await run
        dead = await js.pull_subscribe(
            dead_subject(settings), durable="inspect", stream=dead_stream(settings)
        )
        letters = await dead.fetch(10, timeout=2)
        info = await consumer.subscription.consumer_info()
        await consumer.close()
        sink.close()
        return letters, info

    letters, info = asyncio.run(scenario())
    assert set(logged_ids(event_log)) == {e for b in good for e in b.event_ids}
    reasons = sorted(m.headers[DEAD_REASON] for m in letters)
    assert len(letters) == 2
    assert "not an event batch message" in reasons[0] and "unknown item_id(s)" in reasons[1]
    assert "987654321" in reasons[1]
    assert {m.data for m in letters} == {b"this is not an event batch", encode_message(unknown_item)}
    assert info.num_pending == 0 and info.num_ack_pending == 0  # everything acknowledged
    event_log.engine.dispose()


@pytest.mark.integration
def test_stream_service_rejects_unknown_items_before_publishing(stream_settings, small_data):
    settings = stream_settings
    _, event_log = build_and_materialize(settings, small_data)
    with events_process(settings, "serve", name="serve") as ingest:
        item = int(small_data.items["item_id"].iloc[0])
        answer = ingest.client.post(
            "/v1/events", json=[{"user_id": 1, "item_id": item}, {"user_id": 1, "item_id": 987_654_321}]
        )
        assert answer.status_code == 400 and answer.json()["row"] == 1
        accepted = ingest.client.post("/v1/events", json=[{"user_id": 1, "item_id": item}])
        assert accepted.status_code == 202 and len(accepted.json()["event_ids"]) == 1
        assert ingest.client.get("/readyz").json() == {"stream": True}
        exposition = httpx.get(f"{ingest.url}/metrics").text
        assert "recsys_events_accepted_total 1.0" in exposition

    async def stream_messages():
        nc = await nats.connect(settings.nats_url)
        info = await nc.jetstream().stream_info(settings.events_stream)
        await nc.close()
        return info.state.messages

    assert asyncio.run(stream_messages()) == 1  # the rejected request never reached the stream
    event_log.engine.dispose()
