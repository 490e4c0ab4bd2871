"""Feature-layer benchmark on the production profile (PostgreSQL offline, Redis online).

Measures, in one run:
* materialization throughput (offline PostgreSQL → Redis), rows/s;
* online read latency for 1 user and for 1 user + 100 items: Feast ``get_online_features`` against a
  pipelined raw Redis read of the same keys and fields (``RawRedisReader``, the floor), interleaved
  request by request so machine noise hits both alike;
* push-to-visible latency: ``push_events`` (event log append + Feast push) until the next online read
  shows the new item.

Writes ``bench/results/features.json``. Usage: ``python bench/features.py [--events N] [--reps N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import redis
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.data.synthetic import generate
from predictor.features.batch import compute_features
from predictor.features.offline import write_offline
from predictor.features.realtime import push_events
from predictor.features.redis_reader import RawRedisReader
from predictor.features.schema import ITEM_FEATURES, USER_FEATURES
from predictor.features.store import (
    apply,
    online_item_features,
    online_user_features,
)

RESULTS = Path(__file__).resolve().parent / "results" / "features.json"
console = Console()


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "n": len(arr),
    }


def ensure_database(name: str) -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="synthetic events (default 1M)")
    parser.add_argument("--reps", type=int, default=1000, help="online reads per variant")
    parser.add_argument("--push-reps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="100k events, 200 reads: a minute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.events, args.reps, args.push_reps = 100_000, 200, 100

    settings = Settings(
        profile=Profile.production,
        pg_database="recsys_bench",
        redis_db=2,
        feast_project="bench",
        home=Path(".recsys-bench"),
        recent_items=50,
    )
    ensure_database(settings.pg_database)
    redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db).flushdb()
    rng = np.random.default_rng(args.seed)

    console.rule(f"data: {args.events:,} synthetic events")
    data = generate(n_events=args.events, seed=args.seed)
    event_log = EventLog(settings.database_url)
    event_log.replace(data)
    tables = compute_features(data, recent_n=settings.recent_items)
    written = write_offline(tables, settings)
    rows = sum(written.values())
    console.print(data.summary(), f"; offline rows: {written}")

    console.rule("materialize")
    store = apply(settings)
    started = time.perf_counter()
    store.materialize(
        start_date=datetime(1970, 1, 1, tzinfo=timezone.utc), end_date=datetime.now(timezone.utc)
    )
    materialize_s = time.perf_counter() - started
    console.print(f"{rows:,} rows in {materialize_s:.1f} s = {rows / materialize_s:,.0f} rows/s")

    console.rule(f"online reads: {args.reps} per variant, interleaved")
    reader = RawRedisReader(store, settings)
    users = data.events["user_id"].unique()
    item_ids = data.items["item_id"].to_numpy()
    samples: dict[tuple[str, str], list[float]] = {
        (s, v): [] for s in ("feast", "raw_redis") for v in ("user", "user_plus_100_items")
    }
    for _ in range(20):  # warm connections and caches
        online_user_features(store, [int(users[0])])
        reader.read([("user_id", [int(users[0])], USER_FEATURES)])
    for _ in tqdm(range(args.reps), desc="reads"):
        user = [int(rng.choice(users))]
        items = [int(i) for i in rng.choice(item_ids, size=100, replace=False)]
        t0 = time.perf_counter()
        online_user_features(store, user)
        t1 = time.perf_counter()
        online_user_features(store, user)
        online_item_features(store, items)
        t2 = time.perf_counter()
        reader.read([("user_id", user, USER_FEATURES)])
        t3 = time.perf_counter()
        reader.read([("user_id", user, USER_FEATURES), ("item_id", items, ITEM_FEATURES)])
        t4 = time.perf_counter()
        samples["feast", "user"].append((t1 - t0) * 1000)
        samples["feast", "user_plus_100_items"].append((t2 - t1) * 1000)
        samples["raw_redis", "user"].append((t3 - t2) * 1000)
        samples["raw_redis", "user_plus_100_items"].append((t4 - t3) * 1000)

    console.rule(f"push to visible: {args.push_reps} pushes")
    push_ms = []
    for _ in tqdm(range(args.push_reps), desc="pushes"):
        user, item = int(rng.choice(users)), int(rng.choice(item_ids))
        event = pd.DataFrame(
            {
                "user_id": [user],
                "item_id": [item],
                "timestamp": [pd.Timestamp.now(tz="UTC")],
                "event_type": ["click"],
            }
        )
        t0 = time.perf_counter()
        push_events(event, store, event_log, settings.recent_items, source="bench")
        while online_user_features(store, [user])["recent_items"].iloc[0][0] != item:
            pass
        push_ms.append((time.perf_counter() - t0) * 1000)

    result = {
        "events": args.events,
        "materialize_rows": rows,
        "materialize_seconds": round(materialize_s, 2),
        "materialize_rows_per_s": round(rows / materialize_s, 1),
        "online_read": {
            source: {
                variant: percentiles(samples[source, variant]) for variant in ("user", "user_plus_100_items")
            }
            for source in ("feast", "raw_redis")
        },
        "push_to_visible": percentiles(push_ms),
        "machine": "2 cores; PostgreSQL and Redis on localhost",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    table = Table("read", "feast p50 / p99 ms", "raw redis p50 / p99 ms", "feast / raw (p50)")
    for variant in ("user", "user_plus_100_items"):
        f, r = result["online_read"]["feast"][variant], result["online_read"]["raw_redis"][variant]
        table.add_row(
            variant,
            f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f}",
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
            f"{f['p50_ms'] / r['p50_ms']:.1f}x",
        )
    console.print(table)
    p = result["push_to_visible"]
    console.print(
        f"materialize: {result['materialize_rows_per_s']:,.0f} rows/s; "
        f"push to visible: p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms"
    )
    console.print(f"wrote {RESULTS}")
    reader.close()
    event_log.engine.dispose()


if __name__ == "__main__":
    main()
