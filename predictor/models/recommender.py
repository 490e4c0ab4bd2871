"""The two-stage recommender: ``fit`` trains retrieval then ranking; ``inference`` freezes it into the one
inference path (``predictor.models.inference``) that ``rank`` (evaluation) and the serving engine run.

Retrieval trains on windows: each user's training events are cut into chunks of up to ``max_history``
labels; the encoder reads the items before each label (causally) and predicts it. The user features
at each label are the newest ``user_profile`` snapshot strictly before the label's timestamp
(point-in-time). Batches are built by NumPy fancy indexing over the padded sequence matrix: no per-row
Python in the loop.

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) each process takes every ``world``-th example,
gradients are averaged by ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), rank 0 evaluates
and decides early stopping for all.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from predictor.features.schema import USER_DENSE_COLUMNS
from predictor.models.config import ModelConfig, TrainConfig
from predictor.models.data import SplitData, UserFeatureIndex, to_tensor
from predictor.models.distributed import World, pick_device, seed_everything
from predictor.models.evaluate import (
    RankFn,
    beats_by_more_than_noise,
    evaluate,
    holdout,
    mask_seen_,
    per_user_scores,
    validation_metric,
)
from predictor.models.inference import (
    HNSW_THRESHOLD,
    RANKED_LEVELS,
    TwoStageInference,
    batch_from_split,
    ranker_history,
    ranker_inputs,
)
from predictor.models.ranker import Ranker
from predictor.models.two_tower import (
    TwoTower,
    all_items_softmax_loss,
    exact_softmax_loss,
    sampled_softmax_loss,
)
from predictor.models.windows import (
    shuffled_training_items,
    training_examples,
    training_objective,
    training_windows,
)

log = logging.getLogger(__name__)


@dataclass
class TrainingHistory:
    retrieval: list[dict] = field(default_factory=list)  # per epoch: loss, validation metric, seconds
    ranker: list[dict] = field(default_factory=list)
    examples_per_second: float = 0.0


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

    Training windows live in ``predictor.models.windows``, the frozen inference path in
    ``predictor.models.inference`` (which knows the model modules and the catalog, never this class).
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
        self.catalog = None  # the split trained on, or a loaded model's SplitCatalog
        self.user_features: UserFeatureIndex | None = None  # the point-in-time join, prepared once
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

    def _item_tables(self, split: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.retrieval.items.id_embedding.rows
        cats = np.zeros((rows, split.item_categories.shape[1]), np.float32)
        dense = np.zeros((rows, split.item_dense.shape[1]), np.float32)
        cats[: split.n_items + 1] = split.item_categories
        dense[: split.n_items + 1] = split.item_dense
        return to_tensor(cats, self.device), to_tensor(dense, self.device)

    @property
    def uses_user_features(self) -> bool:
        return bool(getattr(self, "_trained_with_features", False))

    def prepare(self, split: SplitData, user_profile: pd.DataFrame | None) -> TwoStageRecommender:
        """Point a trained model at ``split`` (built with this model's indexes) for ranking; no training."""
        self.split, self.catalog = split, split
        self.user_features = _feature_index(user_profile, split)
        self._grow(split)
        self.item_cats, self.item_dense = self._item_tables(split)
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
        self._trained_with_features = user_profile is not None
        if self.retrieval is None:
            self._build(split)
        else:
            self._grow(split)
        self.item_cats, self.item_dense = self._item_tables(split)

        users, positions = training_examples(split)
        self.offsets = np.concatenate([[0], np.cumsum(split.lengths)[:-1]])
        self.dense_flat = np.zeros(
            (int(split.lengths.sum()) + 1, len(USER_DENSE_COLUMNS) + split.n_categories), np.float32
        )
        self.dense_flat[self.offsets[users] + positions] = self._user_dense(split, users, positions)
        ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        self._fit_retrieval(split, world, ckpt, resume, progress)
        self._fit_ranker(split, users, positions, world, progress)
        return self

    def _grow(self, split: SplitData) -> None:
        """Warm start on a bigger catalog: keep every learned row, add rows for new items."""
        needed = split.n_items + 1
        for table in (self.retrieval.items.id_embedding, self.ranker.item_id):
            if table.rows < needed:
                extra = torch.randn(needed - table.rows, table.weight.shape[1], device=table.weight.device)
                extra = (extra * table.weight.shape[1] ** -0.5).to(table.weight.dtype)
                table.weight = torch.nn.Parameter(torch.cat([table.weight.data, extra]))
        if self.retrieval.items.n_categories != split.n_categories:
            raise ValueError(
                f"category vocabulary changed ({self.retrieval.items.n_categories} → {split.n_categories}): "
                "train a new model instead of warm-starting"
            )

    def _user_dense(self, split: SplitData, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
        width = len(USER_DENSE_COLUMNS) + split.n_categories
        if self.user_features is None or len(users) == 0:
            return np.zeros((len(users), width), np.float32)
        return self.user_features.at(split.users.raw(users), split.timestamps[users, positions])

    def _window_batch(self, split: SplitData, users: np.ndarray, ends: np.ndarray):
        """Training windows: inputs ``[B, L]``, targets ``[B, L]`` (0 = no label), user features
        ``[B, L, F_u]``, and the number of labels (counted on the host, before the copy)."""
        L = self.config.max_history
        inputs, n = split.window(users, ends - 1, L)
        target_pos = (ends - n)[:, None] + np.arange(L)[None, :]
        valid = np.arange(L)[None, :] < n[:, None]
        target_pos = np.where(valid, target_pos, 0)
        targets = np.where(valid, split.sequences[users[:, None], target_pos], 0)
        flat = np.where(valid, self.offsets[users][:, None] + target_pos, len(self.dense_flat) - 1)
        dense = self.dense_flat[flat]
        return (
            to_tensor(inputs, self.device),
            to_tensor(targets, self.device),
            to_tensor(dense, self.device),
            int((targets > 0).sum()),
        )

    def _example_batch(self, split: SplitData, users: np.ndarray, positions: np.ndarray):
        """Single-label examples (ranker): window before ``positions``, lengths, target, user features."""
        window, lengths = split.window(users, positions, self.config.max_history)
        dense = self.dense_flat[self.offsets[users] + positions]
        return (
            to_tensor(window, self.device),
            to_tensor(lengths, self.device),
            to_tensor(split.sequences[users, positions], self.device),
            to_tensor(dense, self.device),
        )

    def _fit_retrieval(self, split, world, ckpt, resume, progress):
        cfg = self.train_config
        model = self.retrieval
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world.size > 1 else None
        optimizer = adamw(model, cfg)
        popularity = torch.as_tensor(split.item_popularity, dtype=torch.float32, device=self.device)
        p_item = (popularity + 1.0) / (popularity + 1.0).sum()
        rng = np.random.default_rng(cfg.seed)
        start_epoch, best, best_state, stale, best_epoch = 0, -1.0, None, 0, 0
        if resume and ckpt and (ckpt / "retrieval.pt").exists():
            state = torch.load(ckpt / "retrieval.pt", map_location=self.device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, best, stale = state["epoch"] + 1, state["best"], state["stale"]
            best_epoch = state.get("best_epoch", 0)
            best_state = state["best_model"]
            rng.bit_generator.state = state["rng"]
            self.history.retrieval = list(state["history"])
            log.info("resumed retrieval training at epoch %d (best validation score %.4f)", start_epoch, best)

        local_batch = max(cfg.batch_size // world.size, 2)
        rows_user, rows_end = training_windows(split, self.config.max_history)
        metric = validation_metric(split)
        validates = split.validates  # a final fit (nothing held out) runs every epoch
        all_items = training_objective(cfg, split) == "all_items"
        epoch_split = split
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            model.train()
            if cfg.window_jitter:
                rows_user, rows_end = training_windows(split, self.config.max_history, rng)
            if split.protocol == "random":
                # a random split's order means nothing: each epoch reads every user's training items in a
                # fresh order, so the encoder learns to predict any item from any subset of the others
                epoch_split = shuffled_training_items(split, rng)
            n_examples = len(rows_user)
            order = rng.permutation(n_examples)
            if cfg.max_examples_per_epoch:
                order = order[: cfg.max_examples_per_epoch]
            order = order[world.rank :: world.size]
            steps = len(order) // local_batch
            loss_sum, labels = torch.zeros((), device=self.device), 0
            bar = tqdm(
                range(steps),
                desc=f"retrieval epoch {epoch + 1}",
                disable=not (progress and world.is_main),
                leave=False,
            )
            forward = ddp or model
            for step in bar:
                rows = order[step * local_batch : (step + 1) * local_batch]
                window, targets, udense, n_labels = self._window_batch(
                    epoch_split, rows_user[rows], rows_end[rows]
                )
                later = self._later_items(epoch_split, rows_user[rows], window) if all_items else None
                loss = self._retrieval_loss(forward, window, targets, udense, p_item, later)
                labels += n_labels
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                if step % 50 == 49:  # the one host sync, for the progress bar
                    bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}")
            seconds = time.perf_counter() - started
            score = (
                evaluate(self.rank(split, "retrieval", search="exact"), split, "validation")[metric]
                if world.is_main and validates
                else float(epoch)
            )
            score = world.broadcast(score)
            self.history.retrieval.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum.item() / steps if steps else float("nan"),
                    f"validation_{metric}": score if validates else None,
                    "seconds": seconds,
                    "examples": labels * world.size,
                }
            )
            self.history.examples_per_second = labels * world.size / max(seconds, 1e-9)
            if world.is_main and progress:
                tqdm.write(
                    f"retrieval epoch {epoch + 1}: loss {self.history.retrieval[-1]['loss']:.4f}, "
                    + (f"validation {metric} {score:.4f}" if validates else "no validation (final fit)")
                    + f" ({seconds:.1f} s)"
                )
            if score > best:
                best, stale, best_epoch = score, 0, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if ckpt and world.is_main:
                ckpt.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "stale": stale,
                        "best_epoch": best_epoch,
                        "best_model": best_state,
                        "rng": rng.bit_generator.state,
                        "history": self.history.retrieval,
                    },
                    ckpt / "retrieval.pt.tmp",
                )
                os.replace(ckpt / "retrieval.pt.tmp", ckpt / "retrieval.pt")
            if stale >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        self.validation_retrieval = best if validates else None
        self.best_epochs["retrieval"] = best_epoch

    def _later_items(self, split: SplitData, users: np.ndarray, window: torch.Tensor) -> torch.Tensor:
        """``[B, n_items + 1]`` int64: for each window's user, the window position of each of the user's
        training items (the last, if read twice; ``L`` for items outside the window, -1 for items not the
        user's). The items after position ``t`` are the targets of the user state at ``t`` (the all-items
        objective)."""
        L = window.shape[1]
        width = int(split.train_len[users].max()) if len(users) else 0
        owned = np.where(
            np.arange(width)[None, :] < split.train_len[users][:, None], split.sequences[users, :width], 0
        )
        position = torch.full((len(users), split.n_items + 1), -1, dtype=torch.long, device=self.device)
        position.scatter_(1, to_tensor(owned, self.device), L)
        steps = torch.arange(L, device=self.device).expand_as(window)
        # an item read twice in the window takes its last position: it is still to come until then
        position.scatter_(1, window, torch.full_like(window, -1))
        position.scatter_reduce_(1, window, torch.where(window > 0, steps, L), reduce="amax")
        position[:, 0] = -1  # padding is nobody's item
        return position

    def _retrieval_loss(self, forward, window, targets, udense, p_item, later=None):
        cfg = self.config
        valid = targets > 0
        labelled = targets[valid]
        exact = 0 < self.split.n_items <= cfg.full_softmax_items
        if exact:
            # exact softmax: every catalog item is a negative (the label itself is masked and scored as
            # the positive), sampled with certainty, so log q = 0
            negatives = torch.arange(1, self.split.n_items + 1, device=self.device)
            log_q = torch.zeros(len(negatives), device=self.device)
        else:
            # other labels of the batch (sampled ∝ popularity) plus optional uniform extras
            pick = torch.randperm(len(labelled), device=self.device)[: cfg.in_batch_negatives]
            negatives = labelled[pick]
            log_q = torch.log(p_item[negatives] * len(negatives))
            if cfg.uniform_negatives:
                extra = torch.randint(1, self.split.n_items + 1, (cfg.uniform_negatives,), device=self.device)
                negatives = torch.cat([negatives, extra])
                log_q = torch.cat(
                    [
                        log_q,
                        torch.full(
                            (len(extra),),
                            math.log(cfg.uniform_negatives / self.split.n_items),
                            device=self.device,
                        ),
                    ]
                )
        # one call through the (DDP-wrapped) module so gradients synchronise
        states, positive, neg = forward(window, udense, targets, negatives, self.item_cats, self.item_dense)
        if later is not None:
            # the state after window position t scores every candidate; its positives are the user's
            # items after t (in this epoch's order), the items up to t are left out of its softmax
            step = torch.arange(window.shape[1], device=self.device).expand_as(window)[valid]
            where = later[torch.nonzero(valid)[:, 0]][
                :, negatives
            ]  # [P, M] window position of each candidate
            return all_items_softmax_loss(
                states[valid],
                neg,
                log_q,
                where > step[:, None],
                (where >= 0) & (where <= step[:, None]),
                cfg.temperature,
            )
        if exact:
            # the sampled loss with every item a negative and the label's own column masked and scored as
            # the positive is this cross-entropy over the catalog, without the [P, N] mask and copy
            return exact_softmax_loss(states[valid], neg, labelled - 1, cfg.temperature)
        return sampled_softmax_loss(
            states[valid], positive[valid], labelled, neg, negatives, log_q, cfg.temperature
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
    ) -> TwoStageInference:
        """This model frozen for inference: the one path that evaluation and serving both run."""
        self.retrieval.eval()
        self.ranker.eval()
        return TwoStageInference(
            self.retrieval,
            self.ranker,
            self.item_cats,
            self.item_dense,
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

    def with_fp16_tables(self) -> TwoStageRecommender:
        """Store the id embedding tables (most of a large model's parameters) in float16, in place: half
        their memory and artifact bytes; lookups still return fp32 (``IdEmbedding``). The config records it,
        so a saved artifact loads with fp16 tables."""
        for table in (self.retrieval.items.id_embedding, self.ranker.item_id):
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

    # --- ranker ----------------------------------------------------------------------------------------
    def _fit_ranker(self, split, users, positions, world, progress):
        cfg = self.train_config
        if cfg.ranker_epochs <= 0:
            self.use_ranker = False
            self.validation_score = self.validation_retrieval
            return
        metric = validation_metric(split)
        validates = split.validates
        self.best_epochs["ranker"] = 0
        K = self.config.ranker_negatives
        frozen = self.inference(search="exact")
        tables = frozen.tables
        items = tables.embeddings[: split.n_items + 1]
        rng = np.random.default_rng(cfg.seed + 1)
        # negatives drawn from the retrieval model's own top candidates, the list the ranker reorders at
        # serving time; only the very top ones ("hardest") would teach it to distrust retrieval's best
        pool = max(self.candidates, K + 1)
        # the examples the epochs can draw from, and each epoch's draw, fixed up front: negatives (a
        # user-tower pass each) are mined only for the examples some epoch reads, when it first reads them
        # (four epochs of 20,000 drawn from 80,000 read about 68 % of them)
        per_epoch = cfg.ranker_examples_per_epoch or len(users)
        sample = rng.permutation(len(users))[: min(len(users), 200_000, per_epoch * cfg.ranker_epochs)]
        per_epoch = min(per_epoch, len(sample))
        orders = [
            rng.permutation(len(sample))[:per_epoch][world.rank :: world.size]
            for _ in range(cfg.ranker_epochs)
        ]
        negatives = np.zeros((len(sample), K), np.int64)
        # the frozen user vector of each mined example, kept: later epochs read it again
        user_vectors = torch.zeros(len(sample), items.shape[1], device=self.device)
        mined = np.zeros(len(sample), bool)
        mining_rng = np.random.default_rng(cfg.seed + 2)

        def mine(indices: np.ndarray) -> None:
            todo = np.unique(indices[~mined[indices]])
            # by history length, so that each tower pass is cut to its batch's longest history
            todo = todo[np.argsort(positions[sample[todo]], kind="stable")]
            for s in range(0, len(todo), 1024):
                idx = todo[s : s + 1024]
                rows = sample[idx]
                window, lengths, target, udense = self._example_batch(split, users[rows], positions[rows])
                vectors = frozen.user_vectors(window, lengths, udense)
                user_vectors[torch.from_numpy(idx).to(self.device)] = vectors
                scores = mask_seen_(vectors @ items.T, split, users[rows], positions[rows])
                scores[torch.arange(len(rows)), target] = float("-inf")
                top = torch.topk(scores, min(pool, split.n_items), dim=1).indices.cpu().numpy()
                pick = np.argsort(mining_rng.random(top.shape), axis=1)[:, :K]
                negatives[idx] = np.take_along_axis(top, pick, axis=1)
            mined[todo] = True

        model = self.ranker
        optimizer = adamw(model, cfg)
        # per-user validation scores of retrieval alone, and of the best ranker epoch: the gate's pairs, on
        # the same (sampled) validation users
        n_validation = len(holdout(split, "validation")[0])
        gate_rows = None
        if 0 < cfg.ranker_validation_users < n_validation:
            gate_rows = np.sort(rng.permutation(n_validation)[: cfg.ranker_validation_users])
        retrieval_scores = (
            per_user_scores(
                self.rank(split, "retrieval", search="exact"), split, "validation", rows=gate_rows
            )
            if world.is_main and validates
            else None
        )
        baseline = -1.0
        if validates:  # rank 0 scores; every rank takes its figure
            scored = retrieval_scores is not None and len(retrieval_scores) > 0
            baseline = world.broadcast(float(retrieval_scores.mean()) if scored else -1.0)
        best, best_state, stale = baseline, None, 0
        best_scores = None
        for epoch in range(cfg.ranker_epochs):
            started = time.perf_counter()
            model.train()
            order = orders[epoch]
            mine(order)
            local_batch = max(cfg.batch_size // world.size, 2)
            steps, loss_sum = len(order) // local_batch, torch.zeros((), device=self.device)
            for step in tqdm(
                range(steps),
                desc=f"ranker epoch {epoch + 1}",
                disable=not (progress and world.is_main),
                leave=False,
            ):
                idx = order[step * local_batch : (step + 1) * local_batch]
                rows = sample[idx]
                window, lengths, target, udense = self._example_batch(split, users[rows], positions[rows])
                cand = torch.cat([target[:, None], to_tensor(negatives[idx], self.device)], dim=1)
                user_vec = user_vectors[torch.from_numpy(idx).to(self.device)]
                hist = ranker_history(window, lengths, self.config.ranker_history)
                logits = model(
                    *ranker_inputs(
                        items,
                        tables.item_cats,
                        tables.item_dense,
                        split.n_categories,
                        hist,
                        udense,
                        user_vec,
                        cand,
                    )
                )
                loss = F.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.long, device=self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world.size > 1:
                    for p in model.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= world.size
                optimizer.step()
                loss_sum += loss.detach()
            self.use_ranker = True
            scores = (
                per_user_scores(
                    self.rank(split, "two_stage", search="exact"), split, "validation", rows=gate_rows
                )
                if world.is_main and validates
                else None
            )
            score = world.broadcast(
                float(scores.mean()) if scores is not None and len(scores) else float(epoch)
            )
            self.history.ranker.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum.item() / steps if steps else float("nan"),
                    f"validation_{metric}": score if validates else None,
                    "validation_users": len(scores) if scores is not None else 0,
                    "seconds": time.perf_counter() - started,
                }
            )
            if world.is_main and progress and validates:
                tqdm.write(
                    f"ranker epoch {epoch + 1}: loss {self.history.ranker[-1]['loss']:.4f}, "
                    f"two-stage validation {metric} {score:.4f} (retrieval alone {baseline:.4f})"
                )
            if score > best:
                best, stale, best_state, best_scores = score, 0, copy.deepcopy(model.state_dict()), scores
                self.best_epochs["ranker"] = epoch + 1
            else:
                stale += 1
                if stale >= max(2, cfg.patience // 2):
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        if not validates:
            # a final fit: whether the ranker serves was decided on validation, by the fit that chose
            # its epochs (``ranker_epochs=0`` where it did not serve)
            self.use_ranker, self.validation_score = True, None
            return
        # the ranker serves only where it beats retrieval alone on validation by more than the noise: the
        # mean per-user gain in the validation metric above one standard error of that mean (paired)
        self.use_ranker = False
        self.ranker_gain = None  # no epoch beat retrieval alone
        if best_state is not None and world.is_main:
            self.use_ranker, self.ranker_gain = beats_by_more_than_noise(best_scores - retrieval_scores)
        self.use_ranker = bool(world.broadcast(float(self.use_ranker)))
        self.validation_score = best if self.use_ranker else self.validation_retrieval
        if world.is_main and progress and best_state is None:
            tqdm.write("ranker: no epoch beat retrieval alone on validation: not served")
        elif world.is_main and progress:
            tqdm.write(
                f"ranker: validation {metric} gain {self.ranker_gain['mean']:+.4f} per user (standard error "
                f"{self.ranker_gain['standard_error']:.4f}): {'serves' if self.use_ranker else 'not served'}"
            )


def adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters with torch's fused kernel (CPU and CUDA): one pass per tensor
    instead of a dozen elementwise ops, which is most of a small ranker step's optimizer time
    (``bench/train.py``'s ``kernels`` probe)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def _feature_index(user_profile: pd.DataFrame | None, split: SplitData) -> UserFeatureIndex | None:
    return None if user_profile is None else UserFeatureIndex(user_profile, split.n_categories)


def evaluate_model(
    model: TwoStageRecommender, split: SplitData, stage: str = "test"
) -> dict[str, dict[str, float]]:
    return {
        "two_stage": evaluate(model.rank(split, "two_stage"), split, stage),
        "retrieval": evaluate(model.rank(split, "retrieval"), split, stage),
    }
