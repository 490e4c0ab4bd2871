"""The durable event stream on NATS JetStream: the streams, the publisher and the durable pull consumer.

Streams (created or updated on start, file storage, limits retention so events can be replayed):

* ``RECSYS_EVENTS`` on subject ``recsys.events``: one message per accepted request;
* ``RECSYS_EVENTS_DEAD`` on ``recsys.events.dead``: messages that can never be applied, with the reason
  in the ``Recsys-Dead-Reason`` header and the original stream sequence in ``Recsys-Stream-Sequence``.

The consumer is one durable pull consumer (``recsys-events``) that any number of ``recsys events consume``
processes share, so ingestion scales out by running more of them. Each fetch of up to ``fetch_batch``
messages is applied as one batch: one transaction in the event log, one push to the online store, then
the messages are acknowledged. A crash before the acknowledgement redelivers them; ``event_id`` makes the
second application a no-op. A batch that fails validation is split in halves until the bad messages are
found and dead-lettered, so one poison message never stops the stream; any other failure (database or
Redis down) leaves the messages unacknowledged for a redelivery after a back-off.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import nats
import pandas as pd
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from predictor.config import Settings
from predictor.data.eventlog import UnknownItemError
from predictor.data.schema import DataValidationError
from predictor.events import metrics
from predictor.events.payload import EventBatch, decode_message, encode_message, message_id

if TYPE_CHECKING:
    from predictor.features.realtime import PushResult

log = logging.getLogger(__name__)

DEAD_REASON = "Recsys-Dead-Reason"
DEAD_SEQUENCE = "Recsys-Stream-Sequence"
DUPLICATE_WINDOW_SECONDS = 120.0  # JetStream drops a re-published Nats-Msg-Id within this window


def dead_subject(settings: Settings) -> str:
    return f"{settings.events_subject}.dead"


def dead_stream(settings: Settings) -> str:
    return f"{settings.events_stream}_DEAD"


async def connect(settings: Settings, name: str) -> nats.NATS:
    """A NATS connection with the settings' credentials; reconnects forever once connected."""
    options: dict = {"name": name, "max_reconnect_attempts": -1, "connect_timeout": 5}
    if settings.nats_user:
        options |= {"user": settings.nats_user, "password": settings.nats_password}
    if settings.nats_creds:
        options["user_credentials"] = str(settings.nats_creds)
    if settings.nats_tls_ca:
        options["tls"] = ssl.create_default_context(cafile=str(settings.nats_tls_ca))
    return await nats.connect(servers=settings.nats_url.split(","), **options)


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create the event and dead-letter streams, or bring their settings up to date."""
    max_age = settings.events_max_age_days * 86_400
    for name, subject in (
        (settings.events_stream, settings.events_subject),
        (dead_stream(settings), dead_subject(settings)),
    ):
        config = StreamConfig(
            name=name,
            subjects=[subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=max_age,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await js.stream_info(name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


class EventPublisher:
    """Publishes accepted batches; a publish returns once JetStream has stored the message."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.nc: nats.NATS | None = None
        self.js: JetStreamContext | None = None

    async def start(self) -> None:
        self.nc = await connect(self.settings, "recsys-events-serve")
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, self.settings)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def publish(self, batch: EventBatch) -> None:
        """Store one batch in the stream (JetStream drops a re-publish of the same ids: a retried request)."""
        await self.js.publish(
            self.settings.events_subject,
            encode_message(batch),
            timeout=5.0,
            headers={"Nats-Msg-Id": message_id(batch)},
        )

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.drain()


class EventConsumer:
    """The durable pull consumer loop; ``apply`` writes one batch (blocking, run in a thread) and answers
    with its ``events`` and ``new`` counts (``predictor.features.realtime.PushResult``)."""

    def __init__(
        self,
        settings: Settings,
        apply: Callable[[EventBatch], PushResult],
        fetch_batch: int = 256,
        fetch_timeout: float = 1.0,
    ):
        self.settings, self.apply = settings, apply
        self.fetch_batch, self.fetch_timeout = fetch_batch, fetch_timeout
        self.nc: nats.NATS | None = None
        self.js: JetStreamContext | None = None
        self.subscription: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        self.nc = await connect(self.settings, "recsys-events-consume")
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, self.settings)
        config = ConsumerConfig(
            durable_name=self.settings.events_consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.settings.events_ack_wait_seconds,
            max_deliver=-1,
            max_ack_pending=max(1000, 4 * self.fetch_batch),
            filter_subject=self.settings.events_subject,
        )
        self.subscription = await self.js.pull_subscribe(
            self.settings.events_subject,
            durable=self.settings.events_consumer,
            stream=self.settings.events_stream,
            config=config,
        )

    @property
    def ready(self) -> bool:
        return self.subscription is not None and self.nc is not None and self.nc.is_connected

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and apply until ``stop`` is set; the lag gauge is refreshed every few seconds."""
        lag_checked = 0.0
        while not stop.is_set():
            if time.monotonic() - lag_checked > 2.0:
                lag_checked = time.monotonic()
                await self._measure_lag()
            try:
                messages = await self.subscription.fetch(self.fetch_batch, timeout=self.fetch_timeout)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            await self.handle(messages)

    async def _measure_lag(self) -> None:
        try:
            info = await self.subscription.consumer_info()
        except Exception as exc:  # noqa: BLE001 - a lag reading is not worth stopping for
            log.debug("consumer info unavailable: %r", exc)
            return
        metrics.CONSUMER_LAG.set(info.num_pending + info.num_ack_pending)

    async def handle(self, messages: list[Msg]) -> None:
        """Decode, apply as one batch (bisecting around poison), then acknowledge."""
        decoded: list[tuple[Msg, EventBatch]] = []
        for msg in messages:
            try:
                decoded.append((msg, decode_message(msg.data)))
            except DataValidationError as exc:
                await self._dead_letter(msg, str(exc))
        if decoded:
            await self._apply(decoded)

    async def _apply(self, decoded: list[tuple[Msg, EventBatch]]) -> None:
        batch = EventBatch(_concat([b.events for _, b in decoded]), min(b.received_at for _, b in decoded))
        try:
            applied = await asyncio.to_thread(self.apply, batch)
        except (DataValidationError, UnknownItemError) as exc:  # input the log refuses: poison
            if len(decoded) == 1:
                await self._dead_letter(decoded[0][0], str(exc))
                return
            half = len(decoded) // 2
            await self._apply(decoded[:half])
            await self._apply(decoded[half:])
            return
        except Exception as exc:  # noqa: BLE001 - a store is down: leave the messages for a redelivery
            delivered = max(msg.metadata.num_delivered for msg, _ in decoded)
            delay = min(30.0, 2.0 ** (delivered - 1))
            log.warning("applying %d messages failed (%r); redelivery in %.0f s", len(decoded), exc, delay)
            metrics.APPLY_FAILURES.inc()
            for msg, _ in decoded:
                await msg.nak(delay=delay)
            return
        for msg, _ in decoded:
            await msg.ack()
        metrics.count_applied(applied.events, applied.new, [b.received_at for _, b in decoded])

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        sequence = str(msg.metadata.sequence.stream)
        try:
            await self.js.publish(
                dead_subject(self.settings),
                msg.data,
                timeout=5.0,
                headers={DEAD_REASON: reason[:4000], DEAD_SEQUENCE: sequence},
            )
        except Exception as exc:  # noqa: BLE001 - not stored in the dead-letter stream: redeliver, try again
            log.warning("dead-lettering stream message %s failed (%r); it will be redelivered", sequence, exc)
            await msg.nak(delay=5.0)
            return
        await msg.ack()
        metrics.DEAD_LETTERED.inc()
        log.warning("stream message %s dead-lettered: %s", sequence, reason)

    async def close(self) -> None:
        """Flush the acknowledgements sent, then close (a drain would wait out the open pull request)."""
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.flush(timeout=2)
            except Exception as exc:  # noqa: BLE001 - closing anyway; unacknowledged messages come back
                log.warning("flushing acknowledgements failed (%r); those messages will be redelivered", exc)
            await self.nc.close()


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    # an event_id in two messages (a retried request published after the duplicate window) counts once
    return pd.concat(frames, ignore_index=True).drop_duplicates("event_id", keep="first")
