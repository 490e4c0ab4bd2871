"""Full-ranking evaluation of a split's held-out items, and the baselines it compares against.

Every model is asked the same question: for each user with held-out targets (the last item on a temporal
split, a random sample of the user's items on a random one), rank *all* items except those the user
already interacted with (no sampled negatives). Metrics for one target per user: ``Recall@k`` = hit rate,
``NDCG@k`` = ``1 / log2(rank + 2)`` for a hit at 0-based ``rank``; for several, the leaderboards'
definitions (``ranking_metrics_multi``); catalog coverage = share of items in anyone's top 10.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import scipy.sparse as sp
import torch

from predictor.models.data import SplitData

log = logging.getLogger(__name__)

KS = (10, 20)
RankFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
"""(user_idx [B], end [B], k) → item indexes [B, k]; seen items (positions < end) already excluded."""


def ranking_metrics(top: np.ndarray, targets, n_items: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """top ``[U, K]`` ranked item indexes, targets (one per user ``[U]``, or as
    :func:`ranking_metrics_multi` takes them) → recall@k, ndcg@k, coverage@10."""
    if isinstance(targets, np.ndarray) and targets.ndim == 1:
        targets = targets[:, None]
    return {**ranking_metrics_multi(top, targets, ks), "coverage@10": coverage_at_10(top, n_items)}


def coverage_at_10(top: np.ndarray, n_items: int) -> float:
    """Share of the catalog that appears in anyone's top 10."""
    return float(len(np.unique(top[:, :10])) / max(n_items, 1))


def ranking_metrics_multi(top: np.ndarray, targets, ks: Sequence[int] = KS) -> dict[str, float]:
    """Any number of targets per user (``[U, T]`` 0-padded, or a list of arrays), as published benchmark
    splits have: recall@k = hits / |targets|, NDCG@k = DCG with binary gains / ideal DCG of min(|targets|, k)
    hits (the LightGCN / NGCF definitions). With one target both reduce to the hit rate and
    ``1 / log2(rank + 2)``."""
    padded = _padded(targets)
    out = {}
    for k in ks:
        recall, ndcg = _gains(top, padded, k)
        out[f"recall@{k}"] = float(recall.mean()) if len(recall) else 0.0
        out[f"ndcg@{k}"] = float(ndcg.mean()) if len(ndcg) else 0.0
    return out


def _padded(targets) -> np.ndarray:
    """Targets as ``[U, T]`` int64, 0-padded (0 is never an item)."""
    if isinstance(targets, np.ndarray) and targets.ndim == 2:
        return targets.astype(np.int64, copy=False)
    width = max((len(t) for t in targets), default=0)
    padded = np.zeros((len(targets), max(width, 1)), np.int64)
    for row, target in enumerate(targets):
        padded[row, : len(target)] = target
    return padded


def _gains(top: np.ndarray, padded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user recall@k and NDCG@k ``[U]`` of ``top [U, >=k]`` against ``padded [U, T]`` targets."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    head = top[:, :k]
    hit = ((head[:, :, None] == padded[:, None, :]) & (padded[:, None, :] > 0)).any(axis=2)  # [U, k]
    sizes = (padded > 0).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(sizes, k)]
    dcg = (hit * discounts[: head.shape[1]]).sum(axis=1)
    return hit.sum(axis=1) / np.maximum(sizes, 1), np.where(
        ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0.0
    )


def _tops(rank_fn: RankFn, users: np.ndarray, end: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """``rank_fn`` over ``users`` in batches → ``[U, k]``."""
    tops = [
        rank_fn(users[s : s + batch_size], end[s : s + batch_size], k)
        for s in range(0, len(users), batch_size)
    ]
    return np.concatenate(tops) if tops else np.zeros((0, k), np.int64)


def evaluate_targets(
    rank_fn: RankFn, split: SplitData, targets: dict[int, np.ndarray], batch_size: int = 512
) -> dict:
    """Evaluate against external targets (user index → item indexes), history = everything in ``split``."""
    users = np.array(sorted(u for u, t in targets.items() if u > 0 and len(t)), dtype=np.int64)
    top = _tops(rank_fn, users, split.lengths[users], max(KS), batch_size)
    return {**ranking_metrics(top, [targets[u] for u in users], split.n_items), "users": len(users)}


def holdout(split: SplitData, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, end, targets ``[U, T]`` 0-padded) for ``stage`` = "validation" or "test": history is
    everything before the targets. Validation has ``split.validation_len`` targets per user (one on a
    temporal split), the test one, right after them."""
    if stage not in ("validation", "test"):
        raise ValueError(f"stage must be 'validation' or 'test', got {stage!r}")
    if stage == "validation":
        users = np.flatnonzero(split.validation_len > 0)
        end, count = split.train_len[users], split.validation_len[users]
    else:
        users = np.flatnonzero(split.has_holdout & (split.train_len + split.validation_len < split.lengths))
        end, count = split.train_len[users] + split.validation_len[users], np.ones(len(users), np.int64)
    width = int(count.max()) if len(count) else 1
    columns = np.arange(width)[None, :]
    at = np.clip(end[:, None] + columns, 0, max(split.sequences.shape[1] - 1, 0))
    targets = np.where(columns < count[:, None], split.sequences[users[:, None], at], 0)
    return users, end, targets


def validation_metric(split: SplitData) -> str:
    """The validation metric that early stopping and tuning maximise: NDCG@10 of the next item on a
    temporal split; Recall@20 of the held-out sample on a random one (public leaderboards' headline)."""
    return "recall@20" if split.protocol == "random" else "ndcg@10"


def per_user_scores(
    rank_fn: RankFn,
    split: SplitData,
    stage: str,
    metric: str | None = None,
    batch_size: int = 512,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Each ``stage`` user's ``metric`` (default :func:`validation_metric`), ``[U]`` in :func:`holdout`'s
    order (its mean is :func:`evaluate`'s figure); ``rows``: only those positions of that order."""
    metric = metric or validation_metric(split)
    name, k = metric.split("@")
    users, end, targets = holdout(split, stage)
    if rows is not None:
        users, end, targets = users[rows], end[rows], targets[rows]
    recall, ndcg = _gains(_tops(rank_fn, users, end, int(k), batch_size), targets, int(k))
    return recall if name == "recall" else ndcg


def beats_by_more_than_noise(gain: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Per-user paired gains ``[U]`` (a model's metric minus another's on the same users) → whether the
    mean gain exceeds one standard error of that mean, and both figures."""
    gain = np.asarray(gain, np.float64)
    error = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    mean = float(gain.mean()) if len(gain) else 0.0
    return bool(mean > error), {"mean": mean, "standard_error": error}


def evaluate(
    rank_fn: RankFn, split: SplitData, stage: str = "test", batch_size: int = 512
) -> dict[str, float]:
    users, end, targets = holdout(split, stage)
    top = _tops(rank_fn, users, end, max(KS), batch_size)
    return {**ranking_metrics(top, targets, split.n_items), "users": len(users)}


def mask_seen_(scores: torch.Tensor, split: SplitData, users: np.ndarray, end: np.ndarray) -> torch.Tensor:
    """In place: column 0 (padding) and each user's items before position ``end`` set to -inf in
    ``scores [B, n_items + 1]``; returns ``scores``."""
    scores[:, 0] = float("-inf")
    width = int(end.max()) if len(end) else 0
    if width:
        seen = torch.from_numpy(split.sequences[users, :width])
        mask = torch.from_numpy(np.arange(width)[None, :] < end[:, None])
        rows = torch.arange(len(users))[:, None].expand_as(seen)
        scores[rows[mask].to(scores.device), seen[mask].to(scores.device)] = float("-inf")
    return scores


def top_k_excluding_seen(
    scores: torch.Tensor, split: SplitData, users: np.ndarray, end: np.ndarray, k: int
) -> np.ndarray:
    """scores ``[B, n_items + 1]`` (column 0 = padding; left unchanged) → ``[B, min(k, n_items)]`` best
    unseen item indexes."""
    k = min(k, scores.shape[1] - 1)
    return torch.topk(mask_seen_(scores.clone(), split, users, end), k, dim=1).indices.cpu().numpy()


# --- baselines ---------------------------------------------------------------------------------------
def interaction_matrix(split: SplitData, stage: str) -> sp.csr_matrix:
    """User × item CSR of what a model may train on before ``stage``: training events, plus the
    validation event when evaluating on test."""
    n_rows, width = split.sequences.shape
    limit = split.train_len + (split.validation_len if stage == "test" else 0)
    mask = np.arange(width)[None, :] < limit[:, None]
    rows = np.broadcast_to(np.arange(n_rows)[:, None], (n_rows, width))[mask]
    cols = split.sequences[mask]
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_rows, split.n_items + 1))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


@dataclass
class Popularity:
    """Most popular items the user has not seen."""

    name: str = "popularity"

    def fit(self, split: SplitData, stage: str) -> Popularity:
        counts = np.asarray(interaction_matrix(split, stage).sum(axis=0)).ravel()
        self.scores = torch.from_numpy(counts.astype(np.float32))
        return self

    def rank(self, split: SplitData) -> RankFn:
        def rank_fn(users, end, k):
            return top_k_excluding_seen(self.scores.expand(len(users), -1), split, users, end, k)

        return rank_fn


@dataclass
class ImplicitModel:
    """ALS or BPR from the `implicit` library, scored by user · item factors over the full catalog."""

    kind: str  # "als" or "bpr"
    params: dict
    seed: int = 0

    @property
    def name(self) -> str:
        return f"implicit_{self.kind}"

    def fit(self, split: SplitData, stage: str) -> ImplicitModel:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        matrix = interaction_matrix(split, stage)
        params = dict(self.params)
        if self.kind == "als":
            alpha = params.pop("alpha", 1.0)
            model = AlternatingLeastSquares(random_state=self.seed, **params)
            model.fit(matrix * alpha, show_progress=False)
        elif self.kind == "bpr":
            # one thread: implicit's multi-threaded BPR updates shared factors lock-free (Hogwild), so the
            # same seed gave different baselines from run to run; one thread makes a seed mean one result
            model = BayesianPersonalizedRanking(random_state=self.seed, num_threads=1, **params)
            model.fit(matrix, show_progress=False)
        else:
            raise ValueError(f"unknown implicit model {self.kind!r}")
        self.user_factors = torch.from_numpy(np.asarray(model.user_factors, np.float32))
        self.item_factors = torch.from_numpy(np.asarray(model.item_factors, np.float32))
        return self

    def rank(self, split: SplitData) -> RankFn:
        def rank_fn(users, end, k):
            scores = mask_seen_(
                self.user_factors[torch.from_numpy(users)] @ self.item_factors.T, split, users, end
            )
            return torch.topk(scores, min(k, scores.shape[1] - 1), dim=1).indices.numpy()

        return rank_fn


ALS_GRID = {
    "factors": [64, 128],
    "regularization": [0.01, 0.1, 1.0],
    "alpha": [1.0, 10.0, 40.0],
    "iterations": [15],
}
BPR_GRID = {
    "factors": [64, 128],
    "learning_rate": [0.01, 0.05],
    "regularization": [0.001, 0.01],
    "iterations": [100],
}


def tune_implicit(
    kind: str, split: SplitData, grid: dict[str, list] | None = None, seed: int = 0
) -> tuple[ImplicitModel, dict, list]:
    """Grid search on the split's validation metric (:func:`validation_metric`); refit the best on train
    + validation for the test stage.

    Returns (test-stage model, best params, [(params, validation metrics)...]).
    """
    grid = grid or (ALS_GRID if kind == "als" else BPR_GRID)
    trials, metric = [], validation_metric(split)
    for values in product(*grid.values()):
        params = dict(zip(grid.keys(), values))
        model = ImplicitModel(kind, params, seed).fit(split, "validation")
        metrics = evaluate(model.rank(split), split, "validation")
        trials.append((params, metrics))
        log.info("%s %s: validation %s %.4f", kind, params, metric, metrics[metric])
    best = max(trials, key=lambda t: t[1][metric])[0]
    return ImplicitModel(kind, best, seed).fit(split, "test"), best, trials
