"""Autoscaling policies compared in simulation (``operators/sim.py``), same traces, same seeds, same run.

Service times come from the predictor's own benchmark (``bench/results/serve.json``: p50 and p99 of a lone
request) and a new replica's start-up from the measured time to ready of the chosen model size
(``bench/results/frontier.json``, ``--size``, default small), so the replica pool behaves like the predictor
measured on this machine. Writes
``bench/results/autoscale.json`` (``{TRACE: {POLICY: {"slo_attainment", "replica_seconds",
"ejection_periods"}}}`` plus the target checks) and ``docs/img/autoscale.png``.

    python bench/autoscale.py            # 30-minute traces
    python bench/autoscale.py --quick    # 10-minute traces
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from operators.sim import POLICIES, ServiceTime, SimConfig, simulate, traces

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "img" / "autoscale.png"
console = Console(width=150)


def service_time() -> tuple[ServiceTime, str]:
    path = RESULTS / "serve.json"
    if path.is_file():
        c1 = json.loads(path.read_text())["ours"]["c1"]
        return ServiceTime(c1["p50_ms"] / 1000, c1["p99_ms"] / 1000), f"{path.name} (ours, concurrency 1)"
    return ServiceTime(0.010, 0.015), "default 10 / 15 ms (no bench/results/serve.json yet)"


def startup(size: str) -> tuple[tuple[float, float], str]:
    """The start-up range of a new replica: the least and most time to ready that ``bench/frontier.py``
    measured for ``size`` over its replica starts (every remedy's), or the old assumption without it."""
    path = RESULTS / "frontier.json"
    if path.is_file():
        starts = [r["time_to_ready_s"] for r in json.loads(path.read_text()).get("serving", {}).get(size, {}).values()
                  if "time_to_ready_s" in r]  # fmt: skip
        if starts:
            return (min(starts), max(starts)), (
                f"{path.name}: {size}'s time to ready over {len(starts)} replica starts (process start to ready; "
                "pod scheduling and image pull not included)"
            )
    return SimConfig.startup_s, "assumed 20–60 s (no measured time to ready: run bench/frontier.py)"


def direction_changes_per_window(windows: list[dict], stabilization_s: float, settle_s: float = 300.0) -> int:
    """The most changes of scale direction inside any one stabilisation window, counting only windows under
    steady load (the offered rate unchanged for ``settle_s``: a load step rightly reverses a scale-down)."""
    rates = [(w["t"], w["rate"]) for w in windows]
    steady = [all(r == w["rate"] for t, r in rates if w["t"] - settle_s <= t <= w["t"]) for w in windows]
    changes, last = [], 0
    for (prev, cur), ok in zip(zip(windows, windows[1:]), steady[1:]):
        if not ok:
            last = 0  # a new steady segment starts afresh
            continue
        step = np.sign(cur["replicas"] - prev["replicas"])
        if step and step != last:
            if last:
                changes.append(cur["t"])
            last = step
    return max((sum(1 for u in changes if t <= u < t + stabilization_s) for t in changes), default=0)


def checks(results: dict, config: SimConfig) -> dict:
    out = {}
    ours_step = results["step_x2"]["ours"]["_run"].windows
    first_up = next((i for i, w in enumerate(ours_step) if w["replicas"] > config.min_replicas), None)
    after = ours_step[first_up + 1 :] if first_up is not None else []
    # the windows after the new replicas became ready (the first scale-up's start-up is unavoidable)
    ready_at = next((i for i, w in enumerate(after) if w["ready"] == w["replicas"]), 0)
    settled = after[ready_at:]
    share = float(np.mean([w["p99_ms"] <= config.target_p99_ms for w in settled])) if settled else 0.0
    out["step_x2: share of windows on target after the first scale-up >= 0.95"] = {
        "value": share,
        "ok": share >= 0.95,
    }

    slow = results["slow_replica"]["ours"]["_run"].windows
    slow_at = results["slow_replica"]["_slow_at"]
    slow_from = next(
        i for i, w in enumerate(slow) if w["t"] - config.control_period_s >= slow_at
    )  # first slow period
    ejected_at = next((i for i in range(slow_from, len(slow)) if slow[i]["ejected"]), None)
    periods_to_eject = (ejected_at - slow_from + 1) if ejected_at is not None else math.inf
    back = next((i for i in range(slow_from, len(slow)) if i > slow_from and slow[i]["p99_ms"] <= config.target_p99_ms),
                None)  # fmt: skip
    periods_to_target = (back - slow_from + 1) if back is not None else math.inf
    out["slow_replica: ejected within 2 control periods"] = {
        "value": periods_to_eject,
        "ok": periods_to_eject <= 2,
    }
    out["slow_replica: p99 back on target within 3 control periods"] = {"value": periods_to_target,
                                                                        "ok": periods_to_target <= 3}  # fmt: skip
    flips = max(direction_changes_per_window(results[t]["ours"]["_run"].windows, config.scale_down_stabilization_s)
                for t in ("step_x2", "spike_x5", "slow_replica"))  # fmt: skip
    out["steady load: at most one change of direction per stabilisation window"] = {
        "value": flips,
        "ok": flips <= 1,
    }
    for variant in ("ours", "ours_headroom_0.5"):
        per_trace = {t: {"slo": [results[t][variant]["slo_attainment"], results[t]["static_max"]["slo_attainment"]],
                         "replica_seconds": [results[t][variant]["replica_seconds"],
                                             results[t]["static_max"]["replica_seconds"]],
                         "ok": results[t][variant]["replica_seconds"] < results[t]["static_max"]["replica_seconds"]
                         and results[t][variant]["slo_attainment"] >= results[t]["static_max"]["slo_attainment"] - 1e-9}
                     for t in results}  # fmt: skip
        out[f"{variant}: fewer replica-seconds than static-at-max at equal or better SLO attainment"] = {
            "value": {t: v["ok"] for t, v in per_trace.items()}, "detail": per_trace,
            "ok": all(v["ok"] for v in per_trace.values())}  # fmt: skip
    return out


def smallest_matching_static_pool(trace, service: ServiceTime, config: SimConfig, slo: float, seed: int) -> dict:
    """The fewest replicas a *static* pool needs to reach ``slo`` (static-at-max's attainment) on ``trace``,
    by bisection (attainment grows with the pool). When that is ``max_replicas`` itself and the trace's
    overload comes unannounced and shorter than a pod's start-up, no policy can match static-at-max's SLO
    with fewer replica-seconds: it must hold that many ready replicas before the overload begins."""
    import dataclasses

    def static(n: int) -> tuple[float, float]:
        run = simulate(trace, "static_min", service, dataclasses.replace(config, min_replicas=n, max_replicas=n),
                       seed=seed)  # fmt: skip
        return run.slo_attainment, run.replica_seconds

    def ours(floor: int) -> tuple[float, float]:
        run = simulate(trace, "ours", service, dataclasses.replace(config, min_replicas=floor), seed=seed)
        return run.slo_attainment, run.replica_seconds

    def smallest(run) -> tuple[int, dict]:
        lo, hi, tried = config.min_replicas, config.max_replicas, {}
        while lo < hi:
            mid = (lo + hi) // 2
            tried[mid] = run(mid)
            lo, hi = (lo, mid) if tried[mid][0] >= slo - 1e-9 else (mid + 1, hi)
        return lo, tried

    n, tried = smallest(static)
    floor, tried_ours = smallest(ours)
    ours_at_floor = ours(floor)
    return {"replicas": n, "replica_seconds": n * trace.duration_s, "equals_static_max": n == config.max_replicas,
            "slo_of_smaller_pools_tried": {k: a for k, (a, _) in sorted(tried.items()) if k < n},
            "ours_min_replicas_needed": floor, "ours_at_that_floor": {"slo_attainment": ours_at_floor[0],
                                                                       "replica_seconds": ours_at_floor[1]}}  # fmt: skip


def plot(results: dict, config: SimConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.5), sharex="col")
    for col, trace in enumerate(names):
        for policy in ("ours", "ours_headroom_0.5", "cpu_hpa", "keda_p99", "static_max"):
            w = results[trace][policy]["_run"].windows
            t = [x["t"] / 60 for x in w]
            axes[0, col].plot(t, [x["p99_ms"] for x in w], label=policy, lw=1)
            axes[1, col].step(t, [x["replicas"] for x in w], label=policy, lw=1, where="post")
        axes[0, col].axhline(config.target_p99_ms, color="k", ls="--", lw=0.8)
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(trace)
        axes[1, col].set_xlabel("minutes")
    axes[0, 0].set_ylabel("p99 per window (ms)")
    axes[1, 0].set_ylabel("replicas")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Simulated replica pool: p99 (target dashed) and replicas per policy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10-minute traces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="small", help="model size whose measured time to ready starts a pod")
    parser.add_argument("--out", default=str(RESULTS / "autoscale.json"))
    args = parser.parse_args()
    duration = 600 if args.quick else 1800
    service, source = service_time()
    startup_s, startup_source = startup(args.size)
    config = SimConfig(target_p99_ms=max(50.0, 4 * service.p99_s * 1000), startup_s=startup_s)
    console.print(f"start-up {startup_s[0]:.1f}–{startup_s[1]:.1f} s, from {startup_source}")
    capacity = 1.0 / service.mean_s  # requests per second one replica serves at 100 % busy
    base = 3.0 * capacity  # about six replicas at half load before the trace changes it
    console.print(f"service time from {source}: p50 {service.p50_s * 1000:.1f} ms, p99 {service.p99_s * 1000:.1f} ms "
                  f"→ {capacity:.0f} req/s per replica; base load {base:.0f} req/s; target p99 "
                  f"{config.target_p99_ms:g} ms")  # fmt: skip
    results: dict = {}
    for trace in traces(base, duration):
        results[trace.name] = {}
        if trace.slow_replica:
            results[trace.name]["_slow_at"] = trace.slow_replica[0]
        for policy in POLICIES:
            run = simulate(trace, policy, service, config, seed=args.seed)
            results[trace.name][policy] = {"slo_attainment": run.slo_attainment,
                                           "replica_seconds": run.replica_seconds,
                                           "ejection_periods": run.ejection_periods, "_run": run}  # fmt: skip
    slow_at = results["slow_replica"].pop("_slow_at")
    table = Table("trace", *(f"{p}\nSLO / replica-s" for p in POLICIES))
    for trace, per in results.items():
        table.add_row(
            trace, *(f"{per[p]['slo_attainment']:.0%} / {per[p]['replica_seconds']:,.0f}" for p in POLICIES)
        )
    console.print(table)
    results["slow_replica"]["_slow_at"] = slow_at
    verdicts = checks(results, config)
    results["slow_replica"].pop("_slow_at")
    for name, v in verdicts.items():
        console.print(f"{'[green]ok[/]' if v['ok'] else '[red]NOT MET[/]'}  {name}: {v['value']}")
    # is "fewer replica-seconds than static-at-max at equal SLO" reachable at all on each trace?
    floors = {}
    for trace in traces(base, duration):
        floors[trace.name] = smallest_matching_static_pool(
            trace, service, config, results[trace.name]["static_max"]["slo_attainment"], args.seed)
        f = floors[trace.name]
        console.print(f"{trace.name}: the smallest static pool at static-at-max's SLO has {f['replicas']} replicas"
                      f"{' = max_replicas' if f['equals_static_max'] else ''}; smaller pools tried: "
                      + ", ".join(f"{n}: {a:.1%}" for n, a in f["slo_of_smaller_pools_tried"].items())
                      + f"; ours needs minReplicas {f['ours_min_replicas_needed']} "
                      f"({f['ours_at_that_floor']['slo_attainment']:.1%}, "
                      f"{f['ours_at_that_floor']['replica_seconds']:,.0f} replica-s)")  # fmt: skip
    plot_path = PLOT if Path(args.out) == RESULTS / "autoscale.json" else Path(args.out).with_suffix(".png")
    plot(results, config, plot_path)
    report = {trace: {p: {k: v for k, v in r.items() if k != "_run"} for p, r in per.items()}
              for trace, per in results.items()}  # fmt: skip
    report["_meta"] = {"command": "python bench/autoscale.py" + (" --quick" if args.quick else ""), "seed": args.seed,
                       "service_time": {"source": source, "p50_ms": service.p50_s * 1000, "p99_ms": service.p99_s * 1000},
                       "startup": {"source": startup_source, "range_s": list(startup_s)},
                       "config": config.__dict__, "base_rps": base, "duration_s": duration, "checks": verdicts,
                       "smallest_static_pool_at_static_max_slo": floors}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out} and {plot_path}")


if __name__ == "__main__":
    main()
