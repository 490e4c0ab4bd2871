"""The latency-vs-model-size frontier: what each size costs a replica, what each remedy buys back, in quality.

For ``tiny``, ``small``, ``base`` and ``large`` and each remedy (fp32 baseline; fp16 id tables; int8 ranker;
HNSW instead of the exact scan; micro-batching off; user-vector cache on; all of them together), measured
one configuration at a time on the same cores:

* **serving** (production profile: PostgreSQL + Redis on 127.0.0.1, a synthetic log over a ``--items``
  catalog, 100k by default, features materialized to Redis): each size trained briefly on that log (latency
  does not depend on how well it is trained), saved once with fp32 and once with fp16 id tables (the same
  weights); per configuration a fresh ``recsys serve`` replica: parameters, artifact MB, **time to ready**
  (process start to ``/ready``: interpreter, imports, artifact, item side, index, self-check — what a
  scale-up waits for once the image is pulled) with the predictor's own per-stage load times, RSS after the
  load and peak RSS, p50/p99 at concurrency 1 and req/s (p99) at 16, the ranker always on over 100
  candidates;
* **quality** (MovieLens latest-small, temporal leave-last-out): each size trained with the same budget
  (``--quality-epochs``), then NDCG@10 on the test users for each remedy *of that same trained model*,
  through the one inference path (``TwoStageRecommender.rank(inference=...)``), against its fp32 form:
  mean change and the paired standard error over users.

Where CUDA is present a GPU row per size is added (fp16 towers, item table and top-N on the GPU); otherwise
the GPU column says "not measured".

    python bench/frontier.py    # bench/results/frontier.json, docs/img/frontier-*.png (~1 h on 2 cores)
    python bench/frontier.py --quick    # tiny + small, 10k items, short runs (a few minutes)
    python bench/frontier.py --reuse    # keep the previous run's log and features (same --items)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import redis
import torch
from common import fresh_database, log_with_features  # bench/common.py
from memory_rule import memory_limit_mib, memory_request_mib, size_peak_mib  # bench/memory_rule.py
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from serve import load  # bench/serve.py's load generator (this script runs from bench/)

from predictor.config import Profile, Settings
from predictor.data.eventlog import EventLog
from predictor.data.loaders import load_dataset
from predictor.data.synthetic import generate
from predictor.features.offline import read_offline
from predictor.features.schema import USER_PROFILE
from predictor.models.config import SIZES, TrainConfig, model_config
from predictor.models.data import build_split, user_feature_snapshots
from predictor.models.evaluate import evaluate, per_user_scores
from predictor.models.recommender import TwoStageRecommender
from predictor.serving.engine import UserVectorCache, int8_ranker
from predictor.serving.process import ServerProcess

# quantize_dynamic's deprecation notices, at every call
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "docs" / "img"
DATABASE, PROJECT, REDIS_DB = "recsys_frontier", "bench_frontier", 7
BASE_ENV = {  # the baseline replica: fp32, exact search, micro-batching on, no user cache, ranker over 100
    "RECSYS_SERVE_ITEM_REFRESH_SECONDS": "0",
    "RECSYS_SERVE_MODEL_POLL_SECONDS": "0",
    "RECSYS_SERVE_RANKER": "on",
    "RECSYS_SERVE_CANDIDATES": "100",
    "RECSYS_SERVE_PRECISION": "fp32",
    "RECSYS_SERVE_SEARCH": "exact",
    "RECSYS_SERVE_MAX_BATCH": "32",
    "RECSYS_SERVE_USER_CACHE_SIZE": "0",
}
SERVING_EXAMPLES = 20_000  # retrieval training windows of each size's brief fit on the serving log
CACHE_ENV = {"RECSYS_SERVE_USER_CACHE_SIZE": "200000"}
# remedy → (artifact tables, environment over BASE_ENV); each changes one thing, "all" every CPU remedy
REMEDIES: dict[str, tuple[str, dict]] = {
    "fp32": ("fp32", {}),
    "fp16 tables": ("fp16", {}),
    "int8 ranker": ("fp32", {"RECSYS_SERVE_PRECISION": "int8"}),
    "hnsw": ("fp32", {"RECSYS_SERVE_SEARCH": "hnsw"}),
    "no batching": ("fp32", {"RECSYS_SERVE_MAX_BATCH": "1"}),
    "cache": ("fp32", CACHE_ENV),
    "all": ("fp16", {"RECSYS_SERVE_PRECISION": "int8", "RECSYS_SERVE_SEARCH": "hnsw", **CACHE_ENV}),
}
GPU = (
    "fp32",
    {"RECSYS_SERVE_DEVICE": "cuda", "RECSYS_SERVE_PRECISION": "fp16", "RECSYS_SERVE_SEARCH": "auto"},
)
console = Console(width=180)


# --- serving set-up -----------------------------------------------------------------------------------------
def serving_settings(home: Path) -> Settings:
    # the online store keeps as many recent items as the largest size reads (large: max_history 200)
    recent = max(cfg.max_history for cfg in SIZES.values())
    return Settings(
        profile=Profile.production,
        home=home,
        pg_database=DATABASE,
        feast_project=PROJECT,
        redis_db=REDIS_DB,
        recent_items=recent,
    )


def serving_setup(settings: Settings, items: int, users: int, events: int, reuse: bool):
    """The synthetic log in PostgreSQL, its features built and materialized to Redis; returns (log, active
    users). With ``reuse``, a previous run's set-up with the same parameters is kept."""
    marker = settings.home_dir / "setup.json"
    params = {"items": items, "users": users, "events": events, "recent_items": settings.recent_items}
    if reuse:
        try:
            if json.loads(marker.read_text()) == params and redis.Redis(db=REDIS_DB).dbsize() > 0:
                log = EventLog(settings.database_url)
                data = log.read()
                log.engine.dispose()
                return data, active_users(data)
        except Exception as exc:  # noqa: BLE001 - nothing to reuse: set up afresh
            console.print(f"--reuse: {type(exc).__name__}: {exc}"[:200])
        console.print(f"--reuse: no complete previous set-up with {params}; setting up afresh")
    marker.unlink(missing_ok=True)
    fresh_database(DATABASE, REDIS_DB)
    data = generate(n_events=events, n_users=users, n_items=items, seed=0)
    log_with_features(settings, data)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params))
    return data, active_users(data)


def active_users(data) -> np.ndarray:
    counts = data.events["user_id"].value_counts()
    return counts.index[counts >= 5].to_numpy(np.int64)


def serving_models(settings: Settings, data, sizes: list[str], examples: int, reuse: bool) -> dict[str, dict]:
    """Each size trained briefly on the serving log, saved with fp32 and with fp16 id tables (same weights).
    With ``reuse``, a size whose two artifacts a previous run saved for this set-up is not trained again."""
    split = build_split(data)
    profile = read_offline(USER_PROFILE, settings)
    out = {}
    for size in sizes:
        info_path = settings.home_dir / "models" / f"{size}.json"
        if reuse and info_path.is_file() and json.loads(info_path.read_text()).get("examples") == examples:
            out[size] = json.loads(info_path.read_text())
            console.print(f"{size}: reusing {', '.join(out[size]['artifacts'].values())}")
            continue
        info_path.unlink(missing_ok=True)
        started = time.perf_counter()
        train = TrainConfig(
            epochs=1,
            min_epochs=1,
            max_examples_per_epoch=examples,
            ranker_epochs=1,
            ranker_examples_per_epoch=2_000,
            seed=0,
        )
        model = TwoStageRecommender(model_config(size, embedding_fp16=False), train)
        model.fit(split, profile, progress=False)
        trained_s = time.perf_counter() - started
        info = {"parameters": parameters(model), "train_s": trained_s, "artifacts": {}, "artifact_mb": {}}
        for tables in ("fp32", "fp16"):
            if tables == "fp16":
                model.with_fp16_tables()
            uri = str(settings.home_dir / "models" / f"{size}-{tables}")
            model.save(uri)
            info["artifacts"][tables] = uri
            info["artifact_mb"][tables] = sum(f.stat().st_size for f in Path(uri).iterdir()) / 1e6
        info["id_table_share"] = id_table_share(model)
        info["examples"] = examples
        info_path.write_text(json.dumps(info))
        out[size] = info
        console.print(
            f"{size}: {info['parameters'] / 1e6:.1f} M parameters, trained in {trained_s:.0f} s, "
            f"artifacts {info['artifact_mb']['fp32']:.0f} / {info['artifact_mb']['fp16']:.0f} MB"
        )
    return out


def parameters(model: TwoStageRecommender) -> int:
    return sum(p.numel() for m in (model.retrieval, model.ranker) for p in m.parameters())


def id_table_share(model: TwoStageRecommender) -> float:
    tables = model.retrieval.items.id_embedding.weight.numel() + model.ranker.item_id.weight.numel()
    return tables / parameters(model)


# --- one replica --------------------------------------------------------------------------------------------
def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at peak (VmRSS, VmHWM) of process ``pid``, in MiB (the keys say ``mb``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB → MiB
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


def load_stages(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        if family.name == "recsys_model_load_seconds":
            out.update({s.labels["stage"]: s.value for s in family.samples})
    return out


def ready_line(output: str) -> str:
    """The predictor's "model ... ready (...)" message: what it serves (retrieval form, ranker)."""
    for line in reversed(output.splitlines()):
        if " ready (" in line:
            try:
                return json.loads(line)["message"][:300]
            except (ValueError, KeyError):
                return line[-300:]
    return ""


def measure_replica(
    settings: Settings,
    artifact: str,
    env: dict,
    users: np.ndarray,
    c1: int,
    c16: int,
    warm_cache: bool,
    log_path: Path,
) -> dict:
    """Start one replica serving ``artifact`` with ``env`` over BASE_ENV, measure, stop it."""
    environ = {**BASE_ENV, **env, "RECSYS_SERVE_MODEL_URI": artifact}
    with ServerProcess(settings, env=environ, log_path=log_path, timeout=600) as srv:
        out = {
            "time_to_ready_s": srv.startup_seconds,
            "load_stages_s": load_stages(srv.url),
            **{f"loaded_{k}": v for k, v in rss_mb(srv.proc.pid).items()},
        }
        if warm_cache:  # every user seen once: the cache's steady state for returning users
            asyncio.run(load(srv.url, users, 16, len(users), seed=2))
        for level, concurrency, n in (("c1", 1, c1), ("c16", 16, c16)):
            r = asyncio.run(load(srv.url, users, concurrency, n, seed=1))
            out[level] = {k: v for k, v in r.items() if k != "latencies_ms"}
        out.update(rss_mb(srv.proc.pid))
        out["ready_log"] = ready_line(srv.output())
    return out


def platform_floor(settings: Settings, users: np.ndarray, c1: int, c16: int) -> dict:
    """``bench/platform_floor.py`` (the same KServe server, a fixed answer of the same shape) measured like a
    replica: what HTTP + KServe alone cost on these cores in this run, the floor every row is read against."""
    command = [sys.executable, str(ROOT / "bench" / "platform_floor.py")]
    with ServerProcess(
        settings, env=BASE_ENV, command=command, log_path=settings.home_dir / "floor.log"
    ) as srv:
        out = {"time_to_ready_s": srv.startup_seconds}
        for level, concurrency, n in (("c1", 1, c1), ("c16", 16, c16)):
            r = asyncio.run(load(srv.url, users, concurrency, n, seed=1))
            out[level] = {k: v for k, v in r.items() if k != "latencies_ms"}
        out.update(rss_mb(srv.proc.pid))
    console.print(
        f"platform floor: ready in {out['time_to_ready_s']:.1f} s, RSS {out['rss_mb']:.0f} MiB, c1 p50 "
        f"{out['c1']['p50_ms']:.2f} / p99 {out['c1']['p99_ms']:.2f} ms, c16 {out['c16']['rps']:.0f} req/s"
    )
    return out


def serving_study(settings, models, users, c1, c16, remedies: dict) -> dict:
    results: dict = {}
    for size, info in models.items():
        results[size] = {}
        for name, (tables, env) in remedies.items():
            started = time.perf_counter()
            with console.status(f"{size} / {name}: start a replica, {c1:,} requests at c1, {c16:,} at c16"):
                try:
                    r = measure_replica(
                        settings,
                        info["artifacts"][tables],
                        env,
                        users,
                        c1,
                        c16,
                        warm_cache=env.get("RECSYS_SERVE_USER_CACHE_SIZE", "0") != "0",
                        log_path=settings.home_dir / f"replica-{size}-{name.replace(' ', '-')}.log",
                    )
                except Exception as exc:  # noqa: BLE001 - one failed configuration is reported, not fatal
                    r = {"error": str(exc)[-2000:]}
            r["wall_s"] = time.perf_counter() - started
            results[size][name] = r
            if "error" in r:
                console.print(f"[red]{size} / {name} failed: {r['error'][-500:]}[/red]")
                continue
            console.print(
                f"{size} / {name}: ready in {r['time_to_ready_s']:.1f} s, RSS {r['rss_mb']:.0f} MiB, "
                f"c1 p50 {r['c1']['p50_ms']:.2f} / p99 {r['c1']['p99_ms']:.2f} ms, c16 "
                f"{r['c16']['rps']:.0f} req/s (p99 {r['c16']['p99_ms']:.1f} ms); {r['ready_log']}"
            )
    return results


# --- quality ------------------------------------------------------------------------------------------------
def quality_study(sizes: list[str], epochs: int, data_dir: str | None, seed: int) -> dict:
    """Per size: one model trained on MovieLens latest-small; NDCG@10 of each remedy of it against fp32."""
    data = load_dataset("ml-latest-small", data_dir)
    split = build_split(data)
    profile = user_feature_snapshots(data)
    out = {}
    for size in sizes:
        started = time.perf_counter()
        train = TrainConfig(
            epochs=epochs, min_epochs=epochs, ranker_epochs=2, ranker_examples_per_epoch=5_000, seed=seed
        )
        model = TwoStageRecommender(model_config(size, embedding_fp16=False), train).fit(
            split, profile, progress=True
        )
        trained_s = time.perf_counter() - started
        model.use_ranker = True  # the ranker over 100 candidates, as the serving study runs it
        forms = remedy_forms(model)
        base = per_user_scores(model.rank(split, inference=forms["fp32"]), split, "test", "ndcg@10")
        row = {
            "train_s": trained_s,
            "epochs": epochs,
            "users": len(base),
            "retrieval_only_ndcg@10": evaluate(model.rank(split, "retrieval"), split, "test")["ndcg@10"],
        }
        row["fp32"] = paired(base, base)
        for name, inference in forms.items():
            if name != "fp32":
                row[name] = paired(
                    per_user_scores(model.rank(split, inference=inference), split, "test", "ndcg@10"), base
                )
        # micro-batching and the cache change no arithmetic: one user per call, and vectors from a warm cache
        row["no batching"] = paired(
            per_user_scores(
                model.rank(split, inference=forms["fp32"]), split, "test", "ndcg@10", batch_size=1
            ),
            base,
        )
        row["cache"] = paired(
            per_user_scores(cached_rank(model, split, forms["fp32"]), split, "test", "ndcg@10"), base
        )
        out[size] = row
        console.print(
            f"quality {size}: fp32 NDCG@10 {row['fp32']['ndcg@10']:.4f}; "
            + ", ".join(f"{k} {v['change']:+.4f}" for k, v in row.items() if isinstance(v, dict))
        )
    return out


def remedy_forms(model: TwoStageRecommender) -> dict:
    """The serving forms of one trained model, each a ``TwoStageInference`` of the one path."""
    forms = {"fp32": model.inference(search="exact", use_ranker=True, candidates=100)}
    half = copy.deepcopy(model).with_fp16_tables()
    forms["fp16 tables"] = half.inference(search="exact", use_ranker=True, candidates=100)
    quantised = copy.deepcopy(model)
    quantised.ranker = int8_ranker(quantised.ranker)
    forms["int8 ranker"] = quantised.inference(search="exact", use_ranker=True, candidates=100)
    forms["hnsw"] = model.inference(search="hnsw", use_ranker=True, candidates=100)
    everything = copy.deepcopy(half)
    everything.ranker = int8_ranker(everything.ranker)
    forms["all"] = everything.inference(search="hnsw", use_ranker=True, candidates=100)
    return forms


def cached_rank(model: TwoStageRecommender, split, inference):
    """``model.rank`` with the user vectors served from a warm :class:`UserVectorCache`."""
    from predictor.models.inference import batch_from_split

    cache = UserVectorCache(1_000_000)

    def rank_fn(users, end, k):
        batch = batch_from_split(
            split, users, end, model.config.max_history, model._user_dense_at(split, users, end)
        )
        cache.vectors(inference, batch)  # fills the cache
        return inference.recommend(batch, k, user=cache.vectors(inference, batch))[0]

    return rank_fn


def paired(scores: np.ndarray, base: np.ndarray) -> dict:
    diff = scores - base
    return {
        "ndcg@10": float(scores.mean()),
        "change": float(diff.mean()),
        "relative_change": float(diff.mean() / base.mean()) if base.mean() else math.nan,
        "paired_se": float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan,
    }


# --- report -------------------------------------------------------------------------------------------------
COLORS = {
    "fp32": "black",
    "fp16 tables": "tab:blue",
    "int8 ranker": "tab:orange",
    "hnsw": "tab:green",
    "no batching": "tab:red",
    "cache": "tab:purple",
    "all": "tab:brown",
    "gpu": "tab:gray",
}


def plots(report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    serving, models, quality = report["serving"], report["models"], report.get("quality", {})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in COLORS.items():
        pts = [
            (models[s]["parameters"], serving[s][name]) for s in serving if "c1" in serving[s].get(name, {})
        ]
        if not pts:
            continue
        x = [p for p, _ in pts]
        axes[0].plot(x, [r["c1"]["p99_ms"] for _, r in pts], "o-", color=color, label=name)
        axes[1].plot(x, [r["c16"]["rps"] for _, r in pts], "o-", color=color, label=name)
    for ax, label in zip(axes, ("p99 at concurrency 1 (ms)", "req/s at concurrency 16")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"latency against model size per remedy ({report['catalog_items']:,} items, {report['cores']} cores)"
    )
    fig.tight_layout()
    path = IMG / "frontier-latency.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    paths.append(str(path.relative_to(ROOT)))
    if quality:
        fig, ax = plt.subplots(figsize=(7, 5))
        for size in serving:
            for name, r in serving[size].items():
                if "c1" not in r or name not in quality.get(size, {}):
                    continue
                ax.scatter(r["c1"]["p99_ms"], quality[size][name]["ndcg@10"], color=COLORS[name], s=30)
                ax.annotate(f"{size} {name}", (r["c1"]["p99_ms"], quality[size][name]["ndcg@10"]), fontsize=6)
        front = pareto(
            [
                (r["c1"]["p99_ms"], quality[s][n]["ndcg@10"])
                for s in serving
                for n, r in serving[s].items()
                if "c1" in r and n in quality.get(s, {})
            ]
        )
        ax.plot(*zip(*front), "k--", lw=1, label="frontier")
        ax.set_xscale("log")
        ax.set_xlabel(f"p99 at concurrency 1, ms ({report['catalog_items']:,}-item catalog)")
        ax.set_ylabel("NDCG@10, MovieLens latest-small")
        ax.legend(fontsize=7)
        ax.set_title("quality against tail latency: size × remedy")
        fig.tight_layout()
        path = IMG / "frontier-quality.png"
        fig.savefig(path, dpi=110)
        paths.append(str(path.relative_to(ROOT)))
    return paths


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both lower latency and higher quality, by latency."""
    front, best = [], -math.inf
    for latency, quality in sorted(points):
        if quality > best:
            front.append((latency, quality))
            best = quality
    return front


P99_TARGETS_MS = (5, 10, 20, 50, 100)


def settled_quality(q: dict, base: float) -> float:
    """A remedy's NDCG@10 for choosing: its size's fp32 figure plus its change, where the change exceeds two
    paired standard errors; a change within the noise counts as none."""
    return base + (q["change"] if abs(q["change"]) > 2 * q["paired_se"] else 0.0)


def recommendations(report: dict) -> list[dict]:
    """Per p99 target at concurrency 1: among the measured configurations that meet it, the one of best
    NDCG@10 (changes within noise counted as none: :func:`settled_quality`), ties broken by req/s at 16 —
    the frontier read off for a user choosing what to run."""
    quality = report.get("quality", {})
    rows = [
        (size, name, r)
        for size, per in report["serving"].items()
        for name, r in per.items()
        if "c1" in r and name in quality.get(size, {})
    ]
    out = []
    for target in P99_TARGETS_MS:
        fits = [
            (settled_quality(quality[s][n], quality[s]["fp32"]["ndcg@10"]), r["c16"]["rps"], s, n, r)
            for s, n, r in rows
            if r["c1"]["p99_ms"] <= target
        ]
        if not fits:
            out.append({"p99_target_ms": target, "choice": None})
            continue
        _, _, size, name, r = max(fits)
        ndcg = quality[size][name]["ndcg@10"]
        out.append(
            {
                "p99_target_ms": target,
                "choice": f"{size} / {name}",
                "ndcg@10": ndcg,
                "c1_p99_ms": r["c1"]["p99_ms"],
                "c16_rps": r["c16"]["rps"],
            }
        )
    return out


def markdown(report: dict) -> str:
    """The tables of ``docs/performance.md``, as this run measured them."""
    quality = report.get("quality", {})
    header = (
        "| size | remedy | parameters | artifact MB | time to ready s (load stages) | RSS / peak MiB | "
        "c1 p50 / p99 ms | c16 req/s (p99 ms) | NDCG@10 (latest-small) | change vs fp32 ± paired se |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    floor = report.get("platform_floor")
    if floor:
        lines.append(
            f"| platform floor | KServe, fixed answer | — | — | {floor['time_to_ready_s']:.1f} | "
            f"{floor['rss_mb']:,.0f} / {floor['peak_rss_mb']:,.0f} | {floor['c1']['p50_ms']:.2f} / "
            f"{floor['c1']['p99_ms']:.2f} | {floor['c16']['rps']:,.0f} ({floor['c16']['p99_ms']:.0f}) "
            "| — | — |"
        )
    for size, per in report["serving"].items():
        m = report["models"][size]
        for name, r in per.items():
            tables = (GPU if name == "gpu" else REMEDIES[name])[0]
            q = quality.get(size, {}).get(name)
            qual = (
                f"{q['ndcg@10']:.4f} | {q['change']:+.4f} ± {q['paired_se']:.4f}" if q else "not measured | —"
            )
            if "c1" not in r:
                lines.append(f"| {size} | {name} | | | failed: {r.get('error', '')[-80:]} | | | | {qual} |")
                continue
            recall = re.search(r"recall@100 ([0-9.]+)", r.get("ready_log", ""))
            if recall:  # what the HNSW index reached on this catalog's item vectors, at its efSearch
                name = f"{name} (recall@100 {recall.group(1)})"
            stages = r["load_stages_s"]
            load = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in stages.items())
            lines.append(
                f"| {size} | {name} | {m['parameters'] / 1e6:.1f} M | {m['artifact_mb'][tables]:,.0f} | "
                f"{r['time_to_ready_s']:.1f} ({load}) | {r['rss_mb']:,.0f} / {r['peak_rss_mb']:,.0f} | "
                f"{r['c1']['p50_ms']:.2f} / {r['c1']['p99_ms']:.2f} | {r['c16']['rps']:,.0f} "
                f"({r['c16']['p99_ms']:.0f}) | {qual} |"
            )
        if "gpu" not in per:
            lines.append(
                f"| {size} | GPU (fp16 towers, table and top-N on the GPU) | | | not measured | | "
                "not measured | not measured | | |"
            )
    lines += [
        "",
        "| p99 target at concurrency 1 | best measured choice | NDCG@10 | p99 ms | req/s at 16 |",
        "|---|---|---|---|---|",
    ]
    for rec in report.get("recommendations", []):
        if rec["choice"] is None:
            lines.append(f"| ≤ {rec['p99_target_ms']} ms | nothing measured meets it | | | |")
        else:
            lines.append(
                f"| ≤ {rec['p99_target_ms']} ms | {rec['choice']} | {rec['ndcg@10']:.4f} | "
                f"{rec['c1_p99_ms']:.2f} | {rec['c16_rps']:,.0f} |"
            )
    return "\n".join(lines) + "\n"


def write_docs_tables(text: str, path: Path = ROOT / "docs" / "performance.md") -> bool:
    """Replace what lies between the frontier markers of ``path`` with ``text``; False if no markers."""
    begin, end = "<!-- frontier:begin (bench/frontier.py writes this) -->", "<!-- frontier:end -->"
    doc = path.read_text() if path.is_file() else ""
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    path.write_text(head + begin + "\n" + text + end + rest.split(end, 1)[1])
    return True


def memory_by_rule(report: dict) -> dict:
    """Per size: its measured peak RSS and the memory request and limit ``bench/memory_rule.py`` gives it."""
    out = {}
    for size in report["serving"]:
        try:
            peak = size_peak_mib(report, size)
        except ValueError:
            continue
        out[size] = {
            "peak_rss_mib": peak,
            "request_mib": memory_request_mib(peak),
            "limit_mib": memory_limit_mib(peak),
        }
    return out


def print_tables(report: dict) -> None:
    table = Table(
        "size",
        "remedy",
        "params M",
        "artifact MB",
        "ready s",
        "RSS MiB",
        "peak MiB",
        "c1 p50 ms",
        "c1 p99 ms",
        "c16 req/s",
        "c16 p99 ms",
        "ΔNDCG@10",
    )
    for size, rows in report["serving"].items():
        m = report["models"][size]
        for name, r in rows.items():
            tables = (GPU if name == "gpu" else REMEDIES[name])[0]
            q = report.get("quality", {}).get(size, {}).get(name)
            dq = f"{q['change']:+.4f} ± {q['paired_se']:.4f}" if q else "—"
            if "c1" not in r:
                table.add_row(size, name, "", "", "failed", "", "", "", "", "", "", dq)
                continue
            table.add_row(
                size,
                name,
                f"{m['parameters'] / 1e6:.1f}",
                f"{m['artifact_mb'][tables]:.0f}",
                f"{r['time_to_ready_s']:.1f}",
                f"{r['rss_mb']:.0f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['c1']['p50_ms']:.2f}",
                f"{r['c1']['p99_ms']:.2f}",
                f"{r['c16']['rps']:.0f}",
                f"{r['c16']['p99_ms']:.1f}",
                dq,
            )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--items", type=int, default=None, help="serving catalog (default 100,000)")
    parser.add_argument("--c1-requests", type=int, default=None)
    parser.add_argument("--c16-requests", type=int, default=None)
    parser.add_argument(
        "--quality-epochs", type=int, default=None, help="retrieval epochs per size (default 8)"
    )
    parser.add_argument("--remedies", nargs="+", default=None, choices=list(REMEDIES))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny + small, 10k items, short runs")
    parser.add_argument("--reuse", action="store_true", help="keep the previous run's log and features")
    parser.add_argument("--data-dir", default=None, help="folder holding ml-latest-small/")
    parser.add_argument("--home", default=str(ROOT / ".recsys-bench" / "frontier"))
    parser.add_argument("--out", default=str(RESULTS / "frontier.json"))
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: redo the derived figures, tables, plots and docs from --out",
    )
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.out).read_text())
        finish(report, Path(args.out))
        return
    wall = time.perf_counter()
    sizes = args.sizes or (["tiny", "small"] if args.quick else list(SIZES))
    items = args.items or (10_000 if args.quick else 100_000)
    c1 = args.c1_requests or (200 if args.quick else 1_000)
    c16 = args.c16_requests or (800 if args.quick else 3_000)
    epochs = args.quality_epochs or (2 if args.quick else 8)
    users, events = (1_000, 20_000) if args.quick else (5_000, 200_000)
    report: dict = {
        "command": " ".join(["python bench/frontier.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "catalog_items": items,
        "users": users,
        "events": events,
        "baseline": "fp32 id tables, exact search (certified bf16 scan where faster), micro-batching (32), "
        "no user cache, ranker over 100 candidates, 1 torch thread",
        "remedies": {name: {"tables": t, "env": env} for name, (t, env) in REMEDIES.items()},
        "requests": {"c1": c1, "c16": c16},
        "gpu": "measured" if torch.cuda.is_available() else "not measured",
        "time_to_ready": "process start to /ready on this machine: interpreter, imports, artifact read and "
        "verify, online item features, item side and index, self-check; image pull aside",
    }
    settings = serving_settings(Path(args.home))
    if not args.skip_serving:
        started = time.perf_counter()
        with console.status(f"set-up: {events:,} events, {items:,} items → features → Redis"):
            data, active = serving_setup(settings, items, users, events, args.reuse)
        report["setup_s"] = time.perf_counter() - started
        with console.status("training each size briefly on the serving log"):
            report["models"] = serving_models(
                settings, data, sizes, SERVING_EXAMPLES if not args.quick else 2_000, args.reuse
            )
        remedies = {name: REMEDIES[name] for name in args.remedies or REMEDIES}
        if torch.cuda.is_available():
            remedies["gpu"] = GPU
        with console.status("platform floor: KServe with a fixed answer"):
            report["platform_floor"] = platform_floor(settings, active, c1, c16)
        report["serving"] = serving_study(settings, report["models"], active, c1, c16, remedies)
    if not args.skip_quality:
        started = time.perf_counter()
        report["quality"] = quality_study(sizes, epochs, args.data_dir, seed=0)
        report["quality_s"] = time.perf_counter() - started
    report["wall_s"] = time.perf_counter() - wall
    finish(report, Path(args.out))


def finish(report: dict, out: Path) -> None:
    """Derived figures (recommendations, memory by the rule), tables, plots; the docs' tables when ``out``
    is the default result file; then the JSON."""
    if "serving" in report:
        report["recommendations"] = recommendations(report)
        report["memory_rule_mib"] = memory_by_rule(report)
        print_tables(report)
        report["plots"] = plots(report)
        text = markdown(report)
        console.print(text)
        if out == RESULTS / "frontier.json" and write_docs_tables(text):
            console.print("docs/performance.md: tables rewritten")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out} (measured in {report.get('wall_s', 0):.0f} s)")


if __name__ == "__main__":
    main()
