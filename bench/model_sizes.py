"""Parameters and memory per model size: ``python bench/model_sizes.py [--items N --categories C]``.

Builds each size on PyTorch's meta device (no memory allocated) for a catalog of N items (default: the
size's reserved ``item_capacity`` or 100k) and reports parameters, the share in id-embedding tables, and
bytes as stored (fp16 tables where the size says so).
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from predictor.features.schema import USER_DENSE_COLUMNS
from predictor.models.config import SIZES
from predictor.models.ranker import Ranker
from predictor.models.two_tower import TwoTower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--items", type=int, default=100_000, help="catalog size for sizes without reserved rows"
    )
    parser.add_argument("--categories", type=int, default=20)
    args = parser.parse_args()
    table = Table("size", "item rows", "parameters", "in id tables", "memory MB")
    for name, cfg in SIZES.items():
        rows = max(args.items + 1, cfg.item_capacity)
        user_dim = len(USER_DENSE_COLUMNS) + args.categories
        with torch.device("meta"):
            modules = (
                TwoTower(cfg, rows, args.categories, user_dim, 7),
                Ranker(cfg, rows, args.categories, user_dim, 7),
            )
        params = [p for m in modules for p in m.parameters()]
        total = sum(p.numel() for p in params)
        tables = modules[0].items.id_embedding.weight.numel() + modules[1].item_id.weight.numel()
        nbytes = sum(p.numel() * p.element_size() for p in params)
        table.add_row(
            name, f"{rows:,}", f"{total / 1e6:.1f} M", f"{tables / total:.1%}", f"{nbytes / 1e6:,.0f}"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
