"""AWQ's two searches on calibration activations (Lin et al., 2023), on plain tensors.

Legend: N calibration rows, I input features, O output features, G groups (I / group_size).

1. Scale: quantization error of a weight column matters in proportion to the activation that
   multiplies it. Scaling input channel i of W up by s_i (and the activation down by s_i, folded
   into the previous op) protects the salient channels. s = mean|x|^alpha, alpha on a grid over
   [0, 1); the alpha whose quantized output (x / s) @ Q(diag(s) W) is closest to x @ W wins.
2. Clip: shrinking each group's range below its max |w| trades clipping error for finer steps;
   per (group, output column) the shrink with the smallest error of that group's partial output
   x_g @ w_g wins.
"""

from __future__ import annotations

import torch

from dropless.quant.pack import fake_quantize

SCALE_GRID = 20
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_ROWS = 512           # calibration rows per weight used by the clip search (AutoAWQ's figure)
SCALE_ROWS = 16384        # at most this many rows per weight in the scale search's loss
CLIP_COLUMNS = 2048       # output columns per chunk of the clip search (bounds its memory)


def act_stat(x_NI: torch.Tensor) -> torch.Tensor:
    """mean |x| per input channel, fp32 [I]."""
    return x_NI.abs().float().mean(0)


def _rows(x_NI: torch.Tensor, n: int) -> torch.Tensor:
    """At most n rows, evenly spaced (deterministic)."""
    if x_NI.shape[0] <= n:
        return x_NI
    idx = torch.linspace(0, x_NI.shape[0] - 1, n, device=x_NI.device).long()
    return x_NI[idx]


@torch.no_grad()
def search_scale(stat_I: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                 group_size: int, grid: int = SCALE_GRID) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale s [I] shared by every (x_NI, W_IO) in `pairs`, minimizing the
    summed squared output error of the quantized weights. -> (s, best error, error at s = 1)."""
    pairs = [(_rows(x, SCALE_ROWS).float(), w.float()) for x, w in pairs if x.shape[0]]
    refs = [x @ w for x, w in pairs]
    total = sum(r.numel() for r in refs)
    best, best_err, plain_err = torch.ones_like(stat_I), float("inf"), float("inf")
    for i in range(grid):
        alpha = i / grid
        s = stat_I.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()   # centre the scales around 1 (keeps fp16 ranges sane)
        err = torch.zeros((), device=stat_I.device)
        for (x, w), ref in zip(pairs, refs):
            wq = fake_quantize(w * s[:, None], group_size) / s[:, None]
            err += (x @ wq - ref).pow(2).sum()
        err = err.item() / max(total, 1)   # sync: the grid picks on the host
        if i == 0:
            plain_err = err
        if err < best_err:
            best, best_err = s, err
    return best, best_err, plain_err


@torch.no_grad()
def search_clip(x_NI: torch.Tensor, w_IO: torch.Tensor, group_size: int, grid: int = CLIP_GRID,
                max_shrink: float = CLIP_MAX_SHRINK) -> torch.Tensor:
    """max |w| to keep per (group, output column), [G, O] fp32."""
    x = _rows(x_NI, CLIP_ROWS).float()
    I, O = w_IO.shape
    G = I // group_size
    x_NGC = x.view(-1, G, group_size)
    out = []
    for o0 in range(0, O, CLIP_COLUMNS):
        w = w_IO[:, o0:o0 + CLIP_COLUMNS].float()
        w_GCO = w.view(G, group_size, -1)
        full_GO = w_GCO.abs().amax(1)
        ref = torch.einsum("ngc,gco->ngo", x_NGC, w_GCO)
        best_err = torch.full_like(full_GO, float("inf"))
        best = full_GO.clone()
        for i in range(int(max_shrink * grid)):
            max_abs = full_GO * (1 - i / grid)
            wq = fake_quantize(w, group_size, max_abs).view(G, group_size, -1)
            err = (torch.einsum("ngc,gco->ngo", x_NGC, wq) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, max_abs, best)
        out.append(best)
    return torch.cat(out, dim=1)
