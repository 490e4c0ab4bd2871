"""Where training runs: the device, the seeds, and the ``torchrun`` world (rank, size, process group).

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is gloo on CPU and NCCL on CUDA; nothing here
is a cluster layer of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given, else CUDA when present, else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    r"""Seed torch's and NumPy's global generators (training's own draws use seeded ``Generator``\ s)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@dataclass
class World:
    """This process's place under ``torchrun``: its rank and the number of processes (1 without it)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size()) if size > 1 else cls()

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (rank 0 evaluates and decides early stopping for all)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t.item())
