"""Int4 packing in AutoAWQ's GEMM layout, checked against an unpacker written independently (numpy,
nibble by nibble from the packing order) and against hand-computed words."""

import numpy as np
import pytest
import torch

from dropless.quant import pack

# AutoAWQ's layout, restated from its description rather than imported: int32 nibble j of a run of
# eight columns holds column ORDER[j]
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def numpy_unpack(packed: torch.Tensor) -> np.ndarray:
    words = packed.numpy().view(np.uint32)
    out = np.zeros((*words.shape[:-1], words.shape[-1] * 8), dtype=np.int64)
    for p in range(words.shape[-1]):
        for j in range(8):
            out[..., 8 * p + ORDER[j]] = (words[..., p] >> np.uint32(4 * j)) & np.uint32(15)
    return out


def numpy_dequant(qweight, qzeros, scales) -> np.ndarray:
    q, z = numpy_unpack(qweight), numpy_unpack(qzeros)
    group = q.shape[-2] // z.shape[-2]
    z = np.repeat(z, group, axis=-2)
    s = np.repeat(scales.float().numpy().astype(np.float64), group, axis=-2)
    return (q - z) * s


def test_known_word():
    # codes 0..7 in columns 0..7: nibbles (low to high) hold columns 0,2,4,6,1,3,5,7
    codes = torch.arange(8, dtype=torch.int32)[None]
    assert pack.pack(codes).item() == 0x75316420
    # all 15: every bit set, the sign bit included
    assert pack.pack(torch.full((1, 8), 15)).item() == -1
    assert pack.unpack(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 7, 40)])
def test_round_trip_against_independent_unpack(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.int32)
    codes[..., 7] = 15   # top nibbles set: negative int32 words
    packed = pack.pack(codes)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert (packed < 0).any()
    np.testing.assert_array_equal(numpy_unpack(packed), codes.numpy())
    assert torch.equal(pack.unpack(packed), codes)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_dequantize_against_numpy(group):
    gen = torch.Generator().manual_seed(group)
    w = torch.randn(2, 256, 48, generator=gen)
    w[0, :, 3] += 5.0   # an offset column: the zero point must move
    qweight, qzeros, scales = pack.quantize_packed(w, group)
    assert qweight.shape == (2, 256, 6) and qzeros.shape == (2, 256 // group, 6)
    assert scales.shape == (2, 256 // group, 48) and scales.dtype == torch.float16
    ref = numpy_dequant(qweight, qzeros, scales)
    np.testing.assert_allclose(pack.dequantize(qweight, qzeros, scales).numpy(), ref, rtol=1e-6,
                               atol=1e-6)
    # round to nearest: inside the range within half a step; the rounded zero point can push a
    # group's extreme by up to another half step (clamped to code 0 or 15)
    step = np.repeat(scales.float().numpy(), group, axis=-2)
    err = np.abs(ref - w.numpy()) / step
    assert err.max() <= 1.0 + 1e-3 and (err > 0.5 + 1e-3).mean() < 0.02


def test_grid_weights_are_exact():
    # weights that sit on a 4-bit grid with an fp16-exact scale come back exactly
    codes = torch.randint(0, 16, (64, 16), generator=torch.Generator().manual_seed(1))
    codes[0], codes[1] = 0, 15            # the full range in every column: scale = 1/8 exactly
    w = (codes.float() - 3) * 0.125
    assert torch.equal(pack.dequantize(*pack.quantize_packed(w, 64)), w)


def test_clip_limits_the_range():
    w = torch.randn(64, 8)
    max_abs = torch.full((1, 8), 0.5)
    w_hat = pack.fake_quantize(w, 64, max_abs)
    assert w_hat.abs().max() <= 0.5 + 0.5 / 15 + 1e-3   # clipped range, plus half a step


@pytest.mark.parametrize("shape,group,match", [((100, 16), 64, "not a multiple of group_size"),
                                               ((64, 12), 64, "not a multiple of 8"),
                                               ((64, 16), 48, "group_size=48 is invalid")])
def test_bad_shapes(shape, group, match):
    with pytest.raises(ValueError, match=match):
        pack.quantize_packed(torch.randn(shape), group)
