"""Serving export: what the predictor loads.

* ``user_tower.pt2`` and ``ranker.pt2`` — ``torch.export`` programs (``torch.export.save``), with a dynamic
  batch dimension and the catalog tables baked in as buffers. Chosen over TorchScript because TorchScript
  is in maintenance mode while ``torch.export`` is PyTorch's supported path to AOTInductor and other
  backends; both load without this package's model code.
* ``item_embeddings.f32.npy`` / ``item_embeddings.f16.npy`` — ``[n_items + 1, D]`` L2-normalised, row 0 padding.
* ``items.faiss`` — inner-product index over the item embeddings: exact (``IndexFlatIP``) up to
  ``hnsw_threshold`` items, HNSW beyond, with its recall@100 against exact search measured at export.
* ``item_features.npz`` — the item-feature snapshot the towers were exported with (ids, dense, categories).
* ``ranker_int8.pt`` — the ranker's state dict after dynamic int8 quantisation of its Linear layers (CPU).
* ``export.json`` — shapes, tolerances, recall, and the int8 ranker's NDCG@10 change.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import nn

from predictor.models.data import USER_DENSE_COLUMNS
from predictor.models.recommender import TwoStageRecommender

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-4  # max |exported - eager| on fp32 outputs


class UserTowerServing(nn.Module):
    """window ``[B, L]`` int64, lengths ``[B]`` int64, user_dense ``[B, F_u]`` → user embedding ``[B, D]``."""

    def __init__(self, model: TwoStageRecommender):
        super().__init__()
        self.tower = model.retrieval
        self.register_buffer("item_categories", model.item_cats.detach().clone())
        self.register_buffer("item_dense", model.item_dense.detach().clone())

    def forward(self, window, lengths, user_dense):
        return self.tower.user_embedding(window, lengths, user_dense, self.item_categories, self.item_dense)


class RankerServing(nn.Module):
    """user ``[B, D]``, history ``[B, H]`` (newest ``ranker_history`` items, 0-padded), candidates ``[B, K]``,
    user_dense ``[B, F_u]`` → scores ``[B, K]``."""

    def __init__(self, model: TwoStageRecommender, item_embeddings: torch.Tensor, ranker: nn.Module | None = None):
        super().__init__()
        self.ranker = ranker or model.ranker
        self.register_buffer("items", item_embeddings.detach().clone())
        self.register_buffer("item_categories", model.item_cats.detach().clone())
        self.register_buffer("item_dense", model.item_dense.detach().clone())
        self.n_user_dense = len(USER_DENSE_COLUMNS)

    def forward(self, user, history, candidates, user_dense):
        affinity = user_dense[:, self.n_user_dense :]
        match = (self.item_categories[candidates] * affinity[:, None, :]).sum(-1)
        return self.ranker(user, self.items[history], history > 0, self.items[candidates], candidates,
                           self.item_dense[candidates], match, user_dense)  # fmt: skip


def build_index(embeddings: np.ndarray, hnsw_threshold: int = 100_000, hnsw_m: int = 32) -> faiss.Index:
    """Inner-product index over rows 1.. of ``embeddings`` (row 0 is padding); faiss ids = item indexes."""
    vectors = np.ascontiguousarray(embeddings[1:], dtype=np.float32)
    d = vectors.shape[1]
    if len(vectors) <= hnsw_threshold:
        base = faiss.IndexFlatIP(d)
    else:
        base = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = 200
        base.hnsw.efSearch = 128
    index = faiss.IndexIDMap(base)
    index.add_with_ids(vectors, np.arange(1, len(vectors) + 1, dtype=np.int64))
    return index


def index_recall(index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int = 100) -> float:
    """Recall@k of ``index`` against exact inner-product search for ``queries``."""
    exact = faiss.IndexFlatIP(embeddings.shape[1])
    exact.add(np.ascontiguousarray(embeddings[1:], dtype=np.float32))
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    truth = truth + 1
    return float(np.mean([len(np.intersect1d(t, g)) / k for t, g in zip(truth, got)]))


def quantize_ranker(model: TwoStageRecommender) -> nn.Module:
    ranker = model.ranker.to("cpu").eval()
    return torch.ao.quantization.quantize_dynamic(ranker, {nn.Linear}, dtype=torch.qint8)


def int8_ndcg_change(model: TwoStageRecommender, quantized: nn.Module) -> dict[str, float]:
    """Test NDCG@10 of the two-stage ranking with the fp32 ranker and with its int8 copy (ranker forced on,
    so the change measured is the ranker's own even where serving falls back to retrieval order)."""
    from predictor.models.evaluate import evaluate

    fp32_ranker, use_ranker = model.ranker, model.use_ranker
    try:
        model.use_ranker = True
        fp32 = evaluate(model.rank(model.split), model.split, "test")["ndcg@10"]
        model.ranker = quantized
        int8 = evaluate(model.rank(model.split), model.split, "test")["ndcg@10"]
    finally:
        model.ranker, model.use_ranker = fp32_ranker, use_ranker
    return {"fp32": fp32, "int8": int8, "change": int8 - fp32}


def export_for_serving(
    model: TwoStageRecommender,
    out_dir: str | Path,
    hnsw_threshold: int = 100_000,
    sample_users: int = 256,
) -> dict:
    """Write the serving artifacts of a trained model (CPU tensors) and check them against eager outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.device = torch.device("cpu")
    model.retrieval.to("cpu").eval()
    model.ranker.to("cpu").eval()
    model.item_cats, model.item_dense = model.item_cats.cpu(), model.item_dense.cpu()
    with torch.no_grad():
        items = model._embed_items()
    split = model.split
    L = model.config.max_history
    rng = np.random.default_rng(0)
    users = rng.choice(np.arange(1, split.n_users + 1), size=min(sample_users, split.n_users), replace=False)
    window, lengths = split.window(users, split.train_len[users], L)
    window_t, lengths_t = torch.from_numpy(window), torch.from_numpy(lengths)
    user_dense = torch.zeros(len(users), len(USER_DENSE_COLUMNS) + split.n_categories)

    batch = torch.export.Dim("batch", min=1, max=65_536)
    tower = UserTowerServing(model).eval()
    tower_program = torch.export.export(tower, (window_t[:2], lengths_t[:2], user_dense[:2]),
                                        dynamic_shapes={"window": {0: batch}, "lengths": {0: batch},
                                                        "user_dense": {0: batch}})  # fmt: skip
    torch.export.save(tower_program, out / "user_tower.pt2")

    with torch.no_grad():
        user_vec = tower(window_t, lengths_t, user_dense)
        scores = user_vec @ items.T
        scores[:, 0] = float("-inf")
        K = min(model.candidates, split.n_items)
        candidates = torch.topk(scores, K, dim=1).indices
    history = model._ranker_history(window_t, lengths_t)
    ranker = RankerServing(model, items).eval()
    cand_dim = torch.export.Dim("candidates", min=2, max=4096)
    ranker_program = torch.export.export(ranker, (user_vec[:2], history[:2], candidates[:2], user_dense[:2]),
                                         dynamic_shapes={"user": {0: batch}, "history": {0: batch},
                                                         "candidates": {0: batch, 1: cand_dim},
                                                         "user_dense": {0: batch}})  # fmt: skip
    torch.export.save(ranker_program, out / "ranker.pt2")

    # round trip: load what was written and compare with eager
    with torch.no_grad():
        loaded_tower = torch.export.load(out / "user_tower.pt2").module()
        loaded_ranker = torch.export.load(out / "ranker.pt2").module()
        tower_err = float((loaded_tower(window_t, lengths_t, user_dense) - user_vec).abs().max())
        eager_scores = ranker(user_vec, history, candidates, user_dense)
        ranker_err = float((loaded_ranker(user_vec, history, candidates, user_dense) - eager_scores).abs().max())
    if max(tower_err, ranker_err) > EXPORT_TOLERANCE:
        raise RuntimeError(f"exported outputs differ from eager: tower {tower_err:.2e}, ranker {ranker_err:.2e}")

    emb = items.numpy().astype(np.float32)
    np.save(out / "item_embeddings.f32.npy", emb)
    np.save(out / "item_embeddings.f16.npy", emb.astype(np.float16))
    index = build_index(emb, hnsw_threshold)
    recall = index_recall(index, emb, user_vec.numpy().astype(np.float32), k=min(100, split.n_items))
    faiss.write_index(index, str(out / "items.faiss"))
    np.savez(out / "item_features.npz", item_ids=split.items.ids, item_dense=split.item_dense,
             item_categories=split.item_categories)  # fmt: skip

    quantized = quantize_ranker(model)
    buf = io.BytesIO()
    torch.save(quantized.state_dict(), buf)
    (out / "ranker_int8.pt").write_bytes(buf.getvalue())
    with torch.no_grad():
        q_scores = RankerServing(model, items, quantized)(user_vec, history, candidates, user_dense)
    int8_err = float((q_scores - eager_scores).abs().max())

    report = {
        "format": "torch.export (ExportedProgram, .pt2)",
        "dim": int(emb.shape[1]),
        "items": int(split.n_items),
        "index": type(faiss.downcast_index(index.index)).__name__,
        "index_recall@100_vs_flat": recall,
        "export_max_abs_error": {"user_tower": tower_err, "ranker": ranker_err, "tolerance": EXPORT_TOLERANCE},
        "int8_ranker_max_abs_score_change": int8_err,
        "int8_ranker_test_ndcg@10": int8_ndcg_change(model, quantized),
        "uses_ranker": model.use_ranker,
    }
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
