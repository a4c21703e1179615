import torch

from dropless import MoE, MoEConfig


def test_layer_shapes():
    moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2))
    y, aux = moe(torch.randn(2, 3, 16))
    assert y.shape == (2, 3, 16)
    assert int(aux.tokens_per_expert.sum()) == 12
