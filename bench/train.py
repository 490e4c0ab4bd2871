"""Training benchmark: speed against a baseline revision in the same run, time to the quality bar, wall times.

    python bench/train.py                       # speed of this tree, curve, MovieLens latest-small wall time
    python bench/train.py --baseline REV        # also the same speed probes on git revision REV, same run

Speed probes (each in a fresh process, so peak RSS is its own; the baseline runs this file's probes
against REV's ``predictor`` package from a git worktree):

* MovieLens-100K, ``small``, 3 retrieval epochs + 1 ranker epoch: retrieval labels/s and fit wall seconds;
* a 200,000-event synthetic log (default catalog), ``small``, 2 retrieval epochs + 1 ranker epoch: fit
  wall seconds.

And a compute ceiling in the same run (``compute_floor``): the ``small`` model's matmul FLOPs per training
label on MovieLens-100K over this machine's best matmul rate, against which the labels/s stand.

Then, this tree only: the default fit on MovieLens-100K with its validation curve against tuned implicit
ALS (quality bar: validation NDCG@10 ≥ 1.1 × ALS's; plot ``docs/img/training-curve.png``), and the default
``recsys train`` work on MovieLens latest-small end to end (split, feature snapshots, fit, test
evaluation). Writes ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_probe(name: str) -> dict:
    """One probe in this process, through APIs every revision has (``TwoStageRecommender.fit``)."""
    import torch

    from predictor.data.loaders import load_dataset
    from predictor.data.synthetic import generate
    from predictor.models.config import TrainConfig, model_config
    from predictor.models.data import build_split, user_feature_snapshots
    from predictor.models.recommender import TwoStageRecommender

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    loaders = {
        "ml-100k": lambda: load_dataset("ml-100k"),
        "synthetic-200k": lambda: generate(n_events=200_000, seed=0),
        "latest-small-exact": lambda: load_dataset("ml-latest-small"),
    }
    data = loaders[name]()
    epochs = {"ml-100k": 3, "synthetic-200k": 2, "latest-small-exact": 3}[name]
    ranker_epochs = 0 if name == "latest-small-exact" else 1
    split = build_split(data)
    profile = user_feature_snapshots(data)
    prepared = time.perf_counter() - started
    # --precision reaches this tree's probes only (a baseline revision may predate the field)
    precision = (
        {"precision": os.environ["RECSYS_BENCH_PRECISION"]} if "RECSYS_BENCH_PRECISION" in os.environ else {}
    )
    config, train = (
        model_config("small"),
        TrainConfig(epochs=epochs, min_epochs=epochs, ranker_epochs=1, seed=0, **precision),
    )
    if name == "latest-small-exact":
        from predictor.models.defaults import EXACT_SOFTMAX_SETTINGS as SWEEP

        config = model_config("small", full_softmax_items=split.n_items, **SWEEP["model"])
        train = TrainConfig(
            epochs=epochs, min_epochs=epochs, ranker_epochs=0, seed=0, **SWEEP["train"], **precision
        )
    model = TwoStageRecommender(config, train)
    started = time.perf_counter()
    model.fit(split, profile, progress=False)
    fit_s = time.perf_counter() - started
    history = model.history.retrieval
    labels = sum(e["examples"] for e in history)
    seconds = sum(e["seconds"] for e in history)
    return {
        "probe": name,
        "events": len(data.events),
        "items": split.n_items,
        "retrieval_epochs": epochs,
        "ranker_epochs": ranker_epochs,
        "split_and_features_s": prepared,
        "fit_s": fit_s,
        "retrieval_labels_per_s": labels / seconds,
        "retrieval_train_s": seconds,
        "retrieval_seconds_per_epoch": seconds / epochs,
        "validation_ndcg@10": [e["validation_ndcg@10"] for e in history],
        "peak_rss_mb": peak_rss_mb(),
        # revisions before TrainConfig.precision trained in fp32
        "precision": getattr(model.history, "precision", "fp32"),
    }


def compute_floor() -> dict:
    """How fast this machine could train the ``small`` model on MovieLens-100K at best: the matrix-multiply
    FLOPs of one training step (forward and backward, counted by ``torch.utils.flop_counter``; the
    element-wise work comes on top) per label, and the best matmul rate of this machine, measured now on
    the step's own largest shape and on a 1,024³ product. Their ratio is a ceiling on labels/s that no
    implementation of this model and batch exceeds on this CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from predictor.data.loaders import load_dataset
    from predictor.models.config import TrainConfig, model_config
    from predictor.models.data import build_split
    from predictor.models.recommender import TwoStageRecommender
    from predictor.models.training import TrainingBatches, retrieval_loss
    from predictor.models.windows import training_windows

    torch.set_num_threads(os.cpu_count() or 1)
    split = build_split(load_dataset("ml-100k"))
    model = TwoStageRecommender(
        model_config("small"),
        TrainConfig(epochs=1, min_epochs=1, ranker_epochs=0, max_examples_per_epoch=256),
    )
    model.fit(split, None, progress=False)  # builds the tables a step reads
    users, ends = training_windows(split, model.config.max_history)
    rows = np.random.default_rng(0).permutation(len(users))[: model.train_config.batch_size]
    batches = TrainingBatches(split, model.config.max_history, None, model.device)
    window, targets, udense, layout, labels = batches.windows(split, users[rows], ends[rows])
    popularity = torch.as_tensor(split.item_popularity, dtype=torch.float32)
    p_item = (popularity + 1.0) / (popularity + 1.0).sum()
    model.retrieval.train()
    with FlopCounterMode(display=False) as counter:
        item_tables = (model.item_cats, model.item_dense)
        loss = retrieval_loss(
            model.config,
            split.n_items,
            model.retrieval,
            (window, targets, udense),
            item_tables,
            p_item,
            layout=layout,
        )
        loss.backward()
    flops_per_label = counter.get_total_flops() / labels
    packing = {"windows": len(rows), "rows": len(window), "max_history": model.config.max_history}

    def best_gflops(m: int, k: int, n: int, repeats: int = 30) -> float:
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        return 2 * m * k * n / best / 1e9

    tokens = labels if labels else window.numel()
    peak = max(best_gflops(tokens, 64, 256), best_gflops(1024, 1024, 1024))
    return {
        "matmul_flops_per_label": flops_per_label,
        "labels_per_step": labels,
        # the step's windows packed into rows (TrainingBatches.windows): rows x max_history token slots
        "packed": packing,
        "best_matmul_gflops": peak,
        "labels_per_s_ceiling": peak * 1e9 / flops_per_label,
    }


# the default probes; "latest-small-exact" (latest-small's exact softmax with the settings that met the
# quality bar there, for what an epoch of it costs) runs only when asked for: older revisions lack them
PROBES = ("ml-100k", "synthetic-200k")


def run_probes(package_root: Path, probes: tuple[str, ...] = PROBES, precision: str | None = None) -> dict:
    """Each of ``probes``, each in a fresh process importing ``predictor`` from ``package_root``, training at
    ``TrainConfig.precision`` = ``precision`` (None: that revision's default)."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "RECSYS_DATA_DIR": str(data_dir())}
    env.pop("RECSYS_BENCH_PRECISION", None)
    if precision:
        env["RECSYS_BENCH_PRECISION"] = precision
    out = {}
    for name in probes:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            done = subprocess.run(
                [sys.executable, __file__, "--probe", name, "--probe-out", result.name],
                env=env,
                cwd=package_root,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"probe {name} at {package_root} failed:\n{done.stderr[-3000:]}")
            out[name] = json.loads(Path(result.name).read_text())
    return out


def median_probes(rounds: list[dict]) -> dict:
    """Per probe, the median over rounds of each number (lists, such as the validation curve, from round 1),
    and the per-round values of the numbers under ``per_round``."""
    out = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        merged = {
            k: (float(np.median([r[k] for r in runs])) if isinstance(v, int | float) else v)
            for k, v in runs[0].items()
        }
        merged["per_round"] = {k: [r[k] for r in runs] for k, v in runs[0].items() if isinstance(v, float)}
        out[name] = merged
    return out


def kernels() -> dict:
    """The training step's two hand-written kernels against what they replace, same run, medians of 7:
    the blocked softmax cross-entropy (``two_tower.exact_softmax_loss``) against ``F.cross_entropy`` over the
    written-out logits, forward and backward, at latest-small's exact-softmax shape (5,699 labels of a
    128-window batch × 9,742 items, dim 128); and ``MaskDropout`` against a ``torch.rand`` mask and
    torch's bernoulli kernel (``F.dropout``) on a ``[128, 50, 256]`` feed-forward activation, forward and
    backward; the ``small`` user encoder's self-attention (``[128, 50, 64]``, 2 heads, causal, dropout 0.2),
    forward and backward, ``MaskDropoutAttention`` against ``nn.MultiheadAttention`` (the same weights; its
    dropout is torch's bernoulli kernel inside ``scaled_dot_product_attention``); the sampled loss's
    accidental hits excluded from a MovieLens-100K step's logits (5,245 labels × 1,024 in-batch negatives,
    the labels drawn from its item popularity), a comparison and fill per 1,024-row block against
    ``two_tower.equal_pairs`` and a fill of the pairs; and one AdamW step over
    the default ranker's parameters at latest-small's catalog (9,742 items, dim 128), torch's per-tensor
    loop against its fused kernel (``training.adamw``)."""
    import torch
    import torch.nn.functional as F

    from predictor.data.loaders import load_dataset
    from predictor.models.config import model_config
    from predictor.models.data import build_split
    from predictor.models.ranker import Ranker
    from predictor.models.two_tower import MaskDropout, MaskDropoutAttention, equal_pairs, exact_softmax_loss

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    users = F.normalize(torch.randn(5_699, 128, generator=g), dim=1).requires_grad_()
    items = F.normalize(torch.randn(9_742, 128, generator=g), dim=1).requires_grad_()
    labels = torch.randint(0, 9_742, (5_699,), generator=g)
    x = torch.randn(128, 50, 256, requires_grad=True)
    drop = MaskDropout(0.2).train()

    def median_ms(fn, repeats: int = 7) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return float(np.median(times)) * 1000

    def step(loss_fn):
        torch.autograd.grad(loss_fn(), (users, items))

    written_out = median_ms(lambda: step(lambda: F.cross_entropy(users @ items.T / 0.1, labels)))
    blocked = median_ms(lambda: step(lambda: exact_softmax_loss(users, items, labels, 0.1)))
    ones = torch.ones_like(x)
    ours = median_ms(lambda: drop(x).backward(ones), 30)
    rand = median_ms(lambda: (x * (torch.rand_like(x) >= 0.2) * 1.25).backward(ones), 30)
    bernoulli = median_ms(lambda: F.dropout(x, 0.2, training=True).backward(ones), 30)
    attention_ms = {}
    for name, attention in (
        ("nn.MultiheadAttention", torch.nn.MultiheadAttention(64, 2, dropout=0.2, batch_first=True)),
        ("MaskDropoutAttention", MaskDropoutAttention(64, 2, 0.2)),
    ):
        h = torch.randn(128, 50, 64, generator=g, requires_grad=True)
        causal = torch.triu(torch.full((50, 50), float("-inf")), diagonal=1)

        def attend(attention=attention, h=h, causal=causal):
            out = attention(h, h, h, need_weights=False, attn_mask=causal, is_causal=True)[0]
            out.sum().backward()

        attention.train()
        attention_ms[name] = median_ms(attend, 30)
    popularity = torch.as_tensor(build_split(load_dataset("ml-100k")).item_popularity, dtype=torch.float)
    own = torch.multinomial(popularity + 1e-9, 5_245, replacement=True, generator=g)
    excluded = own[torch.randperm(len(own), generator=g)[:1_024]]
    logits = torch.randn(len(own), len(excluded), generator=g)

    def dense_mask():
        for s in range(0, len(own), 1_024):
            logits[s : s + 1_024].masked_fill_(excluded[None, :] == own[s : s + 1_024, None], float("-inf"))

    def pairs_mask():
        rows, columns = equal_pairs(own, excluded)
        logits[rows, columns] = float("-inf")

    excluded_ms = {"compare and fill": median_ms(dense_mask, 30), "equal_pairs": median_ms(pairs_mask, 30)}
    ranker = Ranker(model_config("small", dim=128), 9_743, 20, 8, 8)
    for parameter in ranker.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=g)
    optimizer_ms = {}
    for name, options in (("per tensor", {"foreach": False}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(ranker.parameters(), lr=1e-3, weight_decay=1e-3, **options)
        optimizer_ms[name] = median_ms(optimizer.step, 30)
    return {
        "exact_loss_ms": {"F.cross_entropy": written_out, "blocked": blocked, "ratio": written_out / blocked},
        "dropout_ms": {
            "torch.rand": rand,
            "bernoulli (F.dropout)": bernoulli,
            "MaskDropout": ours,
            "rand_ratio": rand / ours,
            "bernoulli_ratio": bernoulli / ours,
        },
        "attention_ms": {
            **attention_ms,
            "ratio": attention_ms["nn.MultiheadAttention"] / attention_ms["MaskDropoutAttention"],
        },
        "excluded_mask_ms": {
            **excluded_ms,
            "ratio": excluded_ms["compare and fill"] / excluded_ms["equal_pairs"],
        },
        "adamw_step_ms": {**optimizer_ms, "ratio": optimizer_ms["per tensor"] / optimizer_ms["fused"]},
    }


def data_dir() -> Path:
    from predictor.data.loaders import default_data_dir

    return default_data_dir()


def curve_and_wall(console) -> dict:
    """This tree: the default ml-100k fit against tuned ALS, and the default latest-small fit's wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from predictor.data.loaders import load_dataset
    from predictor.models.data import build_split, user_feature_snapshots
    from predictor.models.defaults import choose
    from predictor.models.evaluate import ImplicitModel, evaluate, tune_implicit
    from predictor.models.recommender import TwoStageRecommender

    def default_model(data) -> TwoStageRecommender:  # `recsys train` with no options: settings from the data
        config, train, chosen = choose(len(data.items), len(data.events))
        model = TwoStageRecommender(config, replace(train, seed=0))
        model.settings_chosen = chosen
        return model

    data = load_dataset("ml-100k")
    split = build_split(data)
    _, als_params, trials = tune_implicit("als", split, seed=0)
    als_validation = max(m["ndcg@10"] for _, m in trials)
    started = time.perf_counter()
    ImplicitModel("als", als_params, 0).fit(split, "validation")
    als_fit_s = time.perf_counter() - started
    bar = 1.1 * als_validation
    model = default_model(data)
    started = time.perf_counter()
    model.fit(split, user_feature_snapshots(data), progress=False)
    fit_s = time.perf_counter() - started
    elapsed, time_to_bar, curve = 0.0, None, []
    for epoch in model.history.retrieval:
        elapsed += epoch["seconds"]
        curve.append(
            {"seconds": elapsed, "validation_ndcg@10": epoch["validation_ndcg@10"], "loss": epoch["loss"]}
        )
        if time_to_bar is None and epoch["validation_ndcg@10"] >= bar:
            time_to_bar = elapsed
    ml100k = {
        "fit_s": fit_s,
        "retrieval_epochs": len(curve),
        "time_to_quality_bar_s": time_to_bar,
        "quality_bar_validation_ndcg@10": bar,
        "implicit_als": {
            "params": als_params,
            "fit_seconds": als_fit_s,
            "validation_ndcg@10": als_validation,
        },
        "two_stage_test": evaluate(model.rank(split), split, "test"),
        "settings_chosen": model.settings_chosen,
        "curve": curve,
    }

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [c["seconds"] for c in curve],
        [c["validation_ndcg@10"] for c in curve],
        marker="o",
        ms=3,
        label="two-tower retrieval (validation)",
    )
    ax.axhline(als_validation, color="grey", ls="--", label=f"tuned implicit ALS ({als_fit_s:.1f} s fit)")
    ax.axhline(bar, color="red", ls=":", label="quality bar (1.1 × ALS)")
    ax.set_xlabel(f"training seconds ({os.cpu_count()} CPU cores)")
    ax.set_ylabel("validation NDCG@10 (full ranking)")
    ax.set_title("ml-100k: retrieval training curve, default settings")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    png = ROOT / "docs" / "img" / "training-curve.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    console.print(
        f"ml-100k default fit {fit_s:.0f} s, time to bar {time_to_bar} s (ALS fit {als_fit_s:.2f} s)"
    )

    started = time.perf_counter()  # what `recsys train` does with its defaults, minus the registry write
    data = load_dataset("ml-latest-small")
    split = build_split(data)
    model = default_model(data)
    model.fit(split, user_feature_snapshots(data), progress=False)
    test = evaluate(model.rank(split), split, "test")
    wall = time.perf_counter() - started
    console.print(f"ml-latest-small default train end to end: {wall:.0f} s")
    return {
        "ml-100k_default_fit": ml100k,
        "ml-latest-small_default_train": {
            "wall_s": wall,
            "retrieval_epochs": len(model.history.retrieval),
            "settings_chosen": model.settings_chosen,
            "ranker_served": model.use_ranker,
            "test": test,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision whose speed probes run in the same run")
    parser.add_argument("--skip-curve", action="store_true", help="speed probes only")
    parser.add_argument(
        "--probes", nargs="+", choices=PROBES, default=list(PROBES), help="speed probes to run"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the probes this many times, alternating the trees; medians are reported",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        help="TrainConfig.precision of this tree's speed probes (default: the tree's default); the "
        "baseline always trains at its own default",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"), help="result file")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        Path(args.probe_out).write_text(json.dumps(speed_probe(args.probe)))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    wall = time.perf_counter()
    trees = {"this tree": ROOT}
    worktree = None
    if args.baseline:
        worktree = Path(tempfile.mkdtemp(prefix="recsys-baseline-"))
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline],
            check=True,
            capture_output=True,
        )
        trees[f"baseline {args.baseline}"] = worktree
    try:
        # alternating the trees round by round spreads the machine's drifts over both
        rounds: dict[str, list[dict]] = {label: [] for label in trees}
        for round_ in range(args.rounds):
            for label, root in trees.items():
                with console.status(f"speed probes: {label}, round {round_ + 1} of {args.rounds}"):
                    precision = args.precision if root == ROOT else None
                    rounds[label].append(run_probes(root, tuple(args.probes), precision))
        speed = {label: median_probes(runs) for label, runs in rounds.items()}
    finally:
        if worktree:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False
            )
    with console.status("compute floor"):
        floor = compute_floor()
    with console.status("kernels"):
        kernel = kernels()
    table = Table("probe", *trees, *(["ratio"] if args.baseline else []), title="training speed, same run")
    rows = [
        ("ml-100k retrieval labels/s", "ml-100k", "retrieval_labels_per_s", True),
        ("ml-100k fit s (3 + 1 epochs)", "ml-100k", "fit_s", False),
        ("synthetic 200k fit s (2 + 1 epochs)", "synthetic-200k", "fit_s", False),
        ("synthetic 200k peak RSS MB", "synthetic-200k", "peak_rss_mb", False),
        ("latest-small exact softmax, s / epoch", "latest-small-exact", "retrieval_seconds_per_epoch", False),
    ]
    rows = [row for row in rows if row[1] in args.probes]
    ratios = {}
    for label, probe, key, higher_better in rows:
        values = [speed[t][probe][key] for t in trees]
        cells = [f"{v:,.1f}" for v in values]
        if args.baseline:
            ratios[label] = values[0] / values[1] if higher_better else values[1] / values[0]
            cells.append(f"{ratios[label]:.2f} ×")
        table.add_row(label, *cells)
    console.print(table)
    loss, dropout = kernel["exact_loss_ms"], kernel["dropout_ms"]
    console.print(
        f"exact softmax loss, forward + backward: F.cross_entropy {loss['F.cross_entropy']:.0f} ms, blocked "
        f"{loss['blocked']:.0f} ms ({loss['ratio']:.2f} ×); dropout mask: torch.rand "
        f"{dropout['torch.rand']:.2f} ms, bernoulli {dropout['bernoulli (F.dropout)']:.2f} ms, MaskDropout "
        f"{dropout['MaskDropout']:.2f} ms; self-attention with dropout: nn.MultiheadAttention "
        f"{kernel['attention_ms']['nn.MultiheadAttention']:.2f} ms, MaskDropoutAttention "
        f"{kernel['attention_ms']['MaskDropoutAttention']:.2f} ms"
    )
    if "ml-100k" not in speed["this tree"]:
        floor["this_tree_share_of_ceiling"] = None
    else:
        measured = speed["this tree"]["ml-100k"]["retrieval_labels_per_s"]
        floor["this_tree_share_of_ceiling"] = measured / floor["labels_per_s_ceiling"]
        console.print(
            f"ml-100k small: {floor['matmul_flops_per_label'] / 1e6:.2f} MFLOP (matmul) per label, best "
            f"matmul {floor['best_matmul_gflops']:.0f} GFLOP/s → "
            f"ceiling {floor['labels_per_s_ceiling']:,.0f} "
            f"labels/s; this tree {measured:,.0f} = {floor['this_tree_share_of_ceiling']:.0%} of it"
        )
    report = {
        "command": " ".join(["python", "bench/train.py", *sys.argv[1:]]),
        "rounds": args.rounds,
        "machine": f"{os.cpu_count()} cores",
        "speed": speed,
        "compute_ceiling": floor,
        "kernels": kernel,
        "speedup_over_baseline": ratios or None,
    }
    if not args.skip_curve:
        report.update(curve_and_wall(console))
    report["wall_s"] = time.perf_counter() - wall
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
