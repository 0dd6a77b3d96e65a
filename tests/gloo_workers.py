"""Real ``torch.distributed`` on the CPU for tests: ``world`` processes in one gloo group,
each computing its results, which the test process reads back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, results_of: Callable[[int], Any], world: int, folder: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    init = f"file://{os.path.join(folder, 'init')}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        torch.save(results_of(rank), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo_workers(results_of: Callable[[int], Any], world: int, folder: Path, backend: str = "gloo") -> List[Any]:
    """``results_of(rank)`` in each of ``world`` spawned processes of one gloo group
    (a module-level function, so that it pickles); returns the results by rank.
    ``backend``: another backend for the group (``nccl`` in the GPU check)."""
    mp.spawn(_worker, args=(results_of, world, str(folder), backend), nprocs=world, join=True)
    return [torch.load(Path(folder) / f"rank{rank}.pt") for rank in range(world)]
