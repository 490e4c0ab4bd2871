"""Quality comparison on MovieLens: the two-stage model vs popularity and tuned implicit ALS / BPR.

    python bench/quality.py --dataset ml-100k       # or ml-latest-small; --data-dir for another place
    python bench/quality.py --dataset ml-100k --split random  # a random 80/20 one-line-per-user split
    python bench/quality.py --train train.txt --test test.txt # a published split

Same split and full-ranking harness for every model (``predictor.models.compare``), run once per seed (3 by
default: 0, 1, 2), every model re-tuned and retrained with each seed on the same split. The default split
is temporal leave-last-out (bar: two-stage NDCG@10 mean ≥ 1.25 × tuned ALS's, mean − sd ≥ 1.1 ×). A given
or ``--split random`` split is scored with the leaderboard metrics over all test items of each user (bar:
two-stage Recall@20 mean ≥ tuned ALS's, and on every seed ≥ that seed's); ``--split random`` writes its
files (seed 0, not in the repo: MovieLens may not be redistributed) under ``.recsys-bench/splits/``.
Writes ``bench/results/quality-NAME.json``: {"dataset", "split", "seeds", "summary": {MODEL: {METRIC:
{"mean", "sd"}}}, "ratios", "bar", "runs": [one report per seed]}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from predictor.data.loaders import load_any, load_dataset
from predictor.data.schema import complete_items
from predictor.data.splits import random_user_split, split_protocol, write_user_lines
from predictor.models.compare import METRICS, compare, compare_split_files, print_report
from predictor.models.config import ModelConfig, TrainConfig, parse_overrides
from predictor.models.defaults import choose, describe, explained

RESULTS = Path(__file__).resolve().parent / "results"
SPLITS = Path(__file__).resolve().parent.parent / ".recsys-bench" / "splits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["ml-100k", "ml-latest-small"])
    parser.add_argument(
        "--train", help="a published split's train file (any supported format, .txt = one line per user)"
    )
    parser.add_argument(
        "--test", help="the matching test file; with --train, --dataset only names the output"
    )
    parser.add_argument(
        "--split",
        choices=["temporal", "random"],
        default="temporal",
        help="with --dataset: temporal leave-last-out, or a random 80/20 one-line-per-user split",
    )
    parser.add_argument("--data-dir", default=None, help="folder holding ml-100k/ and ml-latest-small/")
    parser.add_argument("--size", default="small", help="model size: tiny, small, base, large")
    parser.add_argument(
        "--epochs", type=int, default=None, help="maximum retrieval epochs (default: chosen from the data)"
    )
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
        if args.epochs is not None:
            train_options["epochs"] = args.epochs
    except ValueError as exc:
        parser.error(str(exc))

    console = Console()
    if args.train or args.test:
        if not (args.train and args.test):
            parser.error("--train and --test go together")
        name, train_path, test_path = args.dataset or Path(args.train).parent.name, args.train, args.test
    elif not args.dataset:
        parser.error("give --dataset, or --train and --test")
    elif args.split == "random":
        name = f"{args.dataset}-random80"
        train_path, test_path = write_random_split(args.dataset, args.data_dir, SPLITS / name, console)
    else:
        name = train_path = test_path = None
    protocol = "temporal"
    if train_path:
        given_train, given_test = load_any(train_path), load_any(test_path)
        n_items, n_events, protocol = (
            len(complete_items(given_test.events, given_train.items)),
            len(given_train.events),
            split_protocol(given_train, given_test),
        )
    else:
        data = load_dataset(args.dataset, args.data_dir)
        console.print(data.summary())
        n_items, n_events = len(data.items), len(data.events)
    config, train, chosen = choose(n_items, n_events, args.size, model_options, train_options, protocol)
    console.print(describe(config, train, chosen))
    runs = []
    for seed in args.seeds:
        seeded = replace(train, seed=seed)
        if train_path:
            report, _, _ = compare_split_files(train_path, test_path, config, seeded)
        else:
            report, _, _ = compare(data, config, seeded, use_features=not args.no_features)
        runs.append({"seed": seed, **report})
        print_report(report, console, title=f"{name or args.dataset}, seed {seed}: test metrics")
    metric = "recall@20" if train_path else "ndcg@10"
    command = (
        (f"python bench/quality.py --dataset {args.dataset}" if args.dataset else "python bench/quality.py")
        + (f" --split {args.split}" if args.split != "temporal" else "")
        + (f" --train {args.train} --test {args.test}" if args.train else "")
        + f" --size {args.size}"
        + (f" --epochs {args.epochs}" if args.epochs is not None else "")
        + f" --seeds {' '.join(map(str, args.seeds))}"
        + (" --no-features" if args.no_features else "")
        + "".join(f" --model-option {o}" for o in args.model_option)
        + "".join(f" --train-option {o}" for o in args.train_option)
    )
    report = {
        "dataset": name or args.dataset,
        "seeds": args.seeds,
        "command": command,
        "split": runs[0]["split"],
        "users": runs[0]["users"],
        "items": runs[0]["items"],
        "settings_chosen": explained(config, train, chosen),
        **summarise(runs, metric),
        "runs": runs,
    }
    print_summary(report, console)
    out = Path(args.out) if args.out else RESULTS / f"quality-{name or args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


def write_random_split(
    dataset: str, data_dir: str | None, folder: Path, console: Console
) -> tuple[Path, Path]:
    """A random 80/20 split of ``dataset`` (seed 0) as ``folder/train.txt`` and ``folder/test.txt``."""
    data = load_dataset(dataset, data_dir)
    train, test = random_user_split(data, test_share=0.2, seed=0)
    paths = write_user_lines(train, folder / "train.txt"), write_user_lines(test, folder / "test.txt")
    console.print(
        f"random 80/20 split of {data.summary()}: {len(train.events):,} train and "
        f"{len(test.events):,} test events in {folder}"
    )
    return paths


def summarise(runs: list[dict], metric: str = "ndcg@10") -> dict:
    """Mean and sample sd over seeds of every model's test metrics and seconds; the two-stage model against
    tuned ALS on ``metric`` (the bar: NDCG@10 on the temporal split, mean ≥ 1.25 × ALS's mean and mean − sd
    ≥ 1.1 × ALS's mean; Recall@20 on a given or random split, mean ≥ ALS's mean and every seed's fit ≥ that
    seed's ALS); and per seed whether the ranker served (it does only where it beat retrieval alone on
    validation)."""

    def stats(values: list[float]) -> dict:
        values = np.asarray(values, np.float64)
        return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}

    models = list(runs[0]["results"])
    summary = {
        model: {metric: stats([r["results"][model][metric] for r in runs]) for metric in METRICS}
        for model in models
    }
    seconds = {model: stats([r["seconds"].get(model, 0.0) for r in runs]) for model in runs[0]["seconds"]}
    two_stage, als = summary["two_stage"][metric], summary["implicit_als"][metric]["mean"]
    ratios = {
        "two_stage_mean_over_als_mean": two_stage["mean"] / als if als else None,
        "two_stage_mean_minus_sd_over_als_mean": (two_stage["mean"] - two_stage["sd"]) / als if als else None,
    }
    if metric == "ndcg@10":
        bar = {
            "mean>=1.25x_als": bool(als and ratios["two_stage_mean_over_als_mean"] >= 1.25),
            "mean_minus_sd>=1.1x_als": bool(als and ratios["two_stage_mean_minus_sd_over_als_mean"] >= 1.1),
        }
    else:
        # the same split for every seed: each seed's two-stage fit against that seed's tuned ALS as well
        ratios["per_seed"] = {
            str(r["seed"]): r["results"]["two_stage"][metric] / r["results"]["implicit_als"][metric]
            for r in runs
        }
        bar = {
            "mean>=als": bool(als and ratios["two_stage_mean_over_als_mean"] >= 1.0),
            "every_seed>=als": all(v >= 1.0 for v in ratios["per_seed"].values()),
        }
    ranker = {str(r["seed"]): r["two_stage"]["uses_ranker"] for r in runs}
    return {
        "summary": summary,
        "seconds": seconds,
        f"ratios_{metric}": ratios,
        "bar": bar,
        "ranker_served": ranker,
    }


def print_summary(report: dict, console: Console) -> None:
    table = Table(
        "model",
        *METRICS,
        "seconds",
        title=f"{report['dataset']}: test metrics, mean ± sd over seeds "
        f"{', '.join(map(str, report['seeds']))}",
    )
    for model, metrics in report["summary"].items():
        seconds = report["seconds"].get(model)
        table.add_row(
            model,
            *(f"{metrics[m]['mean']:.4f} ± {metrics[m]['sd']:.4f}" for m in METRICS),
            f"{seconds['mean']:.0f}" if seconds else "",
        )
    console.print(table)
    ratios = next(v for k, v in report.items() if k.startswith("ratios_"))
    console.print(
        f"two-stage / tuned ALS: {ratios}; bar {report['bar']}; "
        f"ranker served per seed {report['ranker_served']}"
    )


if __name__ == "__main__":
    main()
