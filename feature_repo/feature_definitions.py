"""Feast definitions for the recommender: entities, sources, feature views, feature services.

One set of definitions serves both profiles (``RECSYS_PROFILE``): the batch sources are Parquet files
in the embedded profile and PostgreSQL tables in production; everything else is identical. The
tables are written by ``recsys features build`` (``predictor/features/batch.py`` documents them).
"""

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
from feast.types import Array, Float32, Int64
from feast.value_type import ValueType

PROFILE = os.environ.get("RECSYS_PROFILE", "embedded")
OFFLINE_DIR = os.path.join(os.path.abspath(os.environ.get("RECSYS_HOME", ".recsys")), "offline")

# Feature rows stay valid until a newer snapshot replaces them; training joins point-in-time on
# event_timestamp, so an old row is never mistaken for a newer one. Not ttl=0: Feast starts the first
# `materialize-incremental` at now - ttl (one year for ttl=0), which would skip replayed datasets
# such as MovieLens (1990s). 50 years covers any log we load.
TTL = timedelta(days=365 * 50)


def batch_source(table: str):
    """The offline table ``table`` in the active profile's offline store."""
    if PROFILE == "production":
        return PostgreSQLSource(
            name=f"{table}_source",
            table=table,
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        )
    return FileSource(
        name=f"{table}_source",
        path=os.path.join(OFFLINE_DIR, f"{table}.parquet"),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )


# --- entities --------------------------------------------------------------------------------------
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="An end user")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A catalog item")

# --- sources ---------------------------------------------------------------------------------------
user_profile_source = batch_source("user_profile")
user_recent_items_source = batch_source("user_recent_items")
item_profile_source = batch_source("item_profile")

# Real-time events: `recsys events push` sends each affected user's new last-N sequence and full
# distinct seen set here (a push must carry both columns: Feast rejects a row missing a feature).
# Wrapping the batch source keeps one schema for pushed and batch rows.
user_recent_items_push = PushSource(name="user_recent_items_push", batch_source=user_recent_items_source)

# --- feature views ---------------------------------------------------------------------------------
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name="events_1d", dtype=Int64, description="Events in the day before the snapshot"),
        Field(name="events_7d", dtype=Int64, description="Events in the 7 days before the snapshot"),
        Field(name="events_30d", dtype=Int64, description="Events in the 30 days before the snapshot"),
        Field(name="events_total", dtype=Int64, description="All events up to the snapshot"),
        Field(name="seconds_since_last_event", dtype=Float32, description="Recency at the snapshot"),
        Field(
            name="mean_rating", dtype=Float32, description="Mean explicit rating; 0 when rating_count is 0"
        ),
        Field(name="rating_count", dtype=Int64, description="Number of rated events"),
        Field(
            name="category_affinity",
            dtype=Array(Float32),
            description="Share of the user's event weight per category id (sums to 1)",
        ),
    ],
    source=user_profile_source,
    online=True,
    tags={"team": "recsys"},
)

user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name="recent_items", dtype=Array(Int64), description="Last N item ids, most recent first"),
        Field(
            name="seen_items",
            dtype=Array(Int64),
            description="Every distinct item id of the user, ascending: what recommendations exclude",
        ),
    ],
    source=user_recent_items_push,
    online=True,
    tags={"team": "recsys"},
)

item_profile = FeatureView(
    name="item_profile",
    entities=[item],
    ttl=TTL,
    schema=[
        Field(name="popularity_1d", dtype=Int64, description="Events on the item in the last day"),
        Field(name="popularity_7d", dtype=Int64, description="Events on the item in the last 7 days"),
        Field(name="popularity_30d", dtype=Int64, description="Events on the item in the last 30 days"),
        Field(name="popularity_total", dtype=Int64, description="All events on the item"),
        Field(
            name="mean_rating", dtype=Float32, description="Mean explicit rating; 0 when rating_count is 0"
        ),
        Field(name="rating_count", dtype=Int64, description="Number of rated events"),
        Field(name="age_seconds", dtype=Float32, description="Time since the item's first event"),
        Field(name="categories", dtype=Array(Int64), description="Category ids of the item"),
    ],
    source=item_profile_source,
    online=True,
    tags={"team": "recsys"},
)

# --- feature services, versioned with the model that reads them -------------------------------------
retrieval_v1 = FeatureService(
    name="retrieval_v1",
    features=[user_profile, user_recent_items],
    description="User-side features for the two-tower user encoder",
)

ranking_v1 = FeatureService(
    name="ranking_v1",
    features=[user_profile, user_recent_items, item_profile],
    description="User and candidate-item features for the ranker",
)
