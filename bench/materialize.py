"""Materialization speed: Feast's own paths side by side with the floor of the same writes, in one run.

The same offline tables (PostgreSQL, from a synthetic log) are loaded into an emptied Redis database by:

* ``feast``: ``FeatureStore.materialize`` as shipped (local compute engine, pandas backend, each write
  checking the stored timestamps first);
* ``feast_skip_dedup``: the same with the Redis store's ``skip_dedup`` (one pipeline, no timestamp read):
  what ``recsys features materialize`` uses for a full reload, whose sequences it rewrites from the log after;
* ``feast_write_batch_10k``: ``materialization.online_write_batch_size`` 10,000 (Feast writes in batches);
* ``feast_polars``: the local engine's polars backend, where polars is installed;
* ``redis_floor``: the rows Feast wrote, read back and written again as plain pipelined HSETs: what Redis and
  the client cost for the same bytes with no conversion at all.

Each variant runs ``--reps`` times (median reported). One profiled ``feast`` run splits its time into the
offline read, the Arrow → protobuf conversion, key serialisation and the Redis writes.

    python bench/materialize.py              # 300k events (about 35k rows), 3 reps
    python bench/materialize.py --events 1000000
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import redis
from common import fresh_database, write_between_markers  # bench/common.py (this script runs from bench/)
from rich.console import Console
from rich.table import Table

from predictor.config import Profile, Settings
from predictor.data.synthetic import generate
from predictor.features.batch import compute_features
from predictor.features.offline import write_offline
from predictor.features.store import apply

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "materialize.json"
DOCS = ROOT / "docs" / "features.md"
DATABASE, PROJECT, REDIS_DB = "recsys_bench_materialize", "bench_mat", 8
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
console = Console()


def settings_for(home: Path) -> Settings:
    fresh_database(DATABASE)
    return Settings(
        profile=Profile.production,
        home=home,
        pg_database=DATABASE,
        feast_project=PROJECT,
        redis_db=REDIS_DB,
        recent_items=50,
    )


def feast_run(
    store, skip_dedup: bool = False, backend: str | None = None, write_batch: int | None = None
) -> float:
    redis.Redis(db=REDIS_DB).flushdb()
    config = store.config
    config.online_store.skip_dedup = skip_dedup
    config.materialization_config.online_write_batch_size = write_batch
    if backend is not None:
        config.batch_engine_config, config._batch_engine = {"type": "local", "backend": backend}, None
    started = time.perf_counter()
    store.materialize(start_date=EPOCH, end_date=datetime.now(timezone.utc))
    elapsed = time.perf_counter() - started
    config.online_store.skip_dedup = False
    config.materialization_config.online_write_batch_size = None
    if backend is not None:
        config.batch_engine_config, config._batch_engine = "local", None
    return elapsed


def redis_floor() -> float:
    """Write back what is in the database now, as plain pipelined HSETs into an emptied database."""
    client = redis.Redis(db=REDIS_DB)
    hashes = {key: client.hgetall(key) for key in client.scan_iter(count=10_000)}
    client.flushdb()
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for key, fields in hashes.items():
        pipe.hset(key, mapping=fields)
    pipe.execute()
    return time.perf_counter() - started


def profile_split(store) -> dict[str, float]:
    redis.Redis(db=REDIS_DB).flushdb()
    profiler = cProfile.Profile()
    profiler.runcall(store.materialize, start_date=EPOCH, end_date=datetime.now(timezone.utc))
    stats = pstats.Stats(profiler).stats
    total = max(v[3] for v in stats.values())

    def cumulative(fragment: str) -> float:
        return sum(v[3] for (path, _, name), v in stats.items() if fragment in f"{path}:{name}")

    parts = {
        "offline read (to_arrow)": cumulative("offline_store.py:to_arrow"),
        "Arrow → protobuf (_convert_arrow_to_proto)": cumulative("utils.py:_convert_arrow_to_proto"),
        "entity key serialisation (_redis_key)": cumulative("helpers.py:_redis_key"),
        "Redis pipelines (execute)": cumulative("redis/client.py:execute"),
    }
    return {k: round(v / total, 3) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--home", type=Path, default=ROOT / ".recsys-bench" / "materialize")
    args = parser.parse_args()
    settings = settings_for(args.home)
    data = generate(n_events=args.events, seed=0)
    written = write_offline(compute_features(data, recent_n=settings.recent_items), settings)
    rows = sum(written.values())
    store = apply(settings)
    console.print(f"{data.summary()}; offline rows {written}")

    variants = {
        "feast": lambda: feast_run(store),
        "feast_skip_dedup": lambda: feast_run(store, skip_dedup=True),
        "feast_write_batch_10k": lambda: feast_run(store, write_batch=10_000),
    }
    if importlib.util.find_spec("polars") is not None:
        variants["feast_polars"] = lambda: feast_run(store, backend="polars")
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, "redis_floor"]}
    for rep in range(args.reps):  # interleaved, so that machine noise falls on every variant alike
        for name, run in variants.items():
            seconds[name].append(run())
            console.print(f"rep {rep + 1}: {name} {seconds[name][-1]:.2f} s")
        seconds["redis_floor"].append(redis_floor())
    split = profile_split(store)
    floor = statistics.median(seconds["redis_floor"])
    results = {
        "measured_at": time.strftime("%Y-%m-%d"),
        "command": f"python bench/materialize.py --events {args.events}",
        "events": args.events,
        "rows": rows,
        "rows_by_view": written,
        "reps": args.reps,
        "polars": "feast_polars" in variants,
        "variants": {
            name: {
                "median_s": round(statistics.median(v), 3),
                "rows_per_s": round(rows / statistics.median(v)),
                "vs_floor": round(statistics.median(v) / floor, 1),
            }
            for name, v in seconds.items()
        },
        "feast_time_split": split,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_between_markers(DOCS, "materialize", render(results))
    out = Table(title=f"materialize {rows:,} rows")
    for column in ("variant", "median s", "rows/s", "× floor"):
        out.add_column(column, justify="right")
    for name, v in results["variants"].items():
        out.add_row(name, f"{v['median_s']:.2f}", f"{v['rows_per_s']:,}", f"{v['vs_floor']:.1f}")
    console.print(out)
    console.print(split)


def render(results: dict) -> str:
    lines = [
        (
            f"Measured {results['measured_at']} with `{results['command']}` on 2 cores: "
            f"{results['rows']:,} rows "
            f"({', '.join(f'{k} {v:,}' for k, v in results['rows_by_view'].items())}), median of "
            f"{results['reps']}, into an emptied Redis database."
        ),
        "",
        "| path | median s | rows/s | time / floor |",
        "|---|---|---|---|",
    ]
    labels = {
        "feast": "Feast `materialize` (local engine, pandas)",
        "feast_skip_dedup": "Feast, Redis `skip_dedup` (the full reload of `recsys features materialize`)",
        "feast_write_batch_10k": "Feast, `materialization.online_write_batch_size: 10000`",
        "feast_polars": "Feast, local engine on polars",
        "redis_floor": "floor: the same hashes as plain pipelined HSETs",
    }
    for name, v in results["variants"].items():
        lines.append(f"| {labels[name]} | {v['median_s']:.2f} | {v['rows_per_s']:,} | {v['vs_floor']:.1f} |")
    if not results["polars"]:
        lines.append("")
        lines.append("The polars backend was not measured: polars is not installed (it is not a dependency).")
    lines += [
        "",
        (
            "Where a Feast run spends its time (share of a profiled run; the parts overlap where one calls "
            "another):"
        ),
        "",
    ]
    lines += [f"- {part}: {share:.0%}" for part, share in results["feast_time_split"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
