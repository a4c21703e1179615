"""Scale-out on torch.distributed, applied from outside the model: mesh, expert parallelism (an
all-to-all dispatcher), FSDP2/HSDP, the torchrun runtime. Importing sets nothing up."""

from __future__ import annotations

import torch.nn as nn

from dropless.parallel.mesh import ParallelConfig, build_mesh

__all__ = ["ParallelConfig", "build_mesh", "gathered_model", "parallelize", "parallel_model",
           "whole_fits"]


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
    builds `whole()` on the host (a seeded init, or an --init source's weights as stored: a bf16
    source is sent in bf16) and every rank receives its shards of it, tensor by tensor, cast to
    its own parameters' dtype as they are copied in. Under the old way (every rank built and
    moved the whole model), a 30B model took every rank's host and GPU memory for 61-122 GB
    before it was sharded. `fill=False` (resuming: the checkpoint fills every value) builds
    nothing whole; it is also how one process (rt.mesh None) resumes: meta() made on its device,
    uninitialised. The CPU generator ends as rank 0's on every rank."""
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


def whole_fits(model: nn.Module, device, dtype) -> tuple[bool, int]:
    """(whether a whole copy of `model` in `dtype` fits in `device`'s free memory with 10% to
    spare (a host always counts as fitting), its bytes)."""
    import torch

    need = sum(p.numel() for p in model.parameters()) * dtype.itemsize   # DTensors: global
    return device.type != "cuda" or 1.1 * need < torch.cuda.mem_get_info(device)[0], need


def gathered_model(model: nn.Module, build, rt, dtype) -> nn.Module | None:
    """Rank 0's whole copy of a parallelized `model` on its device in `dtype` (what a sample
    decodes from: one gather, then no collective per token); None on the other ranks, and on
    every rank when the copy would not fit beside the training state in rank 0's free GPU
    memory (rank 0 warns). `build()` makes the bare model (on the meta device here: the gathered
    tensors become its own, no init and no second host copy)."""
    import warnings

    import torch

    from dropless.parallel.fsdp import full_state

    fits, need = whole_fits(model, rt.device, dtype)
    if rt.all_mean(torch.tensor(float(fits or not rt.is_main), device=rt.device)) < 1:
        if rt.is_main:
            warnings.warn(f"no sample: the whole model ({need / 1e9:.1f} GB in {dtype}) does not "
                          "fit beside the training state on rank 0's GPU; `dropless generate "
                          "RUN_DIR` samples the run", stacklevel=2)
        return None
    full, _ = full_state(model)   # collective; rank 0's host gets the whole model
    if not rt.is_main:
        return None
    with torch.device("meta"):
        whole = build()
    whole.load_state_dict(full, assign=True)
    if whole.cfg.tie_embeddings:   # assign=True gives each key its own Parameter
        whole.lm_head.weight = whole.embed.weight
    return whole.to(rt.device, dtype)
