"""The Feast feature store of the active profile: apply, materialize, online reads.

These are thin wrappers over Feast's Python SDK so that ``recsys`` does the same as the ``feast`` CLI
(``feast apply``, ``feast materialize-incremental``) without changing the working directory.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from datetime import datetime, timezone

import pandas as pd
from feast import FeatureStore
from feast.base_feature_view import BaseFeatureView
from feast.data_source import DataSource
from feast.entity import Entity
from feast.feature_service import FeatureService

from predictor.config import Settings

log = logging.getLogger(__name__)

DEFINITIONS_MODULE = "feature_definitions"
USER_FEATURES = [
    "user_profile:events_1d",
    "user_profile:events_7d",
    "user_profile:events_30d",
    "user_profile:events_total",
    "user_profile:seconds_since_last_event",
    "user_profile:mean_rating",
    "user_profile:rating_count",
    "user_profile:category_affinity",
    "user_recent_items:recent_items",
    "user_recent_items:seen_items",
]
ITEM_FEATURES = [
    "item_profile:popularity_1d",
    "item_profile:popularity_7d",
    "item_profile:popularity_30d",
    "item_profile:popularity_total",
    "item_profile:mean_rating",
    "item_profile:rating_count",
    "item_profile:age_seconds",
    "item_profile:categories",
]


def open_store(settings: Settings) -> FeatureStore:
    """A FeatureStore on the profile's feature_store.yaml, with its ``${VAR}``s exported first."""
    settings.export_feast_environment()
    return FeatureStore(repo_path=str(settings.feature_repo), fs_yaml_file=settings.feature_store_yaml)


def load_definitions(settings: Settings) -> list:
    """Import ``feature_definitions.py`` afresh (it reads the profile at import) and list its Feast objects."""
    settings.export_feast_environment()
    path = settings.feature_repo / f"{DEFINITIONS_MODULE}.py"
    spec = importlib.util.spec_from_file_location(f"_recsys_{DEFINITIONS_MODULE}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, DataSource, BaseFeatureView, FeatureService)
    return [obj for obj in vars(module).values() if isinstance(obj, kinds)]


def apply(settings: Settings) -> FeatureStore:
    """``feast apply``: register entities, sources, views and services, and set up the online tables."""
    store = open_store(settings)
    objects = load_definitions(settings)
    store.apply(objects)
    log.info("applied %d Feast objects to project %s (%s)", len(objects), store.project, settings.profile.value)
    return store


def materialize_incremental(settings: Settings, end: datetime | None = None, store: FeatureStore | None = None) -> None:
    """``feast materialize-incremental``: load rows newer than the last run into the online store."""
    store = store or open_store(settings)
    end = end or datetime.now(timezone.utc)
    store.materialize_incremental(end_date=end)


def teardown(settings: Settings) -> None:
    """Remove the online tables and registry entries of the project (``feast teardown``)."""
    open_store(settings).teardown()


def online_user_features(store: FeatureStore, user_ids: Sequence[int]) -> pd.DataFrame:
    return store.get_online_features(
        features=USER_FEATURES, entity_rows=[{"user_id": int(u)} for u in user_ids]
    ).to_df()


def online_item_features(store: FeatureStore, item_ids: Sequence[int]) -> pd.DataFrame:
    return store.get_online_features(
        features=ITEM_FEATURES, entity_rows=[{"item_id": int(i)} for i in item_ids]
    ).to_df()

