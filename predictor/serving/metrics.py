"""Prometheus metrics of the predictor, served on KServe's ``/metrics`` (the default registry).

Stage buckets are fine below 10 ms so a p99 in that range can be read off the histogram (the operator's
latency policy does exactly that).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.0025,
    0.003,
    0.004,
    0.005,
    0.006,
    0.008,
    0.010,
    0.0125,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)

STAGE_SECONDS = Histogram(
    "recsys_stage_seconds",
    "Time per stage: features (online store read) and total (the whole predict), per request; retrieval "
    "(user tower + nearest items) and ranking (ranker + top-k), per model call (one micro-batch).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "recsys_batch_users",
    "Users per model invocation (micro-batching merges requests)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
FALLBACKS = Counter("recsys_fallbacks_total", "Users answered by a fallback instead of the model", ["reason"])
ERRORS = Counter(
    "recsys_errors_total", "Errors by kind (bad_request, online_store, model, model_load)", ["kind"]
)
CLIENT_ERRORS = Counter(
    "recsys_client_errors_total",
    "Requests answered 4xx, by reason (a fixed set, never the message): bad_json, bad_field, too_many_users, "
    "validation (the V2 schema), body_too_large, not_found (model or route), http (any other 4xx)",
    ["reason"],
)
USER_CACHE = Counter(
    "recsys_user_cache_total", "User-vector cache lookups (RECSYS_SERVE_USER_CACHE_SIZE > 0)", ["result"]
)
ONLINE_STORE_LOST = Gauge(
    "recsys_online_store_lost",
    "1 while the online store lacks a feature view the registry says was materialized (wiped: see "
    "predictor/features/marker.py); users get flagged online_store_lost fallbacks until "
    "`recsys features materialize`",
)
MODEL_VERSION = Gauge("recsys_model_version", "Registry version number of the model serving now (0: a path)")
MODEL_LOAD_SECONDS = Gauge(
    "recsys_model_load_seconds",
    "Seconds the last model load took, by stage: artifact (read, verify, build the modules), item_features "
    "(online read), item_side (item tables, search index), self_check: most of what a new replica waits for",
    ["stage"],
)
SERVED_LEVEL = Counter(
    "recsys_served_level_total",
    "Users served through the model, by the quality-ladder level of their batch (full, reduced, retrieval, "
    "popularity; predictor.serving.ladder): any level below the model's best is degraded",
    ["level"],
)


class LevelCostCollector:
    """``recsys_level_cost_seconds{level}``: the predicted model seconds of one lone request at each level
    of the serving model's ladder (calibrated at load, scaled by measured times), read from ``source`` (a
    ``predictor.serving.ladder.QualityLadder``, set at load and on hot swap) when Prometheus scrapes: only
    the serving model's levels appear, and the request path does no work for it."""

    def __init__(self):
        self.source = None

    def collect(self):
        family = GaugeMetricFamily(
            "recsys_level_cost_seconds",
            "Predicted model seconds of one lone request at each level of the serving model's quality ladder",
            labels=["level"],
        )
        ladder = self.source
        if ladder is not None:
            for i, level in enumerate(ladder.levels):
                family.add_metric([level], ladder.costs.batch_s(i, 1))
        yield family


LEVEL_COSTS = LevelCostCollector()
REGISTRY.register(LEVEL_COSTS)
MODEL_SWAPS = Counter("recsys_model_swaps_total", "Hot swaps to a newly promoted model")
ITEM_FEATURE_REFRESHES = Counter(
    "recsys_item_feature_refreshes_total", "Item-feature cache refreshes after materialization advanced"
)

STAGES = ("features", "retrieval", "ranking", "total")
CLIENT_ERROR_REASONS = (
    "bad_json",
    "bad_field",
    "too_many_users",
    "validation",
    "body_too_large",
    "not_found",
    "http",
)
FALLBACK_REASONS = (
    "cold_start",
    "online_store_unavailable",
    "online_store_timeout",
    "online_store_lost",
    "model_error",
)
for _stage in STAGES:
    STAGE_SECONDS.labels(stage=_stage)
for _reason in FALLBACK_REASONS:
    FALLBACKS.labels(reason=_reason)
for _kind in ("bad_request", "online_store", "model", "model_load"):
    ERRORS.labels(kind=_kind)
for _reason in CLIENT_ERROR_REASONS:
    CLIENT_ERRORS.labels(reason=_reason)
