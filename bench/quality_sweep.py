"""Tune the two-stage model on validation: many (variant × seed) trials on one split, in parallel.

    python bench/quality_sweep.py --dataset ml-latest-small --variants bench/sweeps/ml-latest-small.json \
        --seeds 0 1 2 --jobs 2

Every trial trains on the same temporal leave-last-out split as ``bench/quality.py`` and records its best
validation NDCG@10 (what selection may use) and its test metrics (what selection must not use). Variants
are ranked by mean validation NDCG@10 over the seeds; pass the winner's options to ``bench/quality.py`` to
get the table with the baselines from the same run. The variants file is a JSON list of
``{"name": ..., "model": {ModelConfig overrides}, "train": {TrainConfig overrides}, "features": true}``.

Each worker is a separate process (spawned, so CUDA works) with ``--threads`` torch threads; on a GPU
machine several workers share the device.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
_SPLIT_CACHE: dict = {}


def _prepared(dataset: str, data_dir: str | None):
    """Split and user-feature snapshots, built once per worker process."""
    key = (dataset, data_dir)
    if key not in _SPLIT_CACHE:
        from predictor.data.loaders import load_dataset
        from predictor.models.data import build_split, user_feature_snapshots

        data = load_dataset(dataset, data_dir)
        _SPLIT_CACHE[key] = (build_split(data), user_feature_snapshots(data))
    return _SPLIT_CACHE[key]


def run_trial(
    dataset: str, data_dir: str | None, size: str, epochs: int, variant: dict, seed: int, threads: int
) -> dict:
    import torch

    torch.set_num_threads(threads)
    from predictor.models.config import TrainConfig, model_config
    from predictor.models.evaluate import evaluate
    from predictor.models.recommender import TwoStageRecommender

    split, profile = _prepared(dataset, data_dir)
    started = time.perf_counter()
    train = TrainConfig(**{"epochs": epochs, "seed": seed, **variant.get("train", {})})
    model = TwoStageRecommender(model_config(size, **variant.get("model", {})), train)
    model.fit(split, profile if variant.get("features", True) else None, progress=False)
    test = evaluate(model.rank(split, "two_stage"), split, "test")
    retrieval_test = evaluate(model.rank(split, "retrieval"), split, "test")
    curve = [round(e["validation_ndcg@10"], 5) for e in model.history.retrieval]
    epoch_seconds = [e["seconds"] for e in model.history.retrieval]
    return {
        "variant": variant["name"],
        "seed": seed,
        "device": str(model.device),
        "validation_ndcg@10": float(model.validation_ndcg),
        "uses_ranker": model.use_ranker,
        "epochs": len(curve),
        "best_epoch": int(np.argmax(curve)) + 1 if curve else 0,
        "test": test,
        "retrieval_test": retrieval_test,
        "validation_curve": curve,
        "median_epoch_seconds": float(np.median(epoch_seconds)) if epoch_seconds else 0.0,
        "seconds": time.perf_counter() - started,
    }


def summarise(trials: list[dict]) -> list[dict]:
    by_variant: dict[str, list[dict]] = {}
    for t in trials:
        by_variant.setdefault(t["variant"], []).append(t)
    rows = []
    for name, ts in by_variant.items():
        val = [t["validation_ndcg@10"] for t in ts]
        test = [t["test"]["ndcg@10"] for t in ts]
        rows.append(
            {
                "variant": name,
                "seeds": len(ts),
                "validation_ndcg@10": float(np.mean(val)),
                "validation_std": float(np.std(val)),
                "test_ndcg@10": float(np.mean(test)),
                "test_std": float(np.std(test)),
                "seconds": float(np.mean([t["seconds"] for t in ts])),
            }
        )
    return sorted(rows, key=lambda r: -r["validation_ndcg@10"])


def plot(results_file: Path, image: Path, als_ndcg: float | None = None) -> None:
    """Validation (what selects) and test NDCG@10 per variant, mean ± std over seeds, best validation on top;
    tuned ALS's test NDCG@10 on the same split and the 1.1 × bar as lines, when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results_file.read_text())
    rows = [r for rnd in data.get("rounds", [data]) for r in rnd["summary"]]
    rows = sorted(rows, key=lambda r: r["validation_ndcg@10"])
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    ax.barh(
        y + 0.2,
        [r["validation_ndcg@10"] for r in rows],
        0.4,
        xerr=[r["validation_std"] for r in rows],
        label="validation (selects)",
        color="#9ecae1",
    )
    ax.barh(
        y - 0.2,
        [r["test_ndcg@10"] for r in rows],
        0.4,
        xerr=[r["test_std"] for r in rows],
        label="test",
        color="#3182bd",
    )
    if als_ndcg:
        ax.axvline(als_ndcg, color="#d62728", ls="--", label=f"tuned ALS, test ({als_ndcg:.4f})")
        ax.axvline(1.1 * als_ndcg, color="#d62728", ls=":", label="1.1 × ALS (the bar)")
    ax.set_yticks(y, [r["variant"] for r in rows], fontsize=8)
    ax.set_xlabel("NDCG@10 (mean ± std over seeds)")
    ax.set_title(f"{data['dataset']}: two-stage variants, full ranking, leave-last-out")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=["ml-100k", "ml-latest-small"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--variants", help="JSON file: a list of variants")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    parser.add_argument("--size", default="small")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--out", default=None, help="default: bench/results/sweep-DATASET.json")
    parser.add_argument(
        "--plot-only", action="store_true", help="only redraw docs/img/sweep-DATASET.png from --out"
    )
    args = parser.parse_args()
    out = Path(args.out) if args.out else RESULTS / f"sweep-{args.dataset}.json"
    image = RESULTS.parent.parent / "docs" / "img" / f"sweep-{args.dataset}.png"
    quality = RESULTS / f"quality-{args.dataset}.json"
    als = json.loads(quality.read_text())["results"]["implicit_als"]["ndcg@10"] if quality.exists() else None
    if args.plot_only:
        plot(out, image, als)
        print(f"wrote {image}")
        return

    if not args.variants:
        parser.error("--variants is required unless --plot-only")
    variants = json.loads(Path(args.variants).read_text())
    if args.only:
        variants = [v for v in variants if v["name"] in args.only]
    jobs = [(v, s) for s in args.seeds for v in variants]  # every variant once before any repeats
    out.parent.mkdir(parents=True, exist_ok=True)
    trials: list[dict] = []
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(run_trial, args.dataset, args.data_dir, args.size, args.epochs, v, s, args.threads): (
                v["name"],
                s,
            )
            for v, s in jobs
        }
        for future in as_completed(futures):
            name, seed = futures[future]
            try:
                trials.append(future.result())
            except Exception as exc:  # noqa: BLE001 - a broken variant must not lose the others' results
                trials.append({"variant": name, "seed": seed, "error": repr(exc)})
                print(f"{name} seed {seed}: FAILED {exc!r}", flush=True)
                continue
            t = trials[-1]
            print(
                f"[{len(trials)}/{len(jobs)} {time.perf_counter() - started:.0f}s] {name} seed {seed}: "
                f"val {t['validation_ndcg@10']:.4f} test {t['test']['ndcg@10']:.4f} "
                f"(best epoch {t['best_epoch']}/{t['epochs']}, ranker {t['uses_ranker']}, "
                f"{t['seconds']:.0f}s, "
                f"{t['median_epoch_seconds']:.1f}s/epoch)",
                flush=True,
            )
            ok = [t for t in trials if "error" not in t]
            out.write_text(
                json.dumps(
                    {
                        "dataset": args.dataset,
                        "size": args.size,
                        "epochs": args.epochs,
                        "variants": variants,
                        "summary": summarise(ok),
                        "trials": trials,
                    },
                    indent=1,
                )
                + "\n"
            )
    print(f"{'variant':32s} {'seeds':>5s} {'val ndcg@10':>12s} {'test ndcg@10':>13s} {'s':>6s}")
    for r in summarise([t for t in trials if "error" not in t]):
        print(
            f"{r['variant']:32s} {r['seeds']:5d} {r['validation_ndcg@10']:8.4f}±{r['validation_std']:.4f} "
            f"{r['test_ndcg@10']:8.4f}±{r['test_std']:.4f} {r['seconds']:6.0f}"
        )
    plot(out, image, als)
    print(f"wrote {out} and {image}")


if __name__ == "__main__":
    main()
