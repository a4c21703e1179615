"""FSDP2 over the data-parallel axes of mesh.py's layout: one `fully_shard` per transformer block,
then the root; the experts (Shard(0) over `ep`) get their own, on dim 1 so the expert dim stays
whole per ep rank.

Gradient scale: every rank's loss is a mean over its own tokens, and FSDP averages gradients over
its mesh. An expert's local gradient already sums all ep ranks' tokens (the all-to-all backward
brings them home), so `parallelize` builds the ExpertShards with grad_scale = 1 / ep (FSDP's own
divide factor needs PREMUL_SUM, which gloo lacks, and varies across torch versions on 1-rank
meshes). Both then equal the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from dropless.parallel.expert_parallel import ExpertShard


def submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    """mesh[names], where names may include the flattened axes registered by build_mesh."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh[names[0]] if len(names) == 1 else mesh[names]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, mixed_precision: bool | None = None):
    """Shard `model` (a Transformer, after apply_ep) in place. `mixed_precision` (default: on for
    CUDA meshes) computes in bf16 and reduces gradients in fp32; master weights stay fp32."""
    if mixed_precision is None:
        mixed_precision = mesh.device_type == "cuda"
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision else MixedPrecisionPolicy())
    outer = ("dp_replicate",) if mesh["dp_replicate"].size() > 1 else ()   # HSDP's replica axis
    dense_mesh = submesh(mesh, *outer, "dp_shard_ep")
    expert_mesh = submesh(mesh, *outer, "dp_shard")
    for block in model.layers:
        experts = block.ffn.experts if block.is_moe else None
        if isinstance(experts, ExpertShard):
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp,
                        shard_placement_fn=lambda param: Shard(1))
        fully_shard(block, mesh=dense_mesh, mp_policy=mp)
    fully_shard(model, mesh=dense_mesh, mp_policy=mp)
    return model


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping when gradients are DTensors on different meshes (dense over
    dp, experts over ep x dp_shard), which torch.nn.utils.clip_grad_norm_ cannot mix. Returns the
    total norm (a plain tensor, the same on every rank)."""
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    for group in by_mesh.values():   # foreach ops cannot mix meshes: one call per mesh
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def full_state(model: nn.Module, optimizer=None) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts on CPU, keyed by parameter name; collective, and
    only rank 0 receives them (the others get empty dicts)."""
    return get_state_dict(model, optimizer if optimizer is not None else [],
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
