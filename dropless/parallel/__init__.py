"""Scale-out on torch.distributed, applied from outside the model: mesh, expert parallelism (an
all-to-all dispatcher), FSDP2/HSDP, the torchrun runtime. Importing sets nothing up."""

from __future__ import annotations

import torch.nn as nn

from dropless.parallel.mesh import ParallelConfig, build_mesh

__all__ = ["ParallelConfig", "build_mesh", "parallelize"]


def parallelize(model: nn.Module, mesh, *, mixed_precision: bool | None = None) -> nn.Module:
    """Everything a training run applies, in order: expert parallelism (ep > 1) or, without it,
    global balance-loss counts; then FSDP2/HSDP. A 1-rank mesh leaves the model untouched."""
    from dropless.parallel.expert_parallel import apply_ep
    from dropless.parallel.fsdp import apply_fsdp
    from dropless.parallel.loads import dp_group, use_global_balance

    if mesh.size() == 1:
        return model
    ep = mesh["ep"].size()
    if ep > 1:   # an expert's gradient already sums all ep ranks' tokens (see fsdp.py)
        apply_ep(model, mesh, grad_scale=1.0 / ep, counts_group=dp_group(mesh))
    else:
        use_global_balance(model, mesh)
    return apply_fsdp(model, mesh, mixed_precision=mixed_precision)
