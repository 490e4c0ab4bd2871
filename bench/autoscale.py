"""Autoscaling policies compared in simulation (``bench/sim.py``), same traces, same seeds, same run.

Batch costs per quality-ladder level come from the predictor's own benchmark (``bench/results/serve.json``,
its ``ladder`` section, each level pinned: a lone request's p50 and p99 at concurrency 1, full batches'
throughput at concurrency 64), each level's price from
``bench/results/levels.json`` (test NDCG@10 per level on MovieLens, the larger loss of the two datasets,
a level scoring above full counted as no loss), and a new replica's start-up from the measured time to
ready of the chosen model size (``bench/results/frontier.json``, ``--size``, default small).

For each trace: every policy at its default setpoint (the table), then each policy's own setpoint swept
(``sim.SETPOINTS``: ours' headroom, the HPA's CPU target, KEDA's threshold, KPA's concurrency target) for
the SLO-attainment-vs-replica-seconds plane, where ours with the ladder must lie on or above every
baseline's curve over their common cost range (the worst gap is reported). Every target is checked on
each seed (default 0, 1, 2: Poisson arrivals, service noise, start-up times); the tables and plots show
the first. Writes
``bench/results/autoscale.json``, ``docs/img/autoscale.png`` (time series) and
``docs/img/autoscale-pareto.png``.

    python bench/autoscale.py            # 30-minute traces, seeds 0 1 2
    python bench/autoscale.py --quick    # 10-minute traces
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import itertools

from bench.sim import (
    DEFAULT_SETPOINT,
    POLICIES,
    SETPOINTS,
    Ladder,
    ServiceTime,
    SimConfig,
    frontier_gap,
    simulate,
    traces,
)

RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "img" / "autoscale.png"
PARETO_PLOT = ROOT / "docs" / "img" / "autoscale-pareto.png"
BASELINES = ("ours", "cpu_hpa", "keda_p99", "kpa")
console = Console(width=160)


def ladder_from_results() -> tuple[Ladder, str]:
    """The ladder as measured: per-level service times (serve.json's ladder section) and NDCG@10 drops
    (levels.json); without them, the single full level of serve.json's lone-request latency."""
    serve_path, levels_path = RESULTS / "serve.json", RESULTS / "levels.json"
    serve = json.loads(serve_path.read_text()) if serve_path.is_file() else {}
    measured = {lv: r["c1"] for lv, r in serve.get("ladder", {}).items() if lv != "auto" and "c1" in r}
    if not measured:
        c1 = serve.get("ours", {}).get("c1")
        service = ServiceTime(c1["p50_ms"] / 1000, c1["p99_ms"] / 1000) if c1 else ServiceTime(0.010, 0.015)
        return Ladder.single(service), "no ladder measured: one level (serve.json's ours at concurrency 1)"
    order = ("full", "reduced", "retrieval", "popularity")
    levels = tuple(lv for lv in order if lv in measured)
    drops = {lv: 0.0 for lv in levels}
    if levels_path.is_file():
        for d in json.loads(levels_path.read_text())["datasets"].values():
            full = d["levels"]["full"]["ndcg@10"]["mean"]
            for lv in levels:
                drops[lv] = max(drops[lv], 1.0 - d["levels"][lv]["ndcg@10"]["mean"] / full if full else 0.0)
    service = tuple(
        ServiceTime(measured[lv]["p50_ms"] / 1000, measured[lv]["p99_ms"] / 1000) for lv in levels
    )
    # each further user of a batch: at concurrency 64 the worker is always busy with full batches, so
    # fixed + max_batch × per_user = max_batch / throughput, and fixed + per_user = the lone mean
    max_batch = int(serve.get("in_process_floor_serve_settings", {}).get("max_batch", 32))
    loaded = {lv: serve["ladder"][lv].get("c64", {}).get("rps") for lv in levels}
    per_user = None
    if max_batch > 1 and all(loaded.values()):
        per_user = tuple(
            min(max((max_batch / loaded[lv] - s.mean_s) / (max_batch - 1), 0.0), s.mean_s)
            for lv, s in zip(levels, service)
        )
    source = (
        f"{serve_path.name} ladder (pinned levels: concurrency 1 for a lone request, "
        + ("concurrency 64 for batches" if per_user else "no concurrency-64 run: no batching gain")
        + f") and {levels_path.name} "
        f"({'measured' if levels_path.is_file() else 'missing: no quality loss counted'})"
    )
    drop = tuple(max(drops[lv], 0.0) for lv in levels)
    return Ladder(levels, service, drop, per_user, max_batch), source


def startup(size: str) -> tuple[tuple[float, float], str]:
    """The start-up range of a new replica: the least and most time to ready that ``bench/frontier.py``
    measured for ``size`` over its replica starts (every remedy's), or the old assumption without it."""
    path = RESULTS / "frontier.json"
    if path.is_file():
        starts = [
            r["time_to_ready_s"]
            for r in json.loads(path.read_text()).get("serving", {}).get(size, {}).values()
            if "time_to_ready_s" in r
        ]
        if starts:
            return (min(starts), max(starts)), (
                f"{path.name}: {size}'s time to ready over {len(starts)} replica starts "
                "(process start to ready; pod scheduling and image pull not included)"
            )
    return SimConfig.startup_s, "assumed 20–60 s (no measured time to ready: run bench/frontier.py)"


def direction_changes_per_window(windows: list[dict], stabilization_s: float, settle_s: float = 300.0) -> int:
    """The most changes of scale direction inside any one stabilisation window, counting only windows under
    steady load (the offered rate unchanged for ``settle_s``: a load step rightly reverses a scale-down)."""
    rates = [(w["t"], w["rate"]) for w in windows]
    steady = [all(r == w["rate"] for t, r in rates if w["t"] - settle_s <= t <= w["t"]) for w in windows]
    changes, last = [], 0
    for (prev, cur), ok in zip(itertools.pairwise(windows), steady[1:]):
        if not ok:
            last = 0  # a new steady segment starts afresh
            continue
        step = np.sign(cur["replicas"] - prev["replicas"])
        if step and step != last:
            if last:
                changes.append(cur["t"])
            last = step
    return max((sum(1 for u in changes if t <= u < t + stabilization_s) for t in changes), default=0)


def issue5_checks(windows_of, slow_at: float, config: SimConfig, policy: str) -> dict:
    """Issue 5's targets for ``policy``: after the first scale-up under step ×2, ≥ 95 % of windows on
    target; a 3×-slow replica ejected within 2 periods and p99 back on target within 3; at most one change
    of direction per stabilisation window under steady load."""
    out = {}
    step = windows_of("step_x2")
    first_up = next((i for i, w in enumerate(step) if w["replicas"] > step[0]["replicas"]), None)
    after = step[first_up + 1 :] if first_up is not None else []
    ready_at = next((i for i, w in enumerate(after) if w["ready"] == w["replicas"]), 0)
    settled = after[ready_at:]
    share = float(np.mean([w["p99_ms"] <= config.target_p99_ms for w in settled])) if settled else 1.0
    out[f"{policy}, step_x2: windows on target after the first scale-up >= 95 %"] = {
        "value": share,
        "ok": share >= 0.95,
    }
    slow = windows_of("slow_replica")
    slow_from = next(i for i, w in enumerate(slow) if w["t"] - config.control_period_s >= slow_at)
    ejected_at = next((i for i in range(slow_from, len(slow)) if slow[i]["ejected"]), None)
    periods = (ejected_at - slow_from + 1) if ejected_at is not None else math.inf
    out[f"{policy}, slow_replica: ejected within 2 control periods"] = {"value": periods, "ok": periods <= 2}
    back = next(
        (i for i in range(slow_from + 1, len(slow)) if slow[i]["p99_ms"] <= config.target_p99_ms), None
    )
    back_in = (back - slow_from + 1) if back is not None else math.inf
    out[f"{policy}, slow_replica: p99 back on target within 3 control periods"] = {
        "value": back_in,
        "ok": back_in <= 3,
    }
    flips = max(
        direction_changes_per_window(windows_of(t), config.scale_down_stabilization_s)
        for t in ("step_x2", "spike_x5", "slow_replica")
    )
    out[f"{policy}, steady load: at most one change of direction per stabilisation window"] = {
        "value": flips,
        "ok": flips <= 1,
    }
    return out


def run_one(job: tuple) -> tuple:
    trace_name, policy, setpoint, base, duration, ladder, config, seed = job
    trace = next(t for t in traces(base, duration) if t.name == trace_name)
    run = simulate(trace, policy, ladder, config, seed=seed, setpoint=setpoint)
    return (trace_name, policy, setpoint), run


def at_default(runs: dict, trace: str, policy: str):
    """The run of ``policy`` at its default setpoint on ``trace``."""
    return runs[(trace, policy, DEFAULT_SETPOINT.get(policy))]


def targets(runs: dict, names: list[str], base: float, duration: int, config: SimConfig) -> tuple:
    """(sweep curves, frontier gaps, target checks) of one seed's runs, keyed (trace, policy, setpoint)."""
    default = partial(at_default, runs)

    curves = {
        trace: {
            p: [
                {
                    "setpoint": s,
                    "slo_attainment": runs[(trace, p, s)].slo_attainment,
                    "replica_seconds": runs[(trace, p, s)].replica_seconds,
                    "degraded_share": runs[(trace, p, s)].degraded_share,
                    "ndcg_loss": runs[(trace, p, s)].ndcg_loss,
                    "served_by_level": runs[(trace, p, s)].served,
                }
                for s in SETPOINTS[p]
            ]
            for p in SETPOINTS
        }
        for trace in names
    }
    gaps = {
        trace: {
            b: frontier_gap(
                [(c["replica_seconds"], c["slo_attainment"]) for c in curves[trace]["ours_ladder"]],
                [(c["replica_seconds"], c["slo_attainment"]) for c in curves[trace][b]],
            )
            for b in BASELINES
        }
        for trace in names
    }
    spike, static_max = default("spike_x5", "ours_ladder"), default("spike_x5", "static_max")
    checks = {
        "ours_ladder, spike_x5: >= 99 % of windows on target": {
            "value": spike.slo_attainment,
            "ok": spike.slo_attainment >= 0.99,
        },
        "ours_ladder, spike_x5: <= 50 % of static-at-max's replica-seconds": {
            "value": spike.replica_seconds / static_max.replica_seconds,
            "ok": spike.replica_seconds <= 0.5 * static_max.replica_seconds,
        },
        "ours_ladder, spike_x5: expected NDCG@10 loss over the trace <= 2 %": {
            "value": spike.ndcg_loss,
            "ok": spike.ndcg_loss <= 0.02,
        },
        "ours_ladder on or above every baseline's SLO-vs-cost curve, every trace": {
            "value": {t: {b: g["worst_gap"] for b, g in per.items()} for t, per in gaps.items()},
            "ok": all(
                g["worst_gap"] is None or g["worst_gap"] >= -1e-9
                for per in gaps.values()
                for g in per.values()
            ),
        },
    }
    slow_at = next(t for t in traces(base, duration) if t.slow_replica).slow_replica[0]
    for policy in ("ours_ladder", "ours"):
        checks.update(issue5_checks(lambda tr, p=policy: default(tr, p).windows, slow_at, config, policy))
    return curves, gaps, checks


def plot_series(runs: dict, names: list[str], config: SimConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(names), figsize=(4.2 * len(names), 8.5), sharex="col")
    for col, trace in enumerate(names):
        for policy in ("ours_ladder", "ours", "cpu_hpa", "keda_p99", "kpa", "static_max"):
            w = at_default(runs, trace, policy).windows
            t = [x["t"] / 60 for x in w]
            axes[0, col].plot(t, [max(x["p99_ms"], 0.1) for x in w], label=policy, lw=1)
            axes[1, col].step(t, [x["replicas"] for x in w], label=policy, lw=1, where="post")
            if policy == "ours_ladder":
                axes[2, col].step(t, [100 * x["degraded"] for x in w], color="tab:blue", lw=1, where="post")
        axes[0, col].axhline(config.target_p99_ms, color="k", ls="--", lw=0.8)
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(trace)
        axes[2, col].set_xlabel("minutes")
    axes[0, 0].set_ylabel("p99 per window (ms)")
    axes[1, 0].set_ylabel("replicas")
    axes[2, 0].set_ylabel("ours_ladder: % of requests degraded")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        "Simulated replica pool at each policy's default setpoint: "
        "p99 (target dashed), replicas, degraded share"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_pareto(curves: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4))
    for col, trace in enumerate(names):
        for policy, points in curves[trace].items():
            pts = sorted(points, key=lambda p: p["replica_seconds"])
            axes[col].plot(
                [p["replica_seconds"] for p in pts],
                [100 * p["slo_attainment"] for p in pts],
                marker="o",
                ms=3,
                lw=1,
                label=policy,
            )
        axes[col].set_title(trace)
        axes[col].set_xlabel("replica-seconds")
    axes[0].set_ylabel("% of 15 s windows with p99 on target")
    axes[0].legend(fontsize=7)
    fig.suptitle("Each policy's setpoint swept: SLO attainment against replica-seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


DOC = ROOT / "docs" / "operator.md"
MARKERS = ("<!-- autoscale:start -->", "<!-- autoscale:end -->")
LABELS = {
    "ours_ladder": "ours, ladder",
    "ours": "ours, no ladder",
    "static_min": "static min",
    "static_max": "static max",
    "cpu_hpa": "CPU HPA",
    "keda_p99": "KEDA p99",
    "kpa": "KPA-like",
}
TRACE_LABELS = {
    "step_x2": "step ×2",
    "spike_x5": "spike ×5 for 60 s",
    "diurnal": "diurnal",
    "slow_replica": "one replica 3× slower",
}


def write_doc(report: dict) -> None:
    """The results table, the sweep's best points, the frontier gaps and the checks into docs/operator.md."""
    import re

    meta = report["_meta"]
    seeds = meta.get("seeds", [meta.get("seed", 0)])
    seed_list = ", ".join(map(str, seeds))
    traces_ = [t for t in report if t != "_meta"]
    lines = ["| trace | " + " | ".join(LABELS[p] for p in POLICIES) + " |", "|---|" + "---|" * len(POLICIES)]
    for t in traces_:
        cells = []
        for p in POLICIES:
            r = report[t][p]
            cell = f"{r['slo_attainment']:.0%} / {r['replica_seconds']:,.0f}"
            if p == "ours_ladder":
                cell += f" ({r['degraded_share']:.1%} degraded, NDCG −{100 * r['ndcg_loss']:.2f} %)"
            cells.append(cell)
        lines.append(f"| {TRACE_LABELS.get(t, t)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "Worst gap of ours with the ladder against each baseline's SLO-vs-replica-seconds staircase over "
            "their common cost range (≥ 0: on or above it; each setpoint swept, `sim.SETPOINTS`):"
        ),
        "",
        "| trace | " + " | ".join(LABELS[b] for b in BASELINES) + " |",
        "|---|" + "---|" * len(BASELINES),
    ]
    for t in traces_:
        gaps = meta["pareto_gaps"][t]
        lines.append(
            f"| {TRACE_LABELS.get(t, t)} | "
            + " | ".join(
                f"{g['worst_gap']:+.1%}" if g["worst_gap"] is not None else "no common range"
                for g in (gaps[b] for b in BASELINES)
            )
            + " |"
        )
    spike_max = report["spike_x5"]["static_max"]["replica_seconds"]
    lines += [
        "",
        "Ours with the ladder on the spike, each headroom (share of static-at-max's replica-seconds):",
        "",
        "| headroom | SLO | replica-seconds | degraded | NDCG@10 loss |",
        "|---|---|---|---|---|",
    ]
    for c in meta["sweeps"]["spike_x5"]["ours_ladder"]:
        lines.append(
            f"| {c['setpoint']:g} | {c['slo_attainment']:.1%} | {c['replica_seconds'] / spike_max:.1%} | "
            f"{c['degraded_share']:.1%} | {100 * c['ndcg_loss']:.2f} % |"
        )
    lines += [
        "",
        f"Targets, as the script checks them (default setpoints), on each seed ({seed_list}):",
        "",
        "| target | result |",
        "|---|---|",
    ]
    for name, v in meta["checks"].items():
        values = list(v.get("per_seed", {"": v["value"]}).values())
        if all(isinstance(x, (int, float)) for x in values):
            shown = " / ".join(f"{x:.3g}" for x in values)
            if "mean" in v:
                shown += f" (mean {v['mean']:.3g} ± {v['sd']:.2g})"
        else:
            shown = "see the gap table"
        verdict = (
            f"met on {'all ' + str(len(seeds)) + ' seeds' if len(seeds) > 1 else 'seed ' + str(seeds[0])}"
        )
        lines.append(f"| {name} | {verdict if v['ok'] else '**not met**'}: {shown} |")
    block = MARKERS[0] + "\n" + "\n".join(lines) + "\n" + MARKERS[1]
    text = DOC.read_text()
    DOC.write_text(
        re.sub(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), lambda _: block, text, flags=re.DOTALL)
    )


def reprice(out: Path) -> None:
    """The expected NDCG@10 losses of a finished run, from its requests per level and today's prices."""
    report = json.loads(out.read_text())
    meta = report["_meta"]
    ladder, source = ladder_from_results()
    if list(ladder.levels) != meta["ladder"]["levels"]:
        raise SystemExit(
            f"the run simulated levels {meta['ladder']['levels']}, the results now have {ladder.levels}"
        )
    drop = np.asarray(ladder.drop)

    def price(entry: dict) -> None:
        served = np.asarray(entry["served_by_level"])
        entry["ndcg_loss"] = float(served @ drop / max(served.sum(), 1))

    for trace, per in report.items():
        if trace != "_meta":
            for entry in per.values():
                price(entry)
    for per in meta["sweeps"].values():
        for points in per.values():
            for entry in points:
                price(entry)
    meta["ladder"]["ndcg_drop"], meta["ladder"]["source"] = list(ladder.drop), source
    loss = report["spike_x5"]["ours_ladder"]["ndcg_loss"]
    served = meta.get("spike_served_by_level") or {
        "first": report["spike_x5"]["ours_ladder"]["served_by_level"]
    }
    losses = {seed: float(np.asarray(n) @ drop / max(sum(n), 1)) for seed, n in served.items()}
    check = {"value": loss, "per_seed": losses, "ok": all(v <= 0.02 for v in losses.values())}
    if len(losses) > 1:
        check["mean"], check["sd"] = (
            float(np.mean(list(losses.values()))),
            float(np.std(list(losses.values()), ddof=1)),
        )
    meta["checks"]["ours_ladder, spike_x5: expected NDCG@10 loss over the trace <= 2 %"] = check
    meta["repriced"] = True
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if out == RESULTS / "autoscale.json":
        write_doc(report)
    console.print(
        f"re-priced {out} with {source}: drops "
        + ", ".join(f"{lv} {100 * d:.1f} %" for lv, d in zip(ladder.levels, ladder.drop))
        + f"; spike loss {100 * loss:.2f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10-minute traces")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="simulation seeds: the targets are checked on each; tables and plots show the first",
    )
    parser.add_argument(
        "--size", default="small", help="model size whose measured time to ready starts a pod"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "autoscale.json"))
    parser.add_argument(
        "--reprice",
        action="store_true",
        help="only recompute the NDCG@10 losses in --out from the current levels.json (no simulation)",
    )
    args = parser.parse_args()
    if args.reprice:
        reprice(Path(args.out))
        return
    duration = 600 if args.quick else 1800
    ladder, ladder_source = ladder_from_results()
    full = ladder.service[0]
    startup_s, startup_source = startup(args.size)
    config = SimConfig(target_p99_ms=max(50.0, 4 * full.p99_s * 1000), startup_s=startup_s)
    capacity = 1.0 / full.mean_s  # requests per second one replica serves at 100 % busy, full quality
    base = 3.0 * capacity  # about six replicas at half load before the trace changes it
    console.print(f"start-up {startup_s[0]:.1f}–{startup_s[1]:.1f} s, from {startup_source}")
    console.print(
        f"ladder from {ladder_source}: "
        + ", ".join(
            f"{lv} p50 {s.p50_s * 1000:.2f} / p99 {s.p99_s * 1000:.2f} ms, batch {1000 * f:.1f} + "
            f"{1000 * u:.2f} ms/user (NDCG@10 −{100 * d:.1f} %)"
            for lv, s, d, f, u in zip(
                ladder.levels, ladder.service, ladder.drop, ladder.costs().fixed, ladder.costs().per_user
            )
        )
    )
    console.print(
        f"→ {capacity:.0f} req/s per replica at full quality; base load {base:.0f} req/s; target p99 "
        f"{config.target_p99_ms:g} ms"
    )
    names = [t.name for t in traces(base, duration)]
    jobs = {
        (trace, policy, setpoint)
        for trace in names
        for policy in POLICIES
        for setpoint in ({DEFAULT_SETPOINT.get(policy)} | set(SETPOINTS.get(policy, ())))
    }
    by_seed: dict[int, dict] = {seed: {} for seed in args.seeds}
    ordered = sorted(jobs, key=lambda j: (j[0], j[1], -1 if j[2] is None else j[2]))
    with (
        console.status(f"simulating {len(jobs)} runs × {len(args.seeds)} seeds on {args.workers} processes"),
        ProcessPoolExecutor(args.workers) as pool,
    ):
        work = [(*j, base, duration, ladder, config, seed) for seed in args.seeds for j in ordered]
        for job, (key, run) in zip(work, pool.map(run_one, work)):
            by_seed[job[-1]][key] = run
    runs = by_seed[args.seeds[0]]
    default = partial(at_default, runs)

    table = Table("trace", *(f"{p}\nSLO / replica-s" for p in POLICIES))
    for trace in names:
        table.add_row(
            trace,
            *(
                f"{default(trace, p).slo_attainment:.0%} / {default(trace, p).replica_seconds:,.0f}"
                + (
                    f"\n{default(trace, p).degraded_share:.1%} degr., "
                    f"NDCG −{100 * default(trace, p).ndcg_loss:.2f} %"
                    if p == "ours_ladder"
                    else ""
                )
                for p in POLICIES
            ),
        )
    console.print(table)

    per_seed = {seed: targets(by_seed[seed], names, base, duration, config) for seed in args.seeds}
    curves, gaps, _ = per_seed[args.seeds[0]]
    gap_table = Table("trace", *(f"worst gap vs {b}" for b in BASELINES))
    for trace in names:
        gap_table.add_row(
            trace,
            *(
                f"{g['worst_gap']:+.1%} at {g['at']:,.0f}"
                if g["worst_gap"] is not None
                else "no common range"
                for g in gaps[trace].values()
            ),
        )
    console.print(gap_table)
    # a target is met where it holds on every seed; the value shown is the first seed's
    checks = {
        name: {
            "value": first["value"],
            "per_seed": {seed: per_seed[seed][2][name]["value"] for seed in args.seeds},
            "ok": all(per_seed[seed][2][name]["ok"] for seed in args.seeds),
        }
        for name, first in per_seed[args.seeds[0]][2].items()
    }
    for name, v in checks.items():
        floats = [x for x in v["per_seed"].values() if isinstance(x, (int, float))]
        if len(floats) == len(args.seeds) > 1:
            v["mean"], v["sd"] = float(np.mean(floats)), float(np.std(floats, ddof=1))
    for name, v in checks.items():
        shown = v["per_seed"] if len(args.seeds) > 1 else v["value"]
        console.print(f"{'[green]ok[/]' if v['ok'] else '[red]NOT MET[/]'}  {name}: {shown}")

    plot_path = PLOT if Path(args.out) == RESULTS / "autoscale.json" else Path(args.out).with_suffix(".png")
    pareto_path = PARETO_PLOT if plot_path == PLOT else plot_path.with_name(plot_path.stem + "-pareto.png")
    plot_series(runs, names, config, plot_path)
    plot_pareto(curves, names, pareto_path)
    report = {
        trace: {
            p: {
                "slo_attainment": default(trace, p).slo_attainment,
                "replica_seconds": default(trace, p).replica_seconds,
                "ejection_periods": default(trace, p).ejection_periods,
                "degraded_share": default(trace, p).degraded_share,
                "ndcg_loss": default(trace, p).ndcg_loss,
                "served_by_level": default(trace, p).served,
            }
            for p in POLICIES
        }
        for trace in names
    }
    report["_meta"] = {
        "command": "python bench/autoscale.py"
        + (" --quick" if args.quick else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
        + (f" --out {args.out}" if Path(args.out) != RESULTS / "autoscale.json" else ""),
        "seeds": args.seeds,
        "spike_served_by_level": {
            seed: by_seed[seed][("spike_x5", "ours_ladder", DEFAULT_SETPOINT["ours_ladder"])].served
            for seed in args.seeds
        },
        "ladder": {
            "source": ladder_source,
            "levels": list(ladder.levels),
            "p50_ms": [s.p50_s * 1000 for s in ladder.service],
            "p99_ms": [s.p99_s * 1000 for s in ladder.service],
            "batch_fixed_ms": [1000 * f for f in ladder.costs().fixed],
            "batch_per_user_ms": [1000 * u for u in ladder.costs().per_user],
            "max_batch": ladder.max_batch,
            "ndcg_drop": list(ladder.drop),
        },
        "startup": {"source": startup_source, "range_s": list(startup_s)},
        "config": config.__dict__,
        "base_rps": base,
        "duration_s": duration,
        "default_setpoints": DEFAULT_SETPOINT,
        "sweeps": curves,
        "pareto_gaps": gaps,
        "checks": checks,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if Path(args.out) == RESULTS / "autoscale.json":
        write_doc(json.loads(Path(args.out).read_text()))
    console.print(f"wrote {args.out}, {plot_path} and {pareto_path}")


if __name__ == "__main__":
    main()
