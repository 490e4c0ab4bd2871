"""The predictor's settings: every field is also an environment variable ``RECSYS_SERVE_<FIELD>``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from predictor.models.inference import HNSW_THRESHOLD, LEVELS, SEARCH_FORMS
from predictor.serving.engine import PRECISIONS
from predictor.serving.requests import Limits


class ServeSettings(BaseSettings):
    """Predictor settings; every field is also an environment variable ``RECSYS_SERVE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_SERVE_", extra="ignore")

    model_name: str = Field(default="recsys", pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    http_port: int = Field(default=8080, ge=1, le=65535)
    model_uri: str | None = Field(
        default=None, description="serve this artifact instead of registry production"
    )
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1 ...; default: CUDA when present")
    precision: str = Field(default="auto", description=f"one of {', '.join(PRECISIONS)}")
    candidates: int | None = Field(
        default=None, ge=1, le=4096, description="ranker candidates (default: model's)"
    )
    max_k: int = Field(default=100, ge=1, le=1000)
    default_k: int = Field(default=10, ge=1)
    max_instances: int = Field(default=64, ge=1, le=4096)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    feature_timeout_ms: float = Field(default=50.0, gt=0, description="online store deadline before fallback")
    max_batch: int = Field(default=32, ge=1, description="users per model call (1: no micro-batching)")
    batch_wait_ms: float = Field(default=0.0, ge=0, description="extra wait for more requests when idle")
    model_poll_seconds: float = Field(default=10.0, ge=0, description="registry poll period (0: no hot swap)")
    online_check_seconds: float = Field(
        default=15.0,
        ge=0,
        description="how often the online store's materialization markers are checked (0: never)",
    )
    item_refresh_seconds: float = Field(
        default=30.0, ge=0, description="materialization check period (0: off)"
    )
    # torch's default is one thread per core of the *node*, not of the pod's CPU limit: oversubscribed in a
    # container, and the event loop needs a core too. One thread per replica; scale with replicas.
    torch_threads: int = Field(default=1, ge=0, description="intra-op threads (0: torch's default)")
    hnsw_threshold: int = Field(
        default=HNSW_THRESHOLD, ge=0, description="CPU catalogs above this many items search an HNSW index"
    )
    search: str = Field(
        default="auto",
        pattern=f"^({'|'.join(SEARCH_FORMS)})$",
        description="retrieval search: auto (HNSW above hnsw_threshold where it measures faster), "
        "exact, hnsw",
    )
    user_cache_size: int = Field(default=0, ge=0, description="user vectors cached (LRU; 0: off)")
    ranker: str = Field(
        default="auto",
        pattern="^(auto|on|off)$",
        description="auto: as validation decided at training; on/off: force",
    )
    p99_target_ms: float = Field(
        default=50.0,
        gt=0,
        description="this replica's p99 target: the quality ladder steps down before its queue would pass it "
        "(the chart sets it from the LatencyAutoscaler's p99TargetMs)",
    )
    level: str = Field(
        default="auto",
        pattern=f"^(auto|best|{'|'.join(LEVELS)})$",
        description="auto: the quality ladder picks each batch's level from queue and latency; best: never "
        "degrade; or pin one level (the nearest the model has, not better)",
    )
    reduced_candidates: int | None = Field(
        default=None, ge=1, le=4096, description="candidates ranked at the reduced level (default: a quarter)"
    )
    ladder_hold_seconds: float = Field(
        default=5.0, ge=0, description="calm time before the ladder steps one level back up"
    )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_k=self.max_k, default_k=min(self.default_k, self.max_k), max_instances=self.max_instances
        )
