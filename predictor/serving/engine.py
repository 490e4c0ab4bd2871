"""The compute half of the predictor: raw online ids in, raw top-K ids out, for a batch of users.

No I/O and no event loop here: :class:`ServingEngine` maps raw ids to the model's indexes, runs the one
inference path (``predictor.models.inference.TwoStageInference``, the one evaluation runs) and maps the
answer back to raw ids and scores, so tests drive it directly and the KServe model
(``predictor.serving.model``) only gathers features and calls it from a worker thread.

Shapes: B = users in the batch, L = ``max_history``, D = embedding width, N = catalog items, K = candidates.

Devices and precision:

* CUDA: towers and ranker under fp16 autocast (``precision="fp16"``), the item embedding table in fp16 on
  the GPU, exact top-N by one matrix product (on a GPU a ``[B, D] × [D, N]`` product beats an approximate
  index up to millions of items).
* CPU: fp32 towers; exact retrieval up to ``hnsw_threshold`` items, a calibrated faiss HNSW index beyond
  (``predictor.models.inference``); optionally the dynamically int8-quantised ranker (``precision="int8"``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from predictor.features.schema import USER_DENSE_COLUMNS
from predictor.models.data import item_dense_matrix
from predictor.models.inference import (
    HNSW_THRESHOLD,
    LEVELS,
    UserBatch,
    drop_unknown,
    offsets_from_counts,
    windows_from_ragged,
)
from predictor.models.recommender import TwoStageRecommender
from predictor.serving import metrics

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "int8")


@dataclass
class OnlineUsers:
    """What the online store says of B users, as flat arrays (raw ids; users one after another)."""

    history: np.ndarray  # int64 [H]: each user's recent items, oldest first
    history_offsets: np.ndarray  # int64 [B + 1]
    seen: np.ndarray  # int64 [S]: each user's whole seen set
    seen_offsets: np.ndarray  # int64 [B + 1]
    user_dense: np.ndarray  # float32 [B, F_u] (zeros where unknown)
    exclude_seen: np.ndarray  # bool [B]

    def __len__(self) -> int:
        return len(self.exclude_seen)

    @staticmethod
    def concat(parts: list[OnlineUsers]) -> OnlineUsers:
        """One batch from several requests' users (one concatenation per array, not per user)."""
        if len(parts) == 1:
            return parts[0]

        def offsets(name):
            return offsets_from_counts(np.concatenate([np.diff(getattr(p, name)) for p in parts]))

        return OnlineUsers(
            np.concatenate([p.history for p in parts]),
            offsets("history_offsets"),
            np.concatenate([p.seen for p in parts]),
            offsets("seen_offsets"),
            np.concatenate([p.user_dense for p in parts]),
            np.concatenate([p.exclude_seen for p in parts]),
        )


@dataclass
class Recommendations:
    """Top-k of B users: raw ``item_ids [B, k]`` int64 (-1 where fewer exist), ``scores [B, k]`` float32
    (NaN there), ``counts [B]``, and ``cold [B]``: True where popularity answered (no known history)."""

    item_ids: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    cold: np.ndarray

    def rows(self, start: int, stop: int) -> Recommendations:
        return Recommendations(
            self.item_ids[start:stop], self.scores[start:stop], self.counts[start:stop], self.cold[start:stop]
        )


class UserVectorCache:
    """An LRU of user vectors keyed on what the tower reads: the user's window of item indexes and their
    features. A push changes the recent items, hence the key, so a pushed user misses by construction; an
    item-feature refresh replaces the item tables the vectors were computed against, and empties it."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._tables = None
        self._lock = threading.Lock()

    def vectors(self, inference, batch: UserBatch) -> torch.Tensor:
        """``[B, D]`` vectors: cached ones where the key is known, the tower over the rest."""
        keys = [
            hashlib.blake2b(w.tobytes() + d.tobytes(), digest_size=16).digest()
            for w, d in zip(batch.window, np.ascontiguousarray(batch.user_dense, np.float32))
        ]
        with self._lock:
            if self._tables is not inference.tables:
                self._entries.clear()
                self._tables = inference.tables
            found = [self._entries.get(key) for key in keys]
            for key, vector in zip(keys, found):
                if vector is not None:
                    self._entries.move_to_end(key)
        miss = [row for row, vector in enumerate(found) if vector is None]
        metrics.USER_CACHE.labels(result="hit").inc(len(keys) - len(miss))
        metrics.USER_CACHE.labels(result="miss").inc(len(miss))
        if miss:
            window, lengths, udense = inference.tensors(batch.subset(np.asarray(miss)))
            computed = inference.user_vectors(window, lengths, udense)
            with self._lock:
                for row, vector in zip(miss, computed):
                    found[row] = vector
                    self._entries[keys[row]] = vector
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return torch.stack(found)


def int8_ranker(ranker: nn.Module) -> nn.Module:
    """The ranker with its Linear layers dynamically quantised to int8 (CPU only): what
    ``precision="int8"`` serves and what ``bench/frontier.py`` evaluates."""
    return torch.ao.quantization.quantize_dynamic(ranker, {nn.Linear}, dtype=torch.qint8)


class ModelValidationError(RuntimeError):
    """A loaded model failed the self-check that runs before it may serve."""


class ServingEngine:
    """A trained :class:`TwoStageRecommender` prepared for low-latency batched inference.

    ``recommend`` is thread-safe for concurrent readers; ``set_item_features`` rebuilds the item side
    aside and swaps it in with one assignment.
    """

    def __init__(
        self,
        model: TwoStageRecommender,
        version: str,
        device: str | None = None,
        precision: str = "auto",
        candidates: int | None = None,
        hnsw_threshold: int = HNSW_THRESHOLD,
        search: str = "auto",
        use_ranker: bool | None = None,
        user_cache_size: int = 0,
        item_features: tuple[np.ndarray, pd.DataFrame] | None = None,
        reduced_candidates: int | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.version = version
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision == "int8" and self.device.type != "cpu":
            raise ValueError("the int8 ranker runs on the CPU only (dynamic quantisation)")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 serving needs CUDA; use fp32 or int8 on the CPU")
        self.precision = precision
        catalog = model.catalog
        self.catalog = catalog
        self.items = catalog.items  # raw id ↔ index, sorted or append-only after a warm start
        self.item_ids = np.asarray(catalog.items.ids, np.int64)  # index k + 1 ↔ item_ids[k]
        self.n_items = len(self.item_ids)
        self.max_history = model.config.max_history
        self.n_user_dense = len(USER_DENSE_COLUMNS) + catalog.n_categories
        # a model trained without user features saw zeros there: serving real values would shift its inputs
        self.uses_user_features = bool(model.uses_user_features)
        model.to(self.device)
        ranker = int8_ranker(model.ranker.eval()) if precision == "int8" else None
        item_dense = None
        if item_features is not None:  # the online features, before the item side is built (once)
            item_dense, _ = self._dense_with(model.item_dense, *item_features)
        self.inference = model.inference(
            ranker=ranker,
            item_dense=item_dense,
            use_ranker=use_ranker,
            candidates=candidates,
            precision="fp16" if precision == "fp16" else "fp32",
            hnsw_threshold=hnsw_threshold,
            search=search,
            reduced_candidates=reduced_candidates,
        )
        self._lock = threading.Lock()
        self.user_cache = UserVectorCache(user_cache_size)
        self.item_features_as_of = (
            None  # materialization end of the online item features in use (None: training's)
        )

    @property
    def use_ranker(self) -> bool:
        return self.inference.use_ranker

    @use_ranker.setter
    def use_ranker(self, value: bool) -> None:
        self.inference.use_ranker = bool(value)

    @property
    def candidates(self) -> int:
        return self.inference.candidates

    @property
    def index_recall(self) -> float:
        return self.inference.tables.recall

    # --- item table ---------------------------------------------------------------------------------
    def _dense_with(
        self, item_dense: torch.Tensor, item_ids: np.ndarray, item_profile_rows
    ) -> tuple[torch.Tensor, int]:
        """A copy of ``item_dense`` with the rows of the known ``item_ids`` from ``item_profile`` rows (a
        DataFrame with the ``ITEM_DENSE_COLUMNS``); unknown ids are ignored. Also the rows updated."""
        index = self.item_index(item_ids)
        known = index > 0
        if not known.any():
            return item_dense, 0
        new_dense = item_dense.clone()
        dense = torch.from_numpy(item_dense_matrix(item_profile_rows[known]))
        new_dense[torch.from_numpy(index[known]).to(self.device)] = dense.to(self.device)
        return new_dense, int(known.sum())

    def set_item_features(self, item_ids: np.ndarray, item_profile_rows) -> int:
        """Refresh the dense item features from online ``item_profile`` rows for the given raw ids (see
        :meth:`_dense_with`) and rebuild the item side. Returns rows updated."""
        tables = self.inference.tables
        new_dense, updated = self._dense_with(tables.item_dense, item_ids, item_profile_rows)
        if updated:
            with self._lock:  # one rebuild at a time; readers never wait
                self.inference.refresh_items(tables.item_cats, new_dense)
        return updated

    # --- ids ----------------------------------------------------------------------------------------
    def item_index(self, raw: np.ndarray) -> np.ndarray:
        """Raw item ids → indexes (0 for ids the model does not know), through the catalog's own index,
        which stays right after a warm start appended ids out of order."""
        return self.items.index(np.asarray(raw, np.int64))

    # --- inference ----------------------------------------------------------------------------------
    def batch(self, users: OnlineUsers) -> UserBatch:
        """Online raw ids → model inputs: one id lookup for all histories and one for all seen sets."""
        window, lengths = windows_from_ragged(
            self.item_index(users.history), users.history_offsets, self.max_history
        )
        seen, offsets = self.item_index(users.seen), users.seen_offsets
        if not users.exclude_seen.all():
            keep = np.repeat(users.exclude_seen, np.diff(offsets))
            seen = np.where(keep, seen, 0)
        seen, offsets = drop_unknown(seen, offsets)
        dense = (
            users.user_dense
            if self.uses_user_features
            else np.zeros((len(users), self.n_user_dense), np.float32)
        )
        return UserBatch(window, lengths, dense, seen, offsets)

    @property
    def levels(self) -> tuple[str, ...]:
        """The quality ladder this engine serves, best first (``inference.LEVELS``)."""
        return self.inference.levels

    def nearest_level(self, level: str) -> str:
        """``level`` if this engine's ladder has it, else the best of its levels not better than it (a
        model without a ranker serves "full" and "reduced" as "retrieval")."""
        if level in self.levels:
            return level
        worse = [lv for lv in self.levels if LEVELS.index(lv) >= LEVELS.index(level)]
        return worse[0] if worse else self.levels[-1]

    def probe_users(self, n: int, seed: int = 0) -> OnlineUsers:
        """``n`` seeded users with full histories of random catalog items (seen = history), for timing."""
        rng = np.random.default_rng(seed)
        history = self.item_ids[rng.integers(0, self.n_items, n * self.max_history)]
        offsets = np.arange(n + 1, dtype=np.int64) * self.max_history
        return OnlineUsers(
            history, offsets, history, offsets, np.zeros((n, self.n_user_dense), np.float32), np.ones(n, bool)
        )

    def time_level(self, level: str, users: int, k: int = 10) -> float:
        """Seconds of one ``recommend`` of ``users`` probe users at ``level`` (the ladder's calibration)."""
        probe = self.probe_users(users)
        started = time.perf_counter()
        self.recommend(probe, k, level=level)
        return time.perf_counter() - started

    def recommend(
        self, users: OnlineUsers, k: int, timings: dict | None = None, level: str | None = None
    ) -> Recommendations:
        """Top-``k`` for B users at ``level`` (default: the best of :attr:`levels`). Users whose history
        holds no item the model knows get the popularity order instead (their embedding carries no
        signal), flagged ``cold``; seen items are excluded from both where ``exclude_seen``. ``timings``, if
        given, receives ``retrieval`` and ``ranking`` seconds."""
        k = min(k, self.n_items)
        batch = self.batch(users)
        cold = batch.lengths == 0
        index = np.zeros((len(users), k), np.int64)
        scores = np.full((len(users), k), -np.inf, np.float32)
        warm = np.flatnonzero(~cold)
        if len(warm):
            sub = batch if not cold.any() else batch.subset(warm)
            cached = self.user_cache.size and level != "popularity"
            user = self.user_cache.vectors(self.inference, sub) if cached else None
            got, got_scores = self.inference.recommend(sub, k, timings, user, level)
            index[warm, : got.shape[1]], scores[warm, : got.shape[1]] = got, got_scores
        if cold.any():
            rows = np.flatnonzero(cold)
            index[rows], scores[rows] = self.inference.popular(batch.subset(rows), k)
        counts = (index > 0).sum(axis=1)
        item_ids = np.where(index > 0, self.item_ids[np.clip(index - 1, 0, None)], -1)
        return Recommendations(item_ids, np.where(index > 0, scores, np.nan).astype(np.float32), counts, cold)

    def popular(self, n_users: int, k: int) -> Recommendations:
        """The popularity order for ``n_users`` users the model cannot serve (online store down, model
        error): nothing is known of them, so nothing is excluded."""
        k = min(k, self.n_items)
        index = np.broadcast_to(self.inference.popular_index[:k], (n_users, k))
        scores = self.inference.popular_scores[:k]
        return Recommendations(
            self.item_ids[index - 1],
            np.broadcast_to(scores, (n_users, k)),
            np.full(n_users, k),
            np.ones(n_users, bool),
        )

    def self_check(self) -> None:
        """Run a small batch end to end; raise :class:`ModelValidationError` if the output is unusable.
        Called before a (new) model may serve."""
        if self.n_items == 0:
            raise ModelValidationError("the model's catalog is empty")
        probe = self.item_ids[self.inference.popular_index[: min(5, self.n_items)] - 1]
        k = min(10, self.n_items)
        users = OnlineUsers(
            probe,
            np.array([0, len(probe)]),
            probe[:0],
            np.array([0, 0]),
            np.zeros((1, self.n_user_dense), np.float32),
            np.array([False]),
        )
        recs = self.recommend(users, k)
        ids, scores = recs.item_ids[0, : recs.counts[0]], recs.scores[0, : recs.counts[0]]
        if recs.cold[0] or len(ids) == 0 or not np.isfinite(scores).all():
            raise ModelValidationError(f"model {self.version} produced no or non-finite scores: {scores[:5]}")
        if not np.isin(ids, self.item_ids).all():
            raise ModelValidationError(f"model {self.version} returned ids outside its catalog")
