"""The `recsys` command: help for every subcommand, and the embedded workflow step by step."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from predictor.cli import app

runner = CliRunner()
SUBCOMMANDS = [
    [],
    ["data"],
    ["data", "load"],
    ["features"],
    ["features", "build"],
    ["features", "apply"],
    ["features", "materialize"],
    ["features", "online"],
    ["events"],
    ["events", "push"],
    ["events", "serve"],
    ["events", "consume"],
    ["demo"],
    ["train"],
    ["evaluate"],
    ["retrain"],
    ["serve"],
    ["operator"],
    ["operator", "run"],
]


def test_help_list_covers_every_command():
    import typer.main

    def walk(command, prefix):
        yield prefix
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*prefix, name])

    assert sorted(map(tuple, walk(typer.main.get_command(app), []))) == sorted(map(tuple, SUBCOMMANDS))


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c) or "recsys")
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_embedded_workflow(tmp_path):
    home = ["--home", str(tmp_path / "state"), "--profile", "embedded"]

    def run(*args):
        result = runner.invoke(app, [*home, *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert "2,000 events" in run("data", "load", "synthetic", "--events", "2000", "--seed", "3")
    assert "user_profile" in run("features", "build")
    run("features", "apply")
    run("features", "materialize")
    before = run("features", "online", "--user", "0")
    assert "recent_items" in before
    run("events", "push", "--user-id", "0", "--item-id", "5")
    after = run("features", "online", "--user", "0")
    # the table wraps at the runner's 80 columns, possibly inside the list: compare with spaces collapsed
    assert after != before and "[5, " in " ".join(after.split())


def test_bad_input_exits_2_with_message(tmp_path):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp\n1,2,2026-01-01\n1,x,2026-01-01\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "predictor.cli",
            "--home",
            str(tmp_path / "s"),
            "events",
            "push",
            "--file",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert f"error: {bad}, row 3, column 'item_id': expected an integer id, got 'x'" in " ".join(
        done.stderr.split()
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("profile", ["embedded", pytest.param("production", marks=pytest.mark.integration)])
def test_model_commands_train_evaluate_retrain(tmp_path, profile, request, monkeypatch):
    home = ["--home", str(tmp_path / "state"), "--profile", profile]
    if profile == "production":
        import uuid

        import redis

        from tests.conftest import REDIS_DB

        project = f"cli{uuid.uuid4().hex[:10]}"
        monkeypatch.setenv("RECSYS_PG_DATABASE", request.getfixturevalue("pg_database"))
        monkeypatch.setenv("RECSYS_FEAST_PROJECT", project)
        monkeypatch.setenv("RECSYS_REDIS_DB", str(REDIS_DB))

        def forget_online_rows():
            client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
            keys = [k for k in client.scan_iter(count=10_000) if project.encode() in k]
            if keys:
                client.delete(*keys)

        request.addfinalizer(forget_online_rows)

    def run(*args):
        result = runner.invoke(app, [*home, *args])
        assert result.exit_code == 0, result.output
        return result.output

    run("data", "load", "synthetic", "--events", "5000", "--seed", "4")
    run("features", "build", "--snapshot-every", "7D")
    bad = runner.invoke(app, [*home, "train", "--size", "tiny", "--model-option", "dims=8"])
    assert bad.exit_code == 2 and "ModelConfig has no field 'dims'" in bad.output
    # the small-catalog settings of the quality bench: exact softmax over every item, jittered windows
    trained = run(
        "train",
        "--size",
        "tiny",
        "--epochs",
        "2",
        "--model-option",
        "full_softmax_items=100000",
        "--train-option",
        "window_jitter=true",
    )
    assert "version 1" in trained and "(production)" in trained
    assert "full_softmax_items=100000 (set by the user)" in " ".join(trained.split())
    assert "nothing to do" in run("train", "--skip-if-production")  # a bootstrap job re-run is harmless
    assert "two_stage" in run("evaluate")
    # new events after the cutoff, then a retrain that must not be worse by more than 1.0 NDCG: promoted
    import pandas as pd

    events = tmp_path / "new.csv"
    now = pd.Timestamp.now(tz="UTC")
    pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2],
            "item_id": [3, 4, 5, 6],
            "timestamp": [now + pd.Timedelta(seconds=s) for s in range(4)],
        }
    ).to_csv(events, index=False)
    run("features", "apply")
    run("events", "push", "--file", str(events))
    run("features", "build", "--snapshot-every", "7D")
    assert "promoted version 2" in run("retrain", "--epochs", "1", "--tolerance", "1.0")
