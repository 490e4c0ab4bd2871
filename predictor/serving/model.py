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

* model watcher: polls the registry; a newly promoted version is loaded and self-checked aside, then
  swapped in with one reference assignment, so requests in flight finish on the old engine and no
  request fails. A version that fails to load or validate is logged, counted, and the old one keeps serving.
* item-feature refresher: when ``item_profile``'s materialization advances, re-reads the catalog's item
  features from the online store and rebuilds the item table aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import faiss
import numpy as np
import threadpoolctl
import torch
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from predictor.config import Settings
from predictor.features.marker import MaterializationMarker
from predictor.features.store import open_store
from predictor.models.data import user_dense_rows
from predictor.models.inference import HNSW_THRESHOLD, LEVELS, SEARCH_FORMS, offsets_from_counts
from predictor.models.lifecycle import MODEL_NAME, load_model
from predictor.models.registry import ModelRegistry
from predictor.serving import metrics
from predictor.serving.engine import PRECISIONS, OnlineUsers, ServingEngine
from predictor.serving.ladder import LadderPolicy, LevelCosts, QualityLadder
from predictor.serving.online import OnlineFeatures, UserOnline, online_features
from predictor.serving.requests import (
    Answer,
    Limits,
    ParsedRequest,
    parse_v1,
    parse_v2,
    v1_response,
    v2_response,
)

log = logging.getLogger(__name__)


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


@dataclass
class LoadedModel:
    engine: ServingEngine
    version_id: int | None  # registry row id (None: served from a path)
    version: str  # what responses carry
    ladder: QualityLadder


class MicroBatcher:
    """Merges concurrent calls into one ``run(items, choice)`` on a single worker thread.

    When the worker is idle a call starts at once (after ``max_wait`` if set, to collect company); while
    it is busy, calls queue and the next batch takes up to ``max_batch`` of them. So a lone request pays no
    added latency and a burst is served in a few large, efficient batches. ``choose(batch, waiting,
    head_wait_s)``, if given, is called on the event loop as each batch starts, with the batch's items, the
    items still queued behind it and how long the oldest item of the batch has waited; what it returns is
    ``run``'s second argument (the quality-ladder level).
    """

    def __init__(
        self,
        run: Callable[[list, object], list],
        max_batch: int,
        max_wait: float,
        choose: Callable[[list, list, float], object] | None = None,
    ):
        self.run, self.max_batch, self.max_wait, self.choose = run, max_batch, max_wait, choose
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-model")
        self._pending: list[tuple[list, asyncio.Future, float]] = []
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((items, future, time.perf_counter()))
        if not self._busy:
            if self.max_wait > 0 and sum(len(i) for i, _, _ in self._pending) < self.max_batch:
                if self._timer is None:
                    self._timer = loop.call_later(self.max_wait, self._start)
            else:
                self._start()
        return await future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._pending:
            return
        batch, size = [], 0
        while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
            entry = self._pending.pop(0)
            batch.append(entry)
            size += len(entry[0])
        choice = None
        if self.choose is not None:
            head_wait = time.perf_counter() - batch[0][2]
            choice = self.choose(
                [i for items, _, _ in batch for i in items],
                [i for items, _, _ in self._pending for i in items],
                head_wait,
            )
        self._busy = True
        asyncio.get_running_loop().create_task(self._run(batch, choice))

    async def _run(self, batch: list[tuple[list, asyncio.Future, float]], choice) -> None:
        flat = [item for items, _, _ in batch for item in items]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, flat, choice)
            at = 0
            for items, future, _ in batch:
                if not future.done():
                    future.set_result(results[at : at + len(items)])
                at += len(items)
        except Exception as exc:  # noqa: BLE001 - every waiter learns of the failure
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._busy = False
            if self._pending:
                self._start()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str):
    """Adds the seconds the block took to ``timings[stage]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


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
        self._failed_versions: set[int] = set()
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
        self.current = self._load_model()
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

    def _load_model(self, skip: set[int] = frozenset()) -> LoadedModel | None:
        """Blocking: read, verify and self-check the model to serve. None when the registry has none."""
        if self.serve.model_uri is not None:
            uri, version_id, version = (
                self.serve.model_uri,
                None,
                self.serve.model_uri.rstrip("/").rsplit("/", 1)[-1],
            )
            number = 0
        else:
            production = self.registry.production(MODEL_NAME)
            if production is None or production.id in skip:
                return None
            uri, version_id, version, number = (
                production.artifact_uri,
                production.id,
                str(production.version),
                production.version,
            )
        timings: dict[str, float] = {}
        with timed(timings, "artifact"):
            model = load_model(uri, self.serve.device)
        if model.config.max_history > self.settings.recent_items:
            raise ValueError(
                f"model {version} reads max_history={model.config.max_history} items of each user's history, "
                f"but the online store keeps RECSYS_RECENT_ITEMS={self.settings.recent_items}: "
                "serving would cut every history the model was trained on; raise RECSYS_RECENT_ITEMS "
                "(and re-materialize) or train with a smaller max_history"
            )
        use_ranker = None if self.serve.ranker == "auto" else self.serve.ranker == "on"
        with timed(timings, "item_features"):
            online_items = self._online_item_features(model.catalog.items.ids, as_of=None)
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
            ladder = self._ladder(engine)
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

    def _ladder(self, engine: ServingEngine) -> QualityLadder:
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
        """Swap in a newly promoted model. Returns True when a swap happened."""
        production = await asyncio.to_thread(self.registry.production, MODEL_NAME)
        if (
            production is None
            or production.id == self.current.version_id
            or production.id in self._failed_versions
        ):
            return False
        log.info("registry production is now version %s; loading it", production.version)
        try:
            loaded = await asyncio.to_thread(self._load_model)
            if loaded is None:
                return False
        except Exception as exc:  # noqa: BLE001 - any failure to load means: keep serving the old model
            self._failed_versions.add(production.id)
            metrics.ERRORS.labels(kind="model_load").inc()
            log.error(
                "model version %s failed to load or validate; version %s keeps serving: %s",
                production.version,
                self.current.version,
                exc,
            )
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

    def _item_profile_end(self) -> datetime | None:
        self.store.refresh_registry()
        return self.store.get_feature_view("item_profile").most_recent_end_time

    def _online_item_features(self, item_ids: np.ndarray, as_of: datetime | None):
        """Blocking: ``(materialized until, ids, item_profile rows)`` of the catalog items the online store
        holds, if ``item_profile`` was materialized since ``as_of``; None otherwise, or when the store or
        its registry cannot be read (the features in use keep serving)."""
        try:
            end = self._item_profile_end()
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

    def _refresh_item_features(self, engine: ServingEngine) -> bool:
        """Blocking: if ``item_profile`` was materialized since the engine's features, load the catalog's
        online item features into ``engine``."""
        found = self._online_item_features(engine.item_ids, engine.item_features_as_of)
        if found is None:
            return False
        end, ids, rows = found
        updated = engine.set_item_features(ids, rows)
        engine.item_features_as_of = end
        metrics.ITEM_FEATURE_REFRESHES.inc()
        log.info("item features refreshed for %d items (materialized until %s)", updated, end)
        return True

    async def refresh_items(self) -> bool:
        return await asyncio.to_thread(self._refresh_item_features, self.current.engine)

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
        users = sum(len(job[1]) for job in batch) + sum(len(job[1]) for job in waiting)
        return self.current.ladder.choose(users, head_wait_s, time.perf_counter())

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
