"""Run a test body on N spawned processes: gloo on the CPU (always; CI), or NCCL with one GPU per
rank (rank r on cuda:r). The body is a module-level function `body(rank, world, *args)` that puts
its tensors on `device()`; an exception on any rank fails the test."""

from __future__ import annotations

import gc
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# the GPU machines require NVLink multicast (NVLS) off
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def layouts(*worlds: int) -> list:
    """pytest params (world, backend): gloo at every world size; nccl (gpu-marked) where this
    machine has at least `world` GPUs, skipped otherwise. The assertions are the same."""
    params = [pytest.param(w, "gloo", id=f"gloo-{w}") for w in worlds]
    for w in worlds:
        enough = torch.cuda.device_count() >= w
        params.append(pytest.param(w, "nccl", id=f"nccl-{w}", marks=[
            pytest.mark.gpu, pytest.mark.skipif(not enough, reason=f"needs {w} GPUs")]))
    return params


def device() -> torch.device:
    """This rank's device: cuda:rank under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _worker(rank, world, init_file, backend, body, args):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **NCCL_ENV)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        body(rank, world, *args)
    finally:
        if dist.is_initialized():   # train() shuts the group down itself
            gc.collect()  # drop graphs holding collectives first: avoids a flaky abort at exit
            dist.destroy_process_group()


def launch(world: int, body, *args, backend: str = "gloo") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "rdzv"), backend, body, args),
                           nprocs=world, join=True, start_method="spawn")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
