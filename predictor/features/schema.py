"""The feature schema, defined once: each feature view's entity and columns, with kinds and descriptions.

The Feast definitions (``feature_repo/feature_definitions.py``), the offline tables
(``predictor.features.offline``), training's dense inputs (``predictor.models.data``), the online reads
(``predictor.features.store``, ``predictor.serving.online``) and the batch job's output check
(``predictor.features.batch``) all read it; a column added here reaches every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

USER_PROFILE = "user_profile"
USER_RECENT_ITEMS = "user_recent_items"
ITEM_PROFILE = "item_profile"
KINDS = ("int64", "float32", "int64_list", "float32_list")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of KINDS
    description: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def scalar(self) -> bool:
        return not self.kind.endswith("_list")


@dataclass(frozen=True)
class View:
    name: str
    entity: str  # "user" or "item"
    columns: tuple[Column, ...]

    @property
    def join_key(self) -> str:
        return f"{self.entity}_id"

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def refs(self) -> list[str]:
        """Feast feature references, ``view:column``."""
        return [f"{self.name}:{c.name}" for c in self.columns]


_RATING = "Mean explicit rating; 0 when rating_count is 0"
VIEWS: dict[str, View] = {
    USER_PROFILE: View(
        USER_PROFILE,
        "user",
        (
            Column("events_1d", "int64", "Events in the day before the snapshot"),
            Column("events_7d", "int64", "Events in the 7 days before the snapshot"),
            Column("events_30d", "int64", "Events in the 30 days before the snapshot"),
            Column("events_total", "int64", "All events up to the snapshot"),
            Column("seconds_since_last_event", "float32", "Recency at the snapshot"),
            Column("mean_rating", "float32", _RATING),
            Column("rating_count", "int64", "Number of rated events"),
            Column(
                "category_affinity",
                "float32_list",
                "Share of the user's event weight per category id (sums to 1)",
            ),
        ),
    ),
    USER_RECENT_ITEMS: View(
        USER_RECENT_ITEMS,
        "user",
        (
            Column("recent_items", "int64_list", "Last N item ids, most recent first"),
            Column(
                "seen_items",
                "int64_list",
                "Every distinct item id of the user, ascending: what recommendations exclude",
            ),
        ),
    ),
    ITEM_PROFILE: View(
        ITEM_PROFILE,
        "item",
        (
            Column("popularity_1d", "int64", "Events on the item in the last day"),
            Column("popularity_7d", "int64", "Events on the item in the last 7 days"),
            Column("popularity_30d", "int64", "Events on the item in the last 30 days"),
            Column("popularity_total", "int64", "All events on the item"),
            Column("mean_rating", "float32", _RATING),
            Column("rating_count", "int64", "Number of rated events"),
            Column("age_seconds", "float32", "Time since the item's first event"),
            Column("categories", "int64_list", "Category ids of the item"),
        ),
    ),
}

# the models' dense inputs: every scalar column of the profile views, in schema order
USER_DENSE_COLUMNS = [c.name for c in VIEWS[USER_PROFILE].columns if c.scalar]
ITEM_DENSE_COLUMNS = [c.name for c in VIEWS[ITEM_PROFILE].columns if c.scalar]
# Feast feature services: what the predictor reads online per user and per item, versioned with the model
# that reads them; ``get_online_features`` reads go through them, the raw Redis reader reads their refs
USER_SERVICE, ITEM_SERVICE = "predictor_user_v1", "predictor_item_v1"
SERVICES: dict[str, tuple[str, ...]] = {
    USER_SERVICE: (USER_PROFILE, USER_RECENT_ITEMS),
    ITEM_SERVICE: (ITEM_PROFILE,),
}
USER_FEATURES = [ref for view in SERVICES[USER_SERVICE] for ref in VIEWS[view].refs]
ITEM_FEATURES = [ref for view in SERVICES[ITEM_SERVICE] for ref in VIEWS[view].refs]
