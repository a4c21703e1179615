"""The MoE against a dense model of the same compute per token, each trained by `dropless train`.

    python benchmarks/moe_vs_dense.py --device cuda --json moe_vs_dense.json --plot moe_vs_dense.png
    python benchmarks/moe_vs_dense.py --device cpu --preset tiny --steps 40      # smoke test

Three runs of `dropless.train.train()` (the function behind `dropless train`, so no loop of its own)
on the same batches, schedule and seed: PRESET-dense (every block a dense SwiGLU of hidden
top_k * expert hidden: the MoE's FLOPs per token), PRESET (the MoE) and PRESET-2x (twice the
experts at the same top-k and hidden: the same FLOPs per token, twice the expert parameters). Each
run writes its own run directory; this script reads their metrics.jsonl and prints a table (final
validation loss; the tokens and training seconds each model needs to reach the dense model's final
validation loss, interpolated between evaluation points; their ratios to dense) and, with --plot,
validation loss against tokens and against training seconds.

Training seconds are wall-clock without evaluation: train() times each metrics line's window of
steps apart from the evaluation that follows it, so a window lasts tokens / tokens_per_s seconds.
On CUDA a few warm-up steps per model (--warm-steps, in a scratch directory) first compile and load
the kernels, so that no model pays one-off start-up costs in its timed run.

The learning rate is constant after warmup by default (--min-lr-ratio 1): under a decaying
schedule a model's loss at 60% of its run is not the loss of a run that stops there, and "tokens to
reach the dense model's final loss" would measure the schedule's annealing as much as the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

# each family's run. small: 13.1 M tokens (1.6 epochs of the stdlib corpus at BPE 8192; more steps
# give the routers time to specialise, more epochs would favour memorising), three runs in about
# 3-6 minutes on one H200 (estimated: 150-400k tokens/s, plus warm-ups, BPE training, checkpoints)
FAMILY_DEFAULTS = {
    "tiny": dict(batch_size=16, seq_len=128, steps=900, lr=3e-3, eval_batches=4),
    "small": dict(batch_size=32, seq_len=512, steps=800, lr=1e-3, eval_batches=16),
    "medium": dict(batch_size=16, seq_len=1024, steps=600, lr=1e-3, eval_batches=16),
}


# ---- reading runs (pure functions; tested in tests/test_moe_vs_dense.py) -------------------------

def val_curve(records: list[dict]) -> list[dict]:
    """A run's evaluation points: step, tokens, training seconds so far and validation loss."""
    curve, seconds, tokens = [], 0.0, 0
    for r in records:
        seconds += (r["tokens"] - tokens) / r["tokens_per_s"]   # this line's window of steps
        tokens = r["tokens"]
        if "val_loss" in r:
            curve.append({"step": r["step"], "tokens": tokens, "seconds": seconds,
                          "val_loss": r["val_loss"]})
    return curve


def reach(curve: list[dict], target: float) -> dict | None:
    """Tokens and seconds at which the validation loss first gets to `target`, linear between the
    two evaluation points around the crossing (the first point itself when it is already there);
    None when it never does."""
    previous = None
    for point in curve:
        if point["val_loss"] <= target:
            if previous is None:
                return {"tokens": point["tokens"], "seconds": point["seconds"]}
            f = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return {k: previous[k] + f * (point[k] - previous[k]) for k in ("tokens", "seconds")}
        previous = point
    return None


def summarize(runs: list[dict]) -> tuple[float, list[dict]]:
    """-> (target, rows). runs[0] is the dense reference; target is its final validation loss.
    A run: {"preset", "ffn", "total_params", "active_params", "flops_per_token", "curve"}."""
    target = runs[0]["curve"][-1]["val_loss"]
    rows = []
    for run in runs:
        last = run["curve"][-1]
        hit = reach(run["curve"], target)
        rows.append({k: v for k, v in run.items() if k != "curve"} | {
            "final_val_loss": last["val_loss"], "tokens": last["tokens"],
            "seconds": last["seconds"], "tokens_per_s": last["tokens"] / last["seconds"],
            "reach_tokens": None if hit is None else hit["tokens"],
            "reach_seconds": None if hit is None else hit["seconds"]})
    for row in rows:
        for key in ("tokens", "seconds"):
            mine, dense = row[f"reach_{key}"], rows[0][f"reach_{key}"]
            row[f"{key}_ratio"] = mine / dense if mine is not None and dense else None
    return target, rows


def format_table(target: float, rows: list[dict]) -> str:
    """Markdown: one row per model, the dense reference first."""
    def cell(x, fmt, missing):
        return missing if x is None else format(x, fmt)

    lines = [f"Target: the dense model's final validation loss, {target:.4f} nats/token.", "",
             "| model | FFN | total params | active params | train GFLOP/token | tokens/s | "
             "final val loss | tokens to target | x dense | seconds to target | x dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach_tokens = None if r["reach_tokens"] is None else f"{r['reach_tokens'] / 1e6:.2f} M"
        lines.append(
            f"| {r['preset']} | {r['ffn']} | {r['total_params'] / 1e6:.1f} M | "
            f"{r['active_params'] / 1e6:.1f} M | {r['flops_per_token'] / 1e9:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['final_val_loss']:.4f} | "
            f"{cell(reach_tokens, 's', 'not reached')} | {cell(r['tokens_ratio'], '.2f', '-')} | "
            f"{cell(r['reach_seconds'], '.1f', 'not reached')} | "
            f"{cell(r['seconds_ratio'], '.2f', '-')} |")
    return "\n".join(lines)


def plot(runs: list[dict], target: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained", sharey=True)
    later = [p["val_loss"] for run in runs for p in run["curve"][len(run["curve"]) // 8:]]
    for ax, key, scale, label in ((axes[0], "tokens", 1e6, "training tokens (millions)"),
                                  (axes[1], "seconds", 1, "training wall-clock (seconds)")):
        for run, color in zip(runs, ("black", "tab:blue", "tab:orange", "tab:green")):
            xs = [p[key] / scale for p in run["curve"]]
            ax.plot(xs, [p["val_loss"] for p in run["curve"]], "o-", ms=3, lw=1.5, color=color,
                    label=f"{run['preset']} ({run['ffn']})")
            hit = reach(run["curve"], target)
            if hit is not None:
                ax.plot(hit[key] / scale, target, "x", ms=10, mew=2, color=color)
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"dense final ({target:.3f})")
        ax.set_xlabel(label)
        ax.set_xlim(0, None)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].set_ylim(min(later) - 0.05, max(later) + 0.05)   # the first evaluations are far above
    axes[0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- running -----------------------------------------------------------------------------------

def _environment(device) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


def _release(device) -> None:
    """Free the finished run's model and optimizer before the next one is built."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(FAMILY_DEFAULTS),
                   help="the MoE; its NAME-dense and NAME-2x partners train beside it")
    p.add_argument("--steps", type=int, help="optimizer steps per run (family default)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="LR warmup steps (default steps / 10)")
    p.add_argument("--min-lr-ratio", type=float, default=1.0, help="1 = constant LR after warmup")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default steps / 20)")
    p.add_argument("--eval-batches", type=int, help="validation batches (family default)")
    p.add_argument("--tokenizer", default="bpe")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--data", help="corpus (default: this Python's stdlib .py files)")
    p.add_argument("--site-packages-mb", type=float, metavar="MB",
                   help="instead of --data: the first MB megabytes of the .py files of this "
                        "Python's site-packages (sorted by path), written as OUT/corpus.jsonl: "
                        "a larger corpus already on the machine (no download)")
    p.add_argument("--cache-dir", help="token cache (default ~/.cache/dropless/tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each model's step (default off: the runs measured so far "
                        "are eager; `dropless train` compiles by default on one GPU)")
    p.add_argument("--warm-steps", type=int, help="warm-up steps per model before its timed run "
                                                  "(default 3 on CUDA, 0 on CPU)")
    p.add_argument("--out", help="parent of the run directories (default runs/moe_vs_dense-TIME); "
                                 "finished runs in it are reused")
    p.add_argument("--json", type=Path, help="write settings, table and curves here")
    p.add_argument("--plot", type=Path, help="write the two-panel PNG here")
    return p.parse_args(argv)


def site_packages_corpus(path: Path, megabytes: float) -> Path:
    """A .jsonl corpus (one document per file) of the .py files of this Python's site-packages, in
    path order, up to `megabytes` of text: larger than the stdlib, and already on every machine
    that has torch. Written once; an existing file is reused."""
    import sysconfig

    if path.is_file():
        return path
    root = Path(sysconfig.get_paths()["purelib"])
    budget, lines = int(megabytes * 2**20), []
    for file in sorted(root.rglob("*.py")):
        if budget <= 0:
            break
        if not file.is_file() or "__pycache__" in file.parts:
            continue
        text = file.read_bytes().decode("utf-8", errors="replace")
        if text.strip() and "\x00" not in text:
            lines.append(json.dumps({"text": text}))
            budget -= len(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    print(f"corpus: {len(lines):,} .py files of {root} ({megabytes - budget / 2**20:.0f} MB) "
          f"-> {path}", flush=True)
    return path


def run(args) -> dict:
    from dropless import data
    from dropless.parallel.checkpoint import latest
    from dropless.config import PRESETS, TrainConfig
    from dropless.errors import DroplessError
    from dropless.info import model_stats
    from dropless.plots import read_metrics
    from dropless.tokenizer import tokenizer_from_json
    from dropless.precision import resolve_device
    from dropless.train import train

    out = Path(args.out or f"runs/moe_vs_dense-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.site_packages_mb:
        if args.data:
            raise DroplessError("give --data or --site-packages-mb, not both")
        args.data = str(site_packages_corpus(out / "corpus.jsonl", args.site_packages_mb))
    flags = ("steps", "batch_size", "seq_len", "lr", "warmup", "eval_every", "eval_batches")
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    shape = FAMILY_DEFAULTS[args.preset] | given
    steps = shape["steps"]
    shape = {"warmup": steps // 10, "eval_every": max(1, steps // 20)} | shape
    base = TrainConfig(
        out=str(out), preset=args.preset, data=args.data, tokenizer=args.tokenizer,
        vocab=args.vocab, min_lr_ratio=args.min_lr_ratio,
        log_every=shape["eval_every"], ckpt_every=steps, seed=args.seed, device=args.device,
        cache_dir=args.cache_dir, sample_tokens=0, compile=args.compile, **shape)
    device = resolve_device(args.device)
    warm_steps = args.warm_steps if args.warm_steps is not None else 3 * (device.type == "cuda")
    settings = {k: v for k, v in asdict(base).items() if k not in ("out", "preset")}
    # a run finished by an earlier call with the same settings is reused: a comparison cut short
    # (a time limit) continues where it stopped
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise DroplessError(f"{out} holds runs made with other settings ({saved}): choose "
                            "another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings))
    runs = []
    for preset in (f"{args.preset}-dense", args.preset, f"{args.preset}-2x"):
        cfg = replace(base, preset=preset, out=str(out / preset))
        run_dir = Path(cfg.out)
        if latest(run_dir) is not None:
            print(f"{preset}: reusing the finished run in {run_dir}", flush=True)
        else:
            if warm_steps:
                scratch = out / f"warmup-{preset}"
                shutil.rmtree(scratch, ignore_errors=True)
                train(replace(base, preset=preset, out=str(scratch), steps=warm_steps, warmup=1,
                              eval_every=warm_steps, eval_batches=1, ckpt_every=warm_steps),
                      progress=False)
                shutil.rmtree(scratch)
                _release(device)
            train(cfg, progress=False)
            _release(device)
        vocab = tokenizer_from_json((run_dir / "tokenizer.json").read_text()).vocab_size
        model_cfg = replace(PRESETS[preset], vocab_size=vocab,
                            max_seq_len=max(PRESETS[preset].max_seq_len, cfg.seq_len))
        stats = model_stats(model_cfg, cfg.seq_len)
        moe = model_cfg.moe
        runs.append({"preset": preset, "run_dir": str(run_dir),
                     "ffn": f"dense {model_cfg.dense_hidden}" if preset.endswith("-dense")
                     else f"{moe.num_experts} x {moe.hidden_dim}, top-{moe.top_k}",
                     "total_params": stats["total_params"], "active_params": stats["active_params"],
                     "flops_per_token": stats["train_flops_per_token"],
                     "curve": val_curve(read_metrics(run_dir / "metrics.jsonl"))})
        last = runs[-1]["curve"][-1]
        print(f"{preset}: {last['step']} steps, {last['tokens']:,} tokens in "
              f"{last['seconds']:.1f} s of training ({last['tokens'] / last['seconds']:,.0f} "
              f"tokens/s), final val loss {last['val_loss']:.4f}", flush=True)
    assert len({r["curve"][-1]["tokens"] for r in runs}) == 1, "every model sees the same tokens"
    tok = tokenizer_from_json((Path(runs[0]["run_dir"]) / "tokenizer.json").read_text())
    tokens = data.load_tokens(data.read_documents(base.data), tok, Path(base.cache_dir) if
                              base.cache_dir else data.default_cache_dir())   # cached: no re-encode
    target, rows = summarize(runs)
    name = (f"the first {args.site_packages_mb:g} MB of site-packages .py files"
            if args.site_packages_mb else base.data or "stdlib .py files")
    corpus = {"name": name, "tokenizer": base.tokenizer,
              "vocab": tok.vocab_size,
              "train_tokens": len(tokens.train), "val_tokens": len(tokens.val),
              "epochs": runs[0]["curve"][-1]["tokens"] / len(tokens.train)}
    return {"settings": settings | {"warm_steps": warm_steps}, "corpus": corpus,
            "environment": _environment(device), "target_val_loss": target, "rows": rows,
            "curves": {r["preset"]: r["curve"] for r in runs}}


def main(argv: list[str] | None = None) -> int:
    from dropless.errors import DroplessError

    args = _parse(argv)
    try:
        result = run(args)
    except (DroplessError, ValueError) as e:   # a user mistake: one line, no traceback
        print(f"moe_vs_dense: error: {e}", file=sys.stderr)
        return 1
    s, c, env = result["settings"], result["corpus"], result["environment"]
    print(f"\n{env['date']}, {env['device']}, torch {env['torch']}, Python {env['python']}, "
          f"commit {env['commit'] or '?'}")
    print(f"corpus: {c['name']}, {c['tokenizer']} vocab "
          f"{c['vocab']}: {c['train_tokens']:,} training / {c['val_tokens']:,} validation tokens; "
          f"each run {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens "
          f"({c['epochs']:.2f} epochs), lr {s['lr']:g} (warmup {s['warmup']}, min ratio "
          f"{s['min_lr_ratio']:g}), seed {s['seed']}\n")
    if c["epochs"] > 2:   # seen on a GPU machine whose stdlib was a third of this one's
        print(f"WARNING: {c['epochs']:.1f} epochs of a {c['train_tokens']:,}-token corpus: the "
              "models overfit, so the table measures memorisation more than learning; give "
              "--data a larger corpus or fewer --steps\n")
    print(format_table(result["target_val_loss"], result["rows"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        tokens_per_step = s["batch_size"] * s["seq_len"]
        title = (f"{result['rows'][1]['preset']} vs dense at equal FLOPs per token "
                 f"({env['device']}, {s['steps']} steps x {tokens_per_step:,} tokens)")
        plot([{"preset": r["preset"], "ffn": r["ffn"], "curve": result["curves"][r["preset"]]}
              for r in result["rows"]], result["target_val_loss"], args.plot, title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
