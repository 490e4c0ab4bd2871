"""Training benchmark: examples/s, time to the quality bar, and implicit ALS's fit time, in one run.

    python bench/train.py [--dataset ml-100k] [--epochs 60]

The quality bar is validation NDCG@10 >= 1.1 × tuned implicit ALS's validation NDCG@10 on the same split.
Writes ``bench/results/train.json`` and the training curve ``docs/img/training-curve.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402

from predictor.data.loaders import load_dataset  # noqa: E402
from predictor.models.config import TrainConfig, model_config  # noqa: E402
from predictor.models.data import build_split, user_feature_snapshots  # noqa: E402
from predictor.models.evaluate import ImplicitModel, evaluate, tune_implicit  # noqa: E402
from predictor.models.recommender import TwoStageRecommender  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--size", default="small")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console()

    data = load_dataset(args.dataset)
    split = build_split(data)
    _, als_params, trials = tune_implicit("als", split, seed=args.seed)
    als_validation = max(m["ndcg@10"] for _, m in trials)
    started = time.perf_counter()
    ImplicitModel("als", als_params, args.seed).fit(split, "validation")
    als_fit_s = time.perf_counter() - started
    bar = 1.1 * als_validation
    console.print(
        f"tuned ALS {als_params}: validation NDCG@10 {als_validation:.4f}, fit {als_fit_s:.2f} s; bar {bar:.4f}"
    )

    started = time.perf_counter()
    profile = user_feature_snapshots(data)
    features_s = time.perf_counter() - started
    model = TwoStageRecommender(model_config(args.size), TrainConfig(epochs=args.epochs, seed=args.seed))
    started = time.perf_counter()
    model.fit(split, profile)
    total_s = time.perf_counter() - started

    elapsed, time_to_bar = 0.0, None
    curve = []
    for epoch in model.history.retrieval:
        elapsed += epoch["seconds"]
        curve.append((elapsed, epoch["validation_ndcg@10"], epoch["loss"]))
        if time_to_bar is None and epoch["validation_ndcg@10"] >= bar:
            time_to_bar = elapsed
    examples = sum(e["examples"] for e in model.history.retrieval)
    train_s = sum(e["seconds"] for e in model.history.retrieval)
    result = {
        "dataset": args.dataset,
        "size": args.size,
        "seed": args.seed,
        "retrieval_examples_per_s": examples / train_s,
        "retrieval_epochs": len(model.history.retrieval),
        "retrieval_train_seconds": train_s,
        "two_stage_total_fit_seconds": total_s,
        "feature_snapshots_seconds": features_s,
        "time_to_quality_bar_s": time_to_bar,
        "quality_bar_validation_ndcg@10": bar,
        "implicit_als": {
            "params": als_params,
            "fit_seconds": als_fit_s,
            "validation_ndcg@10": als_validation,
        },
        "two_stage_test": evaluate(model.rank(split), split, "test"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "curve": [{"seconds": s, "validation_ndcg@10": n, "loss": loss} for s, n, loss in curve],
    }
    out = ROOT / "bench" / "results" / "train.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [c[0] for c in curve],
        [c[1] for c in curve],
        marker="o",
        ms=3,
        label="two-tower retrieval (validation)",
    )
    ax.axhline(als_validation, color="grey", ls="--", label=f"tuned implicit ALS ({als_fit_s:.1f} s fit)")
    ax.axhline(bar, color="red", ls=":", label="quality bar (1.1 × ALS)")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("validation NDCG@10 (full ranking)")
    ax.set_title(f"{args.dataset}: retrieval training curve")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    png = ROOT / "docs" / "img" / "training-curve.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    console.print(
        f"{result['retrieval_examples_per_s']:,.0f} labels/s; time to bar "
        f"{time_to_bar if time_to_bar is None else round(time_to_bar, 1)} s vs ALS fit {als_fit_s:.2f} s; "
        f"peak RSS {result['peak_rss_mb']:.0f} MB; wrote {out} and {png}"
    )


if __name__ == "__main__":
    main()
