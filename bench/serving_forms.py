"""Which form of each model part serves fastest on this CPU: eager, ``torch.export``, ``torch.compile``, int8.

Times the parts of the one inference path (``predictor.models.inference``) for a ``small`` model over a
100k-item catalog, one torch thread (what a replica runs), at 1 and 16 users per call: the user tower,
retrieval (exact product + top-k against the calibrated HNSW index) and the ranker over 100
candidates. Medians over ``--repeats`` calls after warm-up, each form against eager measured in the same
run; also the one-off cost each form adds to a replica's start (export, compile, index build).

    python bench/serving_forms.py        # writes bench/results/serving_forms.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from predictor.models.config import model_config
from predictor.models.inference import TwoStageInference, UserBatch, ranker_history, ranker_inputs
from predictor.models.ranker import Ranker
from predictor.models.two_tower import TwoTower
from predictor.serving.engine import UserVectorCache

ROOT = Path(__file__).resolve().parent.parent
console = Console()


def median_ms(fn, args: tuple, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` after 5 warm-up calls."""
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


class TowerProgram(torch.nn.Module):
    def __init__(self, tower: TwoTower, history: torch.Tensor, trim: bool = True):
        super().__init__()
        self.tower, self.history, self.trim = tower, history, trim

    def forward(self, window, lengths, dense):
        return self.tower.user_embedding(window, lengths, dense, self.history, trim=self.trim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_forms.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_config("small")
    N, C, Fu, Fi = args.items, 20, 7 + 20, 7
    tower, ranker = TwoTower(cfg, N + 1, C, Fu, Fi).eval(), Ranker(cfg, N + 1, C, Fu, Fi).eval()
    cats, dense = (torch.rand(N + 1, C) < 0.1).float(), torch.rand(N + 1, Fi)
    cats[0], dense[0] = 0, 0
    results: dict = {"items": N, "model": "small", "threads": 1, "cores": os.cpu_count(), "parts": {}}
    startup: dict = {}

    started = time.perf_counter()
    exact = TwoStageInference(
        tower, ranker, cats, dense, N, C, cfg.max_history, cfg.ranker_history, 100, True, "exact"
    )
    startup["item tables (exact)"] = time.perf_counter() - started
    started = time.perf_counter()
    hnsw = TwoStageInference(
        tower,
        ranker,
        cats,
        dense,
        N,
        C,
        cfg.max_history,
        cfg.ranker_history,
        100,
        True,
        "auto",
        hnsw_threshold=0,
    )
    startup["item tables + HNSW build and calibration"] = time.perf_counter() - started
    results["retrieval_selection"] = hnsw.tables.selection  # HNSW serves only where it measures faster

    rng = np.random.default_rng(0)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    exported = exported_ranker = compiled = None
    for B in (16, 1):  # the programs are exported from a batch of 16 (a batch of 1 would specialise)
        lengths = torch.from_numpy(rng.integers(5, cfg.max_history + 1, B))
        window = torch.randint(1, N + 1, (B, cfg.max_history)) * (
            torch.arange(cfg.max_history) < lengths[:, None]
        )
        udense = torch.rand(B, Fu)
        program = TowerProgram(tower, exact.tables.history).eval()
        rows: dict[str, float] = {}
        with torch.no_grad():
            rows["user tower: eager"] = median_ms(program, (window, lengths, udense), args.repeats)
            # torch.export cannot trace the data-dependent cut to the longest history: it runs full width
            static = TowerProgram(tower, exact.tables.history, trim=False).eval()
            rows["user tower: eager, full width"] = median_ms(static, (window, lengths, udense), args.repeats)
            if exported is None:
                started = time.perf_counter()
                exported = torch.export.export(
                    static,
                    (window[:2], lengths[:2], udense[:2]),
                    dynamic_shapes=({0: batch_dim}, {0: batch_dim}, {0: batch_dim}),
                ).module()
                startup["user tower: torch.export"] = time.perf_counter() - started
            rows["user tower: torch.export"] = median_ms(exported, (window, lengths, udense), args.repeats)
            try:
                if compiled is None:
                    compiled = torch.compile(program, dynamic=True)
                started = time.perf_counter()
                compiled(window, lengths, udense)
                startup[f"user tower: torch.compile (first call, {B} users)"] = time.perf_counter() - started
                rows["user tower: torch.compile"] = median_ms(
                    compiled, (window, lengths, udense), args.repeats
                )
            except Exception as exc:  # noqa: BLE001 - inductor needs a C++ toolchain; report, do not fail
                rows["user tower: torch.compile"] = float("nan")
                results.setdefault("notes", []).append(
                    f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
                )
            user = program(window, lengths, udense)
            batch = UserBatch(
                window.numpy(),
                lengths.numpy(),
                udense.numpy(),
                np.zeros(0, np.int64),
                np.zeros(B + 1, np.int64),
            )
            rows["retrieval top-100: exact product + top-k"] = median_ms(
                exact.retrieve, (user, batch, 100), args.repeats
            )
            rows[f"retrieval top-100: {hnsw.tables.selection['served']} (as selected)"] = median_ms(
                hnsw.retrieve, (user, batch, 100), args.repeats
            )
            cand, _ = exact.retrieve(user, batch, 100)
            cand_t = torch.from_numpy(cand)
            hist = ranker_history(window, lengths, cfg.ranker_history)
            t = exact.tables
            inputs = ranker_inputs(t.embeddings, t.item_cats, t.item_dense, C, hist, udense, user, cand_t)
            rows["ranker x100: eager fp32"] = median_ms(ranker, inputs, args.repeats)
            int8 = torch.ao.quantization.quantize_dynamic(ranker, {torch.nn.Linear}, dtype=torch.qint8)
            rows["ranker x100: eager int8"] = median_ms(int8, inputs, args.repeats)
            if exported_ranker is None:
                started = time.perf_counter()
                cand_dim = torch.export.Dim("candidates", min=2, max=4096)
                shapes = (
                    {0: batch_dim},
                    {0: batch_dim},
                    {0: batch_dim},
                    {0: batch_dim, 1: cand_dim},
                    {0: batch_dim, 1: cand_dim},
                    {0: batch_dim, 1: cand_dim},
                    {0: batch_dim, 1: cand_dim},
                    {0: batch_dim},
                )
                exported_ranker = torch.export.export(
                    ranker, tuple(x[:2] for x in inputs), dynamic_shapes=shapes
                ).module()
                startup["ranker: torch.export"] = time.perf_counter() - started
            rows["ranker x100: torch.export"] = median_ms(exported_ranker, inputs, args.repeats)

            # the optional user-vector cache: a miss pays the tower plus the lookup, a hit only the lookup
            def cache_miss(b=batch):
                UserVectorCache(1024).vectors(exact, b)

            warm = UserVectorCache(1024)
            warm.vectors(exact, batch)
            rows["user vectors: cache miss"] = median_ms(cache_miss, (), args.repeats)
            rows["user vectors: cache hit"] = median_ms(warm.vectors, (exact, batch), args.repeats)
        results["parts"][f"B{B}"] = rows
    results["startup_seconds"] = startup

    table = Table("part / form", "1 user (ms)", "16 users (ms)", "16 users vs eager")
    for name in results["parts"]["B1"]:
        one, many = results["parts"]["B1"][name], results["parts"]["B16"][name]
        part = name.split(":")[0]
        base = next(v for k, v in results["parts"]["B16"].items() if k.startswith(part))
        table.add_row(name, f"{one:.3f}", f"{many:.3f}", f"{many / base:.2f}x")
    console.print(table)
    console.print({k: round(v, 2) for k, v in startup.items()}, results["retrieval_selection"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
