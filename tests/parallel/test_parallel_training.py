"""10 training steps at (dp_shard=2, ep=2) on 4 processes == 1 process on the same global batch."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from _dist import launch, rel_err
from dropless import ModelConfig, MoEConfig, Transformer
from dropless.parallel import ParallelConfig, build_mesh, parallelize
from dropless.parallel.fsdp import clip_grad_norm_
from dropless.parallel.loads import all_reduce_loads

CFG = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                  moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2, z_loss_coef=1e-3,
                                bias_update_rate=1e-3, num_shared_experts=1))
STEPS, BATCH, SEQ = 10, 8, 16


def batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def step(model, opt, tokens, mesh=None):
    logits, aux = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux.balance_loss + aux.z_loss
    loss.backward()
    if mesh is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loads = aux.tokens_per_expert
    else:
        clip_grad_norm_(list(model.parameters()), 1.0)
        loads = all_reduce_loads(aux.tokens_per_expert, mesh)
    opt.step()
    opt.zero_grad()
    model.update_bias(loads)
    return loss.detach()


def train_body(rank, world, pcfg):
    torch.manual_seed(0)
    ref = Transformer(CFG)
    model = copy.deepcopy(ref)
    mesh = build_mesh(pcfg)
    parallelize(model, mesh)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    per_rank = BATCH // world
    for i, tokens in enumerate(batches()):
        ref_loss = step(ref, ref_opt, tokens)
        loss = step(model, opt, tokens[rank * per_rank:(rank + 1) * per_rank], mesh)
        torch.distributed.all_reduce(loss)
        assert rel_err(loss / world, ref_loss) < 1e-5, (i, float(loss / world), float(ref_loss))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    for name, p in ref.state_dict().items():
        assert rel_err(full[name], p) < 1e-4, name


@pytest.mark.timeout(150)
def test_dp2_ep2_matches_single_process():
    launch(4, train_body, ParallelConfig(dp_shard=2, ep=2))
