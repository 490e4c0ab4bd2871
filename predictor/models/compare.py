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
                           "training": {"retrieval": model.history.retrieval, "ranker": model.history.ranker}}  # fmt: skip
    als = report["results"]["implicit_als"]["ndcg@10"]
    report["two_stage_vs_als_ndcg@10"] = report["results"]["two_stage"]["ndcg@10"] / als if als else None
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


def results_frame(report: dict) -> pd.DataFrame:
    return pd.DataFrame(report["results"]).T[list(METRICS)]
