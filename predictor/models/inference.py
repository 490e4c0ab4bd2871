"""The one two-stage inference path: user tower → top-N unseen items → ranker → top-k, for a batch of users.

Offline evaluation (``TwoStageRecommender.rank``), the ranker's training inputs and the serving engine
all go through :class:`TwoStageInference`, so what is evaluated is what serves.

Shapes and dtypes: B users, L = ``max_history``, D embedding width, R item rows (``n_items + 1`` and any
reserved capacity; row 0 = padding), N = ``n_items``, K candidates, H = ``ranker_history``.
Item *indexes* are int64, 0 = padding / none. A :class:`UserBatch` carries per user a left-aligned,
oldest-first window of item indexes, user features, and the seen items to exclude as a CSR list.

Retrieval is either exact (one ``[B, D] × [D, N]`` product and a top-k, used for any catalog on a GPU
and for catalogs up to ``hnsw_threshold`` items on a CPU) or a faiss HNSW index whose ``efSearch`` is
calibrated at build time until its recall@100 against exact search reaches ``min_recall``, served only
where it then measures faster than the exact scan (``docs/serving.md``); ``search="exact"`` or
``"hnsw"`` forces one form (``"hnsw"`` serves the index whatever it measured: the frontier study's
remedy). Seen items are excluded exactly: the exact path masks them before the top-k; the index path
over-fetches by each user's seen count.

On a CPU the exact scan may run over a bfloat16 copy of the item table (half the bytes to stream), still
exactly: it over-fetches, rescores the candidates in fp32, and proves per user from a rounding-error
bound that no item outside them can enter the top-N; users without that proof are rescanned in fp32.
It serves where it measures faster than the fp32 scan at build time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial

import faiss
import numpy as np
import torch

from predictor.features.schema import USER_DENSE_COLUMNS

log = logging.getLogger(__name__)

# CPU catalogs above this many items try an HNSW index (served where it measures faster)
HNSW_THRESHOLD = 50_000
MIN_RECALL = 0.95  # recall@100 against exact search that the HNSW index must reach
SEARCH_FORMS = ("auto", "exact", "hnsw")  # auto: HNSW above the threshold where it measures faster
TOP_K_CHUNK = 128  # columns per chunk of the two-pass top-k
BF16_UNIT_ROUNDOFF = 2.0**-8  # relative rounding error of bfloat16 (8-bit significand)
BF16_SCAN_ITEMS = 50_000  # CPU catalogs from this many items try the certified bf16 scan
ITEM_CHUNK = 8192  # item rows per pass of the towers when the item side is built
# the quality ladder, best first: the ranker over all candidates, over fewer, retrieval order, popularity
LEVELS = ("full", "reduced", "retrieval", "popularity")
RANKED_LEVELS = LEVELS[:2]  # the levels that run the ranker
REDUCED_SHARE = 4  # the reduced level ranks candidates // REDUCED_SHARE (at least k)


@dataclass
class UserBatch:
    """Model inputs for B users (item indexes, not raw ids)."""

    window: np.ndarray  # int64 [B, L]: the newest L known items, oldest first, left-aligned, 0-padded
    lengths: np.ndarray  # int64 [B]: real items in each window (0: no history)
    user_dense: np.ndarray  # float32 [B, F_u]
    seen: np.ndarray  # int64 [S]: item indexes to exclude, users one after another
    seen_offsets: np.ndarray  # int64 [B + 1]: user b's seen items are seen[seen_offsets[b]:seen_offsets[b+1]]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def seen_counts(self) -> np.ndarray:
        return np.diff(self.seen_offsets)

    def subset(self, rows: np.ndarray) -> UserBatch:
        """The users ``rows`` (in that order), seen lists renumbered."""
        counts = self.seen_counts[rows]
        offsets = offsets_from_counts(counts)
        take = np.repeat(self.seen_offsets[rows] - offsets[:-1], counts) + np.arange(offsets[-1])
        return UserBatch(
            self.window[rows], self.lengths[rows], self.user_dense[rows], self.seen[take], offsets
        )


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """CSR offsets ``[B + 1]`` int64 of rows with ``counts [B]`` entries."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def windows_from_ragged(
    items: np.ndarray, offsets: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Oldest-first item indexes of B users (``items[offsets[b]:offsets[b+1]]``, 0 = unknown, dropped) →
    window ``[B, max_len]`` of each user's newest known items, left-aligned, and lengths ``[B]``."""
    known, known_offsets = drop_unknown(items, offsets)
    counts = np.diff(known_offsets)
    ends = np.cumsum(counts)
    lengths = np.minimum(counts, max_len).astype(np.int64)
    pos = (ends - lengths)[:, None] + np.arange(max_len)[None, :]
    valid = np.arange(max_len)[None, :] < lengths[:, None]
    window = np.where(valid, known[np.clip(pos, 0, max(len(known) - 1, 0))] if len(known) else 0, 0)
    return window.astype(np.int64), lengths


def ragged_from_padded(rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[B, W]`` padded rows with ``lengths [B]`` → (flat values, offsets ``[B + 1]``)."""
    mask = np.arange(rows.shape[1])[None, :] < lengths[:, None]
    return rows[mask].astype(np.int64), offsets_from_counts(lengths)


def drop_unknown(items: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove index-0 entries from a CSR list."""
    keep = items > 0
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    counts = np.bincount(row[keep], minlength=len(offsets) - 1)
    return items[keep], offsets_from_counts(counts)


def first_unmasked(values: np.ndarray, masked: np.ndarray, n: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``n`` entries of ``values`` whose ``masked`` is False, in order, padded with
    ``fill``; also how many each row has."""
    order = np.argsort(masked, axis=1, kind="stable")[:, :n]
    picked = np.take_along_axis(values, order, axis=1)
    ok = ~np.take_along_axis(masked, order, axis=1)
    return np.where(ok, picked, fill), ok.sum(axis=1)


def seen_mask(candidates: np.ndarray, seen: np.ndarray, seen_offsets: np.ndarray, n_rows: int) -> np.ndarray:
    """``[B, M]`` True where candidate ``[b, m]`` is among user b's seen items (one vectorised test)."""
    if not len(seen):
        return np.zeros(candidates.shape, bool)
    row = np.repeat(np.arange(len(seen_offsets) - 1, dtype=np.int64), np.diff(seen_offsets))
    keys = np.arange(len(candidates), dtype=np.int64)[:, None] * n_rows + candidates
    return np.isin(keys, row * n_rows + seen)


def batch_from_split(
    split, users: np.ndarray, end: np.ndarray, max_history: int, user_dense: np.ndarray
) -> UserBatch:
    """Evaluation inputs: each user's items before position ``end`` of ``split.sequences`` (a
    ``SplitData``) as history and as the seen items to exclude — the rule serving applies to the online
    seen set."""
    window, lengths = split.window(users, end, max_history)
    width = int(end.max()) if len(end) else 0
    seen, offsets = ragged_from_padded(split.sequences[users, :width], np.asarray(end, np.int64))
    seen, offsets = drop_unknown(seen, offsets)
    return UserBatch(window, lengths, user_dense, seen, offsets)


def ranker_history(window: torch.Tensor, lengths: torch.Tensor, size: int) -> torch.Tensor:
    """The newest ``size`` items of each left-aligned window ``[B, L]`` → ``[B, min(size, L)]``, 0-padded."""
    H = min(size, window.shape[1])
    pos = lengths[:, None] - H + torch.arange(H, device=window.device)[None, :]
    return torch.where(pos >= 0, window.gather(1, pos.clamp(min=0)), torch.zeros_like(pos))


def ranker_inputs(items, item_cats, item_dense, n_categories, hist, udense, user_vec, cand) -> tuple:
    """The ranker's arguments for candidates ``cand [B, K]``: frozen retrieval vectors ``items [R, D]``,
    catalog tables, history ``hist [B, H]``, user features ``udense [B, F_u]`` and vectors ``[B, D]``."""
    affinity = udense[:, len(USER_DENSE_COLUMNS) :]
    if n_categories:
        match = (item_cats[cand] * affinity[:, None, :]).sum(-1)
    else:
        match = torch.zeros(cand.shape, device=cand.device)
    return user_vec, items[hist], hist > 0, items[cand], cand, item_dense[cand], match, udense


@dataclass
class ItemTables:
    """Everything derived from the item side, computed once per model or item-feature refresh."""

    item_cats: torch.Tensor  # [R, C]
    item_dense: torch.Tensor  # [R, F_i]
    embeddings: torch.Tensor  # [N + 1 + pad, D] retrieval item vectors, row 0 and padding rows = 0
    history: (
        torch.Tensor
    )  # [N + 1, D] the user tower's history inputs (rows of reserved capacity hold no item)
    index: faiss.Index | None  # HNSW over rows 1..N, or None for exact search
    ef_search: int = 0
    recall: float = 1.0
    selection: dict = field(default_factory=dict)  # what was tried (HNSW, bf16 scan), its ms against exact
    scan: torch.Tensor | None = None  # bf16 copy of embeddings for the certified exact scan, or None
    scan_error: float = 0.0  # |fp32 score - bf16 scan score| <= scan_error * ||user||


class TwoStageInference:
    """The frozen two-stage model for inference: ``recommend(batch, k, level=...)`` → item indexes and scores.

    ``level`` is a rung of the quality ladder (:data:`LEVELS`): "full" ranks ``candidates`` retrieved items,
    "reduced" ranks ``reduced_candidates``, "retrieval" serves retrieval order, "popularity" the training
    popularity order (``popularity [n_items + 1]``, event counts); seen items are excluded at every level. A
    model whose ranker does not serve (``use_ranker`` False) has the ladder ("retrieval", "popularity"):
    :attr:`levels` lists this model's, best first. ``search`` is one of :data:`SEARCH_FORMS`: "exact" forces
    exact retrieval (training-time validation uses it, since an index per epoch would cost more than the
    epoch), "hnsw" serves the CPU index whatever it measured.
    """

    def __init__(
        self,
        retrieval,
        ranker,
        item_cats: torch.Tensor,
        item_dense: torch.Tensor,
        n_items: int,
        n_categories: int,
        max_history: int,
        ranker_history_size: int,
        candidates: int,
        use_ranker: bool,
        search: str = "auto",
        hnsw_threshold: int = HNSW_THRESHOLD,
        precision: str = "fp32",
        graph: faiss.Index | None = None,
        popularity: np.ndarray | None = None,
        reduced_candidates: int | None = None,
    ):
        if search not in SEARCH_FORMS:
            raise ValueError(f"search must be one of {', '.join(SEARCH_FORMS)}, not {search!r}")
        if search == "hnsw" and item_cats.device.type != "cpu":
            raise ValueError("the HNSW index serves on the CPU only (faiss-cpu); use auto or exact on a GPU")
        self.retrieval, self.ranker = retrieval, ranker
        self.n_items, self.n_categories = n_items, n_categories
        self.max_history, self.ranker_history_size = max_history, ranker_history_size
        self.candidates, self.use_ranker = candidates, use_ranker
        self.reduced_candidates = reduced_candidates or max(1, candidates // REDUCED_SHARE)
        counts = np.zeros(n_items + 1) if popularity is None else np.asarray(popularity, np.float64)
        # popularity order of item indexes (most popular first, ties by index) and the counts in that order
        self.popular_index = (np.argsort(-counts[1 : n_items + 1], kind="stable") + 1).astype(np.int64)
        self.popular_scores = counts[self.popular_index].astype(np.float32)
        self.device = item_cats.device
        self.precision = precision
        self.forced = search != "auto"
        self.use_index = search == "hnsw" or (
            search == "auto" and self.device.type == "cpu" and n_items > hnsw_threshold
        )
        self.table_dtype = torch.float16 if precision == "fp16" else torch.float32
        # the bf16 scan can pay off only where streaming the table dominates: large CPU catalogs
        self.try_scan = self.device.type == "cpu" and precision == "fp32" and n_items >= BF16_SCAN_ITEMS
        self.graph = graph  # an HNSW graph built at export: reused, not rebuilt (see build_hnsw)
        self.tables = self._build(item_cats, item_dense)

    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # --- item side -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _build(self, item_cats: torch.Tensor, item_dense: torch.Tensor) -> ItemTables:
        started = time.perf_counter()
        with self._autocast():
            n = self.n_items
            # rows 0..n only (reserved capacity rows hold no item yet), in chunks: the towers' activations
            # over a whole catalog at once would be several times the tables themselves
            embeddings = by_rows(
                lambda rows: self.retrieval.item_embedding(rows, item_cats[rows], item_dense[rows]),
                n + 1,
                self.device,
            )
            embeddings[0] = 0
            # zero rows up to a multiple of TOP_K_CHUNK, masked at search: the two-pass top-k needs no copy
            embeddings = torch.nn.functional.pad(embeddings, (0, 0, 0, (-(n + 1)) % TOP_K_CHUNK))
            history = by_rows(
                lambda rows: self.retrieval.history_table(item_cats, item_dense, rows), n + 1, self.device
            )
        tables = ItemTables(item_cats, item_dense, embeddings.to(self.table_dtype), history, None)
        if self.try_scan:
            self._select_scan(tables)
        if self.use_index:
            index, ef, recall = build_hnsw(embeddings[: n + 1].cpu().numpy(), graph=self.graph)
            self.graph = index  # the next item refresh reuses this graph
            index_ms, exact_ms = self._search_times(index, ef, tables)
            if self.forced or (recall >= MIN_RECALL and index_ms < exact_ms):
                tables.index, tables.ef_search, tables.recall = index, ef, recall
            tables.selection.update(
                {
                    "served": "hnsw" if tables.index is not None else "exact",
                    "hnsw_recall@100": recall,
                    "hnsw_ef_search": ef,
                    "hnsw_ms_per_16_users": index_ms,
                    "exact_ms_per_16_users": exact_ms,
                }
            )
            log.info(
                "retrieval over %d items: %s (HNSW recall@100 %.3f at efSearch %d, %.2f ms per 16 users; "
                "exact %.2f ms)",
                self.n_items,
                "HNSW" if tables.index is not None else "exact",
                recall,
                ef,
                index_ms,
                exact_ms,
            )
        log.debug("item tables for %d items built in %.2f s", self.n_items, time.perf_counter() - started)
        return tables

    def _probe(self, tables: ItemTables, users: int) -> tuple[torch.Tensor, UserBatch]:
        """``users`` query vectors for timing retrieval, nothing seen: the user tower over seeded random
        histories (item vectors themselves sit in clusters that users' vectors do not)."""
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, self.max_history + 1, users)
        window = np.where(
            np.arange(self.max_history)[None, :] < lengths[:, None],
            rng.integers(1, self.n_items + 1, (users, self.max_history)),
            0,
        )
        dense = np.zeros((users, len(USER_DENSE_COLUMNS) + self.n_categories), np.float32)
        batch = UserBatch(window, lengths, dense, np.zeros(0, np.int64), np.zeros(users + 1, np.int64))
        with torch.no_grad(), self._autocast():
            w, n, d = self.tensors(batch)
            probe = self.retrieval.user_embedding(w, n, d, tables.history).float()
        return probe, batch

    def _select_scan(self, tables: ItemTables) -> None:
        """Keep the bf16 scan copy only where the certified scan measures faster than the fp32 scan, for
        a lone user and for 16 (what a micro-batch holds)."""
        k = min(self.candidates, self.n_items)
        scan_tables = with_bf16_scan(tables)
        timed = {}
        for users in (1, 16):
            probe, empty = self._probe(tables, users)
            timed[users] = tuple(
                _best_ms(partial(self._retrieve_exact, probe, empty, k, t)) for t in (tables, scan_tables)
            )
        faster = all(scan < fp32 for fp32, scan in timed.values())
        if faster:
            tables.scan, tables.scan_error = scan_tables.scan, scan_tables.scan_error
        tables.selection.update(
            {
                "scan": "bf16 certified" if faster else "fp32",
                "fp32_scan_ms_per_1_16_users": [timed[1][0], timed[16][0]],
                "bf16_scan_ms_per_1_16_users": [timed[1][1], timed[16][1]],
            }
        )
        log.info(
            "exact scan over %d items: %s (fp32 %.2f / %.2f ms, certified bf16 %.2f / %.2f ms for 1 / 16 "
            "users)",
            self.n_items,
            "certified bf16" if faster else "fp32",
            timed[1][0],
            timed[16][0],
            timed[1][1],
            timed[16][1],
        )

    def _search_times(self, index: faiss.Index, ef: int, tables: ItemTables) -> tuple[float, float]:
        """Milliseconds per 16-user search, HNSW (at ``ef``) against exact: the index serves only where
        it measures faster."""
        probe, empty = self._probe(tables, 16)
        params = faiss.SearchParametersHNSW(efSearch=ef)
        k = min(self.candidates, self.n_items)
        index_ms = _best_ms(lambda: index.search(probe.numpy(), k, params=params))
        exact_ms = _best_ms(lambda: self._retrieve_exact(probe, empty, k, tables))
        return index_ms, exact_ms

    @property
    def retrieval_form(self) -> str:
        """What retrieval serves, in words (start-up log, benchmark)."""
        tables = self.tables
        if tables.index is not None:
            return f"HNSW, recall@100 {tables.recall:.3f}"
        return "exact, certified bf16 scan" if tables.scan is not None else "exact"

    def refresh_items(self, item_cats: torch.Tensor, item_dense: torch.Tensor) -> None:
        """Recompute the item side from new features aside, then swap it in with one assignment (user
        vectors cached against the old tables are stale: callers key caches on ``tables``)."""
        self.tables = self._build(item_cats, item_dense)

    # --- user side -----------------------------------------------------------------------------------
    def user_vectors(self, window: torch.Tensor, lengths: torch.Tensor, udense: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` user embeddings (fp32, or fp16 under autocast)."""
        with torch.no_grad(), self._autocast():
            return self.retrieval.user_embedding(window, lengths, udense, self.tables.history)

    def tensors(self, batch: UserBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(np.ascontiguousarray(batch.window)).to(self.device),
            torch.from_numpy(np.ascontiguousarray(batch.lengths)).to(self.device),
            torch.from_numpy(np.ascontiguousarray(batch.user_dense, np.float32)).to(self.device),
        )

    # --- retrieval -----------------------------------------------------------------------------------
    def retrieve(self, user: torch.Tensor, batch: UserBatch, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best unseen items per user: indexes ``[B, n]`` (0-padded) and scores (-inf-padded)."""
        n = min(n, self.n_items)
        tables = self.tables
        if tables.index is None:
            return self._retrieve_exact(user, batch, n, tables)
        return self._retrieve_index(user.float().cpu().numpy(), batch, n, tables)

    def _masked(self, scores: torch.Tensor, batch: UserBatch) -> torch.Tensor:
        """``scores [B, R']`` with row 0, padding rows and each user's seen items at -inf (in place)."""
        scores[:, 0] = float("-inf")
        scores[:, self.n_items + 1 :] = float("-inf")
        if len(batch.seen):
            row = torch.from_numpy(np.repeat(np.arange(len(batch)), batch.seen_counts)).to(self.device)
            scores[row, torch.from_numpy(batch.seen).to(self.device)] = float("-inf")
        return scores

    def _retrieve_exact(self, user: torch.Tensor, batch: UserBatch, n: int, tables: ItemTables):
        with torch.no_grad():
            if tables.scan is not None:
                values, cand = self._certified_scan(user.float(), batch, n, tables)
            else:
                scores = self._masked((user.to(tables.embeddings.dtype) @ tables.embeddings.T).float(), batch)
                values, cand = top_k(scores, n)
        values, cand = values.cpu().numpy(), cand.cpu().numpy()
        cand = np.where(np.isfinite(values), cand, 0)
        return cand.astype(np.int64), values.astype(np.float32)

    def _certified_scan(self, user: torch.Tensor, batch: UserBatch, n: int, tables: ItemTables):
        """The exact fp32 top-``n`` through the bf16 table: the best ``m > n`` items by bf16 score, rescored
        in fp32. An item outside them scores at most (the m-th bf16 score + the error bound) in fp32, so a
        user whose n-th fp32 score beats that has its exact top-n; the others are rescanned in fp32."""
        m = min(n + max(n, 64), self.n_items)
        approx = self._masked((user.to(torch.bfloat16) @ tables.scan.T).float(), batch)
        approx_top, cand = top_k(approx, m)
        exact = torch.bmm(tables.embeddings[cand], user[:, :, None]).squeeze(2)
        exact = exact.masked_fill(torch.isinf(approx_top), float("-inf"))  # masked stays masked
        values, order = torch.topk(exact, n, dim=1)
        cand = cand.gather(1, order)
        outside = approx_top[:, -1]  # -inf: every unmasked item is a candidate
        bound = tables.scan_error * user.norm(dim=1)
        unproven = torch.isfinite(outside) & ~(values[:, -1] > outside + bound)
        if unproven.any():
            rows = torch.nonzero(unproven).squeeze(1)
            sub = batch.subset(rows.cpu().numpy())
            scores = self._masked(user[rows] @ tables.embeddings.T, sub)
            values[rows], cand[rows] = top_k(scores, n)
        return values, cand

    def _retrieve_index(self, user: np.ndarray, batch: UserBatch, n: int, tables: ItemTables):
        # over-fetch by each user's seen count; users grouped by powers of two of it, so that one heavy
        # user does not make the whole batch search deep
        need = n + batch.seen_counts
        cand = np.zeros((len(batch), n), np.int64)
        values = np.full((len(batch), n), -np.inf, np.float32)
        bucket = np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64)
        for b in np.unique(bucket):
            rows = np.flatnonzero(bucket == b)
            fetch = int(min(need[rows].max(), self.n_items))
            params = faiss.SearchParametersHNSW(efSearch=max(tables.ef_search, fetch))
            scores, found = tables.index.search(user[rows], fetch, params=params)
            found = found.astype(np.int64) + 1  # faiss ids 0.. ↔ item indexes 1..
            sub = batch.subset(rows)
            masked = (found <= 0) | seen_mask(found, sub.seen, sub.seen_offsets, self.n_items + 1)
            picked, _ = first_unmasked(found, masked, n, 0)
            picked_scores, _ = first_unmasked(scores, masked, n, -np.inf)
            cand[rows, : picked.shape[1]] = picked
            values[rows, : picked.shape[1]] = picked_scores
        return cand, values

    # --- ranking -------------------------------------------------------------------------------------
    @property
    def levels(self) -> tuple[str, ...]:
        """The ladder this model serves, best first."""
        return LEVELS if self.use_ranker else LEVELS[len(RANKED_LEVELS) :]

    def popular(self, batch: UserBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The popularity order without each user's seen items: ``[B, k]`` indexes (0-padded) and counts
        (-inf-padded)."""
        depth = min(k + int(batch.seen_counts.max(initial=0)), self.n_items)
        cand = np.broadcast_to(self.popular_index[:depth], (len(batch), depth))
        masked = seen_mask(cand, batch.seen, batch.seen_offsets, self.n_items + 1)
        index, _ = first_unmasked(cand, masked, k, 0)
        values, _ = first_unmasked(
            np.broadcast_to(self.popular_scores[:depth], cand.shape), masked, k, -np.inf
        )
        return index, values

    def rank(self, user: torch.Tensor, window, lengths, udense, cand: np.ndarray, k: int):
        """Ranker scores over ``cand [B, K]`` (0 = no candidate) → top-k indexes and scores."""
        tables = self.tables
        with torch.no_grad(), self._autocast():
            cand_t = torch.from_numpy(cand).to(self.device)
            hist = ranker_history(window, lengths, self.ranker_history_size)
            items = tables.embeddings
            scores = self.ranker(
                *ranker_inputs(
                    items,
                    tables.item_cats,
                    tables.item_dense,
                    self.n_categories,
                    hist,
                    udense,
                    user.to(items.dtype),
                    cand_t,
                )
            )
            scores = scores.float().masked_fill(cand_t == 0, float("-inf"))
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        order, values = top.indices.cpu().numpy(), top.values.cpu().numpy()
        chosen = np.take_along_axis(cand, order, axis=1)
        return np.where(np.isfinite(values), chosen, 0), values.astype(np.float32)

    def recommend(
        self,
        batch: UserBatch,
        k: int,
        timings: dict | None = None,
        user: torch.Tensor | None = None,
        level: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` unseen items per user at ``level`` (default: the best of :attr:`levels`): indexes
        ``[B, k']`` int64 (0-padded where fewer exist) and scores ``[B, k']`` float32 (-inf-padded),
        ``k' = min(k, n_items)``. ``user``: the users' vectors ``[B, D]`` if already known (a cache), else
        the tower computes them. ``timings``, if given, receives the seconds of ``retrieval`` (user tower +
        nearest items) and ``ranking``."""
        level = self.levels[0] if level is None else level
        if level not in self.levels:
            raise ValueError(f"level must be one of {', '.join(self.levels)} for this model, not {level!r}")
        timings = {} if timings is None else timings
        started = time.perf_counter()
        if level == "popularity":
            cand, scores = self.popular(batch, min(k, self.n_items))
            timings["retrieval"], timings["ranking"] = time.perf_counter() - started, 0.0
            return cand, scores
        window, lengths, udense = self.tensors(batch)
        if user is None:
            user = self.user_vectors(window, lengths, udense)
        ranked = level in RANKED_LEVELS
        n = max(self.candidates if level == "full" else self.reduced_candidates, k) if ranked else k
        cand, scores = self.retrieve(user, batch, n)
        timings["retrieval"] = time.perf_counter() - started
        started = time.perf_counter()
        if ranked and len(batch):
            cand, scores = self.rank(user, window, lengths, udense, cand, k)
        timings["ranking"] = time.perf_counter() - started
        return cand[:, :k], scores[:, :k]


def by_rows(fn, n_rows: int, device: torch.device, chunk: int = ITEM_CHUNK) -> torch.Tensor:
    """``fn(rows)`` (a ``[len(rows), D]`` tensor) over item rows ``0..n_rows-1`` in chunks of ``chunk``,
    concatenated as fp32 ``[n_rows, D]``."""
    parts = [
        fn(torch.arange(s, min(s + chunk, n_rows), device=device)).float() for s in range(0, n_rows, chunk)
    ]
    return torch.cat(parts)


def with_bf16_scan(tables: ItemTables) -> ItemTables:
    """A copy of ``tables`` whose exact scan runs over a bf16 table, with the error bound that certifies
    it: |fp32 score − bf16 score| ≤ ``scan_error`` · ||user|| for every item (both factors rounded to
    bf16, ≤ 2u + u² relative; the product rounded again, counted as 2u in case a kernel truncates; fp32
    accumulation over D terms), with 1 % margin."""
    u = BF16_UNIT_ROUNDOFF
    d = tables.embeddings.shape[1]
    max_norm = float(tables.embeddings.float().norm(dim=1).max())
    error = max_norm * ((2 * u + u * u) + 2 * u * (1 + u) ** 2 + d * 2.0**-23) * 1.01
    return replace(tables, scan=tables.embeddings.to(torch.bfloat16), scan_error=error)


def _best_ms(fn, repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls, in milliseconds (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def top_k(scores: torch.Tensor, k: int, chunk: int = TOP_K_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` (values, indexes; sorted), exact, in two passes: the ``k`` chunks
    of ``chunk`` columns with the highest maxima hold every top-k value (a value outside them would have
    k larger chunk maxima above it), so one full pass takes chunk maxima and the top-k runs over
    ``k × chunk`` columns."""
    B, M = scores.shape
    if M <= 4 * k * chunk:
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices
    pad = (-M) % chunk
    padded = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    chunks = padded.view(B, -1, chunk)
    best = torch.topk(chunks.amax(dim=2), k, dim=1).indices  # [B, k]
    values = chunks.gather(1, best[:, :, None].expand(-1, -1, chunk)).reshape(B, -1)
    columns = (best[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).reshape(B, -1)
    top = torch.topk(values, k, dim=1)
    return top.values, columns.gather(1, top.indices)


def build_hnsw(
    embeddings: np.ndarray,
    m: int = 32,
    min_recall: float = MIN_RECALL,
    probes: int = 256,
    seed: int = 0,
    graph: faiss.Index | None = None,
) -> tuple[faiss.Index, int, float]:
    """HNSW inner-product index over rows 1.. of ``embeddings`` (faiss id = item index - 1), with the
    smallest ``efSearch`` (doubling from 64) whose recall@100 against exact search reaches ``min_recall``
    on probe queries near the items (what user vectors look like), up to 1024. Returns (index, efSearch,
    recall); the caller serves it only if it reached ``min_recall`` and measures faster than exact.

    ``graph``: an HNSW index over the same items built earlier (at export, or before an item-feature
    refresh): a copy of its graph takes the new vectors instead of being built again — item vectors move
    a little when item features change, the neighbourhoods hardly — and the calibration below measures
    the recall it still reaches, so a graph that no longer fits shows as low recall, never silently."""
    vectors = np.ascontiguousarray(embeddings[1:], dtype=np.float32)
    n, d = vectors.shape
    reused = graph is not None and graph.ntotal == n and graph.d == d
    if reused:
        index = faiss.clone_index(graph)  # the caller's graph may be serving searches right now
        storage = faiss.downcast_index(index.storage)
        storage.reset()
        storage.add(vectors)
    else:
        index = hnsw_graph(vectors, m)
    rng = np.random.default_rng(seed)
    probe = vectors[rng.choice(n, size=min(probes, n), replace=False)]
    probe = probe + 0.5 * rng.standard_normal(probe.shape).astype(np.float32) / np.sqrt(d)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    k = min(100, n)
    exact = faiss.IndexFlatIP(d)
    exact.add(vectors)
    _, truth = exact.search(probe, k)
    ef, recall = 64, 0.0
    while True:
        _, got = index.search(probe, k, params=faiss.SearchParametersHNSW(efSearch=ef))
        recall = float(np.mean([len(np.intersect1d(t, g)) for t, g in zip(truth, got)]) / k)
        if recall >= min_recall or ef >= 1024:  # beyond, an exact scan is faster anyway
            break
        ef *= 2
    index.hnsw.efSearch = ef
    log.info(
        "HNSW index over %d items (%s): efSearch %d, recall@%d %.3f against exact search",
        n,
        "graph reused, new vectors" if reused else "graph built",
        ef,
        k,
        recall,
    )
    return index, ef, recall


def hnsw_graph(vectors: np.ndarray, m: int = 32) -> faiss.Index:
    """A new HNSW inner-product graph over ``vectors [N, D]`` float32 (faiss ids 0..N-1)."""
    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(vectors)
    return index
