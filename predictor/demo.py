"""``recsys demo``: the whole online-feature path on the active profile, narrated.

synthetic data → event log → batch features → ``feast apply`` → ``materialize-incremental`` →
online reads → a real-time event pushed → the next online read sees it.
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
from predictor.features.pipeline import build_features
from predictor.features.realtime import push_events
from predictor.features.store import apply, materialize_incremental, online_user_features


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


def run_demo(settings: Settings, console: Console, n_events: int = 200_000, seed: int = 0) -> None:
    total = time.perf_counter()
    console.print(f"profile [bold]{settings.profile.value}[/], state in {settings.home_dir}")
    settings.home_dir.mkdir(parents=True, exist_ok=True)

    with _Step(console, "1. Interaction data → event log"):
        data = generate(n_events=n_events, seed=seed)
        event_log = EventLog(settings.database_url)
        event_log.replace(data)
        console.print(data.summary())

    with _Step(console, "2. Batch features → offline store"):
        written = build_features(settings, progress=True)
        console.print(", ".join(f"{name}: {rows:,} rows" for name, rows in written.items()))

    with _Step(console, "3. feast apply + materialize-incremental → online store"):
        store = apply(settings)
        materialize_incremental(settings, datetime.now(timezone.utc), store=store)
        console.print(f"project {store.project}: {len(store.list_feature_views())} feature views, "
                      f"{len(store.list_feature_services())} feature services")

    active = data.events["user_id"].value_counts().index[:3].tolist()
    with _Step(console, "4. Online reads"):
        before = _timed_read(store, active, console)
        _show(console, before, data)

    user = int(active[0])
    seen = set(before.loc[before["user_id"] == user, "recent_items"].iloc[0])
    new_item = int(np.setdiff1d(data.items["item_id"].to_numpy(), list(seen))[-1])
    with _Step(console, f"5. Real-time event: user {user} clicks item {new_item}"):
        started = time.perf_counter()
        push_events(
            pd.DataFrame({"user_id": [user], "item_id": [new_item], "timestamp": [pd.Timestamp.now(tz="UTC")],
                          "event_type": ["click"]}),
            store, event_log, settings.recent_items, source="demo",
        )  # fmt: skip
        pushed_ms = (time.perf_counter() - started) * 1000
        after = online_user_features(store, [user])
        head = after["recent_items"].iloc[0][:5]
        console.print(f"pushed in {pushed_ms:.1f} ms; next online read: recent_items starts {head}")
        if head[0] != new_item:
            raise RuntimeError(f"the pushed event is not visible online: expected {new_item} first, got {head}")
    event_log.engine.dispose()

    console.rule("[bold green]Done")
    console.print(f"whole demo: {time.perf_counter() - total:.1f} s")
    console.print(
        "Next: `recsys features build --snapshot-every 1D && recsys train` trains the two-stage model on this "
        "log; the KServe predictor (`recsys serve`) that answers requests from it is the next part to be built."
    )


def _timed_read(store, users, console: Console) -> pd.DataFrame:
    online_user_features(store, users)  # the first read opens connections; time the second
    started = time.perf_counter()
    frame = online_user_features(store, users)
    console.print(f"get_online_features for {len(users)} users: {(time.perf_counter() - started) * 1000:.1f} ms")
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
