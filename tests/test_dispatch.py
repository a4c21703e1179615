"""The dispatcher seam: MoE goes through its dispatcher for the balance-loss counts, and nothing
outside dropless/parallel imports torch.distributed."""

import ast
from pathlib import Path

import torch

from dropless import MoE, MoEConfig
from dropless.dispatch import Dispatcher, LocalDispatcher

PACKAGE = Path(__file__).resolve().parents[1] / "dropless"


class UniformCounts(LocalDispatcher):
    """Pretends the whole batch (e.g. other ranks' tokens) is perfectly balanced."""

    def global_counts(self, counts_E):
        return torch.ones_like(counts_E)


def test_balance_loss_takes_the_dispatchers_counts():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, balance_loss_coef=0.1))
    with torch.no_grad():
        moe.router.weight[0] = 1.0   # skewed: the local balance loss is well above coef
    x = torch.randn(32, 16).abs()
    y_local, aux_local = moe(x)
    assert aux_local.balance_loss > 0.11
    moe.dispatcher = UniformCounts(4)
    y, aux = moe(x)
    # f uniform: coef * E * sum_i (1/E) * P_i = coef, whatever the router's probabilities
    assert torch.allclose(aux.balance_loss, torch.tensor(0.1))
    assert torch.equal(y, y_local)   # dispatch and combine unchanged
    assert isinstance(moe.dispatcher, LocalDispatcher)


def test_dispatchers_implement_the_protocol():
    from dropless.parallel.expert_parallel import AllToAllDispatcher
    from dropless.parallel.loads import DataParallelDispatcher

    names = {n for n in vars(Dispatcher) if not n.startswith("_")} | {"fusable"}
    for cls in (LocalDispatcher, DataParallelDispatcher, AllToAllDispatcher):
        assert all(hasattr(cls, n) for n in names), (cls, names - set(dir(cls)))


def test_model_files_never_import_torch_distributed():
    for path in PACKAGE.rglob("*.py"):
        if "parallel" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("torch.distributed") for n in names), path
