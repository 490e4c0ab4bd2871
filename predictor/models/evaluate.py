"""Full-ranking evaluation on the temporal leave-last-out split, and the baselines it compares against.

Every model is asked the same question: for each user with a held-out target, rank *all* items except
those the user already interacted with (no sampled negatives). Metrics for one target per user:
``Recall@k`` = hit rate, ``NDCG@k`` = ``1 / log2(rank + 2)`` for a hit at 0-based ``rank``, and catalog
coverage = share of items that appear in anyone's top 10.
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


def ranking_metrics(top: np.ndarray, target: np.ndarray, n_items: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """top ``[U, K]`` ranked item indexes, target ``[U]`` → recall@k, ndcg@k, coverage@10."""
    rank = _hit_rank(top, target)
    out = {}
    for k in ks:
        hit = rank < k
        out[f"recall@{k}"] = float(hit.mean()) if len(hit) else 0.0
        out[f"ndcg@{k}"] = float(_ndcg_gains(rank, k).mean()) if len(hit) else 0.0
    out["coverage@10"] = float(len(np.unique(top[:, :10])) / max(n_items, 1))
    return out


def _hit_rank(top: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target in ``top [U, K]`` (int64 max where absent)."""
    hits = top == target[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)


def _ndcg_gains(rank: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k of one target at ``rank`` (0 beyond k)."""
    return np.where(rank < k, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)


def _tops(rank_fn: RankFn, users: np.ndarray, end: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """``rank_fn`` over ``users`` in batches → ``[U, k]``."""
    tops = [rank_fn(users[s : s + batch_size], end[s : s + batch_size], k) for s in range(0, len(users), batch_size)]
    return np.concatenate(tops) if tops else np.zeros((0, k), np.int64)


def ranking_metrics_multi(top: np.ndarray, targets: list[np.ndarray], ks: Sequence[int] = KS) -> dict[str, float]:
    """Several targets per user, as published benchmark splits have: recall@k = hits / |targets|,
    NDCG@k = DCG / ideal DCG of min(|targets|, k) hits (the LightGCN / NGCF definitions)."""
    out = {}
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    for k in ks:
        recalls, ndcgs = [], []
        for row, target in zip(top, targets):
            hit = np.isin(row[:k], target)
            recalls.append(hit.sum() / len(target))
            ndcgs.append((hit * discounts[: len(hit)]).sum() / discounts[: min(len(target), k)].sum())
        out[f"recall@{k}"] = float(np.mean(recalls)) if recalls else 0.0
        out[f"ndcg@{k}"] = float(np.mean(ndcgs)) if ndcgs else 0.0
    return out


def evaluate_targets(rank_fn: RankFn, split: SplitData, targets: dict[int, np.ndarray], batch_size: int = 512) -> dict:
    """Evaluate against external targets (user index → item indexes), history = everything in ``split``."""
    users = np.array(sorted(u for u, t in targets.items() if u > 0 and len(t)), dtype=np.int64)
    top = _tops(rank_fn, users, split.lengths[users], max(KS), batch_size)
    metrics = ranking_metrics_multi(top, [targets[u] for u in users])
    metrics["coverage@10"] = float(len(np.unique(top[:, :10])) / max(split.n_items, 1))
    metrics["users"] = len(users)
    return metrics


def holdout(split: SplitData, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, end, target) for ``stage`` = "validation" or "test": history is everything before the target."""
    if stage not in ("validation", "test"):
        raise ValueError(f"stage must be 'validation' or 'test', got {stage!r}")
    users = np.flatnonzero(split.has_holdout)
    end = split.train_len[users] + (0 if stage == "validation" else 1)
    return users, end, split.sequences[users, end]


def per_user_ndcg(rank_fn: RankFn, split: SplitData, stage: str, k: int = 10, batch_size: int = 512) -> np.ndarray:
    """NDCG@k of each user with a ``stage`` target, ``[U]`` in :func:`holdout`'s order (its mean is
    :func:`evaluate`'s ``ndcg@k``)."""
    users, end, target = holdout(split, stage)
    return _ndcg_gains(_hit_rank(_tops(rank_fn, users, end, k, batch_size), target), k)


def beats_by_more_than_noise(gain: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Per-user paired gains ``[U]`` (a model's metric minus another's on the same users) → whether the
    mean gain exceeds one standard error of that mean, and both figures."""
    gain = np.asarray(gain, np.float64)
    error = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    mean = float(gain.mean()) if len(gain) else 0.0
    return bool(mean > error), {"mean": mean, "standard_error": error}


def evaluate(rank_fn: RankFn, split: SplitData, stage: str = "test", batch_size: int = 512) -> dict[str, float]:
    users, end, target = holdout(split, stage)
    metrics = ranking_metrics(_tops(rank_fn, users, end, max(KS), batch_size), target, split.n_items)
    metrics["users"] = len(users)
    return metrics


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


def top_k_excluding_seen(scores: torch.Tensor, split: SplitData, users: np.ndarray, end: np.ndarray, k: int) -> np.ndarray:
    """scores ``[B, n_items + 1]`` (column 0 = padding; left unchanged) → ``[B, min(k, n_items)]`` best
    unseen item indexes."""
    k = min(k, scores.shape[1] - 1)
    return torch.topk(mask_seen_(scores.clone(), split, users, end), k, dim=1).indices.cpu().numpy()


# --- baselines ---------------------------------------------------------------------------------------
def interaction_matrix(split: SplitData, stage: str) -> sp.csr_matrix:
    """User × item CSR of what a model may train on before ``stage``: training events, plus the
    validation event when evaluating on test."""
    n_rows, width = split.sequences.shape
    limit = split.train_len + (1 if stage == "test" else 0) * split.has_holdout
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
            scores = mask_seen_(self.user_factors[torch.from_numpy(users)] @ self.item_factors.T, split, users, end)
            return torch.topk(scores, min(k, scores.shape[1] - 1), dim=1).indices.numpy()

        return rank_fn


ALS_GRID = {"factors": [64, 128], "regularization": [0.01, 0.1, 1.0], "alpha": [1.0, 10.0, 40.0], "iterations": [15]}
BPR_GRID = {"factors": [64, 128], "learning_rate": [0.01, 0.05], "regularization": [0.001, 0.01], "iterations": [100]}


def tune_implicit(kind: str, split: SplitData, grid: dict[str, list] | None = None, seed: int = 0) -> tuple[ImplicitModel, dict, list]:
    """Grid search on validation NDCG@10; refit the best on train + validation for the test stage.

    Returns (test-stage model, best params, [(params, validation metrics)...]).
    """
    grid = grid or (ALS_GRID if kind == "als" else BPR_GRID)
    trials = []
    for values in product(*grid.values()):
        params = dict(zip(grid.keys(), values))
        model = ImplicitModel(kind, params, seed).fit(split, "validation")
        metrics = evaluate(model.rank(split), split, "validation")
        trials.append((params, metrics))
        log.info("%s %s: validation ndcg@10 %.4f", kind, params, metrics["ndcg@10"])
    best = max(trials, key=lambda t: t[1]["ndcg@10"])[0]
    return ImplicitModel(kind, best, seed).fit(split, "test"), best, trials
