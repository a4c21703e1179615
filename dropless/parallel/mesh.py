"""The parallel layout: a frozen config of degrees and the DeviceMesh built from it.

Mesh axes, outermost first: `dp_replicate` x `dp_shard` x `ep` (world size = their product), and
two flattened ones: `dp` (all ranks: batch split, load all-reduce) and `dp_shard_ep`. Every rank
reads a distinct slice of the global batch, ep ranks too, so dense parameters are data-parallel
over all ranks (FSDP over `dp_shard_ep`, HSDP replicas over `dp_replicate`), and expert
parameters are split over `ep` and FSDP-sharded over the ranks that do not split them
(`dp_shard`, replicated over `dp_replicate`): "ep borrows from the sharded data-parallel degree".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("dp_replicate", "dp_shard", "ep")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    dp_replicate: int = 1   # HSDP replica groups (full copies of the sharded state)
    dp_shard: int = 1       # FSDP degree among ranks that do not split experts
    ep: int = 1             # expert-parallel degree: experts split this many ways

    def __post_init__(self):
        for name in AXES:
            value = getattr(self, name)
            low = 0 if name == "dp_shard" else 1   # dp_shard 0 = the rest of the world (runtime)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {low}")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        """Raise if this layout does not fit the launched world or the model's experts."""
        if self.world_size != world_size:
            raise ValueError(f"dp_replicate*dp_shard*ep={self.world_size} is invalid: must equal "
                             f"the world size {world_size}")
        if num_experts is not None and num_experts % self.ep:
            raise ValueError(f"ep={self.ep} is invalid: must divide num_experts={num_experts}")


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> DeviceMesh:
    """A 3-D DeviceMesh named `dp_replicate, dp_shard, ep` with flattened `dp` and `dp_shard_ep`.
    Needs an initialised default process group (torchrun) whose size is cfg.world_size."""
    cfg.check(dist.get_world_size())
    mesh = init_device_mesh(device_type, (cfg.dp_replicate, cfg.dp_shard, cfg.ep),
                            mesh_dim_names=AXES)
    mesh[AXES]._flatten("dp")
    mesh["dp_shard", "ep"]._flatten("dp_shard_ep")
    return mesh
