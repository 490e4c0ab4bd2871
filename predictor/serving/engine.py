"""The compute half of the predictor: user tower → nearest items → ranker → top-K, for a batch of users.

No I/O and no event loop here: :class:`ServingEngine` takes raw ids and feature arrays and returns raw
ids and scores, so tests drive it directly and the KServe model (``predictor.serving.model``) only
gathers features and calls it from a worker thread.

Shapes: B = users in the batch, L = ``max_history``, D = embedding width, N = catalog items, K = candidates.

Devices and precision:

* CUDA: towers and ranker under fp16 autocast (``precision="fp16"``), the item embedding table in fp16 on
  the GPU, exact top-N by one matrix product (on a GPU a ``[B, D] × [D, N]`` product beats an approximate index up to millions of items).
* CPU: fp32 towers; retrieval through a faiss inner-product index (exact up to ``hnsw_threshold`` items,
  HNSW beyond); optionally the dynamically int8-quantised ranker (``precision="int8"``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from predictor.models.data import USER_DENSE_COLUMNS, item_dense_matrix
from predictor.models.export import build_index
from predictor.models.recommender import TwoStageRecommender

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "int8")


@dataclass
class Recommendation:
    """Top-K of one user: raw item ids ``[k]`` int64 and scores ``[k]`` float32 (higher is better)."""

    item_ids: np.ndarray
    scores: np.ndarray


class ModelValidationError(RuntimeError):
    """A loaded model failed the self-check that runs before it may serve."""


class ServingEngine:
    """A trained :class:`TwoStageRecommender` prepared for low-latency batched inference.

    ``recommend`` is thread-safe for concurrent readers; ``set_item_features`` rebuilds the item table
    and index aside and swaps them in one assignment.
    """

    def __init__(
        self,
        model: TwoStageRecommender,
        version: str,
        device: str | None = None,
        precision: str = "auto",
        candidates: int | None = None,
        hnsw_threshold: int = 100_000,
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
        self.hnsw_threshold = hnsw_threshold
        self.model = model
        catalog = model.catalog if hasattr(model, "catalog") else model.split
        self.catalog = catalog
        self.item_ids = np.asarray(catalog.items.ids, np.int64)  # index k + 1 ↔ item_ids[k]
        self.n_items = len(self.item_ids)
        self.max_history = model.config.max_history
        self.n_user_dense = len(USER_DENSE_COLUMNS) + catalog.n_categories
        self.candidates = int(candidates or model.candidates)
        self.use_ranker = bool(model.use_ranker)
        # a model trained without user features saw zeros there: serving real values would shift its inputs
        self.uses_user_features = bool(model.uses_user_features)
        # popularity order for fallbacks (index space, most popular first)
        popularity = np.asarray(catalog.item_popularity, np.float64)[1 : self.n_items + 1]
        self._popular_index = (np.argsort(-popularity, kind="stable") + 1).astype(np.int64)
        self.popular_scores = popularity[self._popular_index - 1].astype(np.float32)

        model.device = self.device
        model.retrieval.to(self.device).eval()
        model.ranker.to(self.device).eval()
        model.item_cats, model.item_dense = model.item_cats.to(self.device), model.item_dense.to(self.device)
        self.retrieval = model.retrieval
        self.ranker: nn.Module = model.ranker
        if precision == "int8":
            self.ranker = torch.ao.quantization.quantize_dynamic(model.ranker, {nn.Linear}, dtype=torch.qint8)
        self._lock = threading.Lock()
        self.item_features_as_of = (
            None  # materialization end of the online item features in use (None: training's)
        )
        self.table_dtype = torch.float16 if precision == "fp16" else torch.float32
        self._rebuild_items(model.item_cats, model.item_dense)

    # --- item table ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _rebuild_items(self, item_cats: torch.Tensor, item_dense: torch.Tensor) -> None:
        with torch.no_grad(), self._autocast():
            rows = torch.arange(self.retrieval.items.id_embedding.rows, device=self.device)
            table = self.retrieval.item_embedding(rows, item_cats, item_dense).to(self.table_dtype)
            table[0] = 0
            table[self.n_items + 1 :] = 0  # reserved capacity rows are not items yet
        index = None
        if self.device.type == "cpu":
            index = build_index(table[: self.n_items + 1].float().numpy(), self.hnsw_threshold)
        # one tuple assignment: a concurrent reader sees either the old or the new state, never a mix
        self._items = (item_cats, item_dense, table, index)

    def set_item_features(self, item_ids: np.ndarray, item_profile_rows) -> int:
        """Refresh the dense item features from online ``item_profile`` rows (a DataFrame with the
        ``ITEM_DENSE_COLUMNS``) for the given raw ids; unknown ids are ignored. Returns rows updated."""
        index = self.item_index(item_ids)
        known = index > 0
        if not known.any():
            return 0
        dense = torch.from_numpy(item_dense_matrix(item_profile_rows[known]))
        item_cats, item_dense, _, _ = self._items
        new_dense = item_dense.clone()
        new_dense[torch.from_numpy(index[known]).to(self.device)] = dense.to(self.device)
        with self._lock:  # one rebuild at a time; readers never wait
            self._rebuild_items(item_cats, new_dense)
        return int(known.sum())

    # --- ids ----------------------------------------------------------------------------------------
    def item_index(self, raw: np.ndarray) -> np.ndarray:
        """Raw item ids → indexes (0 for ids the model does not know)."""
        raw = np.asarray(raw, np.int64)
        if self.n_items == 0 or raw.size == 0:
            return np.zeros(raw.shape, np.int64)
        pos = np.searchsorted(self.item_ids, raw).clip(0, self.n_items - 1)
        return np.where(self.item_ids[pos] == raw, pos + 1, 0).astype(np.int64)

    def knows_history(self, history: np.ndarray) -> bool:
        return bool((self.item_index(history) > 0).any())

    # --- inference ----------------------------------------------------------------------------------
    def _window(self, histories: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Oldest-first raw histories → left-aligned index window ``[B, L]``, lengths ``[B]``, and each
        user's full set of known indexes (to exclude seen items)."""
        L = self.max_history
        window = np.zeros((len(histories), L), np.int64)
        lengths = np.zeros(len(histories), np.int64)
        seen = []
        for row, history in enumerate(histories):
            idx = self.item_index(history)
            idx = idx[idx > 0]
            seen.append(idx)
            tail = idx[-L:]
            window[row, : len(tail)] = tail
            lengths[row] = len(tail)
        return window, lengths, seen

    def recommend(
        self,
        histories: list[np.ndarray],
        user_dense: np.ndarray,
        k: list[int],
        exclude_seen: list[bool],
        timings: dict | None = None,
    ) -> list[Recommendation]:
        """Top-``k[b]`` for each user ``b``: ``histories`` oldest-first raw item ids, ``user_dense``
        ``[B, F_u]`` float32 (zeros where unknown). Users whose history holds no known item should go to
        :meth:`popular` instead (their embedding carries no signal). ``timings``, if given, receives the
        seconds spent in ``retrieval`` and ``ranking``."""
        timings = {} if timings is None else timings
        with torch.no_grad(), self._autocast():
            return self._recommend(histories, user_dense, k, exclude_seen, timings)

    def _recommend(self, histories, user_dense, k, exclude_seen, timings) -> list[Recommendation]:
        started = time.perf_counter()
        B = len(histories)
        if B == 0:
            return []
        item_cats, item_dense, table, index = self._items
        window, lengths, seen = self._window(histories)
        window_t = torch.from_numpy(window).to(self.device)
        lengths_t = torch.from_numpy(lengths).to(self.device)
        if not self.uses_user_features:
            user_dense = np.zeros((B, self.n_user_dense), np.float32)
        dense_t = torch.from_numpy(np.ascontiguousarray(user_dense, np.float32)).to(self.device)
        user = self.retrieval.user_embedding(window_t, lengths_t, dense_t, item_cats, item_dense).to(
            self.table_dtype
        )

        # retrieval: top-(candidates + seen) so that enough remain after removing seen items
        extra = max((len(s) for s, ex in zip(seen, exclude_seen) if ex), default=0)
        n = min(max(self.candidates, max(k)) + extra, self.n_items)
        if index is not None:
            scores, cand = index.search(user.float().cpu().numpy(), n)
            cand = cand.astype(np.int64)
        else:
            dots = (user @ table[: self.n_items + 1].T).float()
            dots[:, 0] = float("-inf")  # padding row
            top = torch.topk(dots, n, dim=1)
            scores, cand = top.values.cpu().numpy(), top.indices.cpu().numpy()
        keep_n = min(max(self.candidates, max(k)), self.n_items)
        cand_rows, score_rows = [], []
        for b in range(B):
            c, s = cand[b], scores[b]
            valid = c > 0
            if exclude_seen[b] and len(seen[b]):
                valid &= ~np.isin(c, seen[b])
            cand_rows.append(c[valid][:keep_n])
            score_rows.append(s[valid][:keep_n])

        timings["retrieval"] = time.perf_counter() - started
        started = time.perf_counter()
        if not self.use_ranker:
            timings["ranking"] = 0.0
            return [Recommendation(self.item_ids[c[: k[b]] - 1], s[: k[b]].astype(np.float32))
                    for b, (c, s) in enumerate(zip(cand_rows, score_rows))]  # fmt: skip

        width = max(len(c) for c in cand_rows)
        padded = np.zeros((B, max(width, 1)), np.int64)
        for b, c in enumerate(cand_rows):
            padded[b, : len(c)] = c
        cand_t = torch.from_numpy(padded).to(self.device)
        hist = self.model._ranker_history(window_t, lengths_t)
        affinity = dense_t[:, len(USER_DENSE_COLUMNS) :]
        match = (item_cats[cand_t] * affinity[:, None, :]).sum(-1) if self.catalog.n_categories else \
            torch.zeros(cand_t.shape, device=self.device)  # fmt: skip
        ranked = self.ranker(
            user, table[hist], hist > 0, table[cand_t], cand_t, item_dense[cand_t], match, dense_t
        )
        ranked = ranked.float().masked_fill(cand_t == 0, float("-inf"))
        top = torch.topk(ranked, min(max(k), ranked.shape[1]), dim=1)
        order, top_scores = top.indices.cpu().numpy(), top.values.cpu().numpy()
        out = []
        for b in range(B):
            kb = min(k[b], len(cand_rows[b]))
            chosen = padded[b, order[b, :kb]]
            out.append(Recommendation(self.item_ids[chosen - 1], top_scores[b, :kb].astype(np.float32)))
        timings["ranking"] = time.perf_counter() - started
        return out

    def popular(self, k: int, exclude: np.ndarray | None = None) -> Recommendation:
        """Most popular items (training-time popularity), optionally without the raw ids ``exclude``."""
        idx, scores = self._popular_index, self.popular_scores
        if exclude is not None and len(exclude):
            keep = ~np.isin(idx, self.item_index(exclude))
            idx, scores = idx[keep], scores[keep]
        return Recommendation(self.item_ids[idx[:k] - 1], scores[:k])

    def self_check(self) -> None:
        """Run a small batch end to end; raise :class:`ModelValidationError` if the output is unusable.
        Called before a (new) model may serve."""
        if self.n_items == 0:
            raise ModelValidationError("the model's catalog is empty")
        probe = self.item_ids[self._popular_index[: min(5, self.n_items)] - 1]
        k = min(10, self.n_items)
        recs = self.recommend([probe], np.zeros((1, self.n_user_dense), np.float32), [k], [False])
        scores = recs[0].scores
        if len(recs[0].item_ids) == 0 or not np.isfinite(scores).all():
            raise ModelValidationError(f"model {self.version} produced no or non-finite scores: {scores[:5]}")
        if not np.isin(recs[0].item_ids, self.item_ids).all():
            raise ModelValidationError(f"model {self.version} returned ids outside its catalog")
