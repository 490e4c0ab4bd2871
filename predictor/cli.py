"""``recsys``: one command in front of every job.

Global options pick the profile (embedded / production) and the state directory; each subcommand has
``--help``. The jobs themselves live in the modules they name; this file only adapts arguments.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console

from predictor.config import Profile, Settings

app = typer.Typer(help="Real-time two-stage recommender: data, features, models, serving.", no_args_is_help=True, pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Load interaction data into the event log.", no_args_is_help=True)
features_app = typer.Typer(help="Batch features, Feast apply / materialize, online reads.", no_args_is_help=True)
events_app = typer.Typer(help="Real-time events.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(events_app, name="events")

console = Console()


class State:
    settings: Settings


state = State()


@app.callback()
def main_options(
    profile: Annotated[
        Optional[Profile], typer.Option(help="Storage profile; default from RECSYS_PROFILE, else embedded.")
    ] = None,
    home: Annotated[Optional[Path], typer.Option(help="State directory; default from RECSYS_HOME, else .recsys.")] = None,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "WARNING",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"profile": profile, "home": home}.items() if v is not None}
    state.settings = Settings(**overrides)


# --- data -------------------------------------------------------------------------------------------
@data_app.command("load")
def data_load(
    dataset: Annotated[str, typer.Argument(help="synthetic, ml-100k, ml-latest-small, or a CSV/Parquet path")] = "synthetic",
    data_dir: Annotated[Optional[Path], typer.Option(help="Where MovieLens lies (default ../shared/data).")] = None,
    events: Annotated[int, typer.Option(help="Synthetic: number of events.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
) -> None:
    """Load a dataset into the event log and item catalog, replacing what was there."""
    from predictor.data.eventlog import EventLog
    from predictor.data.loaders import load_dataset

    settings = state.settings
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading {dataset}"):
        data = load_dataset(dataset, data_dir, n_events=events, seed=seed)
        EventLog(settings.database_url).replace(data)
    console.print(f"[green]event log[/] ({settings.profile.value}): {data.summary()}")
    if data.duplicates_dropped:
        console.print(f"dropped {data.duplicates_dropped} exact duplicate rows")


# --- features ---------------------------------------------------------------------------------------
@features_app.command("build")
def features_build(
    snapshot_every: Annotated[
        Optional[str], typer.Option(help="Also write history snapshots at this frequency (e.g. 1D) for training.")
    ] = None,
) -> None:
    """Compute user and item features from the event log and write them to the offline store."""
    from predictor.features.pipeline import build_features

    written = build_features(state.settings, snapshot_every=snapshot_every, progress=True)
    console.print(f"[green]offline store[/] ({state.settings.profile.value}): {written}")


@features_app.command("apply")
def features_apply() -> None:
    """Register the feature repo (feast apply) for the active profile."""
    from predictor.features.store import apply

    store = apply(state.settings)
    console.print(f"[green]applied[/] feature repo to project {store.project}")


@features_app.command("materialize")
def features_materialize(
    end: Annotated[Optional[datetime], typer.Option(help="End of the interval (UTC); default now.")] = None,
) -> None:
    """Load new offline rows into the online store (feast materialize-incremental)."""
    from predictor.features.store import materialize_incremental

    end = (end.replace(tzinfo=timezone.utc) if end and end.tzinfo is None else end) or datetime.now(timezone.utc)
    started = time.perf_counter()
    materialize_incremental(state.settings, end)
    console.print(f"[green]materialized[/] up to {end:%Y-%m-%d %H:%M:%S} in {time.perf_counter() - started:.1f} s")


@features_app.command("online")
def features_online(
    user: Annotated[list[int], typer.Option("--user", "-u", help="User id (repeatable).")] = [],  # noqa: B006
    item: Annotated[list[int], typer.Option("--item", "-i", help="Item id (repeatable).")] = [],  # noqa: B006
) -> None:
    """Read features from the online store."""
    from predictor.features.store import online_item_features, online_user_features, open_store

    if not user and not item:
        raise typer.BadParameter("give at least one --user or --item")
    store = open_store(state.settings)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        if user:
            console.print(online_user_features(store, user).to_string(index=False))
        if item:
            console.print(online_item_features(store, item).to_string(index=False))


# --- events -----------------------------------------------------------------------------------------
@events_app.command("push")
def events_push(
    user_id: Annotated[Optional[int], typer.Option(help="User of a single event.")] = None,
    item_id: Annotated[Optional[int], typer.Option(help="Item of a single event.")] = None,
    event_type: Annotated[str, typer.Option(help="Event type of a single event.")] = "click",
    file: Annotated[
        Optional[Path], typer.Option(help="CSV or Parquet file of events (canonical columns) to push as one batch.")
    ] = None,
) -> None:
    """Append events to the event log and push the users' new recent items to the online store."""
    from predictor.data.loaders import read_table_file
    from predictor.features.realtime import push_events_with_settings

    if file is not None:
        events, first_row = read_table_file(file)
        source = str(file)
    elif user_id is not None and item_id is not None:
        events = pd.DataFrame(
            {"user_id": [user_id], "item_id": [item_id], "timestamp": [pd.Timestamp.now(tz="UTC")], "event_type": [event_type]}
        )
        source, first_row = "command line", 1
    else:
        raise typer.BadParameter("give --file, or both --user-id and --item-id")
    result = push_events_with_settings(events, state.settings, source, first_row)
    console.print(f"[green]pushed[/] {result.events} events for {result.users} users")


# --- demo -------------------------------------------------------------------------------------------
@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to generate.")] = 200_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """End to end on the active profile: data → features → Feast → online reads → real-time push."""
    from predictor.demo import run_demo

    run_demo(state.settings, console, n_events=events, seed=seed)


def main() -> None:
    from predictor.data.eventlog import UnknownItemError
    from predictor.data.schema import DataValidationError

    try:
        app()
    except (DataValidationError, UnknownItemError, FileNotFoundError) as exc:
        # bad input is the user's to fix: say what and where, without a traceback
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
