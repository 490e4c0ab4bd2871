"""Events benchmark on the production profile: freshness through the stream, and ingestion throughput.

Setup: a synthetic log (PostgreSQL), features materialized to Redis, a ``small`` model trained briefly
and promoted. Then ``recsys serve``, ``recsys events serve`` and ``recsys events consume`` run together
on the same 2 cores as the load generator, against the machine's nats-server (JetStream).

* **Freshness**: ``--events`` single events at a steady ``--rate``. Each event is the user's current top
  recommendation; the clock runs from the POST until the predictor's next response no longer offers the
  item (seen items are excluded, so the event is visible), the predictor polled back to back.
  In the same run, two floors on the same users: one predictor response (freshness cannot be faster)
  and the direct path of ``recsys events push`` (``push_events``: log append + online push, no stream and
  no HTTP) followed by the same poll; and the stream alone: from the POST until a raw read of the online store
  shows the event.
* **Throughput**: ``--concurrency`` clients POST for ``--seconds``, with each of ``--sizes`` events per
  request (1, 10 and 100); accepted events/s at the service, and applied events/s: until the consumer's log
  holds every accepted event.

Writes ``bench/results/events.json`` and the table in ``docs/features.md`` (between markers).

    python bench/events.py            # 1,000 events at 50/s; 16 clients for 20 s per body size (1, 10, 100)
    python bench/events.py --quick    # 200 events, 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pandas as pd
import sqlalchemy as sa
from common import (  # bench/common.py (this script runs from bench/)
    fresh_database,
    log_with_features,
    write_between_markers,
)
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog, events_table
from predictor.data.synthetic import generate
from predictor.features.offline import read_offline
from predictor.features.realtime import push_events
from predictor.features.redis_reader import AsyncRawRedisReader
from predictor.features.schema import USER_PROFILE
from predictor.features.store import open_store
from predictor.models.config import TrainConfig, model_config
from predictor.models.lifecycle import train_and_register
from predictor.models.registry import ModelRegistry
from predictor.serving.process import ServerProcess, recsys_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "events.json"
DOCS = ROOT / "docs" / "features.md"
DATABASE, PROJECT, REDIS_DB = "recsys_bench_events", "bench_events", 7
SERVE_ENV = {"RECSYS_SERVE_ITEM_REFRESH_SECONDS": "0", "RECSYS_SERVE_MODEL_POLL_SECONDS": "0"}
console = Console()


def bench_settings(home: Path) -> Settings:
    fresh_database(DATABASE, REDIS_DB)
    tag = uuid.uuid4().hex[:8]
    return Settings(
        profile=Profile.production,
        home=home,
        pg_database=DATABASE,
        feast_project=PROJECT,
        redis_db=REDIS_DB,
        events_stream=f"BENCH_{tag}",
        events_subject=f"bench.{tag}",
        events_consumer=f"bench-{tag}",
    )


def setup(settings: Settings, items: int, users: int, events: int) -> np.ndarray:
    data = generate(n_events=events, n_users=users, n_items=items, seed=0)
    log_with_features(settings, data)
    train = TrainConfig(epochs=1, min_epochs=1, ranker_epochs=1, ranker_examples_per_epoch=4_000, seed=0)
    registry = ModelRegistry(settings.database_url)
    train_and_register(
        data,
        registry,
        settings.artifacts_uri,
        model_config("small"),
        train,
        read_offline(USER_PROFILE, settings),
        progress=False,
    )
    registry.engine.dispose()
    return data.events["user_id"].unique().astype(np.int64)


def stream_env(settings: Settings) -> dict:
    return {
        "RECSYS_EVENTS_STREAM": settings.events_stream,
        "RECSYS_EVENTS_SUBJECT": settings.events_subject,
        "RECSYS_EVENTS_CONSUMER": settings.events_consumer,
        "RECSYS_NATS_URL": settings.nats_url,
    }


def percentiles(samples_ms) -> dict:
    arr = np.asarray(samples_ms, dtype=float)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "n": len(arr),
    }


class Predictor:
    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, f"{url}/v1/models/recsys:predict"

    async def top(self, user: int) -> int:
        async with self.session.post(self.url, json={"instances": [{"user_id": user, "k": 10}]}) as response:
            body = await response.json()
        return int(body["predictions"][0]["item_ids"][0])

    async def until_gone(self, user: int, item: int, started: float, timeout: float = 10.0) -> float:
        """Poll until ``item`` is no longer the user's top answer; ms since ``started``."""
        while await self.top(user) == item:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"user {user}: item {item} still recommended after {timeout} s")
        return (time.perf_counter() - started) * 1000


async def freshness(
    settings: Settings, predictor_url: str, ingest_url: str, users: np.ndarray, n: int, rate: float, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    picks = rng.choice(users, size=3 * n, replace=len(users) < 3 * n)
    store = open_store(settings)
    log = EventLog(settings.database_url)
    online = AsyncRawRedisReader(store, settings, timeout=1.0)
    response_ms, stream_ms, direct_ms, to_online_ms = [], [], [], []
    async with aiohttp.ClientSession() as session:
        predictor = Predictor(session, predictor_url)
        for user in picks[:20]:  # warm-up: connections, first calls
            await predictor.top(int(user))
        period = 1.0 / rate
        for k in tqdm(range(n), desc="freshness", unit="event"):
            tick = time.perf_counter()
            user = int(picks[k])
            started = time.perf_counter()
            item = await predictor.top(user)
            response_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            async with session.post(
                f"{ingest_url}/v1/events", json=[{"user_id": user, "item_id": item}]
            ) as r:
                if r.status != 202:
                    raise RuntimeError(f"POST /v1/events answered {r.status}: {await r.text()}")
            stream_ms.append(await predictor.until_gone(user, item, started))
            # the floor without the stream: the same event applied in-process, as `recsys events push` does
            user = int(picks[n + k])
            item = await predictor.top(user)
            started = time.perf_counter()
            frame = pd.DataFrame(
                {"user_id": [user], "item_id": [item], "timestamp": [pd.Timestamp.now(tz="UTC")]}
            )
            await asyncio.to_thread(push_events, frame, store, log, settings.recent_items)
            direct_ms.append(await predictor.until_gone(user, item, started))
            # the stream alone: from the POST until the online store holds the event (raw reads, no predictor)
            user = int(picks[2 * n + k])
            started = time.perf_counter()
            async with session.post(
                f"{ingest_url}/v1/events", json=[{"user_id": user, "item_id": item}]
            ) as r:
                await r.read()
            while True:
                ((row,),) = await online.read([("user_id", [user], ["user_recent_items:recent_items"])])
                if row["recent_items"] and row["recent_items"][0] == item:
                    break
            to_online_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(max(0.0, period - (time.perf_counter() - tick)))
    await online.close()
    log.engine.dispose()
    return {
        "events": n,
        "rate_per_s": rate,
        "stream": percentiles(stream_ms),
        "direct_push": percentiles(direct_ms),
        "stream_to_online_store": percentiles(to_online_ms),
        "predictor_response": percentiles(response_ms),
    }


def logged_events(settings: Settings) -> int:
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).where(events_table.c.event_id.is_not(None))
        ).scalar_one()
    engine.dispose()
    return int(count)


async def throughput(
    settings: Settings,
    ingest_url: str,
    users: np.ndarray,
    items: np.ndarray,
    concurrency: int,
    seconds: float,
    per_request: int,
    seed: int,
) -> dict:
    rng = np.random.default_rng(seed)
    before = await asyncio.to_thread(logged_events, settings)
    accepted = errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        nonlocal accepted, errors
        local = np.random.default_rng(seed * 1000 + worker)
        while time.perf_counter() < deadline:
            body = [
                {"user_id": int(local.choice(users)), "item_id": int(local.choice(items))}
                for _ in range(per_request)
            ]
            started = time.perf_counter()
            async with session.post(f"{ingest_url}/v1/events", json=body) as response:
                await response.read()
                if response.status == 202:
                    accepted += per_request
                else:
                    errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    del rng
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, w) for w in range(concurrency)))
        posting = time.perf_counter() - started
    while await asyncio.to_thread(logged_events, settings) < before + accepted:
        if time.perf_counter() - started > posting + 300:
            raise TimeoutError("the consumer did not catch up within 5 minutes")
        await asyncio.sleep(0.05)
    applied_after = time.perf_counter() - started
    return {
        "events_per_request": per_request,
        "concurrency": concurrency,
        "accepted_events": accepted,
        "errors": errors,
        "ingest_events_per_s": round(accepted / posting, 1),
        "applied_events_per_s": round(accepted / applied_after, 1),
        "request": percentiles(latencies),
    }


def render(results: dict) -> str:
    f = results["freshness"]
    lines = [
        f"Measured {results['measured_at']} with `{results['command']}` (2 cores, load generator included).",
        "",
        (
            f"Freshness, {f['events']} single events at {f['rate_per_s']:g}/s: "
            "from the POST until the predictor's next response reflects the event (ms)"
        ),
        "",
        "| path | p50 | p99 | p99 / floor |",
        "|---|---|---|---|",
    ]
    floor = f["predictor_response"]["p99_ms"]
    for name, label in (
        ("stream", "POST → JetStream → consumer → online store → predictor"),
        ("direct_push", "direct push (`recsys events push`'s path, no stream, no HTTP)"),
        ("stream_to_online_store", "POST → JetStream → consumer → online store (raw reads, no predictor)"),
        ("predictor_response", "floor: one predictor response"),
    ):
        p = f[name]
        lines.append(f"| {label} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['p99_ms'] / floor:.2f} |")
    lines += [
        "",
        "Ingestion throughput (events/s):",
        "",
        "| events per request | clients | accepted /s | applied /s | request p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for t in results["throughput"]:
        lines.append(
            f"| {t['events_per_request']} | {t['concurrency']} | {t['ingest_events_per_s']:,.0f} | "
            f"{t['applied_events_per_s']:,.0f} | "
            f"{t['request']['p50_ms']:.1f} / {t['request']['p99_ms']:.1f} | "
            f"{t['errors']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="freshness events per second")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--sizes", default="1,10,100", help="events per request of each throughput run")
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--home", type=Path, default=ROOT / ".recsys-bench" / "events")
    args = parser.parse_args()
    if args.quick:
        args.events, args.seconds = 200, 5.0
    settings = bench_settings(args.home)
    with console.status("setting up: data, features, materialize, a small model"):
        started = time.perf_counter()
        users = setup(settings, args.items, users=max(4 * args.events, 2_000), events=60_000)
        console.print(f"set up in {time.perf_counter() - started:.0f} s")
    items = np.arange(args.items, dtype=np.int64)  # the synthetic catalog's ids
    recsys = recsys_command()[0]
    env = stream_env(settings)
    with (
        ServerProcess(settings, env=SERVE_ENV, log_path=settings.home_dir / "predictor.log") as predictor,
        ServerProcess(
            settings,
            env=env,
            command=[recsys, "events", "serve"],
            ready_path="/readyz",
            log_path=settings.home_dir / "events-serve.log",
        ) as ingest,
        ServerProcess(
            settings,
            env=env,
            command=[recsys, "events", "consume"],
            ready_path="/readyz",
            log_path=settings.home_dir / "events-consume.log",
        ),
    ):
        fresh = asyncio.run(
            freshness(settings, predictor.url, ingest.url, users, args.events, args.rate, seed=1)
        )
        rates = [
            asyncio.run(
                throughput(
                    settings, ingest.url, users, items, args.concurrency, args.seconds, size, seed=2 + size
                )
            )
            for size in map(int, args.sizes.split(","))
        ]
    results = {
        "measured_at": time.strftime("%Y-%m-%d"),
        "command": "python bench/events.py" + (" --quick" * args.quick),
        "freshness": fresh,
        "throughput": rates,
        "targets": {
            "stream_p99_le_20ms": fresh["stream"]["p99_ms"] <= 20.0,
            "events_per_s_ge_2000": max(t["applied_events_per_s"] for t in rates) >= 2000,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    write_between_markers(DOCS, "events", table)
    out = Table(title="events")
    out.add_column("measure")
    out.add_column("value", justify="right")
    out.add_row("stream freshness p50 / p99 ms", f"{fresh['stream']['p50_ms']} / {fresh['stream']['p99_ms']}")
    out.add_row(
        "direct push p50 / p99 ms", f"{fresh['direct_push']['p50_ms']} / {fresh['direct_push']['p99_ms']}"
    )
    to_online = fresh["stream_to_online_store"]
    out.add_row("POST to online store p50 / p99 ms", f"{to_online['p50_ms']} / {to_online['p99_ms']}")
    out.add_row(
        "predictor response p50 / p99 ms",
        f"{fresh['predictor_response']['p50_ms']} / {fresh['predictor_response']['p99_ms']}",
    )
    for t in rates:
        out.add_row(
            f"{t['events_per_request']}/request: accepted, applied /s",
            f"{t['ingest_events_per_s']:,.0f}, {t['applied_events_per_s']:,.0f}",
        )
    console.print(out)
    console.print(results["targets"])


if __name__ == "__main__":
    main()
