"""The events service's two processes as ASGI apps: ingestion (``recsys events serve``) and a stream
consumer (``recsys events consume``), each with ``/healthz``, ``/readyz`` and ``/metrics``.

Ingestion is its own small app rather than a route beside the predictor's: it scales with the event
rate, not the request rate, needs neither torch nor a model, and must keep accepting events while a
predictor restarts or swaps models. On the production profile it validates a request, checks its
items against the catalog and publishes it to JetStream (202: stored durably, applied shortly); the
consumers apply it. On the embedded profile there is no broker and it applies the batch itself (200).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog, UnknownItemError
from predictor.data.schema import DataValidationError
from predictor.events import metrics
from predictor.events.payload import EventBatch, TooManyEventsError, parse_request
from predictor.events.stream import EventConsumer, EventPublisher
from predictor.features.realtime import PushResult, apply_events
from predictor.features.store import open_store

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0


class EventSink:
    """Applies batches to the event log and the online store: blocking, one call per batch."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings)
        self.event_log = EventLog(settings.database_url)
        self.event_log.create_tables()

    def apply(self, batch: EventBatch) -> PushResult:
        """Append and write online; the batch was validated when it was parsed or decoded."""
        return apply_events(batch.events, self.store, self.event_log, self.settings.recent_items)

    def close(self) -> None:
        self.event_log.engine.dispose()


class KnownItems:
    """The catalog's item ids as far as requests have needed them: a database read only for ids not seen."""

    def __init__(self, engine: sa.Engine):
        self.engine, self.known = engine, set()

    def unknown(self, item_ids: list[int]) -> list[int]:
        missing = sorted(set(item_ids) - self.known)
        if not missing:
            return []
        with self.engine.connect() as conn:
            unknown = EventLog.unknown_items(conn, missing)
        self.known.update(set(missing) - set(unknown))
        return unknown


def _error(status: int, exc: Exception, reason: str, batch: EventBatch | None = None) -> JSONResponse:
    body = {"error": str(exc)}
    if isinstance(exc, DataValidationError):
        body |= {"row": exc.row, "field": exc.column}
    elif isinstance(exc, UnknownItemError):
        body |= {"row": _first_row_with(batch, exc.item_ids), "field": "item_id"}
    log.warning("rejected a request (%d): %s", status, exc)
    metrics.REJECTED.labels(reason).inc(len(batch) if batch is not None else 1)
    return JSONResponse(body, status_code=status)


def _first_row_with(batch: EventBatch, item_ids: list[int]) -> int:
    """The request's first row (array index) naming one of ``item_ids``."""
    position = {event_id: row for row, event_id in enumerate(batch.event_ids)}
    wanted = set(item_ids)
    events = batch.events
    return min(position[e] for e, i in zip(events["event_id"], events["item_id"]) if int(i) in wanted)


def _probes(app: FastAPI, ready) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = ready()
        return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def ingest_app(settings: Settings) -> FastAPI:
    """``POST /v1/events`` with a JSON array of events (see ``predictor.events.payload``)."""
    streaming = settings.profile is Profile.production
    publisher = EventPublisher(settings) if streaming else None
    state: dict = {}

    async def connect_until_stopped() -> None:
        while True:
            try:
                await publisher.start()
                log.info(
                    "publishing events to JetStream stream %s at %s",
                    settings.events_stream,
                    settings.nats_url,
                )
                return
            except Exception as exc:  # noqa: BLE001 - NATS not up yet: stay unready and try again
                log.warning("JetStream at %s not reachable (%r); retrying", settings.nats_url, exc)
                await asyncio.sleep(RETRY_SECONDS)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if streaming:
            state["known"] = KnownItems(sa.create_engine(settings.database_url, pool_pre_ping=True))
            state["connecting"] = asyncio.create_task(connect_until_stopped())
        else:
            state["sink"] = await asyncio.to_thread(EventSink, settings)
            state["lock"] = asyncio.Lock()  # SQLite has one writer
        yield
        if streaming:
            state["connecting"].cancel()
            await publisher.close()
            state["known"].engine.dispose()
        else:
            state["sink"].close()

    app = FastAPI(title="recsys events", lifespan=lifespan)
    _probes(app, lambda: {"stream": publisher.connected} if streaming else {"event_log": "sink" in state})

    @app.post("/v1/events")
    async def post_events(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            batch = parse_request(await request.body())
        except TooManyEventsError as exc:
            return _error(413, exc, "too_many")
        except DataValidationError as exc:
            return _error(400, exc, "invalid")
        if streaming:
            response = await _publish(batch)
        else:
            response = await _apply(batch)
        metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _publish(batch: EventBatch) -> JSONResponse:
        item_ids = [int(i) for i in batch.events["item_id"].unique()]
        try:
            unknown = await asyncio.to_thread(state["known"].unknown, item_ids)
        except sa.exc.SQLAlchemyError as exc:
            # the stream stays the durable record while the database is away; consumers check again
            log.warning("catalog check skipped, the database is unreachable: %r", exc)
            unknown = []
        if unknown:
            return _error(400, UnknownItemError(unknown), "unknown_item", batch)
        if not publisher.connected:
            return JSONResponse({"error": "the event stream is not reachable; retry"}, status_code=503)
        try:
            await publisher.publish(batch)
        except Exception as exc:  # noqa: BLE001 - whatever JetStream said, the client must retry: 503
            log.warning("publishing %d events failed: %r", len(batch), exc)
            return JSONResponse(
                {"error": f"the event stream did not store the batch: {exc!r}; retry"}, status_code=503
            )
        metrics.ACCEPTED.inc(len(batch))
        return JSONResponse({"accepted": len(batch), "event_ids": batch.event_ids}, status_code=202)

    async def _apply(batch: EventBatch) -> JSONResponse:
        try:
            async with state["lock"]:
                applied = await asyncio.to_thread(state["sink"].apply, batch)
        except UnknownItemError as exc:
            return _error(400, exc, "unknown_item", batch)
        except Exception as exc:  # noqa: BLE001 - the log or the online store is down: 503, retry
            log.warning("applying %d events failed: %r", len(batch), exc)
            return JSONResponse(
                {"error": f"the event log did not take the batch: {exc!r}; retry"}, status_code=503
            )
        metrics.ACCEPTED.inc(len(batch))
        metrics.count_applied(applied.events, applied.new, [batch.received_at])
        body = {"accepted": len(batch), "applied": applied.new, "event_ids": batch.event_ids}
        return JSONResponse(body, status_code=200)

    return app


def consumer_app(settings: Settings, fetch_batch: int = 256) -> FastAPI:
    """A JetStream consumer that applies events, with its probes and metrics on HTTP."""
    if settings.profile is not Profile.production:
        raise ValueError(
            "`recsys events consume` reads the JetStream stream of the production profile; on the embedded "
            "profile `recsys events serve` applies events itself"
        )
    state: dict = {}

    async def consume_until_stopped(stop: asyncio.Event) -> None:
        sink = await asyncio.to_thread(EventSink, settings)
        state["sink"] = sink
        while not stop.is_set():
            consumer = EventConsumer(settings, sink.apply, fetch_batch=fetch_batch)
            try:
                await consumer.start()
            except Exception as exc:  # noqa: BLE001 - NATS not up yet: unready, try again
                log.warning("JetStream at %s not reachable (%r); retrying", settings.nats_url, exc)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            state["consumer"] = consumer
            log.info(
                "consuming %s as durable %s, %d messages a fetch",
                settings.events_stream,
                settings.events_consumer,
                fetch_batch,
            )
            try:
                await consumer.run(stop)
            except Exception:  # unacknowledged messages are redelivered to the next subscription
                log.exception("the consumer loop failed; subscribing again")
                await asyncio.sleep(RETRY_SECONDS)
            finally:
                state.pop("consumer", None)
                await consumer.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = asyncio.Event()
        task = asyncio.create_task(consume_until_stopped(stop))
        yield
        stop.set()  # the batch in hand is finished and acknowledged before the process exits
        await asyncio.wait_for(task, timeout=30)
        if "sink" in state:
            state["sink"].close()

    app = FastAPI(title="recsys events consumer", lifespan=lifespan)
    _probes(app, lambda: {"consumer": "consumer" in state and state["consumer"].ready})
    return app
