"""`recsys train` under torchrun: 2 CPU processes (gloo) reach the same quality as 1 process, within noise."""

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from predictor.cli import app


def test_two_processes_match_one(tmp_path):
    home = str(tmp_path / "state")
    runner = CliRunner()
    for args in (
        ["data", "load", "synthetic", "--events", "20000", "--seed", "5"],
        ["features", "build", "--snapshot-every", "7D"],
    ):
        result = runner.invoke(app, ["--home", home, *args])
        assert result.exit_code == 0, result.output

    train = ["train", "--size", "tiny", "--epochs", "6", "--no-promote", "--seed", "3"]

    def ndcg(command):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        found = re.findall(r"test: recall@10 [0-9.]+, ndcg@10 ([0-9.]+)", " ".join(done.stdout.split()))
        assert len(found) == 1, done.stdout  # one report: only rank 0 registers and prints
        return float(found[0])

    single = ndcg([sys.executable, "-m", "predictor.cli", "--home", home, *train])
    double = ndcg(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "predictor.cli",
            "--home",
            home,
            *train,
        ]
    )
    assert single > 0.02  # it learned something on this data
    assert double == pytest.approx(single, rel=0.25, abs=0.01)
