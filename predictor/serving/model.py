"""The KServe predictor: ``load / preprocess / predict / postprocess``, all awaitable.

Per request (``predict``):

1. online features of every user in one round trip (``online.py``), bounded by a deadline;
2. users the model knows something about go through the :class:`~predictor.serving.engine.ServingEngine`
   on a dedicated worker thread — concurrent requests are merged into one batch by :class:`MicroBatcher`,
   and each batch runs at the level of the quality ladder that ``predictor.serving.ladder`` picks from the
   queue as it starts (``RECSYS_SERVE_LEVEL``, ``RECSYS_SERVE_P99_TARGET_MS``);
3. users it knows nothing about (cold start), or everyone when the online store is down or slow, get the
   popularity fallback, flagged in the response and counted in ``recsys_fallbacks_total``.

Nothing blocking runs on the event loop: parsing is pure and microseconds long, reads are ``await``ed,
model work and registry/artifact I/O run in threads.

Background tasks (started with the server, see ``server.py``):

* model watcher: polls the registry; a newly promoted version is loaded and self-checked aside
  (``loading.py``), then swapped in with one reference assignment, so requests in flight finish on the old
  engine and no request fails. A version that fails to load or validate is logged, counted, and the old
  one keeps serving.
* item-feature refresher (``item_refresh.py``): when ``item_profile``'s materialization advances, re-reads
  the catalog's item features from the online store and rebuilds the item table aside.
* online-store check: whether the online store lost a materialized view (``recsys_online_store_lost``).

Settings are ``settings.py`` (``RECSYS_SERVE_*``), micro-batching ``batcher.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import faiss
import numpy as np
import threadpoolctl
import torch
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest

from predictor.config import Settings
from predictor.features.marker import MaterializationMarker
from predictor.features.store import open_store
from predictor.models.data import user_dense_rows
from predictor.models.inference import LEVELS, offsets_from_counts
from predictor.models.registry import ModelRegistry
from predictor.serving import metrics
from predictor.serving.batcher import MicroBatcher
from predictor.serving.engine import OnlineUsers, ServingEngine
from predictor.serving.item_refresh import ItemFeatureRefresher
from predictor.serving.loading import LoadedModel, ModelLoader
from predictor.serving.online import OnlineFeatures, UserOnline, online_features
from predictor.serving.requests import (
    Answer,
    ParsedRequest,
    parse_v1,
    parse_v2,
    v1_response,
    v2_response,
)
from predictor.serving.settings import ServeSettings

log = logging.getLogger(__name__)


class RecommenderModel(Model):
    """``recsys`` as a KServe model: V1 and V2 REST, top-K recommendations per user."""

    def __init__(self, settings: Settings, serve: ServeSettings):
        super().__init__(serve.model_name)
        self.settings, self.serve = settings, serve
        self.limits = serve.limits
        self.current: LoadedModel | None = None
        self.online: OnlineFeatures | None = None
        self.store = None
        self.registry: ModelRegistry | None = None
        self.items: ItemFeatureRefresher | None = None
        self.loader: ModelLoader | None = None
        self.marker: MaterializationMarker | None = None
        self.online_lost: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self.batcher = MicroBatcher(
            self._run_engine, serve.max_batch, serve.batch_wait_ms / 1000, self._choose_level
        )
        for level in LEVELS:  # every level's series exists from the start, so a window's increase is defined
            metrics.SERVED_LEVEL.labels(level=level)

    # --- load ------------------------------------------------------------------------------------------
    def load(self) -> bool:
        """Load the model (registry production, or ``model_uri``), build the index, open the online store,
        read the current item features; ready only after all of it."""
        if self.serve.torch_threads:
            # faiss (OpenMP) and NumPy's BLAS keep a pool of one thread per core of the node otherwise
            torch.set_num_threads(self.serve.torch_threads)
            faiss.omp_set_num_threads(self.serve.torch_threads)
            threadpoolctl.threadpool_limits(self.serve.torch_threads)
        if self.serve.model_uri is None:
            self.registry = ModelRegistry(self.settings.database_url)
        # the store first: the model's item side is built once, from the online item features
        self.store = open_store(self.settings)
        self.online = online_features(self.store, self.settings, timeout=self.serve.feature_timeout_ms / 1000)
        self.marker = MaterializationMarker(self.store, self.settings)
        self.check_online_store()
        self.items = ItemFeatureRefresher(self.store, self.online)
        self.loader = ModelLoader(self.settings, self.serve, self.registry, self.items)
        self.current = self.loader.load()
        if self.current is None:
            raise RuntimeError(
                f"no production model in the registry at {self.settings.database_url}: "
                "run `recsys train` first or pass --model-uri"
            )
        self.ready = True
        metrics.LEVEL_COSTS.source = self.current.ladder
        engine = self.current.engine
        log.info(
            "model %s ready (%d items, device %s, precision %s, retrieval %s, ranker %s, levels %s)",
            self.current.version,
            engine.n_items,
            engine.device,
            engine.precision,
            engine.inference.retrieval_form,
            "on" if engine.use_ranker else "off",
            self._ladder_text(),
        )
        return self.ready

    def _ladder_text(self) -> str:
        ladder = self.current.ladder
        costs = ", ".join(
            f"{lv} {1000 * ladder.costs.batch_s(i, 1):.2f} ms" for i, lv in enumerate(ladder.levels)
        )
        mode = (
            f"pinned at {ladder.levels[ladder.pinned]}"
            if ladder.pinned is not None
            else f"target p99 {self.serve.p99_target_ms:g} ms"
        )
        return f"{costs}; {mode}"

    # --- background tasks ------------------------------------------------------------------------------
    async def start_background(self) -> None:
        if self.registry is not None and self.serve.model_poll_seconds > 0:
            self._tasks.append(
                asyncio.create_task(self._every(self.serve.model_poll_seconds, self.check_for_new_model))
            )
        if self.serve.online_check_seconds > 0:
            self._tasks.append(
                asyncio.create_task(self._every(self.serve.online_check_seconds, self.watch_online_store))
            )
        if self.serve.item_refresh_seconds > 0:
            self._tasks.append(
                asyncio.create_task(self._every(self.serve.item_refresh_seconds, self.refresh_items))
            )

    async def stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.online is not None:
            await self.online.close()
        if self.marker is not None:
            self.marker.close()
        self.batcher.close()

    @staticmethod
    async def _every(period: float, job) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background job %s failed", job.__name__)

    async def check_for_new_model(self) -> bool:
        """Swap in a newly promoted model (loaded aside by the loader). Returns True when a swap happened."""
        loaded = await self.loader.newer(self.current)
        if loaded is None:
            return False
        previous, self.current = self.current, loaded  # in-flight requests keep their own reference
        metrics.LEVEL_COSTS.source = loaded.ladder  # a model without a ranker has no full / reduced
        metrics.MODEL_SWAPS.inc()
        gc.collect()
        gc.freeze()  # the new model's objects join the permanent generation: no gen-2 scans of them
        log.info("hot-swapped model %s → %s", previous.version, loaded.version)
        return True

    def check_online_store(self) -> None:
        """Blocking: which materialized views the online store lost (their marker is gone). Degraded, not
        unready: the replica keeps answering, with fallbacks flagged ``online_store_lost``, because going
        unready would turn every degraded answer into an error."""
        try:
            lost = self.marker.lost_views()
        except Exception as exc:  # noqa: BLE001 - store or registry unreachable: the read path reports that
            log.debug("online store check skipped: %r", exc)
            return
        if lost != self.online_lost:
            if lost:
                log.warning(
                    "the online store lost %s (registry says materialized, marker gone); answering with "
                    "fallbacks until `recsys features materialize` reloads it",
                    ", ".join(lost),
                )
            else:
                log.warning("the online store holds every materialized view again")
        self.online_lost = lost
        metrics.ONLINE_STORE_LOST.set(1 if lost else 0)

    async def watch_online_store(self) -> None:
        await asyncio.to_thread(self.check_online_store)

    def health(self) -> dict:
        """The replica's own account of itself (``GET /healthz``): readiness, model version, online store."""
        loaded = self.current
        return {
            "ready": self.ready,
            "model_version": loaded.version if loaded else None,
            "online_store": {"lost": bool(self.online_lost), "lost_views": self.online_lost},
        }

    async def refresh_items(self) -> bool:
        return await asyncio.to_thread(self.items.refresh, self.current.engine)

    # --- request path ----------------------------------------------------------------------------------
    def validate(self, payload):
        return payload  # preprocess already validated; KServe's generic check does not know ParsedRequest

    async def preprocess(self, payload, headers: dict[str, str] | None = None) -> ParsedRequest:
        try:
            if isinstance(payload, InferRequest):
                return parse_v2(payload, self.limits)
            return parse_v1(payload, self.limits)
        except InvalidInput:
            metrics.ERRORS.labels(kind="bad_request").inc()
            raise

    def _choose_level(self, batch: list, waiting: list, head_wait_s: float) -> str:
        """Event loop, as a batch starts: its level, from the users queued (it included) and its wait."""
        in_batch = sum(len(job[1]) for job in batch)
        users = in_batch + sum(len(job[1]) for job in waiting)
        return self.current.ladder.choose(users, head_wait_s, time.perf_counter(), in_batch)

    def _run_engine(self, jobs: list[tuple[ServingEngine, OnlineUsers, int]], level: str | None) -> list:
        """Worker thread: one engine call per distinct engine in the batch (two only during a swap), over
        all requests' users at once, at the batch's ladder ``level``; each request gets its own rows and
        the level back."""
        out: list = [None] * len(jobs)
        by_engine: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_engine.setdefault(id(job[0]), []).append(i)
        ladder = self.current.ladder
        for rows in by_engine.values():
            engine = jobs[rows[0]][0]
            users = OnlineUsers.concat([jobs[r][1] for r in rows])
            metrics.BATCH_SIZE.observe(len(users))
            timings: dict = {}
            served = engine.nearest_level(level or engine.levels[0])
            started = time.perf_counter()
            recs = engine.recommend(users, max(jobs[r][2] for r in rows), timings, served)
            if engine is self.current.engine:
                ladder.observe(served, len(users), time.perf_counter() - started)
            metrics.SERVED_LEVEL.labels(level=served).inc(len(users))
            # once per model call, so that per-user model time = stage time / batch size
            metrics.STAGE_SECONDS.labels(stage="retrieval").observe(timings.get("retrieval", 0.0))
            metrics.STAGE_SECONDS.labels(stage="ranking").observe(timings.get("ranking", 0.0))
            at = 0
            for r in rows:
                n = len(jobs[r][1])
                out[r] = (recs.rows(at, at + n), served)
                at += n
        return out

    async def _features(self, user_ids: list[int]) -> tuple[list[UserOnline] | None, str | None]:
        try:
            users = await asyncio.wait_for(self.online.users(user_ids), self.serve.feature_timeout_ms / 1000)
            return users, None
        except TimeoutError:
            reason = "online_store_timeout"
        except Exception as exc:  # noqa: BLE001 - refused, reset, protocol error: all mean "no features now"
            log.warning("online store read failed: %s", exc)
            reason = "online_store_unavailable"
        metrics.ERRORS.labels(kind="online_store").inc()
        return None, reason

    def _online_users(self, engine: ServingEngine, requests, users: list[UserOnline]) -> OnlineUsers:
        by_id = {u.user_id: u for u in users}
        rows = [by_id[r.user_id] for r in requests]
        history_lengths = np.fromiter((len(u.history) for u in rows), np.int64, len(rows))
        seen_lengths = np.fromiter((len(u.seen) for u in rows), np.int64, len(rows))
        # a model trained without user features ignores them: skip the conversion on the event loop
        dense = (
            user_dense_rows([u.values for u in rows], engine.catalog.n_categories)
            if engine.uses_user_features
            else np.zeros((len(rows), engine.n_user_dense), np.float32)
        )
        return OnlineUsers(
            np.concatenate([u.history for u in rows]).astype(np.int64),
            offsets_from_counts(history_lengths),
            np.concatenate([u.seen for u in rows]).astype(np.int64),
            offsets_from_counts(seen_lengths),
            dense,
            np.fromiter((r.exclude_seen for r in requests), bool, len(requests)),
        )

    async def predict(self, parsed: ParsedRequest, headers: dict[str, str] | None = None):
        started = time.perf_counter()
        loaded = self.current  # one model for the whole request, even if a swap lands meanwhile
        engine = loaded.engine
        requests = parsed.requests
        k = max(r.k for r in requests)
        t0 = time.perf_counter()
        users, store_problem = await self._features(list(dict.fromkeys(r.user_id for r in requests)))
        feature_s = time.perf_counter() - t0
        metrics.STAGE_SECONDS.labels(stage="features").observe(feature_s)
        level = "popularity"
        if store_problem is not None:
            recs, reason = engine.popular(len(requests), k), store_problem
        else:
            try:
                ((recs, level),) = await self.batcher.submit(
                    [(engine, self._online_users(engine, requests, users), k)]
                )
                reason = "online_store_lost" if self.online_lost else "cold_start"
            except Exception:
                log.exception(
                    "model failed on %d users; answering with the popularity fallback", len(requests)
                )
                metrics.ERRORS.labels(kind="model").inc()
                recs, reason = engine.popular(len(requests), k), "model_error"
        fallbacks = int(recs.cold.sum())
        if fallbacks:
            metrics.FALLBACKS.labels(reason=reason).inc(fallbacks)
        metrics.STAGE_SECONDS.labels(stage="total").observe(time.perf_counter() - started)
        loaded.ladder.observe_overhead(
            feature_s
        )  # the latency the model queue adds to, in the ladder's forecast
        return parsed, Answer(recs, reason, loaded.version, level)

    async def postprocess(self, result, headers: dict[str, str] | None = None, response_headers=None):
        parsed, answer = result
        if parsed.protocol == "v2":
            return v2_response(answer, parsed, self.name)
        return v1_response(answer, parsed)
