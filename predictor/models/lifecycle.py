"""Training, registering and retraining a model: what ``recsys train`` and ``recsys retrain`` run.

Retraining (the CronJob):

1. read production from the registry and load its artifact (checksums verified);
2. data = every user with events after production's cutoff (their whole history, so sequences have
   context) plus a replay sample of other users; new users and items are appended to the model's
   indexes, old rows keep their learned embeddings;
3. warm-start a copy of production and fine-tune it;
4. evaluate candidate and production on the same fresh holdout: each changed user's last event, which
   is after the cutoff;
5. register the candidate; promote only if its NDCG@10 >= production's − tolerance, through the
   registry's compare-and-swap, else record the rejection and why.

A crash anywhere before the promotion transaction commits leaves production untouched; re-running
simply makes another candidate.
"""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch.distributed as dist

from predictor.data.schema import Interactions
from predictor.models.config import ModelConfig, TrainConfig
from predictor.models.data import build_split
from predictor.models.evaluate import evaluate
from predictor.models.persistence import load_model, save_model
from predictor.models.recommender import TwoStageRecommender
from predictor.models.registry import (
    ModelRegistry,
    ModelVersion,
    PromotionConflict,
)

log = logging.getLogger(__name__)
MODEL_NAME = "two_stage"


def artifact_uri(root: str | Path, name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{str(root).rstrip('/')}/{name}/{stamp}-{uuid.uuid4().hex[:8]}"


def train_and_register(
    data: Interactions,
    registry: ModelRegistry,
    artifacts: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    user_profile: pd.DataFrame | None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    promote: bool = True,
    progress: bool = True,
    settings_chosen: dict[str, str] | None = None,
) -> tuple[ModelVersion | None, dict]:
    """Train from scratch on the whole log, evaluate on its leave-last-out test, register, and promote
    (if ``promote``) through the registry's compare-and-swap.

    ``user_profile``: the offline user_profile rows (history snapshots) for the point-in-time join.
    ``settings_chosen``: why each setting has its value (``predictor.models.defaults.choose``), kept in
    the model's metadata.
    """
    split = build_split(data)
    model = TwoStageRecommender(model_config, train_config)
    model.settings_chosen = dict(settings_chosen or {})
    model.fit(split, user_profile, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None, {}  # under torchrun only rank 0 evaluates and registers
    metrics = evaluate(model.rank(split), split, "test")
    cutoff = data.events["timestamp"].max().to_pydatetime()
    uri = save_model(model, artifact_uri(artifacts, MODEL_NAME), {"metrics": metrics})
    version = registry.register(MODEL_NAME, uri, cutoff, metrics)
    if promote:
        current = registry.production(MODEL_NAME)
        version = registry.promote(version.id, current.id if current else None)
    return version, metrics


@dataclass
class RetrainResult:
    candidate: ModelVersion
    production_before: ModelVersion
    promoted: bool
    candidate_ndcg: float
    production_ndcg: float
    reason: str


def retrain(
    data: Interactions,
    registry: ModelRegistry,
    artifacts: str | Path,
    user_profile: pd.DataFrame | None = None,
    tolerance: float = 0.005,
    replay_users: float = 0.2,
    epochs: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> RetrainResult:
    """``user_profile``: offline user_profile history snapshots (used if production was trained with them)."""
    production = registry.production(MODEL_NAME)
    if production is None:
        raise LookupError(f"no production version of {MODEL_NAME}: run `recsys train` first")
    base = load_model(production.artifact_uri)
    cutoff = pd.Timestamp(production.data_cutoff)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff
    window = select_retraining_data(data, cutoff, replay_users, seed)
    changed = window.meta["changed_users"]
    if len(changed) == 0:
        raise LookupError(f"no events after the production cutoff {cutoff}: nothing to retrain on")

    split = build_split(window, users=base.catalog.users, items=base.catalog.items)
    user_profile = user_profile if base.uses_user_features else None
    # fresh holdout: the changed users' last events (all after the cutoff); every user's second-to-last
    # event still serves as validation for early stopping
    fresh = np.zeros(split.n_users + 1, dtype=bool)
    fresh[split.users.index(changed)] = True

    candidate = copy.deepcopy(base)
    candidate.train_config = TrainConfig(
        **{**base.train_config.__dict__, "epochs": epochs, "seed": seed, "patience": max(2, epochs // 3)}
    )
    candidate.fit(split, user_profile, progress=progress)

    holdout_split = copy.copy(split)
    holdout_split.has_holdout = split.has_holdout & fresh
    base.prepare(split, user_profile if base.uses_user_features else None)
    cand_metrics = evaluate(candidate.rank(holdout_split), holdout_split, "test")
    prod_metrics = evaluate(base.rank(holdout_split), holdout_split, "test")
    new_cutoff = data.events["timestamp"].max().to_pydatetime()
    uri = save_model(candidate, artifact_uri(artifacts, MODEL_NAME), {"metrics": cand_metrics})
    version = registry.register(
        MODEL_NAME,
        uri,
        new_cutoff,
        {"fresh_holdout": cand_metrics, "production_on_fresh_holdout": prod_metrics},
        parent_version=production.version,
    )
    c, p = cand_metrics["ndcg@10"], prod_metrics["ndcg@10"]
    if c < p - tolerance:
        reason = f"candidate NDCG@10 {c:.4f} is worse than production's {p:.4f} by more than {tolerance}"
        return RetrainResult(registry.reject(version.id, reason), production, False, c, p, reason)
    try:
        promoted = registry.promote(version.id, production.id)
    except PromotionConflict as exc:
        reason = f"production changed while retraining ({exc})"
        return RetrainResult(registry.reject(version.id, reason), production, False, c, p, reason)
    return RetrainResult(
        promoted,
        production,
        True,
        c,
        p,
        f"candidate NDCG@10 {c:.4f} vs production {p:.4f} (tolerance {tolerance})",
    )


def select_retraining_data(
    data: Interactions, cutoff: pd.Timestamp, replay_users: float, seed: int
) -> Interactions:
    """Users with events after ``cutoff`` (whole histories) plus a ``replay_users`` share of the others."""
    ev = data.events
    changed = np.unique(ev.loc[ev["timestamp"] > cutoff, "user_id"].to_numpy())
    others = np.setdiff1d(ev["user_id"].unique(), changed)
    rng = np.random.default_rng(seed)
    replay = (
        rng.choice(others, size=round(len(others) * replay_users), replace=False) if len(others) else others
    )
    keep = ev["user_id"].isin(np.concatenate([changed, replay]))
    return Interactions(
        ev[keep.to_numpy()].reset_index(drop=True),
        data.items,
        f"{data.name} since {cutoff}",
        meta={"changed_users": changed, "replay_users": replay},
    )
