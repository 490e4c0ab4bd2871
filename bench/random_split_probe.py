"""One retrieval fit on a random split, for choosing random-split settings: its best validation Recall@20.

    python bench/quality.py --dataset ml-100k --split random --seeds 0   # writes the split files first
    python bench/random_split_probe.py ml-100k-random80 --train-option batch_size=128 --train-option epochs=40

Reads ``.recsys-bench/splits/NAME/{train,test}.txt``, validates like ``compare_split_files`` (a random sample
of each user's train items, the test's share), trains with the settings ``choose`` picks for a random split
plus the given options and ``ranker_epochs=0``, and prints one JSON line: options, best validation
Recall@20, its epoch, wall seconds (set-up, training and per-epoch validation) and the curve.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from predictor.data.loaders import load_any
from predictor.data.schema import Interactions, complete_items
from predictor.models.config import ModelConfig, TrainConfig, parse_overrides
from predictor.models.data import build_split
from predictor.models.defaults import choose
from predictor.models.recommender import TwoStageRecommender

SPLITS = Path(__file__).resolve().parent.parent / ".recsys-bench" / "splits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="a folder under .recsys-bench/splits/, e.g. ml-100k-random80")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()
    train, test = (load_any(SPLITS / args.name / f) for f in ("train.txt", "test.txt"))
    share = len(test.events) / (len(train.events) + len(test.events))
    data = Interactions(train.events, complete_items(test.events, train.items))
    split = build_split(data, holdout=1, protocol="random", validation_share=share, seed=0)
    config, train_config, _ = choose(
        split.n_items,
        len(train.events),
        "small",
        parse_overrides(args.model_option, ModelConfig),
        parse_overrides(args.train_option, TrainConfig),
        protocol="random",
    )
    model = TwoStageRecommender(config, replace(train_config, ranker_epochs=0)).fit(
        split, None, progress=False
    )
    curve = [round(e["validation_recall@20"], 4) for e in model.history.retrieval]
    print(
        json.dumps(
            {
                "options": args.model_option + args.train_option,
                "best": max(curve),
                "epoch": model.best_epochs["retrieval"],
                "seconds": round(time.perf_counter() - started),
                "curve": curve,
            }
        )
    )


if __name__ == "__main__":
    main()
