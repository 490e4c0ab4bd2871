"""One retrieval fit on a dataset's temporal split, for choosing settings: validation curve, test NDCG@10.

    python bench/temporal_probe.py ml-latest-small --model-option full_softmax_items=50000 \
        --model-option dim=128 --model-option dropout=0.3 --model-option temperature=0.1 \
        --train-option weight_decay=0.001 --train-option window_jitter=true --train-option lr=0.003 \
        --train-option batch_size=64 --train-option epochs=30 --train-option min_epochs=30 --test

Builds the leave-last-out split and the user feature snapshots as ``bench/quality.py`` does, trains with the
settings ``choose`` picks plus the given options and ``ranker_epochs=0``, and prints one JSON line: options,
best validation NDCG@10 and its epoch, seconds per epoch, the curve, wall seconds and (``--test``) the test
NDCG@10 of retrieval.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from predictor.data.loaders import load_dataset
from predictor.models.config import ModelConfig, TrainConfig, parse_overrides
from predictor.models.data import build_split, user_feature_snapshots
from predictor.models.defaults import choose
from predictor.models.evaluate import evaluate
from predictor.models.recommender import TwoStageRecommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="ml-100k or ml-latest-small")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--test", action="store_true", help="also score the test split")
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_dataset(args.dataset)
    split, profile = build_split(data), user_feature_snapshots(data)
    config, train, _ = choose(
        split.n_items,
        len(data.events),
        "small",
        parse_overrides(args.model_option, ModelConfig),
        parse_overrides(args.train_option, TrainConfig),
    )
    model = TwoStageRecommender(config, replace(train, ranker_epochs=0)).fit(split, profile, progress=False)
    history = model.history.retrieval
    out = {
        "options": args.model_option + args.train_option,
        "best": max(e["validation_ndcg@10"] for e in history),
        "epoch": model.best_epochs["retrieval"],
        "seconds_per_epoch": [round(e["seconds"], 1) for e in history],
        "curve": [round(e["validation_ndcg@10"], 4) for e in history],
        "wall_s": round(time.perf_counter() - started),
    }
    if args.test:
        out["test_ndcg@10"] = evaluate(model.rank(split, "retrieval"), split, "test")["ndcg@10"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
