"""Quality comparison on MovieLens: the two-stage model vs popularity and tuned implicit ALS / BPR.

    python bench/quality.py --dataset ml-100k            # or ml-latest-small; --data-dir for another place

Same temporal leave-last-out split and full-ranking harness for every model (``predictor.models.compare``).
Writes ``bench/results/quality-DATASET.json``: {"dataset", "split", "results": {MODEL: {metrics}}, ...}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from predictor.data.loaders import load_dataset
from predictor.models.compare import compare, compare_split_files, print_report
from predictor.models.config import ModelConfig, TrainConfig, model_config, parse_overrides

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
    parser.add_argument("--seed", type=int, default=0)
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
    train = TrainConfig(**{"epochs": args.epochs, "seed": args.seed, **train_options})
    if args.train or args.test:
        if not (args.train and args.test):
            parser.error("--train and --test go together")
        name = args.dataset or Path(args.train).parent.name
        report, _, _ = compare_split_files(
            args.train, args.test, model_config(args.size, **model_options), train
        )
        report = {"dataset": name, "seed": args.seed, **report}
        print_report(report, console, title=f"{name}: given split")
        out = RESULTS / f"quality-{name}-given-split.json"
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        console.print(f"wrote {out}")
        return
    if not args.dataset:
        parser.error("give --dataset, or --train and --test")
    data = load_dataset(args.dataset, args.data_dir)
    console.print(data.summary())
    report, _, _ = compare(
        data, model_config(args.size, **model_options), train, use_features=not args.no_features
    )
    report = {"dataset": args.dataset, "seed": args.seed,
              "command": f"python bench/quality.py --dataset {args.dataset} --size {args.size} --epochs {args.epochs} "
                         f"--seed {args.seed}" + (" --no-features" if args.no_features else "")
                         + "".join(f" --model-option {o}" for o in args.model_option)
                         + "".join(f" --train-option {o}" for o in args.train_option),
              **report}  # fmt: skip
    print_report(report, console, title=f"{args.dataset}: test metrics")
    out = Path(args.out) if args.out else RESULTS / f"quality-{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
