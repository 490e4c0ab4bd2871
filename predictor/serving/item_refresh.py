"""The item-feature refresher: the catalog's online item features, re-read when ``item_profile`` advances.

A replica builds its item side (retrieval item vectors, the ranker's item inputs) from the online
``item_profile`` rows at load, and again whenever a materialization moves the view's end time; until
then, or when the store cannot be read, the features in use keep serving.
"""

from __future__ import annotations

import logging
from datetime import datetime

import numpy as np
import pandas as pd

from predictor.serving import metrics
from predictor.serving.engine import ServingEngine
from predictor.serving.online import OnlineFeatures

log = logging.getLogger(__name__)


class ItemFeatureRefresher:
    """Reads ``item_profile`` rows for a catalog from the online store (``online``), guided by the view's
    materialization end time in the Feast registry (``store``). Every method blocks: run it in a thread."""

    def __init__(self, store, online: OnlineFeatures):
        self.store, self.online = store, online

    def materialized_until(self) -> datetime | None:
        self.store.refresh_registry()
        return self.store.get_feature_view("item_profile").most_recent_end_time

    def read(
        self, item_ids: np.ndarray, as_of: datetime | None
    ) -> tuple[datetime, np.ndarray, pd.DataFrame] | None:
        """``(materialized until, ids, item_profile rows)`` of the catalog items the online store holds, if
        ``item_profile`` was materialized since ``as_of``; None otherwise, or when the store or its
        registry cannot be read (the features in use keep serving)."""
        try:
            end = self.materialized_until()
        except Exception as exc:  # noqa: BLE001 - no registry yet / view not applied: keep training's features
            log.warning(
                "item features: cannot read materialization state (%s); keeping the model's snapshot", exc
            )
            return None
        if end is None or as_of == end:
            return None
        try:
            rows = self.online.items_sync(item_ids)
        except Exception as exc:  # noqa: BLE001 - online store down: serve training's features, retry later
            log.warning("item features: online store read failed (%s); keeping the current ones", exc)
            metrics.ERRORS.labels(kind="online_store").inc()
            return None
        present = rows.notna().any(axis=1).to_numpy() if len(rows) else np.zeros(0, bool)
        return end, np.asarray(item_ids)[present], rows[present].reset_index(drop=True)

    def refresh(self, engine: ServingEngine) -> bool:
        """If ``item_profile`` was materialized since the engine's features, load the catalog's online item
        features into ``engine``. True when it did."""
        found = self.read(engine.item_ids, engine.item_features_as_of)
        if found is None:
            return False
        end, ids, rows = found
        updated = engine.set_item_features(ids, rows)
        engine.item_features_as_of = end
        metrics.ITEM_FEATURE_REFRESHES.inc()
        log.info("item features refreshed for %d items (materialized until %s)", updated, end)
        return True
