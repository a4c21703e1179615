"""Scale-out on torch.distributed, applied from outside the model: mesh, expert parallelism (an
all-to-all dispatcher), FSDP2/HSDP, distributed checkpoints. Importing sets nothing up."""

from __future__ import annotations

import torch.nn as nn

from dropless.parallel.mesh import ParallelConfig, build_mesh

__all__ = ["ParallelConfig", "build_mesh", "parallelize"]


def parallelize(model: nn.Module, mesh, *, mixed_precision: bool | None = None) -> nn.Module:
    """Everything a training run applies, in order: global balance-loss counts, expert
    parallelism (ep > 1), FSDP2/HSDP. A 1-rank mesh leaves the model untouched."""
    from dropless.parallel.expert_parallel import apply_ep
    from dropless.parallel.fsdp import apply_fsdp
    from dropless.parallel.loads import use_global_balance

    if mesh.size() == 1:
        return model
    use_global_balance(model, mesh)
    if mesh["ep"].size() > 1:
        apply_ep(model, mesh)
    return apply_fsdp(model, mesh, mixed_precision=mixed_precision)
