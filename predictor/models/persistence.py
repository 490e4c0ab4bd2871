"""A trained ``TwoStageRecommender`` as files and back: weights (tensors only), the catalog index, the
metadata and, for large catalogs, the HNSW graph; ``save_model`` / ``load_model`` write and read them as a
verified artifact (``predictor.models.registry``). No pickles: opening an artifact cannot run code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from predictor.features.schema import USER_DENSE_COLUMNS
from predictor.models.config import ModelConfig, TrainConfig
from predictor.models.inference import HNSW_THRESHOLD, hnsw_graph
from predictor.models.ranker import Ranker
from predictor.models.recommender import TwoStageRecommender
from predictor.models.registry import open_artifact, write_artifact
from predictor.models.two_tower import TwoTower

SEARCH_GRAPH = "hnsw.faiss"  # the artifact's HNSW graph, for catalogs above HNSW_THRESHOLD


def model_files(model: TwoStageRecommender) -> tuple[dict[str, bytes], dict]:
    """Everything needed to rebuild ``model``: weights (tensors only) and the catalog index, no pickles."""

    def tensors(module: torch.nn.Module) -> bytes:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
        return buf.getvalue()

    split = model.catalog  # the split trained on, or a loaded model's SplitCatalog: the same fields
    catalog = io.BytesIO()
    np.savez(
        catalog,
        user_ids=split.users.ids,
        item_ids=split.items.ids,
        item_dense=split.item_dense,
        item_categories=split.item_categories,
        item_popularity=split.item_popularity,
    )
    meta = {
        "model_config": model.config.to_dict(),
        "train_config": dict(model.train_config.__dict__),
        "use_ranker": model.use_ranker,
        "ranker_validation_gain": model.ranker_gain,
        "settings_chosen": model.settings_chosen,
        "candidates": model.candidates,
        "n_categories": split.n_categories,
        "uses_user_features": model.uses_user_features,
        "item_rows": model.retrieval.items.id_embedding.rows,
        "history": {"retrieval": model.history.retrieval, "ranker": model.history.ranker},
    }
    files = {
        "retrieval.pt": tensors(model.retrieval),
        "ranker.pt": tensors(model.ranker),
        "catalog.npz": catalog.getvalue(),
        "model.json": json.dumps(meta).encode(),
    }
    if split.n_items > HNSW_THRESHOLD:  # built once here, not on every replica start
        if model.search_graph is None:
            vectors = model.inference(search="exact").tables.embeddings[1 : split.n_items + 1]
            model.search_graph = hnsw_graph(np.ascontiguousarray(vectors.float().cpu().numpy()))
        files[SEARCH_GRAPH] = faiss.serialize_index(model.search_graph).tobytes()
    return files, meta


def model_from_files(files: dict[str, bytes | Path], device: str | None = None) -> TwoStageRecommender:
    """Inverse of :func:`model_files`: each file as bytes, or as a local path (then the weights are
    memory-mapped, not copied: a replica pages in what it reads). Loads with ``weights_only=True`` and
    ``allow_pickle=False``: an artifact cannot run code when it is opened. The modules are built on the
    meta device and take the stored tensors as they are, so no random initialisation is spent on tables
    that are overwritten at once."""
    from predictor.models.data import make_index

    def source(name: str):
        return files[name] if isinstance(files[name], Path) else io.BytesIO(files[name])

    raw_meta = files["model.json"]
    meta = json.loads(raw_meta.read_bytes() if isinstance(raw_meta, Path) else raw_meta)
    model = TwoStageRecommender(
        ModelConfig.from_dict(meta["model_config"]), TrainConfig(**meta["train_config"]), device
    )
    cat = np.load(source("catalog.npz"), allow_pickle=False)
    users, items = make_index(cat["user_ids"]), make_index(cat["item_ids"])
    n_cat = int(meta["n_categories"])
    user_dim = len(USER_DENSE_COLUMNS) + n_cat
    item_dim = cat["item_dense"].shape[1]
    with torch.device("meta"):
        model.retrieval = TwoTower(model.config, meta["item_rows"], n_cat, user_dim, item_dim)
        model.ranker = Ranker(model.config, meta["item_rows"], n_cat, user_dim, item_dim)
    for module, name in ((model.retrieval, "retrieval.pt"), (model.ranker, "ranker.pt")):
        mapped = isinstance(files[name], Path) and model.device.type == "cpu"
        state = torch.load(source(name), map_location=model.device, weights_only=True, mmap=mapped)
        module.load_state_dict(state, assign=True)
        module.eval()
    model.use_ranker = bool(meta["use_ranker"])
    model.settings_chosen = dict(meta.get("settings_chosen", {}))
    model.uses_user_features = bool(meta.get("uses_user_features", False))
    model.candidates = int(meta["candidates"])
    model.catalog = SplitCatalog(
        users, items, cat["item_dense"], cat["item_categories"], cat["item_popularity"], n_cat
    )
    model.item_cats, model.item_dense = model.item_tables(model.catalog)
    if SEARCH_GRAPH in files:
        graph = files[SEARCH_GRAPH]
        model.search_graph = (
            faiss.read_index(str(graph))
            if isinstance(graph, Path)
            else faiss.deserialize_index(np.frombuffer(graph, np.uint8))
        )
    return model


@dataclass
class SplitCatalog:
    """The part of a split a trained model keeps: id indexes and item tables."""

    users: object
    items: object
    item_dense: np.ndarray
    item_categories: np.ndarray
    item_popularity: np.ndarray
    n_categories: int

    @property
    def n_items(self) -> int:
        return len(self.items)


def save_model(model: TwoStageRecommender, uri: str, extra: dict | None = None) -> str:
    """Write ``model`` as an artifact at ``uri`` (a path or an fsspec URL such as ``s3://``), ``extra``
    added to its metadata, the checksum manifest last; returns ``uri``."""
    files, meta = model_files(model)
    return write_artifact(uri, files, {**meta, **(extra or {})})


def load_model(uri: str, device: str | None = None) -> TwoStageRecommender:
    """The verified model at ``uri``; a local artifact's weights are memory-mapped, not copied."""
    files, _ = open_artifact(uri, local_paths=True)
    return model_from_files(files, device)
