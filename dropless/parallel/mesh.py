"""The parallel layout (`ParallelConfig`, in dropless.config) and the DeviceMesh built from it.

Mesh axes, outermost first: `dp_replicate` x `dp_shard` x `ep` (world size = their product), and
two flattened ones: `dp` (all ranks: batch split, load all-reduce) and `dp_shard_ep`. Every rank
reads a distinct slice of the global batch, ep ranks too, so dense parameters are data-parallel
over all ranks (FSDP over `dp_shard_ep`, HSDP replicas over `dp_replicate`), and expert
parameters are split over `ep` and FSDP-sharded over the ranks that do not split them
(`dp_shard`, replicated over `dp_replicate`): "ep borrows from the sharded data-parallel degree".
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dropless.config import ParallelConfig

AXES = ("dp_replicate", "dp_shard", "ep")   # ParallelConfig's fields, outermost first


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> DeviceMesh:
    """A 3-D DeviceMesh named `dp_replicate, dp_shard, ep` with flattened `dp` and `dp_shard_ep`.
    Needs an initialised default process group (torchrun) whose size is cfg.world_size."""
    cfg.check(dist.get_world_size())
    mesh = init_device_mesh(device_type, (cfg.dp_replicate, cfg.dp_shard, cfg.ep),
                            mesh_dim_names=AXES)
    mesh[AXES]._flatten("dp")
    mesh["dp_shard", "ep"]._flatten("dp_shard_ep")
    return mesh
