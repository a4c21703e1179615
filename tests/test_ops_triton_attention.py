"""The decode step's split-KV attention kernel (dropless/ops/triton_attention.py) against SDPA with
decode.make_step's additive mask, the engine's reference path.

On a GPU when there is one, else on the CPU under the Triton interpreter (bf16 on CUDA only:
the interpreter's bf16 arithmetic is wrong). The contract: row r attends to cache positions
[0, min(positions[r] + 1, length)), which is what the mask gives; the engine's decoding rows sit
below `length`, and its scratch rows (position S - 1, past a shorter `length`) see all of
[0, length), finite garbage that is checked like any other row. Cache entries a row must not
see are NaN here, so a read of any of them (a key past the row's position, or past `length`)
shows up as NaN in its output."""

import pytest
import torch
import torch.nn.functional as F

from triton_env import DEVICE, DTYPES, TOL   # first: it sets up Triton

from dropless.config import ModelConfig, MoEConfig
from dropless.ops.triton_attention import BLOCK_N, decode_attention, fused_combine, num_splits
from dropless.serve.decode import make_step
from tests.conftest import counters_at_rest, fresh_counters, rel_err


def check_attention(b, G, group, Dh, length, dtype, S=None, splits=0, device=DEVICE,
                    positions=None):
    """Kernel vs SDPA for b rows at positions (default: length - 1, 0 and the scratch row S - 1,
    cycled), H = G * group heads, a cache of S >= length positions (default length + 5)."""
    torch.manual_seed(0)
    S, H = S or length + 5, G * group
    if positions is None:
        positions = torch.tensor([length - 1, 0, S - 1] * b)[:b]
    positions = positions.to(device)
    cfg = ModelConfig(dim=H * Dh, num_heads=H, num_kv_heads=G, head_dim=Dh,
                      moe=MoEConfig(dim=H * Dh))
    mask = make_step(cfg, positions, S, torch.float64, length).mask_b1QS   # [b, 1, 1, length]
    q = torch.randn(b, H, Dh, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(b, G, S, Dh, device=device, dtype=dtype) for _ in range(2))
    ref = F.scaled_dot_product_attention(
        q.double().view(b, G, group, Dh), k_cache[:, :, :length].double(),
        v_cache[:, :, :length].double(), attn_mask=mask).view(b, H, Dh)
    # poison what each row must not read: keys past min(position, length - 1)
    hidden = torch.arange(S, device=device) >= (positions + 1).clamp(max=length).view(b, 1)
    for cache in (k_cache, v_cache):
        cache.masked_fill_(hidden.view(b, 1, S, 1), float("nan"))
    out = decode_attention(q, k_cache, v_cache, positions, length, splits)
    assert out.shape == (b, H, Dh) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 7, 64, 200])   # 200: not a multiple of the chunk
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("b", [1, 3])
def test_decode_attention_matches_sdpa(dtype, length, group, G, b):
    check_attention(b, G, group, 64, length, dtype)


@pytest.fixture(params=[False, True], ids=["combine-launch", "fused-combine"])
def fused(request, monkeypatch):
    """Both ways of combining the splits: the combine kernel's own launch, and the split kernel's
    last program per (row, kv head) (DROPLESS_DECODE_FUSION=1)."""
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "1" if request.param else "0")
    fresh_counters(monkeypatch)
    return request.param


@pytest.mark.parametrize("splits", [1, 2, 4, 9])   # 9 asks for more chunks than 200 keys fill
def test_decode_attention_any_split(splits, fused):
    """The same output one split at a time (no combine kernel) or merged from several, including
    chunks past a row's position (no work: an empty partial) and a short last chunk."""
    check_attention(3, 2, 4, 64, 200, torch.float32, splits=splits)
    assert fused_combine(splits, 4, 64) == (fused and splits > 1)
    assert not fused_combine(splits, 4, 64) or counters_at_rest()


def test_decode_attention_head_dim_128_full_cache(fused):
    """Dh 128, and length == S (the engine's full-length graph: the scratch row at S - 1 is the
    last key of the bucket, attended as a real row)."""
    check_attention(3, 2, 8, 128, 130, torch.float32, S=130, splits=3)


def test_decode_attention_mixed_positions(fused):
    """Rows at many positions of one batch, each chunk of each row cut at its own position."""
    positions = torch.tensor([0, 1, 63, 64, 65, 127, 128, 199])
    check_attention(8, 2, 4, 64, 200, torch.float32, splits=4, positions=positions)


def test_fused_combine_only_for_few_splits(fused):
    """The split kernel's last program combines a group's heads only while that is at most
    FUSED_COMBINE_TILES tiles (8 heads of 128: 4 splits a tile, so 16 splits); past that the
    combine launch spreads the work, and the result is the same either way (20 splits here)."""
    assert fused_combine(16, 8, 128) == fused and not fused_combine(17, 8, 128)
    assert fused_combine(64, 1, 64) == fused
    assert not fused_combine(2, 64, 128)   # a group wider than a tile: the combine's launch
    check_attention(1, 1, 8, 128, 20 * BLOCK_N, torch.float32, splits=20)


def test_num_splits():
    """Enough programs to fill the GPU twice over (the H200's 132 SMs: 264), chunks of at least
    BLOCK_N keys."""
    assert num_splits(1, 4, 4096, 264) == 4096 // BLOCK_N   # chunk-bound
    assert num_splits(1, 4, 160, 264) == 3
    assert num_splits(32, 4, 4096, 264) == 3                # 384 programs
    assert num_splits(64, 4, 4096, 264) == 2                # 256 programs: 2 splits, not 1
    assert num_splits(66, 4, 4096, 264) == 1
    assert num_splits(1, 1, 1, 264) == 1


def test_one_split_for_short_contexts(monkeypatch):
    """DROPLESS_DECODE_ATTN_ONE_SPLIT=N: contexts up to N keys in one chunk, longer ones split as
    before; the output is SDPA's either way; a value that is not a count of keys is refused."""
    monkeypatch.setenv("DROPLESS_DECODE_ATTN_ONE_SPLIT", "256")
    assert num_splits(1, 4, 160, 264) == 1 and num_splits(1, 4, 256, 264) == 1
    assert num_splits(1, 4, 257, 264) == 5
    check_attention(3, 2, 4, 64, 200, torch.float32)
    for bad in ("-1", "yes", "2.5"):
        monkeypatch.setenv("DROPLESS_DECODE_ATTN_ONE_SPLIT", bad)
        with pytest.raises(ValueError, match="allowed: an integer >= 0"):
            num_splits(1, 4, 160, 264)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [256, 4096])
@pytest.mark.parametrize("b", [1, 32])
def test_decode_attention_on_cuda_at_qwen3_shape(dtype, length, b):
    """Qwen3-30B-A3B's attention (32 heads, 4 kv heads, head_dim 128): rows at random positions
    below `length`, the first at its last key and the last at the scratch position; then the
    same call captured in a CUDA graph and replayed at other positions."""
    gen = torch.Generator().manual_seed(b)
    positions = torch.randint(0, length, (b,), generator=gen)
    positions[0], positions[-1] = length - 1, length + 15
    check_attention(b, 4, 8, 128, length, dtype, S=length + 16, device="cuda",
                    positions=positions)
    q = torch.randn(b, 32, 128, device="cuda", dtype=dtype)
    k_cache, v_cache = (torch.randn(b, 4, length, 128, device="cuda", dtype=dtype)
                        for _ in range(2))
    pos = torch.full((b,), length - 1, device="cuda")
    decode_attention(q, k_cache, v_cache, pos, length)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, pos, length)
    pos.copy_(torch.randint(0, length, (b,), generator=gen))
    graph.replay()
    assert torch.equal(out, decode_attention(q, k_cache, v_cache, pos, length))
