"""Quality comparison on MovieLens: the two-stage model vs popularity and tuned implicit ALS / BPR.

    python bench/quality.py --dataset ml-100k            # or ml-latest-small; --data-dir for another place

Same temporal leave-last-out split and full-ranking harness for every model (``predictor.models.compare``),
run once per seed (3 by default: 0, 1, 2), every model re-tuned and retrained with each seed on the same
split. Writes ``bench/results/quality-DATASET.json``: {"dataset", "split", "seeds", "summary": {MODEL:
{METRIC: {"mean", "sd"}}}, "ratios", "runs": [one report per seed]}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from predictor.data.loaders import load_dataset
from predictor.models.compare import METRICS, compare, compare_split_files, print_report
from predictor.models.config import ModelConfig, TrainConfig, model_config, parse_overrides
from predictor.models.defaults import choose, describe, explained

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["ml-100k", "ml-latest-small"])
    parser.add_argument(
        "--train", help="a published split's train file (any supported format, .txt = one line per user)"
    )
    parser.add_argument(
        "--test", help="the matching test file; with --train, --dataset only names the output"
    )
    parser.add_argument("--data-dir", default=None, help="folder holding ml-100k/ and ml-latest-small/")
    parser.add_argument("--size", default="small", help="model size: tiny, small, base, large")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed")
    parser.add_argument("--no-features", action="store_true", help="train without the user_profile features")
    parser.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ModelConfig field, e.g. dropout=0.5 (repeatable)",
    )
    parser.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field, e.g. min_epochs=40 (repeatable)",
    )
    parser.add_argument(
        "--out", default=None, help="result file (default: bench/results/quality-DATASET.json)"
    )
    args = parser.parse_args()
    try:
        model_options = parse_overrides(args.model_option, ModelConfig)
        train_options = parse_overrides(args.train_option, TrainConfig)
    except ValueError as exc:
        parser.error(str(exc))

    console = Console()
    train = TrainConfig(**{"epochs": args.epochs, "seed": args.seeds[0], **train_options})
    if args.train or args.test:
        if not (args.train and args.test):
            parser.error("--train and --test go together")
        name = args.dataset or Path(args.train).parent.name
        report, _, _ = compare_split_files(
            args.train, args.test, model_config(args.size, **model_options), train
        )
        report = {"dataset": name, "seed": args.seeds[0], **report}
        print_report(report, console, title=f"{name}: given split")
        out = RESULTS / f"quality-{name}-given-split.json"
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        console.print(f"wrote {out}")
        return
    if not args.dataset:
        parser.error("give --dataset, or --train and --test")
    data = load_dataset(args.dataset, args.data_dir)
    console.print(data.summary())
    config, train, chosen = choose(len(data.items), args.size, model_options, train_options)
    console.print(describe(config, train, chosen))
    runs = []
    for seed in args.seeds:
        report, _, _ = compare(data, config, replace(train, epochs=args.epochs, seed=seed),
                               use_features=not args.no_features)  # fmt: skip
        runs.append({"seed": seed, **report})
        print_report(report, console, title=f"{args.dataset}, seed {seed}: test metrics")
    report = {"dataset": args.dataset, "seeds": args.seeds,
              "command": f"python bench/quality.py --dataset {args.dataset} --size {args.size} --epochs {args.epochs} "
                         f"--seeds {' '.join(map(str, args.seeds))}" + (" --no-features" if args.no_features else "")
                         + "".join(f" --model-option {o}" for o in args.model_option)
                         + "".join(f" --train-option {o}" for o in args.train_option),
              "split": runs[0]["split"], "users": runs[0]["users"], "items": runs[0]["items"],
              "settings_chosen": explained(config, train, chosen),
              **summarise(runs), "runs": runs}  # fmt: skip
    print_summary(report, console)
    out = Path(args.out) if args.out else RESULTS / f"quality-{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


def summarise(runs: list[dict]) -> dict:
    """Mean and sample sd over seeds of every model's test metrics and seconds; the two-stage model against
    tuned ALS on NDCG@10 (the bar: mean ≥ 1.25 × ALS's mean and mean − sd ≥ 1.1 × ALS's mean); and per
    seed whether the ranker served (it does only where it beat retrieval alone on validation)."""

    def stats(values: list[float]) -> dict:
        values = np.asarray(values, np.float64)
        return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}

    models = list(runs[0]["results"])
    summary = {model: {metric: stats([r["results"][model][metric] for r in runs]) for metric in METRICS}
               for model in models}  # fmt: skip
    seconds = {model: stats([r["seconds"].get(model, 0.0) for r in runs]) for model in runs[0]["seconds"]}
    two_stage, als = summary["two_stage"]["ndcg@10"], summary["implicit_als"]["ndcg@10"]["mean"]
    ratios = {"two_stage_mean_over_als_mean": two_stage["mean"] / als if als else None,
              "two_stage_mean_minus_sd_over_als_mean": (two_stage["mean"] - two_stage["sd"]) / als if als else None}  # fmt: skip
    bar = {"mean>=1.25x_als": bool(als and ratios["two_stage_mean_over_als_mean"] >= 1.25),
           "mean_minus_sd>=1.1x_als": bool(als and ratios["two_stage_mean_minus_sd_over_als_mean"] >= 1.1)}  # fmt: skip
    ranker = {str(r["seed"]): r["two_stage"]["uses_ranker"] for r in runs}
    return {
        "summary": summary,
        "seconds": seconds,
        "ratios_ndcg@10": ratios,
        "bar": bar,
        "ranker_served": ranker,
    }


def print_summary(report: dict, console: Console) -> None:
    table = Table("model", *METRICS, "seconds", title=f"{report['dataset']}: test metrics, mean ± sd over seeds "
                                                       f"{', '.join(map(str, report['seeds']))}")  # fmt: skip
    for model, metrics in report["summary"].items():
        seconds = report["seconds"].get(model)
        table.add_row(model, *(f"{metrics[m]['mean']:.4f} ± {metrics[m]['sd']:.4f}" for m in METRICS),
                      f"{seconds['mean']:.0f}" if seconds else "")  # fmt: skip
    console.print(table)
    console.print(f"two-stage / tuned ALS NDCG@10: {report['ratios_ndcg@10']}; bar {report['bar']}; "
                  f"ranker served per seed {report['ranker_served']}")  # fmt: skip


if __name__ == "__main__":
    main()
