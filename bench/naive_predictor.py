"""The naive baseline ``bench/serve.py`` compares the predictor against: the same model and KServe server,
written the obvious way.

Per request: a synchronous ``preprocess`` (runs on the event loop) calls Feast's ``get_online_features``
for the user; ``predict`` scores every item by brute force (one matrix product, no index), then calls
``get_online_features`` again for the 100 best candidates' item features and ranks them. No micro-batching,
no item-feature cache, no raw Redis reads, no frozen heap.

    python bench/naive_predictor.py --port 8081   (with the RECSYS_* environment of the benchmark)
"""

from __future__ import annotations

import argparse
import sys

_argv, sys.argv = sys.argv, sys.argv[:1]  # KServe parses sys.argv at import
import kserve

sys.argv = _argv

import numpy as np
import torch

from predictor.config import Settings
from predictor.features.schema import ITEM_FEATURES, USER_FEATURES
from predictor.features.store import open_store
from predictor.models.data import item_dense_matrix, user_dense_matrix
from predictor.models.inference import ranker_history, ranker_inputs
from predictor.models.lifecycle import MODEL_NAME
from predictor.models.recommender import TwoStageRecommender
from predictor.models.registry import ModelRegistry
from predictor.serving.server import logging_config

CANDIDATES = 100


class NaiveModel(kserve.Model):
    def __init__(self, name: str, settings: Settings):
        super().__init__(name)
        self.settings = settings

    def load(self) -> bool:
        production = ModelRegistry(self.settings.database_url).production(MODEL_NAME)
        self.model = TwoStageRecommender.load(production.artifact_uri, "cpu")
        self.store = open_store(self.settings)
        self.inference = self.model.inference(search="exact")
        self.items = self.inference.tables.embeddings[: self.model.catalog.n_items + 1]
        self.item_ids = self.model.catalog.items.ids
        self.n_cat = self.model.catalog.n_categories
        self.ready = True
        return True

    def preprocess(self, payload, headers=None):
        instance = payload["instances"][0]
        user = int(instance["user_id"])
        frame = self.store.get_online_features(
            features=USER_FEATURES, entity_rows=[{"user_id": user}]
        ).to_df()
        return user, int(instance.get("k", 10)), frame

    def predict(self, payload, headers=None):
        user, k, frame = payload
        recent = frame["recent_items"].iloc[0] or []
        history = self.model.catalog.items.index(np.asarray(recent[::-1], np.int64))
        history = history[history > 0][-self.model.config.max_history :]
        window = torch.zeros((1, self.model.config.max_history), dtype=torch.long)
        window[0, : len(history)] = torch.from_numpy(history)
        lengths = torch.tensor([len(history)])
        udense = torch.from_numpy(user_dense_matrix(frame, self.n_cat))
        with torch.no_grad():
            user_vec = self.inference.user_vectors(window, lengths, udense)
            scores = user_vec @ self.items.T
            scores[:, 0] = float("-inf")
            cand = torch.topk(scores, CANDIDATES, dim=1).indices
            raw = self.item_ids[cand[0].numpy() - 1]
            item_frame = self.store.get_online_features(
                features=ITEM_FEATURES, entity_rows=[{"item_id": int(i)} for i in raw]
            ).to_df()
            item_dense = self.model.item_dense.clone()
            item_dense[cand[0]] = torch.from_numpy(item_dense_matrix(item_frame))
            hist = ranker_history(window, lengths, self.model.config.ranker_history)
            ranked = self.model.ranker(
                *ranker_inputs(
                    self.items, self.model.item_cats, item_dense, self.n_cat, hist, udense, user_vec, cand
                )
            )
            order = torch.argsort(ranked, dim=1, descending=True)[0, :k]
        return {
            "predictions": [
                {
                    "user_id": user,
                    "item_ids": raw[order.numpy()].tolist(),
                    "scores": ranked[0, order].tolist(),
                }
            ]
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    from kserve.logging import configure_logging

    configure_logging(logging_config("WARNING"))
    model = NaiveModel("recsys", Settings())
    model.load()
    kserve.ModelServer(http_port=args.port, enable_grpc=False, enable_latency_logging=False).start([model])


if __name__ == "__main__":
    main()
