"""``recsys demo``: the whole product on the active profile, narrated.

synthetic data → event log → batch features → ``feast apply`` → full ``materialize`` → online reads →
train the two-stage model → start the KServe predictor → recommendations over REST and their latency →
real-time events pushed → the user's next recommendations change → the predictor stops.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from predictor.config import Settings
from predictor.data.eventlog import EventLog
from predictor.data.synthetic import generate
from predictor.features.offline import read_offline
from predictor.features.pipeline import build_features
from predictor.features.realtime import push_events
from predictor.features.schema import USER_PROFILE
from predictor.features.store import apply, materialize, online_user_features
from predictor.models.config import TrainConfig, model_config
from predictor.models.lifecycle import train_and_register
from predictor.models.registry import ModelRegistry
from predictor.serving.process import ServerProcess


class _Step:
    def __init__(self, console: Console, title: str):
        self.console, self.title = console, title

    def __enter__(self):
        self.started = time.perf_counter()
        self.console.rule(f"[bold]{self.title}")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.console.print(f"[dim]done in {time.perf_counter() - self.started:.1f} s[/]")


def run_demo(
    settings: Settings,
    console: Console,
    n_events: int = 100_000,
    seed: int = 0,
    size: str = "small",
    epochs: int = 6,
) -> None:
    total = time.perf_counter()
    console.print(f"profile [bold]{settings.profile.value}[/], state in {settings.home_dir}")
    settings.home_dir.mkdir(parents=True, exist_ok=True)

    with _Step(console, "1. Interaction data → event log"):
        data = generate(n_events=n_events, seed=seed)
        event_log = EventLog(settings.database_url)
        event_log.replace(data)
        console.print(data.summary())

    with _Step(console, "2. Batch features → offline store (weekly snapshots for point-in-time training)"):
        written = build_features(settings, snapshot_every="7D", progress=True)
        console.print(", ".join(f"{name}: {rows:,} rows" for name, rows in written.items()))

    with _Step(console, "3. feast apply + materialize → online store"):
        store = apply(settings)
        # step 1 replaced the whole log: a full load, or rows a previous run pushed (stamped later than
        # this run's snapshots) would outlive it and the events of step 8 would already be in place
        materialize(settings, datetime.now(timezone.utc), store=store, full=True)
        console.print(
            f"project {store.project}: {len(store.list_feature_views())} feature views, "
            f"{len(store.list_feature_services())} feature services"
        )

    active = [int(u) for u in data.events["user_id"].value_counts().index[:3]]
    with _Step(console, "4. Online reads"):
        before = _timed_read(store, active, console)
        _show(console, before, data)

    with _Step(
        console, f"5. Train the two-stage model ({size}, up to {epochs} epochs) → registry → production"
    ):
        registry = ModelRegistry(settings.database_url)
        version, metrics = train_and_register(
            data,
            registry,
            settings.artifacts_uri,
            model_config(size),
            TrainConfig(
                epochs=epochs, min_epochs=1, ranker_epochs=2, ranker_examples_per_epoch=10_000, seed=seed
            ),
            read_offline(USER_PROFILE, settings),
        )
        registry.engine.dispose()
        console.print(
            f"version {version.version} ({version.status}); test "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("recall", "ndcg")))
        )

    titles = dict(zip(data.items["item_id"].tolist(), data.items["title"].tolist()))
    console.rule("[bold]6. Start the KServe predictor (recsys serve)")
    predictor = Predictor(settings)
    with predictor:
        console.print(f"ready at {predictor.url} in {predictor.startup_seconds:.1f} s")
        with _Step(console, "7. Recommendations over REST (V1)"):
            recs = predictor.recommend(active, k=5)
            _show_recs(console, recs, titles)
            p50, p99 = predictor.latency(active[0], requests=200)
            console.print(f"latency over 200 sequential requests: p50 {p50:.2f} ms, p99 {p99:.2f} ms")

        user = active[0]
        fresh = _items_outside_taste(data, user, 6)
        with _Step(console, f"8. Real-time events: user {user} views {len(fresh)} items of another category"):
            started = time.perf_counter()
            now = pd.Timestamp.now(tz="UTC")
            push_events(
                pd.DataFrame(
                    {
                        "user_id": [user] * len(fresh),
                        "item_id": fresh,
                        "event_type": ["view"] * len(fresh),
                        "timestamp": [now + pd.Timedelta(milliseconds=i) for i in range(len(fresh))],
                    }
                ),
                store,
                event_log,
                settings.recent_items,
                source="demo",
            )
            console.print(
                f"pushed to the online store in {(time.perf_counter() - started) * 1000:.1f} ms: "
                + "; ".join(titles.get(i, str(i)) for i in fresh[:3])
                + " ..."
            )
            after = predictor.recommend([user], k=5)
            _show_recs(console, recs[:1] + after, titles, labels=["before", "after"])
            changed = len(set(after[0]["item_ids"]) ^ set(recs[0]["item_ids"])) // 2
            if changed:
                console.print(f"{changed} of the top 5 changed, with no retraining")
            elif after[0]["scores"] != recs[0]["scores"]:
                console.print(
                    "same top 5, new scores: the model saw the events (a briefly trained model barely "
                    "moves; the default demo's does)"
                )
            else:
                raise RuntimeError("the pushed events did not reach the predictor: same items, same scores")
        console.rule("[bold]9. Stop the predictor (SIGTERM)")
    console.print(f"[dim]stopped in {predictor.stop_seconds:.1f} s[/]")
    event_log.engine.dispose()

    console.rule("[bold green]Done")
    console.print(f"whole demo: {time.perf_counter() - total:.1f} s")
    console.print(
        "Next: `recsys serve` keeps the predictor running (V1: POST /v1/models/recsys:predict, V2: POST "
        "/v2/models/recsys/infer); `recsys events push FILE` feeds it events; `recsys retrain` makes a new "
        "version that the running predictor hot-swaps. `--profile production` does the same on "
        "PostgreSQL + Redis."
    )


class Predictor(ServerProcess):
    """``recsys serve`` as a child process for the demo, called over HTTP."""

    def __init__(self, settings: Settings):
        super().__init__(settings, log_path=settings.home_dir / "predictor.log")

    def recommend(self, users: list[int], k: int) -> list[dict]:
        response = self.client.post(
            "/v1/models/recsys:predict", json={"instances": [{"user_id": u, "k": k} for u in users]}
        )
        response.raise_for_status()
        return response.json()["predictions"]

    def latency(self, user: int, requests: int) -> tuple[float, float]:
        times = []
        body = {"instances": [{"user_id": user, "k": 10}]}
        for _ in range(requests):
            started = time.perf_counter()
            self.client.post("/v1/models/recsys:predict", json=body).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
        return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _items_outside_taste(data, user: int, n: int) -> list[int]:
    """Unseen items from the category the user has interacted with least."""
    items = data.items
    category = items["categories"].map(lambda c: c[0] if len(c) else -1)
    seen = set(data.events.loc[data.events["user_id"] == user, "item_id"].tolist())
    counts = category[items["item_id"].isin(seen)].value_counts()
    rare = min(category.unique(), key=lambda c: counts.get(c, 0))
    pool = items.loc[(category == rare) & ~items["item_id"].isin(seen), "item_id"]
    return [int(i) for i in pool.head(n)]


def _show_recs(
    console: Console, predictions: list[dict], titles: dict, labels: list[str] | None = None
) -> None:
    table = Table("", "user", "model", "top 5 (title, score)")
    for row, pred in enumerate(predictions):
        label = labels[row] if labels else ""
        model = f"v{pred['model_version']}" + (f" fallback: {pred['fallback']}" if pred["fallback"] else "")
        top = "; ".join(f"{titles.get(i, i)} ({s:.2f})" for i, s in zip(pred["item_ids"], pred["scores"]))
        table.add_row(label, str(pred["user_id"]), model, top)
    console.print(table)


def _timed_read(store, users, console: Console) -> pd.DataFrame:
    online_user_features(store, users)  # the first read opens connections; time the second
    started = time.perf_counter()
    frame = online_user_features(store, users)
    console.print(
        f"get_online_features for {len(users)} users: {(time.perf_counter() - started) * 1000:.1f} ms"
    )
    return frame


def _show(console: Console, frame: pd.DataFrame, data) -> None:
    titles = dict(zip(data.items["item_id"], data.items["title"]))
    table = Table("user", "events 7d / total", "mean rating", "top category", "last 3 items")
    for _, row in frame.iterrows():
        affinity = np.asarray(row["category_affinity"])
        top = int(affinity.argmax()) if affinity.size else -1
        table.add_row(
            str(row["user_id"]),
            f"{row['events_7d']} / {row['events_total']}",
            f"{row['mean_rating']:.2f}",
            f"{top} ({affinity[top]:.0%})" if top >= 0 else "-",
            "; ".join(titles.get(i, str(i)) for i in row["recent_items"][:3]),
        )
    console.print(table)
