"""Run a test body on N spawned gloo processes. The body is a module-level function
`body(rank, world, *args)`; an exception on any rank fails the test."""

from __future__ import annotations

import gc
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, body, args):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        body(rank, world, *args)
    finally:
        if dist.is_initialized():   # train() shuts the group down itself
            gc.collect()  # drop graphs holding collectives first: avoids a flaky abort at exit
            dist.destroy_process_group()


def launch(world: int, body, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "rdzv"), body, args),
                           nprocs=world, join=True, start_method="spawn")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
