"""Where one real-time event's time goes, with the alternatives measured beside it in the same run.

Production profile (PostgreSQL, Redis), a small synthetic log. Each figure is the median (and p99) of
``--reps`` single-event calls, the alternatives interleaved call by call:

* validating one request: ``validate_event_rows`` (the events service) against ``validate_events`` (the
  file loader's pandas validation, the same rules);
* writing one user's sequence online: ``SequenceWriter.write`` (Feast's provider ``online_write_batch``)
  against ``FeatureStore.push`` of the same row (what the path used before);
* one whole ``apply_events`` (lock, append, read-back, online write, commit), and its read-back
  (``EventLog.sequences``) alone.

    python bench/event_path.py            # 300 reps; bench/results/event_path.json
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from common import fresh_database, log_with_features  # bench/common.py (this script runs from bench/)
from feast.data_source import PushMode
from rich.console import Console
from rich.table import Table

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.data.schema import validate_event_rows, validate_events
from predictor.data.synthetic import generate
from predictor.features.realtime import PUSH_SOURCE, SequenceWriter, apply_events
from predictor.features.store import open_store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "event_path.json"
DATABASE, PROJECT, REDIS_DB = "recsys_bench_event_path", "bench_event_path", 9
console = Console()


def summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def timed(samples: list[float], call, *args, **kwargs):
    started = time.perf_counter()
    out = call(*args, **kwargs)
    samples.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--home", type=Path, default=ROOT / ".recsys-bench" / "event_path")
    args = parser.parse_args()
    fresh_database(DATABASE, REDIS_DB)
    settings = Settings(
        profile=Profile.production,
        home=args.home,
        pg_database=DATABASE,
        feast_project=PROJECT,
        redis_db=REDIS_DB,
    )
    data = generate(n_events=30_000, n_users=2_000, n_items=2_000, seed=0)
    log_with_features(settings, data)
    store, event_log = open_store(settings), EventLog(settings.database_url)
    writer = SequenceWriter(store)
    users = data.events["user_id"].unique()
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "validate_rows",
            "validate_pandas",
            "provider_write",
            "feast_push",
            "apply_events",
            "read_back",
        )
    }
    for rep in range(args.reps + 10):  # the first 10 warm connections and caches
        user, item = int(rng.choice(users)), int(rng.integers(0, 2_000))
        row = {
            "user_id": user,
            "item_id": item,
            "timestamp": pd.Timestamp.now(tz="UTC"),
            "event_type": "view",
            "weight": 1.0,
            "rating": None,
            "event_id": uuid.uuid4().hex,
        }
        batch = timed(samples["validate_rows"], validate_event_rows, [row], "request")
        timed(
            samples["validate_pandas"],
            validate_events,
            pd.DataFrame([row]),
            "request",
            0,
            drop_duplicates=False,
            event_ids=True,
        )
        timed(samples["apply_events"], apply_events, batch, store, event_log, settings.recent_items)
        with event_log.begin() as conn:
            sequences = timed(samples["read_back"], event_log.sequences, conn, [user], settings.recent_items)
        timed(samples["provider_write"], writer.write, *sequences)
        now = pd.Timestamp.now(tz="UTC")
        pushed = pd.DataFrame(
            {
                "user_id": sequences[0],
                "recent_items": sequences[1],
                "seen_items": sequences[2],
                "event_timestamp": [now],
                "created": [now],
            }
        )
        timed(samples["feast_push"], store.push, PUSH_SOURCE, pushed, to=PushMode.ONLINE)
        if rep == 9:
            for values in samples.values():
                values.clear()
    event_log.engine.dispose()
    results = {
        "measured_at": time.strftime("%Y-%m-%d"),
        "command": "python bench/event_path.py",
        "reps": args.reps,
        **{name: summary(values) for name, values in samples.items()},
    }
    results["ratios"] = {
        "validate_pandas_over_rows": round(
            results["validate_pandas"]["p50_ms"] / results["validate_rows"]["p50_ms"], 1
        ),
        "feast_push_over_provider_write": round(
            results["feast_push"]["p50_ms"] / results["provider_write"]["p50_ms"], 1
        ),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"one event, median of {args.reps}")
    for column in ("step", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for name in samples:
        table.add_row(name, f"{results[name]['p50_ms']:.2f}", f"{results[name]['p99_ms']:.2f}")
    console.print(table)
    console.print(results["ratios"])


if __name__ == "__main__":
    main()
