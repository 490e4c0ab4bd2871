"""Serving benchmark: the predictor against a naive baseline and two floors, on the same cores, in one run.

Setup (production profile: PostgreSQL + Redis on 127.0.0.1): a synthetic log over a ``--items`` catalog
(100k by default), features built and materialized to Redis, a ``small`` two-tower + ranker trained
briefly (latency does not depend on how well it is trained) and promoted. Then, measured one after the
other (the three servers start together, since an idle server takes no CPU, and each stops once measured):

* ours: ``recsys serve`` (raw Redis reads of Feast's layout, faiss index, item-feature cache, micro-batching);
* naive: ``bench/naive_predictor.py`` (Feast ``get_online_features`` for the user and 100 candidates per
  request, synchronous preprocess, brute-force scoring);
* platform floor: ``bench/platform_floor.py``, the same KServe ``ModelServer`` set up as ours, whose model
  parses the same V1 body and returns a fixed answer of the same shape: what HTTP + KServe alone cost;
* in-process floor: our ``RecommenderModel`` with the served settings, loaded in a child process (after
  the servers have stopped) and driven with ``preprocess → predict → postprocess`` from asyncio tasks, no
  HTTP: what the model path alone costs.

The three servers are driven by an aiohttp load generator on the same 2 cores, the in-process floor by
asyncio tasks, each at concurrency 1 and 16, with the same random active users. Per-stage times come from
the predictor's own Prometheus histograms (deltas over the run).

    python bench/serve.py            # full: 100k items; bench/results/serve.json + docs/img/serve-latency.png
    python bench/serve.py --quick    # 10k items, short runs (< 2 minutes)
    python bench/serve.py --reuse    # keep the previous run's data, features and model (same --items)
    python bench/serve.py --reuse --ladder-only   # only the quality-ladder section, merged into serve.json

The quality-ladder section (``ladder``) serves each level pinned and then the ladder itself (``auto``),
at concurrency 1, 16 and 64 (past one replica's capacity at full quality), counting the level each
response names; the per-level costs are what ``bench/autoscale.py`` simulates with. "ours" above is
pinned at its best level (``RECSYS_SERVE_LEVEL=best``): the same work as the naive model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
from predictor.features.offline import read_offline
from predictor.features.pipeline import build_features
from predictor.features.schema import USER_PROFILE
from predictor.features.store import apply, materialize
from predictor.models.config import TrainConfig, model_config
from predictor.models.lifecycle import train_and_register
from predictor.models.registry import ModelRegistry
from predictor.serving.process import ServerProcess, recsys_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "img" / "serve-latency.png"
DATABASE, PROJECT, REDIS_DB = "recsys_bench", "bench_serve", 6
LEVELS = ("c1", "c16")
SERVERS = {  # name → (label, plot colour, what it is)
    "ours": ("ours", "tab:blue", "recsys serve over HTTP"),
    "naive": ("naive", "tab:red", "bench/naive_predictor.py over HTTP"),
    "platform_floor": (
        "platform floor",
        "tab:green",
        "bench/platform_floor.py over HTTP: KServe, fixed answer",
    ),
    "in_process_floor": (
        "in-process floor",
        "tab:gray",
        "RecommenderModel in a child process, preprocess/predict/postprocess, no HTTP",
    ),
}
STAGE_METRIC = "recsys_stage_seconds"
BATCH_METRIC = "recsys_batch_users"  # users per model call
console = Console()


def bench_settings(home: Path, fresh: bool = True) -> Settings:
    if fresh:
        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        redis.Redis(db=REDIS_DB).flushdb()
    return Settings(
        profile=Profile.production, home=home, pg_database=DATABASE, feast_project=PROJECT, redis_db=REDIS_DB
    )


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
    materialize(settings, store=store)
    timings["materialize_s"] = time.perf_counter() - started
    started = time.perf_counter()
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
    "RECSYS_SERVE_CANDIDATES": "100",
    "RECSYS_SERVE_LEVEL": "best",
}  # same work as the naive model: the ranker always runs, over 100 retrieval candidates, never degraded
LADDER_LOADS = (("c1", 1), ("c16", 16), ("c64", 64))  # c64: past one replica's capacity at full quality


def summary(latencies: np.ndarray, elapsed: float, errors: int) -> dict:
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_ms": float(latencies.mean()),
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "errors": errors,
        "latencies_ms": latencies,
    }


def request_bodies(users: np.ndarray, requests: int, seed: int) -> list[dict]:
    picks = np.random.default_rng(seed).choice(users, size=requests)
    return [{"instances": [{"user_id": int(u), "k": 10}]} for u in picks]


async def load(
    url: str, users: np.ndarray, concurrency: int, requests: int, seed: int, count_levels: bool = False
) -> dict:
    """``requests`` V1 calls from ``concurrency`` workers; returns latencies (ms) and throughput, and with
    ``count_levels`` the share of requests served at each quality-ladder level."""
    bodies = [json.dumps(b).encode() for b in request_bodies(users, requests, seed)]
    latencies = np.zeros(requests)
    errors = 0
    next_index = 0
    levels: dict[str, int] = {}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, errors
        while next_index < requests:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/models/recsys:predict",
                data=bodies[i],
                headers={"content-type": "application/json"},
            ) as response:
                body = await response.read()
                if response.status != 200:
                    errors += 1
            latencies[i] = (time.perf_counter() - started) * 1000
            if count_levels and response.status == 200:
                level = json.loads(body)["predictions"][0]["level"]
                levels[level] = levels.get(level, 0) + 1

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
    out = summary(latencies, elapsed, errors)
    if count_levels:
        out["level_share"] = {lv: n / max(sum(levels.values()), 1) for lv, n in sorted(levels.items())}
    return out


def measure_ladder(settings: Settings, active: np.ndarray, requests: int) -> dict:
    """Each level of the quality ladder pinned (``RECSYS_SERVE_LEVEL``), then the ladder itself (auto),
    each at the ``LADDER_LOADS`` concurrencies: the per-level costs ``bench/autoscale.py`` simulates with,
    and what the ladder does past capacity. Servers start together and are measured one at a time."""
    from predictor.models.inference import LEVELS as LADDER

    commands = {lv: recsys_command() for lv in (*LADDER, "auto")}
    envs = {lv: {**SERVE_ENV, "RECSYS_SERVE_LEVEL": lv} for lv in commands}
    out: dict = {}
    procs = {}
    for name, command in commands.items():
        srv = ServerProcess(
            settings, env=envs[name], command=command, log_path=settings.home_dir / f"level-{name}.log"
        )
        while any(srv.port == other.port for other in procs.values()):
            srv = ServerProcess(
                settings, env=envs[name], command=command, log_path=settings.home_dir / f"level-{name}.log"
            )
        procs[name] = srv
    with ThreadPoolExecutor(len(procs)) as pool:
        futures = {name: pool.submit(srv.__enter__) for name, srv in procs.items()}
    try:
        for name, future in futures.items():
            if future.exception():
                out[name] = {"error": str(future.exception())[-1500:]}
                continue
            srv, out[name] = procs[name], {}
            try:
                for label, concurrency in LADDER_LOADS:
                    with console.status(f"level {name}: concurrency {concurrency}, {requests:,} requests"):
                        r = asyncio.run(
                            load(srv.url, active, concurrency, requests, seed=2, count_levels=True)
                        )
                    out[name][label] = {k: v for k, v in r.items() if k != "latencies_ms"}
                    console.print(
                        f"level {name} {label}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                        f"{r['rps']:.0f} req/s, errors {r['errors']}, levels {r['level_share']}"
                    )
            except Exception as exc:  # noqa: BLE001 - one server down: measure the others, report it
                out[name]["error"] = str(exc)[-1500:]
                console.print(f"[red]level {name} failed: {str(exc)[-500:]}[/red]")
            srv.__exit__(None, None, None)
    finally:
        for srv in procs.values():
            srv.__exit__(None, None, None)
    return out


# --- in-process floor -------------------------------------------------------------------------------------
async def drive(model, users: np.ndarray, concurrency: int, requests: int, seed: int) -> dict:
    """As :func:`load`, with ``concurrency`` asyncio tasks calling the model's KServe methods directly."""
    bodies = request_bodies(users, requests, seed)
    latencies = np.zeros(requests)
    errors = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, errors
        while next_index < requests:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                response = await model.postprocess(await model.predict(await model.preprocess(bodies[i])))
                if not response.get("predictions"):
                    errors += 1
            except Exception:  # noqa: BLE001 - counted, as the HTTP load generator counts non-200s
                errors += 1
            latencies[i] = (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    await asyncio.gather(*(asyncio.create_task(worker()) for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - started, errors)


def in_process_child(spec_path: Path) -> None:
    """The child process: load ``RecommenderModel`` as ``recsys serve`` would (settings from the same
    environment, frozen heap, uvloop), drive it at each level, write the results next to the spec."""
    import gc

    from kserve.logging import configure_logging

    from predictor.serving.model import RecommenderModel
    from predictor.serving.server import logging_config
    from predictor.serving.settings import ServeSettings

    spec = json.loads(spec_path.read_text())
    users = np.load(spec["users"])
    configure_logging(logging_config("INFO"))  # `recsys serve`'s default level
    serve = ServeSettings()  # RECSYS_SERVE_* from SERVE_ENV, as the served one reads them
    model = RecommenderModel(Settings(), serve)
    model.load()
    gc.collect()
    gc.freeze()

    async def run() -> dict:
        await model.start_background()
        try:
            for u in users[:20]:  # warm-up, as over HTTP
                body = {"instances": [{"user_id": int(u)}]}
                await model.postprocess(await model.predict(await model.preprocess(body)))
            return {level: await drive(model, users, c, n, seed=1) for level, c, n in spec["levels"]}
        finally:
            await model.stop_background()

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        results = runner.run(run())
    out = {level: {**r, "latencies_ms": r["latencies_ms"].tolist()} for level, r in results.items()}
    out["serve_settings"] = serve.model_dump()
    Path(spec["out"]).write_text(json.dumps(out))


def in_process_floor(
    settings: Settings, users: np.ndarray, levels: list[tuple[str, int, int]]
) -> tuple[dict, dict]:
    """Run :func:`in_process_child` in a fresh process with the served predictor's environment; returns the
    results per level and the ``ServeSettings`` the model ran with."""
    work = settings.home_dir / "in_process_floor"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "users.npy", users)
    spec = {"users": str(work / "users.npy"), "levels": levels, "out": str(work / "results.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    Path(spec["out"]).unlink(missing_ok=True)
    environ = {**os.environ, **settings.feast_environment(), **SERVE_ENV}
    with open(settings.home_dir / "in_process_floor.log", "w") as log:
        command = [sys.executable, __file__, "--in-process-child", str(work / "spec.json")]
        done = subprocess.run(
            command, env=environ, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False
        )
    if done.returncode != 0:
        tail = (settings.home_dir / "in_process_floor.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the in-process floor exited ({done.returncode}):\n{tail}")
    raw = json.loads(Path(spec["out"]).read_text())
    serve_settings = raw.pop("serve_settings", {})
    return {
        level: {**r, "latencies_ms": np.asarray(r["latencies_ms"])} for level, r in raw.items()
    }, serve_settings


# --- the predictor's metrics ------------------------------------------------------------------------------
def histograms(url: str) -> dict[str, dict[str, dict[float, float]]]:
    """Every histogram on ``/metrics``: name → its first label's value ("" without labels) →
    {le: cumulative count, -1: sum}."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, dict[str, dict[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            series = out.setdefault(family.name, {}).setdefault(next(iter(labels.values()), ""), {})
            if sample.name.endswith("_bucket"):
                series[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                series[-1.0] = sample.value
    return out


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float:
    """Prometheus ``histogram_quantile``: linear interpolation inside the bucket holding quantile q."""
    bounds = sorted(b for b in buckets if b >= 0)
    total = buckets.get(float("inf"), 0.0)
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


def delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {b: v - before.get(b, 0.0) for b, v in after.items()}


def stage_breakdown(before: dict, after: dict) -> dict:
    out = {}
    for stage, buckets in after.items():
        d = delta(before.get(stage, {}), buckets)
        count = d.get(float("inf"), 0.0)
        out[stage] = {
            "mean_ms": 1000 * d.get(-1.0, float("nan")) / count if count else float("nan"),
            "p50_ms": 1000 * quantile_from_buckets(d, 0.50),
            "p99_ms": 1000 * quantile_from_buckets(d, 0.99),
            "observations": int(count),
        }
    return out


def batch_histogram(snapshot: dict) -> tuple[str | None, dict[float, float]]:
    if BATCH_METRIC not in snapshot:
        return None, {}
    return BATCH_METRIC, snapshot[BATCH_METRIC].get("", next(iter(snapshot[BATCH_METRIC].values()), {}))


def model_per_user(stages: dict, batches: dict) -> dict:
    """(retrieval + ranking mean per observation) / mean batch size, per level; None and a note where a
    metric is missing."""
    out: dict = {
        "c1": None,
        "c16": None,
        "mean_batch_size": {},
        "stage_observations": {},
        "batches": {},
        "batch_metric": batches.get("metric"),
        "notes": [],
    }
    for level in LEVELS:
        per_level = stages.get(level, {})
        means = {s: per_level.get(s, {}).get("mean_ms", math.nan) for s in ("retrieval", "ranking")}
        missing = [s for s, v in means.items() if not math.isfinite(v)]
        if missing:
            out["notes"].append(f"{level}: no {STAGE_METRIC} observations for {', '.join(missing)}; skipped")
            continue
        d = batches.get(level)
        count = d.get(float("inf"), 0.0) if d else 0.0
        if not count or -1.0 not in d:
            out["notes"].append(f"{level}: no {BATCH_METRIC} histogram; skipped")
            continue
        mean_batch = d[-1.0] / count
        out["mean_batch_size"][level] = mean_batch
        out["stage_observations"][level] = per_level["retrieval"]["observations"]
        out["batches"][level] = int(count)
        out[level] = (means["retrieval"] + means["ranking"]) / mean_batch
    return out


# --- report -----------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, level in zip(axes, LEVELS):
        series = {n: r[level]["latencies_ms"] for n, r in results.items() if r and level in r}
        if not series:
            continue
        low = max(min(lat.min() for lat in series.values()), 0.05)
        bins = np.logspace(np.log10(low), np.log10(max(lat.max() for lat in series.values()) + 1), 80)
        for name, lat in series.items():
            label, color, _ = SERVERS[name]
            p50, p99 = np.percentile(lat, [50, 99])
            ax.hist(
                lat, bins=bins, alpha=0.55, color=color, label=f"{label}: p50 {p50:.2f} / p99 {p99:.2f} ms"
            )
        ax.set_xscale("log")
        ax.set_xlabel("request latency (ms, log scale)")
        ax.set_ylabel("requests")
        ax.set_title(f"concurrency {level[1:]}")
        ax.legend(fontsize=7)
    fig.suptitle(
        "recsys predictor vs naive KServe model and the platform / in-process floors, same machine "
        f"({os.cpu_count()} cores)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(results: dict) -> dict:
    """Per level: naive / ours for p99, and ours / each of the others for p99 and for req/s."""
    out = {}
    for level in LEVELS:
        p99 = {n: (r or {}).get(level, {}).get("p99_ms") for n, r in results.items()}
        rps = {n: (r or {}).get(level, {}).get("rps") for n, r in results.items()}
        out[level] = {
            "naive_p99_over_ours": ratio(p99["naive"], p99["ours"]),
            "ours_rps_over_naive": ratio(rps["ours"], rps["naive"]),
            "ours_p99_over_platform_floor": ratio(p99["ours"], p99["platform_floor"]),
            "ours_rps_over_platform_floor": ratio(rps["ours"], rps["platform_floor"]),
            "ours_p99_over_in_process_floor": ratio(p99["ours"], p99["in_process_floor"]),
            "ours_rps_over_in_process_floor": ratio(rps["ours"], rps["in_process_floor"]),
        }
    return out


def targets(results: dict, r: dict) -> dict:
    ours = results.get("ours") or {}

    def met(value: float | None, low: float = -math.inf, high: float = math.inf) -> bool:
        return value is not None and low <= value <= high

    naive_over_ours = [r[lv]["naive_p99_over_ours"] for lv in LEVELS]
    out = {
        "c1_p99_ms<=6": met(ours.get("c1", {}).get("p99_ms"), high=6),
        "c16_rps>=450": met(ours.get("c16", {}).get("rps"), low=450),
        "c16_p99_ms<=50": met(ours.get("c16", {}).get("p99_ms"), high=50),
        "c1_p99_over_platform_floor<=2.5": met(r["c1"]["ours_p99_over_platform_floor"], high=2.5),
        "c16_rps_over_platform_floor>=0.4": met(r["c16"]["ours_rps_over_platform_floor"], low=0.4),
        "naive_p99_over_ours>=3": None not in naive_over_ours and min(naive_over_ours) >= 3,
    }
    out["all_met"] = all(out.values())
    return out


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def start_servers(settings: Settings, commands: dict[str, list[str]]) -> dict[str, ServerProcess | Exception]:
    """Start every server at once and wait until all are ready (or failed): the start-ups (imports, model
    loads) overlap, the measurements never do."""
    procs: dict[str, ServerProcess] = {}
    for name, command in commands.items():
        srv = ServerProcess(
            settings, env=SERVE_ENV, command=command, log_path=settings.home_dir / f"{name}.log"
        )
        while any(srv.port == other.port for other in procs.values()):  # free_port() twice in a row
            srv = ServerProcess(
                settings, env=SERVE_ENV, command=command, log_path=settings.home_dir / f"{name}.log"
            )
        procs[name] = srv
    with ThreadPoolExecutor(len(procs)) as pool:
        futures = {name: pool.submit(srv.__enter__) for name, srv in procs.items()}
    return {name: future.exception() or procs[name] for name, future in futures.items()}


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
    parser.add_argument(
        "--ladder-only",
        action="store_true",
        help="only the quality-ladder section (each level pinned, then auto), merged into --out",
    )
    parser.add_argument("--ladder-requests", type=int, default=None)
    parser.add_argument("--in-process-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process_child:
        in_process_child(args.in_process_child)
        return
    wall = time.perf_counter()
    items = args.items or (10_000 if args.quick else 100_000)
    c1_n = args.c1_requests or (200 if args.quick else 3_000)
    c16_n = args.c16_requests or (800 if args.quick else 12_000)
    users = 1_000 if args.quick else 5_000
    events = max(items * 2, users * 20)
    levels = [("c1", 1, c1_n), ("c16", 16, c16_n)]

    active, setup_timings = None, {"reused": True}
    if args.reuse:
        settings = bench_settings(Path(args.home), fresh=False)
        active = reusable(settings, items)
        if active is None:
            console.print(f"--reuse: no complete previous setup with {items:,} items; setting up afresh")
    if active is None:
        settings = bench_settings(Path(args.home))
        with console.status(
            f"setup: {events:,} events, {items:,} items, {users:,} users → features → Redis → model"
        ):
            active, setup_timings = setup(settings, items, users, events)
    console.print(f"setup: {setup_timings}")
    ladder_n = args.ladder_requests or (300 if args.quick else 3_000)
    if args.ladder_only:
        out = Path(args.out)
        report = json.loads(out.read_text()) if out.is_file() else {}
        started = time.perf_counter()
        report["ladder"] = measure_ladder(settings, active, ladder_n)
        report["ladder_command"] = (
            "python bench/serve.py --ladder-only"
            + (" --quick" if args.quick else "")
            + (" --reuse" if args.reuse else "")
            + f" ({time.perf_counter() - started:.0f} s)"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote the ladder section of {out}")
        return

    results: dict = {name: None for name in SERVERS}
    phases: dict = {"setup_s": time.perf_counter() - wall}
    in_process_settings: dict = {}
    failures: dict[str, str] = {}
    stages: dict = {}
    batches: dict = {}
    servers = {
        "ours": recsys_command(),
        "naive": [sys.executable, str(ROOT / "bench" / "naive_predictor.py")],
        "platform_floor": [sys.executable, str(ROOT / "bench" / "platform_floor.py")],
    }
    started = time.perf_counter()
    with console.status(f"starting {', '.join(servers)} (together: an idle server takes no CPU)"):
        running = start_servers(settings, servers)
    phases["start_servers_s"] = time.perf_counter() - started
    try:
        for name, srv in running.items():  # measured one at a time; each stops once measured
            started = time.perf_counter()
            try:
                if isinstance(srv, Exception):
                    raise srv
                results[name] = {}
                for level, concurrency, n in levels:
                    before = histograms(srv.url) if name == "ours" else None
                    with console.status(f"{name}: concurrency {concurrency}, {n:,} requests"):
                        results[name][level] = asyncio.run(load(srv.url, active, concurrency, n, seed=1))
                    if name == "ours":
                        after = histograms(srv.url)
                        stages[level] = stage_breakdown(
                            before.get(STAGE_METRIC, {}), after.get(STAGE_METRIC, {})
                        )
                        metric, buckets = batch_histogram(after)
                        batches["metric"] = metric
                        batches[level] = delta(batch_histogram(before)[1], buckets) if metric else None
                    r = results[name][level]
                    console.print(
                        f"{name} {level}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                        f"{r['rps']:.0f} req/s, errors {r['errors']}"
                    )
            except Exception as exc:  # noqa: BLE001 - one server down: measure the others, report it, exit 1
                results[name], failures[name] = None, str(exc)
                console.print(f"[red]{name} failed: {str(exc)[-1500:]}[/red]")
            finally:
                if not isinstance(srv, Exception):
                    srv.__exit__(None, None, None)
                phases[f"{name}_s"] = time.perf_counter() - started
    finally:  # interrupted: stop the rest (stopping twice is harmless)
        for srv in running.values():
            if not isinstance(srv, Exception):
                srv.__exit__(None, None, None)

    # after every server has stopped: the child process has the cores to itself and the load generator
    started = time.perf_counter()
    try:
        with console.status(f"in-process floor: {c1_n:,} + {c16_n:,} calls, no HTTP"):
            results["in_process_floor"], in_process_settings = in_process_floor(settings, active, levels)
        for level in LEVELS:
            r = results["in_process_floor"][level]
            console.print(
                f"in_process_floor {level}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                f"{r['rps']:.0f} req/s, errors {r['errors']}"
            )
    except Exception as exc:  # noqa: BLE001 - as for a server
        results["in_process_floor"], failures["in_process_floor"] = None, str(exc)
        console.print(f"[red]in_process_floor failed: {str(exc)[-1500:]}[/red]")
    phases["in_process_floor_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ladder = measure_ladder(settings, active, ladder_n)
    phases["ladder_s"] = time.perf_counter() - started

    plot_path = PLOT if Path(args.out) == RESULTS / "serve.json" else Path(args.out).with_suffix(".png")
    plot(results, plot_path)
    all_ratios = ratios(results)
    per_user = model_per_user(stages, batches)
    report = {
        "command": "python bench/serve.py"
        + (" --quick" if args.quick else "")
        + (" --reuse" if args.reuse else ""),
        "machine": f"{os.cpu_count()} cores; load generator on the same machine",
        "catalog_items": items,
        "users": users,
        "events": events,
        "setup_seconds": setup_timings,
        "wall_seconds": {**phases, "total_s": time.perf_counter() - wall},
        "servers": {name: what for name, (_, _, what) in SERVERS.items()},
        **{
            name: (
                {level: {k: v for k, v in r.items() if k != "latencies_ms"} for level, r in per.items()}
                if per
                else {"error": failures.get(name, "not run")[-3000:]}
            )
            for name, per in results.items()
        },
        "in_process_floor_serve_settings": in_process_settings,
        "stages": stages,
        "model_ms_per_user": per_user,
        "ratios": all_ratios,
        "targets": targets(results, all_ratios),
        "ladder": ladder,
    }

    table = Table("server", "concurrency", "p50 ms", "p99 ms", "mean ms", "req/s", "errors")
    for name, (label, _, _) in SERVERS.items():
        for level in LEVELS:
            r = (results[name] or {}).get(level)
            if r is None:
                table.add_row(label, level[1:], "failed", "", "", "", "")
                continue
            table.add_row(
                label,
                level[1:],
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['mean_ms']:.2f}",
                f"{r['rps']:.0f}",
                str(r["errors"]),
            )
    console.print(table)
    ratio_table = Table("ratio", "c1", "c16")
    for key in all_ratios["c1"]:
        ratio_table.add_row(key, fmt(all_ratios["c1"][key]), fmt(all_ratios["c16"][key]))
    console.print(ratio_table)
    stage_table = Table("stage", "c1 mean ms", "c1 p99 ms", "c16 mean ms", "c16 p99 ms")
    for stage in ("features", "retrieval", "ranking", "total"):
        a, b = stages.get("c1", {}).get(stage, {}), stages.get("c16", {}).get(stage, {})
        stage_table.add_row(stage, *(fmt(x.get(k)) for x in (a, b) for k in ("mean_ms", "p99_ms")))
    console.print(stage_table)
    console.print(
        f"model ms per user: c1 {fmt(per_user['c1'], 3)}, c16 {fmt(per_user['c16'], 3)} "
        f"(mean batch {per_user['mean_batch_size']}) {' '.join(per_user['notes'])}"
    )
    console.print(f"targets: {report['targets']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(
        f"wrote {out} and {plot_path} in {time.perf_counter() - wall:.0f} s "
        "(the setup stays for --reuse; `make clean` removes it)"
    )
    if failures:
        console.print(f"[red]failed: {', '.join(failures)}[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
