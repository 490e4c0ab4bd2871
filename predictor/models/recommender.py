"""The two-stage recommender, the estimator: ``fit`` trains retrieval then ranking
(``predictor.models.training``); ``inference`` freezes it into the one inference path
(``predictor.models.inference``) that ``rank`` (evaluation), ``recommend`` and the serving engine run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pandas as pd
import torch

from predictor.features.schema import USER_DENSE_COLUMNS
from predictor.models.config import ModelConfig, TrainConfig
from predictor.models.data import SplitData, UserFeatureIndex, to_tensor
from predictor.models.distributed import World, pick_device, seed_everything
from predictor.models.evaluate import RankFn, evaluate
from predictor.models.inference import (
    HNSW_THRESHOLD,
    RANKED_LEVELS,
    TwoStageInference,
    batch_from_split,
)
from predictor.models.ranker import Ranker
from predictor.models.training import TrainingBatches, TrainingHistory, fit_ranker, fit_retrieval
from predictor.models.two_tower import IdEmbedding, TwoTower

if TYPE_CHECKING:
    from predictor.models.persistence import SplitCatalog


class TwoStageRecommender:
    """Retrieval (two-tower) + ranking (DIN) over one catalog index.

    The contract (``implicit``'s ``RecommenderBase`` shape):

    * ``fit(split, user_profile)`` trains on a :class:`~predictor.models.data.SplitData` (its sequences,
      validation targets and item features) and the point-in-time ``user_profile`` snapshots (or None);
    * ``recommend(user_ids, k)`` → raw item ids ``[U, k]`` int64, padded with -1, and scores ``[U, k]``
      float32, padded with -inf, best first, seen items excluded: the one inference path
      (:meth:`inference`, what evaluation and serving run);
    * ``save(uri)`` / ``TwoStageRecommender.load(uri)`` persist it as a verified artifact
      (``predictor.models.persistence``); a loaded model recommends from a split after :meth:`prepare`.

    The training loops live in ``predictor.models.training``, training windows in
    ``predictor.models.windows``, the frozen inference path in ``predictor.models.inference`` (which
    knows the model modules and the catalog, never this class).
    """

    def __init__(self, config: ModelConfig, train: TrainConfig | None = None, device: str | None = None):
        self.config = config
        self.train_config = train or TrainConfig()
        self.device = pick_device(device)
        self.retrieval: TwoTower | None = None
        self.ranker: Ranker | None = None
        self.use_ranker = False
        self.ranker_gain: dict | None = None  # the ranker's validation-metric gain: mean, standard error
        self.settings_chosen: dict[str, str] = {}  # setting → why it has its value (chosen from the data)
        self.candidates = 200
        self.best_epochs = {"retrieval": 0, "ranker": 0}  # the epochs early stopping kept (0: none)
        self.validation_retrieval: float | None = None  # best validation score of retrieval alone
        self.validation_score: float | None = None  # ... and of what serves
        self.history = TrainingHistory()
        self.catalog: SplitData | SplitCatalog | None = None  # the split trained on, or a loaded model's
        self.split: SplitData | None = None  # what rank and recommend read: the split fitted or prepared on
        # trained on user_profile features: whoever serves or evaluates it must feed them (else zeros)
        self.uses_user_features = False
        self.user_features: UserFeatureIndex | None = None  # the point-in-time join, prepared once
        # the catalog's item tables, rows as the id embeddings: categories [N, C], dense features [N, F_i]
        self.item_cats: torch.Tensor | None = None
        self.item_dense: torch.Tensor | None = None
        # the HNSW graph over this model's item vectors, for CPU catalogs above HNSW_THRESHOLD: built once
        # when the model is saved, stored in the artifact, and reused by every replica that loads it
        self.search_graph: faiss.Index | None = None

    # --- persistence (``predictor.models.persistence`` imports this class, hence the imports inside) ------
    def save(self, uri: str, extra: dict | None = None) -> str:
        """Write the model as a verified artifact at ``uri``, ``extra`` added to its metadata."""
        from predictor.models.persistence import save_model

        return save_model(self, uri, extra)

    @classmethod
    def load(cls, uri: str, device: str | None = None) -> TwoStageRecommender:
        """The verified model at ``uri`` (local weights memory-mapped); :meth:`prepare` it on a split."""
        from predictor.models.persistence import load_model

        return load_model(uri, device)

    # --- shapes of the catalog the model was built for ---------------------------------------------
    def _build(self, split: SplitData) -> None:
        rows = max(split.n_items + 1, self.config.item_capacity)
        user_dim = len(USER_DENSE_COLUMNS) + split.n_categories
        item_dim = split.item_dense.shape[1]
        self.retrieval = TwoTower(self.config, rows, split.n_categories, user_dim, item_dim).to(self.device)
        self.ranker = Ranker(self.config, rows, split.n_categories, user_dim, item_dim).to(self.device)

    def item_tables(self, split: SplitData | SplitCatalog) -> tuple[torch.Tensor, torch.Tensor]:
        """The catalog's item categories ``[N, C]`` and dense features ``[N, F_i]`` float32 on the model's
        device, ``N`` the id embeddings' rows (rows past the catalog: zeros)."""
        rows = self.retrieval.items.id_embedding.rows
        cats = np.zeros((rows, split.item_categories.shape[1]), np.float32)
        dense = np.zeros((rows, split.item_dense.shape[1]), np.float32)
        cats[: split.n_items + 1] = split.item_categories
        dense[: split.n_items + 1] = split.item_dense
        return to_tensor(cats, self.device), to_tensor(dense, self.device)

    def prepare(self, split: SplitData, user_profile: pd.DataFrame | None) -> TwoStageRecommender:
        """Point a trained model at ``split`` (built with this model's indexes) for ranking; no training."""
        self.split, self.catalog = split, split
        self.user_features = _feature_index(user_profile, split)
        self._grow(split)
        self.item_cats, self.item_dense = self.item_tables(split)
        return self

    # --- fit -------------------------------------------------------------------------------------------
    def fit(
        self,
        split: SplitData,
        user_profile: pd.DataFrame | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> TwoStageRecommender:
        """Train retrieval with early stopping on the split's validation metric (NDCG@10 on a temporal
        split, Recall@20 on a random one; a split with nothing held out trains every epoch and keeps the
        last: a final fit), then the ranker on its candidates.

        ``user_profile``: offline user_profile rows (several snapshots) for the point-in-time join; None
        trains without user features. Warm start: call ``fit`` on a model that already has weights.
        """
        cfg = self.train_config
        seed_everything(cfg.seed)
        self.search_graph = None  # training moves the item vectors: the graph is built again at save
        world = World.from_env(self.device)
        self.split, self.catalog = split, split
        self.user_features = _feature_index(user_profile, split)
        self.uses_user_features = user_profile is not None
        if self.retrieval is None:
            self._build(split)
        else:
            self._grow(split)
        self.item_cats, self.item_dense = self.item_tables(split)

        batches = TrainingBatches(split, self.config.max_history, self.user_features, self.device)
        ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        fit_retrieval(self, split, batches, world, ckpt, resume, progress)
        fit_ranker(self, split, batches, world, progress)
        return self

    def id_tables(self) -> list[IdEmbedding]:
        """The item id tables, one row per item: the item tower's, the ranker's, and the set encoder's."""
        tables = [self.retrieval.items.id_embedding, self.ranker.item_id]
        if self.config.user_encoder == "set":
            tables.append(self.retrieval.user.read)
        return tables

    def _grow(self, split: SplitData) -> None:
        """Warm start on a bigger catalog: keep every learned row, add rows for new items."""
        needed = split.n_items + 1
        for table in self.id_tables():
            if table.rows < needed:
                extra = torch.randn(needed - table.rows, table.weight.shape[1], device=table.weight.device)
                extra = (extra * table.weight.shape[1] ** -0.5).to(table.weight.dtype)
                table.weight = torch.nn.Parameter(torch.cat([table.weight.data, extra]))
        if self.retrieval.items.n_categories != split.n_categories:
            raise ValueError(
                f"category vocabulary changed ({self.retrieval.items.n_categories} → {split.n_categories}): "
                "train a new model instead of warm-starting"
            )

    # --- inference ---------------------------------------------------------------------------------------
    def inference(
        self,
        search: str = "auto",
        use_ranker: bool | None = None,
        candidates: int | None = None,
        precision: str = "fp32",
        hnsw_threshold: int = HNSW_THRESHOLD,
        reduced_candidates: int | None = None,
        ranker: torch.nn.Module | None = None,
        item_dense: torch.Tensor | None = None,
    ) -> TwoStageInference:
        """This model frozen for inference: the one path that evaluation and serving both run.

        ``ranker``: a serving form of this model's ranker in its place (the int8 copy); ``item_dense``
        ``[N, F_i]``: item features in place of training's (the online store's). The model is unchanged."""
        self.retrieval.eval()
        self.ranker.eval()
        return TwoStageInference(
            self.retrieval,
            (self.ranker if ranker is None else ranker).eval(),
            self.item_cats,
            self.item_dense if item_dense is None else item_dense,
            self.catalog.n_items,
            self.catalog.n_categories,
            self.config.max_history,
            self.config.ranker_history,
            candidates or self.candidates,
            self.use_ranker if use_ranker is None else use_ranker,
            search,
            hnsw_threshold,
            precision,
            self.search_graph,
            self.catalog.item_popularity,
            reduced_candidates,
        )

    def to(self, device: str | torch.device) -> TwoStageRecommender:
        """Move the modules and the catalog's item tables to ``device``, in place."""
        self.device = torch.device(device)
        self.retrieval, self.ranker = self.retrieval.to(self.device), self.ranker.to(self.device)
        self.item_cats, self.item_dense = self.item_cats.to(self.device), self.item_dense.to(self.device)
        return self

    def with_fp16_tables(self) -> TwoStageRecommender:
        """Store the id embedding tables (most of a large model's parameters) in float16, in place: half
        their memory and artifact bytes; lookups still return fp32 (``IdEmbedding``). The config records it,
        so a saved artifact loads with fp16 tables."""
        for table in self.id_tables():
            table.weight.data = table.weight.data.half()
        self.config = dataclasses.replace(self.config, embedding_fp16=True)
        return self

    def _user_dense_at(self, split: SplitData, users: np.ndarray, end: np.ndarray) -> np.ndarray:
        if self.user_features is not None and len(users):
            times = split.timestamps[users, np.minimum(end, split.sequences.shape[1] - 1)]
            return self.user_features.at(split.users.raw(users), times)
        return np.zeros((len(users), len(USER_DENSE_COLUMNS) + split.n_categories), np.float32)

    def rank(
        self,
        split: SplitData | None = None,
        stage: str = "two_stage",
        search: str = "auto",
        inference: TwoStageInference | None = None,
        level: str | None = None,
    ) -> RankFn:
        """The evaluation question (see ``evaluate.RankFn``) answered by :meth:`inference`: ``stage`` is
        "two_stage" (the ranker where it serves) or "retrieval"; ``search`` as in :meth:`inference`.
        ``inference``: evaluate that one instead (a serving form of this model: int8 ranker, HNSW, ...).
        ``level``: a rung of the serving ladder (``inference.LEVELS``) instead of ``stage``; "full" and
        "reduced" rank with the ranker whether or not validation chose it."""
        split = split or self.split
        if inference is None:
            use_ranker = level in RANKED_LEVELS if level else self.use_ranker and stage == "two_stage"
            inference = self.inference(search=search, use_ranker=use_ranker)

        def rank_fn(users, end, k):
            batch = batch_from_split(
                split, users, end, self.config.max_history, self._user_dense_at(split, users, end)
            )
            return inference.recommend(batch, k, level=level)[0]

        return rank_fn

    def recommend(
        self, user_ids: np.ndarray | list[int], k: int = 10, split: SplitData | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for raw ``user_ids`` ``[U]`` from everything ``split`` (default: the split fitted
        on or prepared with) holds of each user, at the model's best serving level, items the user read
        excluded: raw item ids ``[U, k]`` int64 (-1 where fewer than ``k`` remain) and scores ``[U, k]``
        float32 (-inf there). A user ``split`` does not know raises ValueError naming them."""
        split = split or self.split
        raw = np.asarray(user_ids, np.int64)
        users = split.users.index(raw)
        if (users == 0).any():
            raise ValueError(f"user_ids not in the split: {raw[users == 0][:10].tolist()}")
        end = split.lengths[users]
        batch = batch_from_split(
            split, users, end, self.config.max_history, self._user_dense_at(split, users, end)
        )
        found, found_scores = self.inference().recommend(batch, k)
        ids = np.full((len(raw), k), -1, np.int64)
        scores = np.full((len(raw), k), -np.inf, np.float32)
        ids[:, : found.shape[1]] = split.items.raw(found)  # index 0 (padding) → -1
        scores[:, : found.shape[1]] = np.where(found > 0, found_scores, -np.inf)
        return ids, scores


def _feature_index(user_profile: pd.DataFrame | None, split: SplitData) -> UserFeatureIndex | None:
    return None if user_profile is None else UserFeatureIndex(user_profile, split.n_categories)


def evaluate_model(
    model: TwoStageRecommender, split: SplitData, stage: str = "test"
) -> dict[str, dict[str, float]]:
    return {
        "two_stage": evaluate(model.rank(split, "two_stage"), split, stage),
        "retrieval": evaluate(model.rank(split, "retrieval"), split, stage),
    }
