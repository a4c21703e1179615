"""Scale-out on torch.distributed, applied from outside the model: mesh, expert parallelism (an
all-to-all dispatcher), FSDP2/HSDP, the torchrun runtime. Importing sets nothing up."""

from __future__ import annotations

import torch.nn as nn

from dropless.parallel.mesh import ParallelConfig, build_mesh

__all__ = ["ParallelConfig", "build_mesh", "parallelize", "parallel_model"]


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


def parallel_model(whole, meta, rt, *, mixed_precision: bool, fill: bool = True) -> nn.Module:
    """A model parallelized over `rt.mesh` that no rank but 0 ever holds whole: every rank builds
    `meta()` on the meta device and parallelizes it, then makes its shards on its device; rank 0
    builds `whole()` on the host (a seeded init, or an --init source's weights, each tensor in
    the dtype meta()'s has) and every rank receives its shards of it, tensor by tensor. Under the
    old way (every rank built and moved the whole model), a 30B model took every rank's host and
    GPU memory for 61-122 GB before it was sharded. `fill=False` (resuming: the checkpoint fills
    every value) builds nothing whole; it is also how one process (rt.mesh None) resumes: meta()
    made on its device, uninitialised. The CPU generator ends as rank 0's on every rank."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = rt.main_first(lambda: whole().state_dict(), "could not build the model") if fill else {}
    with torch.device("meta"):
        model = meta()
    if rt.mesh is not None:
        parallelize(model, rt.mesh, mixed_precision=mixed_precision)
    model = model.to_empty(device=rt.device)
    if model.cfg.tie_embeddings and model.lm_head.weight is not model.embed.weight:
        model.lm_head.weight = model.embed.weight   # to_empty off meta unties a plain model
    if fill:
        set_model_state_dict(model, full or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        rng = torch.get_rng_state().to(rt.device)   # rank 0's drew the init; NCCL sends GPU tensors
        dist.broadcast(rng, 0)
        torch.set_rng_state(rng.cpu())
    return model
