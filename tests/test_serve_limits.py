"""What `dropless serve` refuses before it does the work: a KV cache that cannot fit in memory (one
line, no traceback)."""

import pytest
import torch

from dropless import ModelConfig, MoEConfig, Transformer, cli
from dropless.serve.engine import Engine
from tests import test_serve_server as live_server

run_dir = live_server.run_dir   # the module-scoped fixture: the tiny model's run directory
CONTEXT = live_server.CONTEXT


# ---- the KV cache against memory -------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   max_seq_len=32, moe=MoEConfig(dim=32, hidden_dim=32,
                                                                 num_experts=4, top_k=2)))


def test_an_engine_whose_cache_does_not_fit_says_what_does(model, monkeypatch):
    """Measured against the free memory before it is allocated: max_batch=10**13 was a
    RuntimeError ("can't allocate memory") from deep in the cache's allocation."""
    from dropless.serve import kv_cache

    with pytest.raises(ValueError, match=r"max_batch=10000000000000 is invalid: its KV cache .* "
                                         r"at most max_batch=\d+ fits"):
        Engine(model, max_batch=10 ** 13, max_len=32)
    one = kv_cache.slot_bytes(model, 32)
    assert one == 2 * 2 * (2 * 32 * 8) * 4   # layers x (k, v) x [heads, positions, head size] fp32
    monkeypatch.setattr(kv_cache, "free_bytes", lambda device: 100 * one)
    with pytest.raises(ValueError, match=r"max_batch=91 is invalid: .*at most max_batch=90 fits"):
        Engine(model, max_batch=91, max_len=32)
    assert len(Engine(model, max_batch=90, max_len=32).slots) == 90
    monkeypatch.setattr(kv_cache, "free_bytes", lambda device: one)
    with pytest.raises(ValueError, match="not one slot of max_len=32 fits: a shorter max_len"):
        Engine(model, max_batch=1, max_len=32)


def test_an_engine_whose_cache_fails_to_allocate_says_so(model, monkeypatch):
    """Where the free memory is unknown (or the estimate was wrong), the allocation's failure."""
    from dropless.serve import kv_cache

    monkeypatch.setattr(kv_cache, "free_bytes", lambda device: None)
    with pytest.raises(ValueError, match="max_batch=10000000000000 is invalid: its KV cache .* "
                                         "could not be allocated on cpu"):
        Engine(model, max_batch=10 ** 13, max_len=32)


def test_serve_with_a_max_batch_past_memory_is_one_line(capsys, run_dir):
    argv = ["serve", str(run_dir), "--device", "cpu", "--port", str(live_server.free_port())]
    assert cli.main([*argv, "--max-batch", str(10 ** 13)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("dropless: error: --max-batch 10000000000000 is invalid: its KV cache "
                          f"(10000000000000 slots of --max-len {CONTEXT} positions"), err
    assert "at most --max-batch " in err
    assert cli.main([*argv, "--max-batch", "0"]) == 1
    assert capsys.readouterr().err == "dropless: error: --max-batch 0 is invalid: must be >= 1\n"
