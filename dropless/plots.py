"""PNG plots of a run from its metrics.jsonl: loss curves and the experts' share of tokens.

Matplotlib is imported lazily with the Agg backend (no display needed, nothing changed at import).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from dropless.files import write_atomic
from dropless.runlog import read_metrics


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, dpi: int) -> None:
    """The PNG rendered in memory, then written whole: a full disk leaves the previous one."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    write_atomic(path, png.getvalue())


def plot_losses(records: list[dict], path: Path, baseline: float) -> None:
    plt = _pyplot()
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.plot(steps, losses, color="tab:blue", lw=1.5, label=f"train (last {losses[-1]:.2f})")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.5, ms=4,
                label=f"validation (last {val[-1][1]:.2f})")
    ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram baseline ({baseline:.2f})")
    # the first steps' loss is far above the rest: clip the view so the useful range is readable;
    # a diverged run's inf and NaN losses (matplotlib refuses them as limits) are left out of it
    later = losses[len(losses) // 10:] + [v for _, v in val] + [baseline]
    ax.set(ylim=(0, 1.25 * max(filter(math.isfinite, later))), xlim=(0, max(steps)),
           xlabel="optimizer step", ylabel="cross-entropy (nats/token)",
           title=f"Loss per token ({path.parent.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path, dpi=120)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: Path) -> None:
    """Left: each layer's expert shares over training (expert x step). Right: layer x expert share
    over the whole run. Colour is centred on the balanced share 1/E (white); red = overloaded."""
    plt = _pyplot()
    records = [r for r in records if "expert_load" in r]
    shape = np.shape(records[-1]["expert_load"])   # the run's own: an edited line may differ
    records = [r for r in records if np.shape(r["expert_load"]) == shape]
    steps = np.array([r["step"] for r in records])
    share_NLE = np.array([r["expert_load"] for r in records])
    N, L, E = share_NLE.shape
    overall_LE = share_NLE.mean(0)
    norm = dict(cmap="RdBu_r", vmin=0, vmax=2 / E)
    fig = plt.figure(figsize=(12, 1.2 + 1.3 * L), layout="constrained")
    grid = fig.add_gridspec(L, 2, width_ratios=[3, 1])
    for layer in range(L):
        ax = fig.add_subplot(grid[layer, 0])
        image = ax.imshow(share_NLE[:, layer].T, aspect="auto", interpolation="nearest",
                          extent=(0, steps[-1], E - 0.5, -0.5), **norm)
        ax.set(ylabel=f"layer {layer}\nexpert", yticks=range(E) if E <= 16 else range(0, E, E // 8))
        if layer == 0:
            ax.set_title("Each expert's share of its layer's tokens during training")
        if layer < L - 1:
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("optimizer step")
    ax = fig.add_subplot(grid[:, 1])
    ax.imshow(overall_LE, aspect="auto", interpolation="nearest", **norm)
    if E <= 16:
        for (layer, expert), share in np.ndenumerate(overall_LE):
            dark = abs(share - 1 / E) > 0.6 / E     # white text on the saturated cells
            ax.text(expert, layer, f"{100 * share:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
        ax.set_xticks(range(E))
    ax.set(title="Whole run: % of tokens", xlabel="expert", ylabel="layer", yticks=range(L))
    fig.colorbar(image, ax=fig.axes, shrink=0.8,
                 label=f"share of tokens (balanced = 1/{E}; darkest red = {2 / E:.2f} or more)")
    _save(fig, path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: Path, baseline: float) -> list[Path]:   # baseline: the unigram entropy
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return []
    paths = [run_dir / "loss.png"]
    plot_losses(records, paths[0], baseline)
    if any(r.get("expert_load") for r in records):   # dense models log an empty list
        paths.append(run_dir / "expert_load.png")
        plot_expert_load(records, paths[1])
    return paths
