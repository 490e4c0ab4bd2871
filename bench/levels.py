"""The price of each rung of the serving quality ladder: test NDCG@10 per level, same model, MovieLens.

    python bench/levels.py                       # both datasets, seeds 0 1 2
    python bench/levels.py --datasets ml-100k --seeds 0

Per dataset and seed: the temporal leave-last-out split, the two-stage model fitted with the settings
``choose`` picks from the data and 60 epochs at most (what ``recsys train`` does with no options), then the
test split ranked at every level of the ladder (``predictor.models.inference.LEVELS``) through the one
inference path that serves: "full" (ranker over the model's candidates), "reduced" (ranker over a quarter of
them), "retrieval" (retrieval order), "popularity" (training popularity, seen items excluded). "full" and
"reduced" run the trained ranker whether or not validation chose it; the report says which level the model's
own ladder starts at. Writes ``bench/results/levels.json`` (a run of some datasets keeps the others'):
{"datasets": {NAME: {"command", "levels": {LEVEL: {"ndcg@10": {"mean", "sd"}, "recall@10": ...}},
"drop_vs_top": {LEVEL: mean relative NDCG@10 loss against the model's top level}, "runs": [...]}}} and the
table in ``docs/serving.md`` between its markers.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from predictor.data.loaders import load_dataset
from predictor.models.data import build_split, user_feature_snapshots
from predictor.models.defaults import choose
from predictor.models.evaluate import evaluate
from predictor.models.inference import LEVELS
from predictor.models.recommender import TwoStageRecommender

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "levels.json"
DOC = ROOT / "docs" / "serving.md"
MARKERS = ("<!-- levels:start -->", "<!-- levels:end -->")
METRICS = ("ndcg@10", "recall@10")


def one_run(dataset: str, seed: int, data_dir: str | None, epochs: int) -> dict:
    data = load_dataset(dataset, data_dir)
    config, train, _ = choose(len(data.items), len(data.events))
    train = replace(train, seed=seed, epochs=epochs)
    split = build_split(data)
    started = time.perf_counter()
    model = TwoStageRecommender(config, train).fit(split, user_feature_snapshots(data), progress=True)
    fit_s = time.perf_counter() - started
    results = {}
    for level in LEVELS:
        metrics = evaluate(model.rank(split, level=level), split, "test")
        results[level] = {m: float(metrics[m]) for m in METRICS}
    return {
        "seed": seed,
        "fit_s": round(fit_s, 1),
        "uses_ranker": bool(model.use_ranker),
        "candidates": model.candidates,
        "reduced_candidates": model.inference().reduced_candidates,
        "levels": results,
    }


def summarise(runs: list[dict]) -> dict:
    def stats(values):
        return {
            "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        }

    levels = {lv: {m: stats([r["levels"][lv][m] for r in runs]) for m in METRICS} for lv in LEVELS}
    # the loss against the level the model's own ladder starts at (full where the ranker serves)
    drops = {lv: [] for lv in LEVELS}
    for r in runs:
        top = r["levels"]["full" if r["uses_ranker"] else "retrieval"]["ndcg@10"]
        for lv in LEVELS:
            drops[lv].append(1.0 - r["levels"][lv]["ndcg@10"] / top if top else 0.0)
    return {
        "levels": levels,
        "drop_vs_top": {lv: float(np.mean(v)) for lv, v in drops.items()},
        "ranker_serves": [r["uses_ranker"] for r in runs],
        "runs": runs,
    }


def markdown(report: dict) -> str:
    lines = [
        "| dataset | " + " | ".join(f"{lv} NDCG@10" for lv in LEVELS) + " | ranker serves (of seeds) |",
        "|---|" + "---|" * (len(LEVELS) + 1),
    ]
    for name, d in report["datasets"].items():
        seeds = len(d["runs"])
        cells = [
            f"{d['levels'][lv]['ndcg@10']['mean']:.4f}"
            + (f" ± {d['levels'][lv]['ndcg@10']['sd']:.4f}" if seeds > 1 else "")
            + f" ({-100 * d['drop_vs_top'][lv]:+.0f} %)"
            for lv in LEVELS
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {sum(d['ranker_serves'])} of {len(d['runs'])} |"
        )
    return "\n".join(lines)


def write_doc(table: str, command: str) -> None:
    text = DOC.read_text()
    block = (
        f"{MARKERS[0]}\n{table}\n\n{command}; mean ± sd over seeds (one seed: the value), in brackets the "
        f"change against the level the model's ladder starts at.\n{MARKERS[1]}"
    )
    if MARKERS[0] in text:
        text = re.sub(
            re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), lambda _: block, text, flags=re.DOTALL
        )
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-latest-small"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--epochs", type=int, default=60, help="maximum retrieval epochs (recsys train's default)"
    )
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--render", action="store_true", help="only rewrite the docs table from --out")
    args = parser.parse_args()
    console = Console()
    out = Path(args.out)
    if args.render:
        report = json.loads(out.read_text())
    else:
        # a run of some datasets keeps the others' results from an earlier run
        report = json.loads(out.read_text()) if out.is_file() else {"datasets": {}}
        for dataset in args.datasets:
            command = (
                f"python bench/levels.py --datasets {dataset} --seeds "
                + " ".join(map(str, args.seeds))
                + (f" --epochs {args.epochs}" if args.epochs != 60 else "")
            )
            runs = []
            for seed in args.seeds:
                runs.append(one_run(dataset, seed, args.data_dir, args.epochs))
                console.print(
                    f"{dataset} seed {seed}: "
                    + ", ".join(f"{lv} {runs[-1]['levels'][lv]['ndcg@10']:.4f}" for lv in LEVELS)
                    + f" (ranker serves: {runs[-1]['uses_ranker']}, fit {runs[-1]['fit_s']:.0f} s)"
                )
            report["datasets"][dataset] = {"command": command, **summarise(runs)}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(report, indent=2) + "\n"
            )  # after every dataset: a long run keeps its part
    table = Table("dataset", *LEVELS)
    for name, d in report["datasets"].items():
        table.add_row(
            name,
            *(
                f"{d['levels'][lv]['ndcg@10']['mean']:.4f} ± {d['levels'][lv]['ndcg@10']['sd']:.4f}"
                for lv in LEVELS
            ),
        )
    console.print(table)
    write_doc(markdown(report), "; ".join(f"`{d['command']}`" for d in report["datasets"].values()))
    console.print(f"wrote {out} and the table in {DOC}")


if __name__ == "__main__":
    main()
