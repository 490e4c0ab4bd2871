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
    report: dict = {"split": "temporal leave-last-out per user (validation = second to last, test = last); "
                             "full ranking over all items, seen items excluded",  # fmt: skip
                    "users": int(split.has_holdout.sum()), "items": split.n_items, "results": {}, "seconds": {},
                    "tuning": {}}  # fmt: skip
    started = time.perf_counter()
    report["results"]["popularity"] = evaluate(Popularity().fit(split, "test").rank(split), split, "test")
    report["seconds"]["popularity"] = time.perf_counter() - started
    for kind, grid in (("als", als_grid), ("bpr", bpr_grid)):
        started = time.perf_counter()
        model, best, trials = tune_implicit(kind, split, grid, seed=train_config.seed)
        report["results"][f"implicit_{kind}"] = evaluate(model.rank(split), split, "test")
        report["seconds"][f"implicit_{kind}"] = time.perf_counter() - started
        report["tuning"][f"implicit_{kind}"] = {"best": best, "trials": [
            {"params": p, "validation_ndcg@10": m["ndcg@10"]} for p, m in trials]}  # fmt: skip

    started = time.perf_counter()
    user_profile = user_feature_snapshots(data) if use_features else None
    model = TwoStageRecommender(model_config, train_config).fit(split, user_profile, progress=progress)
    report["seconds"]["two_stage"] = time.perf_counter() - started
    report["results"]["two_stage"] = evaluate(model.rank(split, "two_stage"), split, "test")
    report["results"]["retrieval_only"] = evaluate(model.rank(split, "retrieval"), split, "test")
    report["two_stage"] = {"model_config": model_config.to_dict(), "uses_ranker": model.use_ranker,
                           "ranker_validation_gain": model.ranker_gain,
                           "training": {"retrieval": model.history.retrieval, "ranker": model.history.ranker}}  # fmt: skip
    als = report["results"]["implicit_als"]["ndcg@10"]
    report["two_stage_vs_als_ndcg@10"] = report["results"]["two_stage"]["ndcg@10"] / als if als else None
    return report, model, split


def compare_split_files(
    train_path: str,
    test_path: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    progress: bool = True,
) -> tuple[dict, TwoStageRecommender, SplitData]:
    """Evaluate on a published split given as two files (any supported format, including one line per
    user): models train on the train file (its last item per user is the validation target for tuning
    and early stopping) and are scored on every item of the test file, with multi-target metrics."""
    import numpy as np

    from predictor.data.loaders import load_any
    from predictor.data.schema import complete_items
    from predictor.models.evaluate import evaluate_targets

    train, test = load_any(train_path), load_any(test_path)
    items = complete_items(test.events, train.items)
    split = build_split(Interactions(train.events, items, train.name), holdout=1)
    users = split.users.index(test.events["user_id"].to_numpy())
    item_idx = split.items.index(test.events["item_id"].to_numpy())
    frame = pd.DataFrame({"u": users, "i": item_idx})
    frame = frame[(frame["u"] > 0) & (frame["i"] > 0)]
    targets = {int(u): np.unique(g["i"].to_numpy()) for u, g in frame.groupby("u")}
    report: dict = {"split": f"given: train {train_path}, test {test_path}; all test items per user are targets",
                    "users": len(targets), "items": split.n_items, "results": {}, "seconds": {}, "tuning": {}}  # fmt: skip
    report["results"]["popularity"] = evaluate_targets(Popularity().fit(split, "test").rank(split), split, targets)
    for kind in ("als", "bpr"):
        started = time.perf_counter()
        model, best, _ = tune_implicit(kind, split, seed=train_config.seed)
        report["results"][f"implicit_{kind}"] = evaluate_targets(model.rank(split), split, targets)
        report["seconds"][f"implicit_{kind}"] = time.perf_counter() - started
        report["tuning"][f"implicit_{kind}"] = {"best": best}
    started = time.perf_counter()
    model = TwoStageRecommender(model_config, train_config).fit(split, None, progress=progress)
    report["seconds"]["two_stage"] = time.perf_counter() - started
    report["results"]["two_stage"] = evaluate_targets(model.rank(split), split, targets)
    return report, model, split


def print_report(report: dict, console: Console | None = None, title: str = "") -> None:
    console = console or Console()
    table = Table(*(["model"] + list(METRICS) + ["seconds"]), title=title)
    for name, metrics in report["results"].items():
        seconds = report["seconds"].get(name, report["seconds"].get("two_stage") if name == "retrieval_only" else None)
        table.add_row(name, *(f"{metrics[m]:.4f}" for m in METRICS), f"{seconds:.0f}" if seconds else "")
    console.print(table)
    if report.get("two_stage_vs_als_ndcg@10"):
        console.print(f"two-stage / tuned ALS NDCG@10 = {report['two_stage_vs_als_ndcg@10']:.3f}")

