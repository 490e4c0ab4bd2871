"""Model loading and hot swap: the version to serve, read, verified and self-checked beside the one serving.

:class:`ModelLoader` builds a :class:`LoadedModel` (serving engine, quality ladder, version) from registry
production or a fixed artifact URI; :meth:`ModelLoader.newer` is the watcher's poll: a newly promoted
version, loaded aside, or None. The caller swaps it in with one reference assignment, so requests in flight
finish on the engine they started with. A version that fails to load or validate is logged, counted and
remembered, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from predictor.config import Settings
from predictor.models.lifecycle import MODEL_NAME
from predictor.models.recommender import TwoStageRecommender
from predictor.models.registry import ModelRegistry
from predictor.serving import metrics
from predictor.serving.engine import ServingEngine
from predictor.serving.item_refresh import ItemFeatureRefresher
from predictor.serving.ladder import LadderPolicy, LevelCosts, QualityLadder
from predictor.serving.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    engine: ServingEngine
    version_id: int | None  # registry row id (None: served from a path)
    version: str  # what responses carry
    ladder: QualityLadder


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str):
    """Adds the seconds the block took to ``timings[stage]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


class ModelLoader:
    """Loads the model to serve: ``serve.model_uri`` when set, else the registry's production version."""

    def __init__(
        self,
        settings: Settings,
        serve: ServeSettings,
        registry: ModelRegistry | None,
        items: ItemFeatureRefresher,
    ):
        self.settings, self.serve, self.registry, self.items = settings, serve, registry, items
        self.failed_versions: set[int] = set()  # registry ids that failed to load: not retried

    def load(self) -> LoadedModel | None:
        """Blocking: read, verify and self-check the model to serve. None when the registry has none."""
        if self.serve.model_uri is not None:
            uri, version_id, number = self.serve.model_uri, None, 0
            version = self.serve.model_uri.rstrip("/").rsplit("/", 1)[-1]
        else:
            production = self.registry.production(MODEL_NAME)
            if production is None:
                return None
            uri, version_id, number = production.artifact_uri, production.id, production.version
            version = str(production.version)
        timings: dict[str, float] = {}
        with timed(timings, "artifact"):
            model = TwoStageRecommender.load(uri, self.serve.device)
        if model.config.max_history > self.settings.recent_items:
            raise ValueError(
                f"model {version} reads max_history={model.config.max_history} items of each user's history, "
                f"but the online store keeps RECSYS_RECENT_ITEMS={self.settings.recent_items}: "
                "serving would cut every history the model was trained on; raise RECSYS_RECENT_ITEMS "
                "(and re-materialize) or train with a smaller max_history"
            )
        use_ranker = None if self.serve.ranker == "auto" else self.serve.ranker == "on"
        with timed(timings, "item_features"):
            online_items = self.items.read(model.catalog.items.ids, as_of=None)
        with timed(timings, "item_side"):
            engine = ServingEngine(
                model,
                version,
                self.serve.device,
                self.serve.precision,
                self.serve.candidates,
                self.serve.hnsw_threshold,
                self.serve.search,
                use_ranker,
                self.serve.user_cache_size,
                online_items[1:] if online_items else None,
                self.serve.reduced_candidates,
            )
        if online_items:
            engine.item_features_as_of = online_items[0]
            log.info(
                "model %s: online item features of %d items (materialized until %s)",
                version,
                len(online_items[1]),
                online_items[0],
            )
        with timed(timings, "self_check"):
            engine.self_check()
        with timed(timings, "ladder"):
            ladder = self.ladder(engine)
        for stage, seconds in timings.items():
            metrics.MODEL_LOAD_SECONDS.labels(stage=stage).set(seconds)
        log.info(
            "model %s loaded in %.2f s (%s)",
            version,
            sum(timings.values()),
            ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in timings.items()),
        )
        metrics.MODEL_VERSION.set(number)
        return LoadedModel(engine, version_id, version, ladder)

    def ladder(self, engine: ServingEngine) -> QualityLadder:
        """Blocking: the engine's quality ladder, its level costs timed on probe users."""
        pinned = None
        if self.serve.level == "best":
            pinned = engine.levels[0]
        elif self.serve.level != "auto":
            pinned = engine.nearest_level(self.serve.level)
        costs = LevelCosts.calibrate(
            lambda level, users: engine.time_level(engine.levels[level], users),
            len(engine.levels),
            large=min(16, self.serve.max_batch),
        )
        policy = LadderPolicy(self.serve.p99_target_ms / 1000, hold_s=self.serve.ladder_hold_seconds)
        return QualityLadder(engine.levels, costs, policy, self.serve.max_batch, pinned=pinned)

    async def newer(self, current: LoadedModel) -> LoadedModel | None:
        """The watcher's poll: the registry's production version loaded aside if it is not ``current`` and
        has not failed before; None otherwise, or when it fails to load or validate (then ``current``
        keeps serving, and the failure is logged and counted)."""
        production = await asyncio.to_thread(self.registry.production, MODEL_NAME)
        if production is None or production.id == current.version_id or production.id in self.failed_versions:
            return None
        log.info("registry production is now version %s; loading it", production.version)
        try:
            return await asyncio.to_thread(self.load)
        except Exception as exc:  # noqa: BLE001 - any failure to load means: keep serving the old model
            self.failed_versions.add(production.id)
            metrics.ERRORS.labels(kind="model_load").inc()
            log.error(
                "model version %s failed to load or validate; version %s keeps serving: %s",
                production.version,
                current.version,
                exc,
            )
            return None
