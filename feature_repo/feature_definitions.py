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

from predictor.features.schema import ITEM_SERVICE, SERVICES, USER_SERVICE, VIEWS

PROFILE = os.environ.get("RECSYS_PROFILE", "embedded")
OFFLINE_DIR = os.path.join(os.path.abspath(os.environ.get("RECSYS_HOME", ".recsys")), "offline")

# Feature rows stay valid until a newer snapshot replaces them; training joins point-in-time on
# event_timestamp, so an old row is never mistaken for a newer one. Not ttl=0: Feast starts the first
# `materialize-incremental` at now - ttl (one year for ttl=0), which would skip replayed datasets
# such as MovieLens (1990s). 50 years covers any log we load.
TTL = timedelta(days=365 * 50)
FEAST_TYPES = {"int64": Int64, "float32": Float32, "int64_list": Array(Int64), "float32_list": Array(Float32)}


def fields(view: str) -> list[Field]:
    """The Feast schema of ``view``, from the one feature schema (``predictor.features.schema``)."""
    return [
        Field(name=c.name, dtype=FEAST_TYPES[c.kind], description=c.description) for c in VIEWS[view].columns
    ]


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
    schema=fields("user_profile"),
    source=user_profile_source,
    online=True,
    tags={"team": "recsys"},
)

user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=TTL,
    schema=fields("user_recent_items"),
    source=user_recent_items_push,
    online=True,
    tags={"team": "recsys"},
)

item_profile = FeatureView(
    name="item_profile",
    entities=[item],
    ttl=TTL,
    schema=fields("item_profile"),
    source=item_profile_source,
    online=True,
    tags={"team": "recsys"},
)

# --- feature services: the predictor's online reads, their views named by the schema ------------------
_views = {fv.name: fv for fv in (user_profile, user_recent_items, item_profile)}

predictor_user_v1 = FeatureService(
    name=USER_SERVICE,
    features=[_views[name] for name in SERVICES[USER_SERVICE]],
    description="What the predictor reads per user: the two-tower user encoder's and the ranker's inputs",
)

predictor_item_v1 = FeatureService(
    name=ITEM_SERVICE,
    features=[_views[name] for name in SERVICES[ITEM_SERVICE]],
    description="What the predictor reads per candidate item: the ranker's item inputs",
)
