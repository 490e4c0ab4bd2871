"""Serving benchmark: HTTP end to end against the predictor and a naive baseline, in the same run.

Setup (production profile: PostgreSQL + Redis on 127.0.0.1): a synthetic log over a ``--items`` catalog
(100k by default), features built and materialized to Redis, a ``small`` two-tower + ranker trained
briefly (latency does not depend on how well it is trained) and promoted. Then:

* ours: ``recsys serve`` (raw Redis reads of Feast's layout, faiss index, item-feature cache, micro-batching);
* naive: ``bench/naive_predictor.py`` (Feast ``get_online_features`` for the user and 100 candidates per
  request, synchronous preprocess, brute-force scoring);

each driven by an aiohttp load generator on the same 2 cores at concurrency 1 and 16, with random active
users. Per-stage times come from the predictor's own Prometheus histograms (deltas over the run).

    python bench/serve.py            # full: 100k items; writes bench/results/serve.json + docs/img/serve-latency.png
    python bench/serve.py --quick    # 10k items, short runs (< 2 minutes)
    python bench/serve.py --reuse    # keep the previous run's data, features and model (same --items)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.data.synthetic import generate
from predictor.features.batch import USER_PROFILE
from predictor.features.offline import read_offline
from predictor.features.pipeline import build_features
from predictor.features.store import apply, materialize_incremental
from predictor.models.config import TrainConfig, model_config
from predictor.models.lifecycle import train_and_register
from predictor.models.registry import ModelRegistry
from predictor.serving.process import ServerProcess, recsys_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "img" / "serve-latency.png"
DATABASE, PROJECT, REDIS_DB = "recsys_bench", "bench_serve", 6
console = Console()


def bench_settings(home: Path, fresh: bool = True) -> Settings:
    if fresh:
        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        redis.Redis(db=REDIS_DB).flushdb()
    return Settings(profile=Profile.production, home=home, pg_database=DATABASE, feast_project=PROJECT,
                    redis_db=REDIS_DB)  # fmt: skip


def setup(settings: Settings, items: int, users: int, events: int) -> tuple[np.ndarray, dict]:
    timings = {}
    started = time.perf_counter()
    data = generate(n_events=events, n_users=users, n_items=items, seed=0)
    log = EventLog(settings.database_url)
    log.replace(data)
    log.engine.dispose()
    build_features(settings, snapshot_every="14D")
    timings["data_and_features_s"] = time.perf_counter() - started
    started = time.perf_counter()
    store = apply(settings)
    materialize_incremental(settings, store=store)
    timings["materialize_s"] = time.perf_counter() - started
    started = time.perf_counter()
    train = TrainConfig(epochs=1, min_epochs=1, ranker_epochs=1, ranker_examples_per_epoch=4_000, seed=0)
    registry = ModelRegistry(settings.database_url)
    train_and_register(data, registry, settings.artifacts_uri, model_config("small"), train,
                       read_offline(USER_PROFILE, settings), progress=False)  # fmt: skip
    registry.engine.dispose()
    timings["train_s"] = time.perf_counter() - started
    counts = data.events["user_id"].value_counts()
    return counts.index[counts >= 5].to_numpy(np.int64), timings


def reusable(settings: Settings, items: int) -> np.ndarray | None:
    """Active users of a previous run's setup with the same catalog size, if it is all still there."""
    try:
        production = ModelRegistry(settings.database_url).production("two_stage")
        log = EventLog(settings.database_url)
        data = log.read()
        log.engine.dispose()
    except Exception:  # noqa: BLE001 - no database, no tables: set up afresh
        return None
    if (
        production is None
        or data.items["item_id"].nunique() != items
        or redis.Redis(db=REDIS_DB).dbsize() == 0
    ):
        return None
    counts = data.events["user_id"].value_counts()
    return counts.index[counts >= 5].to_numpy(np.int64)


SERVE_ENV = {
    "RECSYS_SERVE_ITEM_REFRESH_SECONDS": "0",
    "RECSYS_SERVE_MODEL_POLL_SECONDS": "0",
    "RECSYS_SERVE_RANKER": "on",
}  # same work as the naive model: the ranker always runs


async def load(url: str, users: np.ndarray, concurrency: int, requests: int, seed: int) -> dict:
    """``requests`` V1 calls from ``concurrency`` workers; returns latencies (ms) and throughput."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(users, size=requests)
    bodies = [json.dumps({"instances": [{"user_id": int(u), "k": 10}]}).encode() for u in picks]
    latencies = np.zeros(requests)
    errors = 0
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, errors
        while next_index < requests:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            async with session.post(f"{url}/v1/models/recsys:predict", data=bodies[i],
                                    headers={"content-type": "application/json"}) as response:  # fmt: skip
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies[i] = (time.perf_counter() - started) * 1000

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # warm-up: connections, lazy imports, first-call allocations
        for u in users[:20]:
            async with session.post(
                f"{url}/v1/models/recsys:predict", json={"instances": [{"user_id": int(u)}]}
            ) as r:
                await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "mean_ms": float(latencies.mean()), "rps": requests / elapsed, "requests": requests, "errors": errors,
            "latencies_ms": latencies}  # fmt: skip


def stage_histograms(url: str) -> dict[str, dict[float, float]]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "recsys_stage_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out.setdefault(sample.labels["stage"], {})[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(sample.labels["stage"], {})[-1.0] = sample.value
    return out


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float:
    """Prometheus ``histogram_quantile``: linear interpolation inside the bucket holding quantile q."""
    bounds = sorted(b for b in buckets if b >= 0)
    total = buckets[float("inf")]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def stage_breakdown(before: dict, after: dict) -> dict:
    out = {}
    for stage, buckets in after.items():
        delta = {b: v - before.get(stage, {}).get(b, 0.0) for b, v in buckets.items()}
        count = delta[float("inf")]
        out[stage] = {"mean_ms": 1000 * delta[-1.0] / count if count else float("nan"),
                      "p50_ms": 1000 * quantile_from_buckets(delta, 0.50),
                      "p99_ms": 1000 * quantile_from_buckets(delta, 0.99), "observations": int(count)}  # fmt: skip
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, level in zip(axes, ("c1", "c16")):
        for name, color in (("ours", "tab:blue"), ("naive", "tab:red")):
            lat = results[name][level]["latencies_ms"]
            bins = np.logspace(np.log10(max(lat.min(), 0.3)), np.log10(lat.max() + 1), 60)
            ax.hist(lat, bins=bins, alpha=0.6, color=color,
                    label=f"{name}: p50 {np.percentile(lat, 50):.1f} / p99 {np.percentile(lat, 99):.1f} ms")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("request latency (ms, log scale)")
        ax.set_ylabel("requests")
        ax.set_title(f"concurrency {level[1:]}")
        ax.legend(fontsize=8)
    fig.suptitle("recsys predictor vs naive KServe model, HTTP end to end, same machine (2 cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k items, short runs: under 2 minutes")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--c1-requests", type=int, default=None)
    parser.add_argument("--c16-requests", type=int, default=None)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the previous run's data, features and model"
    )
    parser.add_argument("--home", default=str(ROOT / ".recsys-bench" / "serve"))
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()
    items = args.items or (10_000 if args.quick else 100_000)
    c1_n = args.c1_requests or (200 if args.quick else 3_000)
    c16_n = args.c16_requests or (800 if args.quick else 12_000)
    users = 1_000 if args.quick else 5_000
    events = max(items * 2, users * 20)

    settings = bench_settings(Path(args.home))
    with console.status(
        f"setup: {events:,} events, {items:,} items, {users:,} users → features → Redis → model"
    ):
        active, setup_timings = setup(settings, items, users, events)
    console.print(f"setup: {setup_timings}")

    results: dict = {"ours": {}, "naive": {}}
    stages = {}
    servers = {
        "ours": recsys_command(),
        "naive": [sys.executable, str(ROOT / "bench" / "naive_predictor.py")],
    }
    for name, command in servers.items():
        with ServerProcess(
            settings, env=SERVE_ENV, command=command, log_path=settings.home_dir / f"{name}.log"
        ) as srv:
            for level, concurrency, n in (("c1", 1, c1_n), ("c16", 16, c16_n)):
                before = stage_histograms(srv.url) if name == "ours" else None
                with console.status(f"{name}: concurrency {concurrency}, {n:,} requests"):
                    results[name][level] = asyncio.run(load(srv.url, active, concurrency, n, seed=1))
                if name == "ours":
                    stages[level] = stage_breakdown(before, stage_histograms(srv.url))
                r = results[name][level]
                console.print(f"{name} {level}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                              f"{r['rps']:.0f} req/s, errors {r['errors']}")  # fmt: skip

    plot_path = PLOT if Path(args.out) == RESULTS / "serve.json" else Path(args.out).with_suffix(".png")
    plot(results, plot_path)
    report = {
        "command": "python bench/serve.py" + (" --quick" if args.quick else "") + (" --reuse" if args.reuse else ""),
        "machine": f"{os.cpu_count()} cores; load generator on the same machine",
        "catalog_items": items, "users": users, "events": events, "setup_seconds": setup_timings,
        **{name: {level: {k: v for k, v in r.items() if k != "latencies_ms"} for level, r in per.items()}
           for name, per in results.items()},
        "stages": stages,
        "ratios": {level: {"naive_p99_over_ours": results["naive"][level]["p99_ms"] / results["ours"][level]["p99_ms"],
                           "ours_rps_over_naive": results["ours"][level]["rps"] / results["naive"][level]["rps"]}
                   for level in ("c1", "c16")},
        "targets": {"c1_p99_ms<=8": results["ours"]["c1"]["p99_ms"] <= 8,
                    "c16_rps>=400": results["ours"]["c16"]["rps"] >= 400,
                    "c16_p99_ms<=50": results["ours"]["c16"]["p99_ms"] <= 50},
    }  # fmt: skip
    report["targets"]["naive_p99/ours>=2"] = (
        min(r["naive_p99_over_ours"] for r in report["ratios"].values()) >= 2
    )

    table = Table("server", "concurrency", "p50 ms", "p99 ms", "req/s")
    for name in ("ours", "naive"):
        for level in ("c1", "c16"):
            r = results[name][level]
            table.add_row(name, level[1:], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['rps']:.0f}")
    console.print(table)
    stage_table = Table("stage", "c1 mean ms", "c1 p99 ms", "c16 mean ms", "c16 p99 ms")
    for stage in ("features", "retrieval", "ranking", "total"):
        a, b = stages["c1"].get(stage, {}), stages["c16"].get(stage, {})
        stage_table.add_row(
            stage, *(f"{x.get(k, float('nan')):.2f}" for x in (a, b) for k in ("mean_ms", "p99_ms"))
        )
    console.print(stage_table)
    console.print(f"targets: {report['targets']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out} and {plot_path} (the setup stays for --reuse; `make clean` removes it)")


if __name__ == "__main__":
    main()
