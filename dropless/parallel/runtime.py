"""The process side of a distributed run: init from torchrun's environment, the mesh, shutdown.

A process started without torchrun (WORLD_SIZE unset or 1) gets a 1-rank runtime with no process
group and no mesh, and everything behaves exactly as in a plain single-process run.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dropless.errors import DroplessError
from dropless.parallel.mesh import ParallelConfig, build_mesh


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    mesh: object = None            # DeviceMesh, or None in a single process
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (of per-rank means over equal token counts = the global mean)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    def shard_batch(self, x_B: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (every rank reads distinct tokens, ep ranks too)."""
        if self.world == 1:
            return x_B
        rows = x_B.shape[0] // self.world
        return x_B[self.rank * rows:(self.rank + 1) * rows]

    def main_first(self, fn, what: str):
        """fn() on rank 0 (its result there, None elsewhere), then a barrier that tells every rank
        whether it failed (a DroplessError or OSError): rank 0 raises its error and the others a
        DroplessError saying rank 0 `what`, instead of waiting in the next collective for a peer
        that has exited (a gloo traceback, or a hang until the timeout)."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except (DroplessError, OSError) as e:   # a user's mistake, a disk's refusal
                error = e
        failed = self.all_mean(torch.tensor(float(error is not None), device=self.device))
        if failed > 0:   # sync: every rank goes on, or none
            raise error or DroplessError(f"rank 0 {what} (its message says why); stopping this "
                                         "rank")
        return result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if self.world > 1:
            gc.collect()   # graphs holding collectives go first: avoids a flaky abort at exit
            dist.destroy_process_group()


def _exit_with_launcher(poll_s: float = 1.0) -> None:
    """Stop this worker when its launcher (torchrun) dies: orphaned workers would otherwise go on
    training and writing the run directory. The parent's death shows as a new parent pid (a
    polling thread, not PR_SET_PDEATHSIG, which fires when the spawning *thread* exits)."""
    from dropless import STARTED_BY

    parent = STARTED_BY   # the launcher, read at import: it may be gone already

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        sys.stderr.write(f"dropless: the launcher (pid {parent}) died; stopping this worker\n")
        os._exit(1)   # checkpoints are atomic: the last complete one survives

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def init(pcfg: ParallelConfig | None, device: torch.device, num_experts: int) -> Runtime:
    """Join the torchrun job (if any) and build its mesh. `pcfg.dp_shard` may be 0: whatever is left
    of the world after dp_replicate and ep."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(device=device)
    pcfg = pcfg or ParallelConfig()
    pcfg.check(num_experts=num_experts)   # before the world size's check, which dp_shard 0 makes
    if "TORCHELASTIC_RUN_ID" in os.environ:   # started by torchrun (not by a test's spawn)
        _exit_with_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get(
            "LOCAL_WORLD_SIZE", str(world)))))
    if pcfg.dp_shard == 0:
        rest, rem = divmod(world, pcfg.dp_replicate * pcfg.ep)
        if rem or rest == 0:
            raise ValueError(f"dp_replicate*ep={pcfg.dp_replicate * pcfg.ep} is invalid: must "
                             f"divide the world size {world}")
        pcfg = ParallelConfig(dp_replicate=pcfg.dp_replicate, dp_shard=rest, ep=pcfg.ep)
    pcfg.check(world)
    if not dist.is_initialized():
        # keys under a per-attempt prefix: after a torchrun restart, ranks otherwise read a dead
        # peer's address left in the store by the previous attempt ("Connection refused")
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, store=dist.PrefixStore(f"attempt{attempt}", store))
    return Runtime(dist.get_rank(), world, build_mesh(pcfg, device.type), device)
