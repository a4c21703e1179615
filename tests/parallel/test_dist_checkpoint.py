"""DCP: saved at (dp_shard=2, ep=2) on 4 ranks, loaded at ep=2 on 2 ranks and in one process with
identical params and AdamW state; a checkpoint without its manifest is skipped; convert keeps every expert;
every file is checksummed (a flipped bit in any rank's shard is refused) and a forged `.metadata`
never runs."""

import hashlib
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from _dist import device, launch, layouts
from dropless import ModelConfig, MoEConfig, Transformer
from dropless.checkpoint import config_to_dict
from dropless.convert import convert_to_safetensors
from dropless.errors import DroplessError
from dropless.parallel import ParallelConfig, build_mesh, parallelize
from dropless.parallel import checkpoint as ckpt
from dropless.parallel.fsdp import full_state
from dropless.tokenizer import ByteTokenizer

# vocab 256: the byte tokenizer saved beside it must fit the model (load_run checks)
CFG = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                  tie_embeddings=True,
                  moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2, bias_update_rate=1e-3))


def build(pcfg=None):
    torch.manual_seed(0)
    model = Transformer(CFG).to(device())
    if pcfg is not None:
        parallelize(model, build_mesh(pcfg, device().type))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def save_body(rank, world, run_dir):
    model, opt = build(ParallelConfig(dp_shard=2, ep=2))
    gen = torch.Generator().manual_seed(rank)
    for step in (1, 2):
        tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=gen).to(device())
        logits, aux = model(tokens[:, :-1])
        (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux.balance_loss).backward()
        opt.step()
        opt.zero_grad()
        ckpt.save(run_dir, step, model, opt, {"model_config": config_to_dict(CFG),
                                              "tokenizer": ByteTokenizer().to_json()})
        full = full_state(model, opt)
        if rank == 0:
            torch.save(full, f"{run_dir}/full-{step}.pt")


def assert_same(full, expected):
    model_sd, optim_sd = full
    exp_model, exp_optim = expected
    assert model_sd.keys() == exp_model.keys()
    for k, v in exp_model.items():
        assert torch.equal(model_sd[k], v), k
    for name, st in exp_optim["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(optim_sd["state"][name][k]), torch.as_tensor(v)), (name, k)


def load_body(rank, world, run_dir):
    model, opt = build(ParallelConfig(ep=2))
    path = ckpt.latest(run_dir)
    assert path.name == "step-00000002"
    assert ckpt.load(path, model, opt)["step"] == 2
    full = full_state(model, opt)   # gathered on rank 0 only
    if rank == 0:
        assert_same(full, torch.load(f"{run_dir}/full-2.pt"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,backend", layouts(4))
def test_elastic_resume_incomplete_and_convert(tmp_path, world, backend):
    from safetensors.torch import load_file

    run_dir = str(tmp_path)
    launch(world, save_body, run_dir, backend=backend)
    launch(2, load_body, run_dir, backend=backend)
    # one process, no process group: the same state
    model, opt = build()
    ckpt.load(ckpt.latest(run_dir), model, opt)
    expected = torch.load(f"{run_dir}/full-2.pt")
    assert_same(full_state(model, opt), expected)
    # convert: one file, every expert present once and equal to the trained experts
    n = convert_to_safetensors(run_dir, tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    assert n == len(tensors) == len(expected[0])
    for k, v in expected[0].items():
        assert torch.equal(tensors[k], v), k
    assert tensors["layers.0.ffn.experts.gate_up"].shape[0] == CFG.moe.num_experts
    # a checkpoint without its manifest: skipped with a warning, the previous checkpoint loads
    (ckpt.step_dir(run_dir, 2) / ckpt.MARKER).unlink()
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        path = ckpt.latest(run_dir)
    assert path.name == "step-00000001"
    model, opt = build()
    ckpt.load(path, model, opt)
    assert_same(full_state(model, opt), torch.load(f"{run_dir}/full-1.pt"))

    # integrity: every rank's shard is in the manifest; one flipped bit in any of them is refused
    path = ckpt.step_dir(run_dir, 1)
    manifest = json.loads((path / ckpt.MARKER).read_text())
    assert sorted(manifest["sha256"]) == [".metadata", *(f"__{r}_0.distcp" for r in range(4)),
                                          ckpt.STATE]
    shard = path / "__3_0.distcp"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    with pytest.raises(DroplessError, match=f"{shard}: checkpoint file is damaged"):
        ckpt.load(path, *build())
    shard.write_bytes(raw)
    # a forged .metadata whose manifest entry was forged too: refused, never unpickled freely
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))
    (path / ".metadata").write_bytes(evil)
    manifest["sha256"][".metadata"] = hashlib.sha256(evil).hexdigest()
    (path / ckpt.MARKER).write_text(json.dumps(manifest))
    with pytest.raises(DroplessError, match="not a DCP metadata file"):
        ckpt.load(path, *build())
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")
