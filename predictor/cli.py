"""``recsys``: one command in front of every job.

Global options pick the profile (embedded / production) and the state directory; each subcommand has
``--help``. The jobs themselves live in the modules they name; this file only adapts arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console

from predictor.config import Profile, Settings

app = typer.Typer(
    help="Real-time two-stage recommender: data, features, models, serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Load interaction data into the event log.", no_args_is_help=True)
features_app = typer.Typer(
    help="Batch features, Feast apply / materialize, online reads.", no_args_is_help=True
)
events_app = typer.Typer(help="Real-time events.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
operator_app = typer.Typer(help="The p99-driven LatencyAutoscaler operator.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(operator_app, name="operator")

console = Console()


class State:
    settings: Settings
    log_level: str | None = None


state = State()


@app.callback()
def main_options(
    profile: Annotated[
        Profile | None, typer.Option(help="Storage profile; default from RECSYS_PROFILE, else embedded.")
    ] = None,
    home: Annotated[
        Path | None, typer.Option(help="State directory; default from RECSYS_HOME, else .recsys.")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="Python log level; default WARNING, INFO for long-running servers.")
    ] = None,
) -> None:
    state.log_level = log_level
    logging.basicConfig(
        level=(log_level or "WARNING").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {k: v for k, v in {"profile": profile, "home": home}.items() if v is not None}
    state.settings = Settings(**overrides)


# --- data -------------------------------------------------------------------------------------------
@data_app.command("load")
def data_load(
    dataset: Annotated[
        str, typer.Argument(help="synthetic, ml-100k, ml-latest-small, or a CSV/Parquet path")
    ] = "synthetic",
    data_dir: Annotated[
        Path | None, typer.Option(help="Where MovieLens lies (default ../shared/data).")
    ] = None,
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
        str | None,
        typer.Option(help="Also write history snapshots at this frequency (e.g. 1D) for training."),
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
    end: Annotated[datetime | None, typer.Option(help="End of the interval (UTC); default now.")] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="Load every online view's whole range, not only rows since the last run."
        ),
    ] = False,
) -> None:
    """Load new offline rows into the online store (feast materialize-incremental), or the whole range when
    --full is given or the online store lost what the registry says it holds (a Redis wiped by a restart)."""
    from predictor.features.store import materialize

    end = (end.replace(tzinfo=timezone.utc) if end and end.tzinfo is None else end) or datetime.now(
        timezone.utc
    )
    started = time.perf_counter()
    lost = materialize(state.settings, end, full=full)
    if lost:
        console.print(f"[yellow]the online store had lost[/] {', '.join(lost)}: reloaded the full range")
    console.print(
        f"[green]materialized[/] up to {end:%Y-%m-%d %H:%M:%S} ({'full' if full or lost else 'incremental'}) "
        f"in {time.perf_counter() - started:.1f} s"
    )


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
    user_id: Annotated[int | None, typer.Option(help="User of a single event.")] = None,
    item_id: Annotated[int | None, typer.Option(help="Item of a single event.")] = None,
    event_type: Annotated[str, typer.Option(help="Event type of a single event.")] = "click",
    file: Annotated[
        Path | None,
        typer.Option(help="CSV or Parquet file of events (canonical columns) to push as one batch."),
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
            {
                "user_id": [user_id],
                "item_id": [item_id],
                "timestamp": [pd.Timestamp.now(tz="UTC")],
                "event_type": [event_type],
            }
        )
        source, first_row = "command line", 1
    else:
        raise typer.BadParameter("give --file, or both --user-id and --item-id")
    result = push_events_with_settings(events, state.settings, source, first_row)
    console.print(f"[green]pushed[/] {result.events} events for {result.users} users")


@events_app.command("serve")
def events_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="HTTP port.", envvar="RECSYS_EVENTS_HTTP_PORT")] = 8090,
) -> None:
    """Run the event ingestion service: POST /v1/events (a JSON array of events). Production profile:
    published to NATS JetStream for `recsys events consume`; embedded profile: applied directly."""
    import uvicorn

    from predictor.events.service import ingest_app

    uvicorn.run(
        ingest_app(state.settings),
        host=host,
        port=port,
        log_level=(state.log_level or "info").lower(),
        access_log=False,
    )


@events_app.command("consume")
def events_consume(
    host: Annotated[str, typer.Option(help="Address of the probe and metrics endpoints.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="HTTP port of /healthz, /readyz, /metrics.")] = 8091,
    fetch_batch: Annotated[
        int, typer.Option(min=1, max=10_000, help="Stream messages applied per database transaction.")
    ] = 256,
) -> None:
    """Apply events from the JetStream stream to the event log and the online store (a durable pull
    consumer: run several to scale out; each event is applied once, on its event_id)."""
    import uvicorn

    from predictor.events.service import consumer_app

    try:
        app_ = consumer_app(state.settings, fetch_batch)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    uvicorn.run(app_, host=host, port=port, log_level=(state.log_level or "info").lower(), access_log=False)


# --- models -----------------------------------------------------------------------------------------
def _offline_user_profile(settings: Settings):
    from predictor.features.offline import read_offline
    from predictor.features.schema import USER_PROFILE

    try:
        profile = read_offline(USER_PROFILE, settings)
    except Exception as exc:  # missing file or table: say what to run
        raise typer.BadParameter(
            f"no offline user_profile table ({exc.__class__.__name__}); "
            "run `recsys features build --snapshot-every 1D`"
        ) from exc
    if profile["event_timestamp"].nunique() < 2:
        console.print(
            "[yellow]warning:[/] user_profile has one snapshot; `recsys features build --snapshot-every 1D` "
            "gives training point-in-time history"
        )
    return profile


@app.command()
def train(
    size: Annotated[str, typer.Option(help="Model size: tiny, small, base, large.")] = "small",
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Maximum retrieval epochs (early stopping on validation NDCG@10); default chosen from the"
            " data: 60, fewer where the exact softmax would exceed the training budget."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    features: Annotated[bool, typer.Option(help="Join the offline user features point-in-time.")] = True,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Write a checkpoint every epoch here.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --checkpoint-dir.")] = False,
    promote: Annotated[bool, typer.Option(help="Promote the new version to production.")] = True,
    skip_if_production: Annotated[
        bool, typer.Option(help="Do nothing when a production model exists (a first-install bootstrap job).")
    ] = False,
    model_option: Annotated[
        list[str] | None,
        typer.Option(
            help="Override a model setting, KEY=VALUE (repeatable), e.g. dim=128 or full_softmax_items=50000."
        ),
    ] = None,
    train_option: Annotated[
        list[str] | None,
        typer.Option(
            help="Override a training setting, KEY=VALUE (repeatable), e.g. window_jitter=true or lr=0.003."
        ),
    ] = None,
) -> None:
    """Train the two-stage model on the event log, register it and (by default) promote it."""
    from predictor.data.eventlog import EventLog
    from predictor.models.config import ModelConfig, TrainConfig, model_config, parse_overrides
    from predictor.models.defaults import choose, describe
    from predictor.models.lifecycle import train_and_register
    from predictor.models.registry import ModelRegistry

    settings = state.settings
    if resume and checkpoint_dir is None:
        raise typer.BadParameter("--resume needs --checkpoint-dir")
    try:
        model_overrides = parse_overrides(model_option or [], ModelConfig)
        train_overrides = parse_overrides(train_option or [], TrainConfig)
        (
            model_config(size, **model_overrides),
            TrainConfig(**train_overrides),
        )  # bad options fail before the read
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if skip_if_production:
        from predictor.models.lifecycle import MODEL_NAME

        production = ModelRegistry(settings.database_url).production(MODEL_NAME)
        if production is not None:
            console.print(f"version {production.version} is in production already: nothing to do")
            return
    data = EventLog(settings.database_url).read()
    if epochs is not None:
        train_overrides["epochs"] = epochs
    config, train_config, chosen = choose(
        len(data.items), len(data.events), size, model_overrides, train_overrides
    )
    train_config = dataclasses.replace(train_config, seed=seed)
    console.print(describe(config, train_config, chosen))
    profile = _offline_user_profile(settings) if features else None
    version, metrics = train_and_register(
        data,
        ModelRegistry(settings.database_url),
        settings.artifacts_uri,
        config,
        train_config,
        profile,
        checkpoint_dir,
        resume,
        promote,
        settings_chosen=chosen,
    )
    if version is None:
        return  # a non-zero torchrun rank: rank 0 reports
    console.print(f"[green]version {version.version}[/] ({version.status}) at {version.artifact_uri}")
    console.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "users"))


def _model_on_event_log(settings: Settings, model: str | None):
    """(artifact URI, model, split): ``model`` or the production version, pointed at the event log's split."""
    from predictor.data.eventlog import EventLog
    from predictor.models.data import build_split
    from predictor.models.lifecycle import MODEL_NAME
    from predictor.models.recommender import TwoStageRecommender
    from predictor.models.registry import ModelRegistry

    if model is None:
        production = ModelRegistry(settings.database_url).production(MODEL_NAME)
        if production is None:
            raise typer.BadParameter("no production model: run `recsys train` or pass --model")
        model = production.artifact_uri
    recommender = TwoStageRecommender.load(model)
    split = build_split(
        EventLog(settings.database_url).read(),
        users=recommender.catalog.users,
        items=recommender.catalog.items,
    )
    recommender.prepare(split, _offline_user_profile(settings) if recommender.uses_user_features else None)
    return model, recommender, split


@app.command()
def evaluate(
    model: Annotated[str | None, typer.Option(help="Artifact URI; default the production version.")] = None,
    baselines: Annotated[bool, typer.Option(help="Also run popularity and tuned implicit ALS/BPR.")] = False,
    output: Annotated[Path | None, typer.Option(help="Write the metrics as JSON here.")] = None,
) -> None:
    """Full-ranking evaluation on the event log's leave-last-out test split."""
    import json

    from predictor.models.compare import print_report
    from predictor.models.evaluate import Popularity, tune_implicit
    from predictor.models.evaluate import evaluate as run_evaluation

    model, recommender, split = _model_on_event_log(state.settings, model)
    report = {
        "model": model,
        "results": {"two_stage": run_evaluation(recommender.rank(split), split, "test")},
        "seconds": {},
    }
    if baselines:
        report["results"]["popularity"] = run_evaluation(
            Popularity().fit(split, "test").rank(split), split, "test"
        )
        for kind in ("als", "bpr"):
            fitted, _, _ = tune_implicit(kind, split)
            report["results"][f"implicit_{kind}"] = run_evaluation(fitted.rank(split), split, "test")
    print_report(report, console)
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")


@app.command()
def retrain(
    tolerance: Annotated[
        float, typer.Option(help="Promote unless NDCG@10 is worse than production by more.")
    ] = 0.005,
    replay: Annotated[
        float, typer.Option(help="Share of unchanged users replayed with the new events.")
    ] = 0.2,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Warm-start from production on new events, compare on a fresh holdout, promote only if not worse."""
    from predictor.data.eventlog import EventLog
    from predictor.models.lifecycle import retrain as run_retrain
    from predictor.models.registry import ModelRegistry

    settings = state.settings
    data = EventLog(settings.database_url).read()
    profile = _offline_user_profile(settings)
    result = run_retrain(
        data,
        ModelRegistry(settings.database_url),
        settings.artifacts_uri,
        profile,
        tolerance,
        replay,
        epochs,
        seed,
    )
    verdict = "[green]promoted[/]" if result.promoted else "[yellow]rejected[/]"
    console.print(f"{verdict} version {result.candidate.version}: {result.reason}")


# --- demo -------------------------------------------------------------------------------------------
@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to generate.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[str, typer.Option(help="Model size: tiny, small, base, large.")] = "small",
    epochs: Annotated[int, typer.Option(help="Maximum retrieval epochs.")] = 6,
) -> None:
    """End to end on the active profile: data → features → Feast → train → KServe predictor → recommendations
    → real-time events → changed recommendations."""
    from predictor.demo import run_demo

    run_demo(state.settings, console, n_events=events, seed=seed, size=size, epochs=epochs)


@app.command()
def serve(
    port: Annotated[
        int, typer.Option(help="HTTP port (RECSYS_SERVE_HTTP_PORT).", envvar="RECSYS_SERVE_HTTP_PORT")
    ] = 8080,
    model_name: Annotated[
        str,
        typer.Option(
            help="Name in the KServe URLs (/v1/models/NAME:predict).", envvar="RECSYS_SERVE_MODEL_NAME"
        ),
    ] = "recsys",
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="Serve this artifact; default: the registry's production "
            "model, hot-swapped when a new one is promoted.",
            envvar="RECSYS_SERVE_MODEL_URI",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="cpu or cuda[:N]; default CUDA when present.", envvar="RECSYS_SERVE_DEVICE"),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, or int8 (CPU ranker).",
            envvar="RECSYS_SERVE_PRECISION",
        ),
    ] = "auto",
    max_batch: Annotated[
        int,
        typer.Option(
            help="Users per model call; 1 turns micro-batching off.", envvar="RECSYS_SERVE_MAX_BATCH"
        ),
    ] = 32,
) -> None:
    """Run the KServe predictor (V1 and V2 REST) until stopped. Other settings: RECSYS_SERVE_* variables
    (see predictor/serving/settings.py: ServeSettings)."""
    from predictor.serving.server import serve as run_server
    from predictor.serving.settings import ServeSettings

    options = ServeSettings(
        http_port=port,
        model_name=model_name,
        model_uri=model_uri,
        device=device,
        precision=precision,
        max_batch=max_batch,
    )
    run_server(state.settings, options, log_level=state.log_level or "INFO")


@operator_app.command("run")
def operator_run(
    namespace: Annotated[
        list[str] | None,
        typer.Option(help="Watch only these namespaces (repeatable); default: the whole cluster."),
    ] = None,
    peering: Annotated[
        str, typer.Option(help="kopf peering object used for leader election between replicas.")
    ] = "recsys-operator",
    standalone: Annotated[bool, typer.Option(help="No peering: this is the only operator instance.")] = False,
    priority: Annotated[
        int | None,
        typer.Option(
            help="Peering priority; default: a random one, so that one replica leads and the others stand by."
        ),
    ] = None,
    liveness: Annotated[
        str, typer.Option(help="Health endpoint to serve (kopf's liveness probe).")
    ] = "http://0.0.0.0:8080/healthz",
) -> None:
    """Run the LatencyAutoscaler operator (kopf) until stopped: scales the predictor on p99 latency and takes
    slow replicas out of rotation. Needs the CRDs (charts/recsys/crds/) and in-cluster or kubeconfig
    access."""
    from operators.run import run

    run(
        namespace or [],
        None if standalone else peering,
        priority,
        liveness,
        verbose=(state.log_level or "INFO").upper() == "DEBUG",
    )


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
