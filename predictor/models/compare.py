"""One harness, one split, every model: the two-stage model against popularity and tuned implicit ALS/BPR.

Used by ``recsys evaluate --baselines`` and ``bench/quality.py``.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
from rich.console import Console
from rich.table import Table

from predictor.data.schema import Interactions
from predictor.models.config import ModelConfig, TrainConfig
from predictor.models.data import SplitData, build_split, user_feature_snapshots
from predictor.models.evaluate import Popularity, evaluate, tune_implicit
from predictor.models.recommender import TwoStageRecommender

log = logging.getLogger(__name__)
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "coverage@10")


def compare(
    data: Interactions,
    model_config: ModelConfig,
    train_config: TrainConfig,
    use_features: bool = True,
    progress: bool = True,
    als_grid: dict | None = None,
    bpr_grid: dict | None = None,
) -> tuple[dict, TwoStageRecommender, SplitData]:
    """Train and evaluate everything on one temporal leave-last-out split; returns (report, model, split)."""
    split = build_split(data)
    report: dict = {
        "split": "temporal leave-last-out per user (validation = second to last, test = last); "
        "full ranking over all items, seen items excluded",
        "users": int(split.has_holdout.sum()),
        "items": split.n_items,
        "results": {},
        "seconds": {},
        "tuning": {},
    }
    started = time.perf_counter()
    report["results"]["popularity"] = evaluate(Popularity().fit(split, "test").rank(split), split, "test")
    report["seconds"]["popularity"] = time.perf_counter() - started
    for kind, grid in (("als", als_grid), ("bpr", bpr_grid)):
        started = time.perf_counter()
        model, best, trials = tune_implicit(kind, split, grid, seed=train_config.seed)
        report["results"][f"implicit_{kind}"] = evaluate(model.rank(split), split, "test")
        report["seconds"][f"implicit_{kind}"] = time.perf_counter() - started
        report["tuning"][f"implicit_{kind}"] = {
            "best": best,
            "trials": [{"params": p, "validation_ndcg@10": m["ndcg@10"]} for p, m in trials],
        }

    started = time.perf_counter()
    user_profile = user_feature_snapshots(data) if use_features else None
    model = TwoStageRecommender(model_config, train_config).fit(split, user_profile, progress=progress)
    report["seconds"]["two_stage"] = time.perf_counter() - started
    report["results"]["two_stage"] = evaluate(model.rank(split, "two_stage"), split, "test")
    report["results"]["retrieval_only"] = evaluate(model.rank(split, "retrieval"), split, "test")
    report["two_stage"] = {
        "model_config": model_config.to_dict(),
        "uses_ranker": model.use_ranker,
        "ranker_validation_gain": model.ranker_gain,
        "training": {"retrieval": model.history.retrieval, "ranker": model.history.ranker},
    }
    als = report["results"]["implicit_als"]["ndcg@10"]
    report["two_stage_vs_als_ndcg@10"] = report["results"]["two_stage"]["ndcg@10"] / als if als else None
    return report, model, split


def compare_split_files(
    train_path: str,
    test_path: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    progress: bool = True,
    protocol: str = "auto",
) -> tuple[dict, TwoStageRecommender, SplitData]:
    """Evaluate on a published split given as two files (any supported format, including one line per
    user), scored on every item of the test file with the leaderboard metrics (``ranking_metrics_multi``).

    Models validate the way the test was drawn (``protocol``; "auto": :func:`split_protocol`): on a
    temporal split, on each user's last train item (NDCG@10); on a random one, on a random sample of each
    user's train items of the test's share (Recall@20), the two-stage model reading them in a fresh
    order every epoch. Validation tunes ALS / BPR and picks the two-stage model's epochs; every model is
    then fitted again on all train items (ALS / BPR with the chosen parameters, the two-stage model for
    the chosen epochs) before the test."""
    from dataclasses import replace

    import numpy as np

    from predictor.data.loaders import load_any
    from predictor.data.schema import complete_items
    from predictor.data.splits import split_protocol
    from predictor.models.evaluate import evaluate_targets, validation_metric

    train, test = load_any(train_path), load_any(test_path)
    protocol = split_protocol(train, test) if protocol == "auto" else protocol
    share = len(test.events) / max(len(train.events) + len(test.events), 1)
    data = Interactions(train.events, complete_items(test.events, train.items), train.name)
    split = build_split(data, holdout=1, protocol=protocol, validation_share=share, seed=train_config.seed)
    full = build_split(data, split.users, split.items, holdout=0, protocol=protocol, seed=train_config.seed)
    users = full.users.index(test.events["user_id"].to_numpy())
    item_idx = full.items.index(test.events["item_id"].to_numpy())
    frame = pd.DataFrame({"u": users, "i": item_idx})
    frame = frame[(frame["u"] > 0) & (frame["i"] > 0)]
    targets = {int(u): np.unique(g["i"].to_numpy()) for u, g in frame.groupby("u")}
    metric = validation_metric(split)
    report: dict = {
        "split": f"given: train {train_path}, test {test_path}; all test items per user are targets",
        "protocol": protocol,
        "validation": {
            "metric": metric,
            "share": round(share, 4) if protocol == "random" else "last train item",
        },
        "users": len(targets),
        "items": full.n_items,
        "results": {},
        "seconds": {},
        "tuning": {},
    }
    report["results"]["popularity"] = evaluate_targets(
        Popularity().fit(full, "test").rank(full), full, targets
    )
    for kind in ("als", "bpr"):
        started = time.perf_counter()
        # tuned on validation, refitted on train + validation: all train items, the rows of ``full``
        tuned, best, trials = tune_implicit(kind, split, seed=train_config.seed)
        report["results"][f"implicit_{kind}"] = evaluate_targets(tuned.rank(full), full, targets)
        report["seconds"][f"implicit_{kind}"] = time.perf_counter() - started
        report["tuning"][f"implicit_{kind}"] = {
            "best": best,
            f"validation_{metric}": max(m[metric] for _, m in trials),
        }
    started = time.perf_counter()
    chooser = TwoStageRecommender(model_config, train_config).fit(split, None, progress=progress)
    epochs, ranker_epochs = (
        chooser.best_epochs["retrieval"],
        chooser.best_epochs["ranker"] if chooser.use_ranker else 0,
    )
    final = replace(train_config, epochs=epochs, min_epochs=epochs, ranker_epochs=ranker_epochs)
    model = TwoStageRecommender(model_config, final).fit(full, None, progress=progress)
    report["seconds"]["two_stage"] = time.perf_counter() - started
    report["results"]["two_stage"] = evaluate_targets(model.rank(full), full, targets)
    report["two_stage"] = {
        "model_config": model_config.to_dict(),
        "uses_ranker": model.use_ranker,
        f"validation_{metric}": chooser.validation_score,
        "epochs": epochs,
        "ranker_epochs": ranker_epochs,
        "ranker_validation_gain": chooser.ranker_gain,
        "training": {"retrieval": chooser.history.retrieval, "ranker": chooser.history.ranker},
    }
    als = report["results"]["implicit_als"]["recall@20"]
    report["two_stage_vs_als_recall@20"] = report["results"]["two_stage"]["recall@20"] / als if als else None
    return report, model, full


def print_report(report: dict, console: Console | None = None, title: str = "") -> None:
    console = console or Console()
    table = Table(*(["model"] + list(METRICS) + ["seconds"]), title=title)
    for name, metrics in report["results"].items():
        seconds = report["seconds"].get(
            name, report["seconds"].get("two_stage") if name == "retrieval_only" else None
        )
        table.add_row(name, *(f"{metrics[m]:.4f}" for m in METRICS), f"{seconds:.0f}" if seconds else "")
    console.print(table)
    for metric in ("ndcg@10", "recall@20"):
        if report.get(f"two_stage_vs_als_{metric}"):
            console.print(f"two-stage / tuned ALS {metric} = {report[f'two_stage_vs_als_{metric}']:.3f}")
