"""Training: `train()` is one visible loop; the data, checkpoint and plot helpers live beside it.

Legend: B batch, T sequence length, V vocab, L MoE layers, E experts.

Scale-out: under torchrun every rank runs this same loop on its slice of each global batch
(`--batch-size` is global), so 1 and N processes train on the same data; rank 0 alone prints,
logs and plots; checkpoints are then distributed (dropless.parallel.checkpoint) and load at any
world size, including one process.

Exact resume: a batch is a pure function of (seed, step, micro-batch) and the checkpoint holds the
model, AdamW state, step, RNG states and the log window, so on CPU a resumed run's losses are bitwise
equal to an uninterrupted run's. The LR schedule is a pure function of (step, config).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless import data
from dropless.checkpoint import (CHECKPOINT, claim_run_dir, config_to_dict, latest_state,
                                 save_checkpoint)
from dropless.config import PRESETS, TrainConfig
from dropless.errors import DroplessError
from dropless.optim import lr_at, make_optimizer
from dropless.plots import write_plots
from dropless.tokenizer import ByteTokenizer, tokenizer_from_json, train_bpe

# flags a resumed run may change; every other one must match the checkpoint
RESUMABLE = ("out", "steps", "device", "backend", "eval_every", "eval_batches", "ckpt_every",
             "log_every", "compile", "cache_dir", "sample_tokens", "ep", "dp_shard",
             "dp_replicate")
BPE_SAMPLE_CHARS = 16_000_000   # BPE merges learned from the first ~16 MB of training text
SAMPLE_PROMPT = "def "


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DroplessError(f"--device {name!r} is not a device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DroplessError(f"--device {name}: CUDA is not available on this machine")
    return device


def resume_config(run_dir: str | Path, overrides: dict) -> tuple[TrainConfig, dict]:
    """The saved run's config with `overrides` (flags given on the command line) applied, and the
    checkpoint. Overriding anything outside RESUMABLE is a config mismatch."""
    state = latest_state(run_dir)
    if "train_config" not in state:
        raise DroplessError(f"{run_dir} holds a model without training state (converted from "
                            "Hugging Face?): `dropless generate` can sample it, --resume cannot")
    saved = state["train_config"]
    clashes = [f"--{k.replace('_', '-')} {v} (the run used {saved[k]})"
               for k, v in overrides.items() if k not in RESUMABLE and saved.get(k) != v]
    if clashes:
        raise DroplessError("config mismatch on resume: " + "; ".join(clashes)
                            + "; leave these flags out to continue the run as it was")
    cfg = TrainConfig(**{**saved, **overrides, "out": str(run_dir)})
    if cfg.steps <= state["step"]:
        raise DroplessError(f"{run_dir}: the run already finished {state['step']} steps; "
                            f"pass --steps larger than {state['step']} to train further")
    return cfg, state


class _StopOnInterrupt:
    """First Ctrl-C: the loop finishes its step, checkpoints and returns. Second: interrupt now."""

    requested = False

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _MetricsLog:
    """metrics.jsonl, one object per logged step. On resume, lines past the checkpoint's step
    (logged by the run after its last save) are dropped so the file reads as one straight run."""

    def __init__(self, path: Path, keep_through: int):
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:   # a line cut short by a crash
                continue
            if record["step"] <= keep_through:
                records.append(record)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


@torch.no_grad()
def evaluate(model: nn.Module, windows, device: torch.device, amp, rt=None) -> float:
    """Mean loss over `windows`; under torchrun each rank takes its slice of every window."""
    model.eval()
    losses = []
    for x_BT, y_BT in windows:
        if rt is not None:
            x_BT, y_BT = rt.shard_batch(x_BT), rt.shard_batch(y_BT)
        with amp:
            logits_BTV, _ = model(x_BT.to(device))
        losses.append(F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.to(device).flatten()))
    model.train()
    loss = torch.stack(losses).mean()
    return (loss if rt is None else rt.all_mean(loss)).item()   # sync: the value is logged


def _prepare_data(cfg: TrainConfig, state: dict | None):
    docs = data.read_documents(cfg.data)
    if state is not None:
        tok = tokenizer_from_json(state["tokenizer"])
    elif cfg.tokenizer == "bpe":
        train_texts, chars = [], 0
        for text in data.split_documents(docs)[0]:
            if chars >= BPE_SAMPLE_CHARS:
                break
            train_texts.append(text)
            chars += len(text)
        tok = train_bpe(train_texts, cfg.vocab)
    else:
        tok = ByteTokenizer()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else data.default_cache_dir()
    tokens = data.load_tokens(docs, tok, cache_dir)
    data.check_length(tokens, cfg.seq_len)
    if state is not None and state["data"]["key"] != tokens.key:
        raise DroplessError("config mismatch on resume: the data (or its tokenization) changed "
                            "since the checkpoint was written")
    return tok, tokens


def train(cfg: TrainConfig, *, state: dict | None = None, progress: bool = True,
          on_step=None) -> dict:
    """Train (or, given a checkpoint `state` from `resume_config`, continue) one run; returns a
    summary dict. `on_step(step, loss)` is called after every optimizer step. Under torchrun,
    every rank calls this; the process group lives for the duration of the call."""
    from dropless.parallel import runtime
    from dropless.parallel.mesh import ParallelConfig

    try:
        pcfg = ParallelConfig(dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, ep=cfg.ep)
        rt = runtime.init(pcfg, resolve_device(cfg.device), PRESETS[cfg.preset].moe.num_experts)
    except ValueError as e:
        raise DroplessError(f"invalid parallel layout: {e}") from None
    try:
        if cfg.batch_size % rt.world:
            raise DroplessError(f"--batch-size {cfg.batch_size} is invalid: the global batch must "
                                f"split evenly over {rt.world} ranks")
        # rank 0 owns the run directory; if it refuses, torchrun stops the other ranks
        with claim_run_dir(Path(cfg.out), new=state is None) if rt.is_main else nullcontext():
            return _train(cfg, rt, state, progress, on_step)
    finally:
        rt.shutdown()


def _train(cfg: TrainConfig, rt, state: dict | None, progress: bool, on_step) -> dict:
    from tqdm.auto import tqdm

    from dropless.generate import generate
    from dropless.model import Transformer
    from dropless.parallel import checkpoint as dckpt
    from dropless.parallel import parallelize
    from dropless.parallel.fsdp import clip_grad_norm_
    from dropless.parallel.loads import all_reduce_loads

    run_dir = Path(cfg.out)
    ckpt_path = run_dir / CHECKPOINT
    device = rt.device

    # 1. data and tokenizer (the model's vocab follows the tokenizer); rank 0 fills the cache first
    if not rt.is_main:
        rt.barrier()
    tok, tokens = _prepare_data(cfg, state)
    if rt.is_main:
        rt.barrier()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "tokenizer.json").write_text(tok.to_json())
    preset = PRESETS[cfg.preset]
    model_cfg = replace(preset, vocab_size=tok.vocab_size,
                        max_seq_len=max(preset.max_seq_len, cfg.seq_len))
    if state is not None and state["model_config"] != config_to_dict(model_cfg):
        raise DroplessError(f"config mismatch on resume: preset {cfg.preset!r} no longer "
                            "matches the model in the checkpoint")
    baseline = data.unigram_entropy(tokens.val, tok.vocab_size)

    # 2. model and optimizer, seeded, parallelized under torchrun (the optimizer then holds the
    #    sharded parameters); restored from the checkpoint when resuming
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    model.set_backend(cfg.backend)
    single_state = state is not None and "dcp_path" not in state
    if single_state:
        if rt.world > 1:
            raise DroplessError(f"{run_dir}: a single-process checkpoint resumes in one process "
                                "only; distributed runs resume from distributed checkpoints")
        model.load_state_dict(state["model"])
    if rt.mesh is not None:
        parallelize(model, rt.mesh)
    opt = make_optimizer(model, cfg)
    L, E = len(model.moe_layers()), model_cfg.moe.num_experts
    step = 0
    window = {"loss": 0.0, "aux": 0.0, "steps": 0, "loads": torch.zeros(L, E, dtype=torch.long)}
    if state is not None:
        if single_state:
            opt.load_state_dict(state["optimizer"])
        else:
            dckpt.load(Path(state["dcp_path"]), model, opt)   # any saved mesh -> this one
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, window = state["step"], state["window"]
    forward = torch.compile(model) if cfg.compile else model
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    val_windows = data.eval_batches(tokens.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    num_params = sum(p.numel() for p in model.parameters())

    def checkpoint() -> None:
        extra = {
            "step": step,
            "schedule": {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps,
                         "min_lr_ratio": cfg.min_lr_ratio},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "data": {"key": tokens.key, "seed": cfg.seed},   # batches are f(seed, step)
            "window": window, "train_config": asdict(cfg),
            "model_config": config_to_dict(model_cfg), "tokenizer": tok.to_json()}
        if rt.world > 1:
            dckpt.save(run_dir, step, model, opt, extra)
        else:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        **extra})

    # 3. the loop
    log = _MetricsLog(run_dir / "metrics.jsonl", keep_through=step) if rt.is_main else None
    recent = deque(maxlen=20)
    val_loss = None
    saved_step = step if state is not None else -1
    start_step, start_time = step, time.perf_counter()
    clock = start_time
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (progress and rt.is_main), desc=f"train {cfg.preset}")
    with _StopOnInterrupt() as stop, bar:
        while step < cfg.steps and not stop.requested:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            lm_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            loads_LE = torch.zeros(L, E, dtype=torch.long, device=device)
            for micro in range(cfg.grad_accum):
                x_BT, y_BT = data.get_batch(tokens.train, cfg.batch_size, cfg.seq_len,
                                            seed=cfg.seed, step=step, micro=micro)
                x_BT, y_BT = rt.shard_batch(x_BT), rt.shard_batch(y_BT)   # this rank's rows
                with amp:
                    logits_BTV, aux = forward(x_BT.to(device))
                lm = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.to(device).flatten())
                aux_loss = aux.balance_loss + aux.z_loss
                ((lm + aux_loss) / cfg.grad_accum).backward()
                lm_sum += lm.detach()
                aux_sum += aux_loss.detach()
                loads_LE += aux.tokens_per_expert
            if rt.mesh is None:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            else:   # gradients are DTensors on two meshes (dense, experts)
                grad_norm = clip_grad_norm_(list(model.parameters()), cfg.grad_clip or math.inf)
                loads_LE = all_reduce_loads(loads_LE, rt.mesh)   # the global batch's loads
                lm_sum, aux_sum = rt.all_mean(lm_sum), rt.all_mean(aux_sum)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_bias(loads_LE)
            step += 1
            if rt.world > 1:   # a Ctrl-C seen by any rank stops every rank after the same step
                flag = rt.all_mean(torch.tensor(float(stop.requested), device=device))
                stop.requested = bool(flag > 0)   # sync: every rank must agree to stop

            loss = lm_sum.item() / cfg.grad_accum   # sync: loss for the bar, log and callback
            recent.append(loss)
            window["loss"] += loss
            window["aux"] += aux_sum.item() / cfg.grad_accum
            window["steps"] += 1
            window["loads"] += loads_LE.cpu()
            now = time.perf_counter()
            rate = tokens_per_step * (step - start_step) / (now - start_time)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update()
            if on_step is not None:
                on_step(step, loss)

            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            if step % cfg.log_every == 0 or evaluate_now:
                loads = window["loads"].double()
                record = {"step": step, "loss": window["loss"] / window["steps"],
                          "aux_loss": window["aux"] / window["steps"], "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens": step * tokens_per_step,
                          "tokens_per_s": round(tokens_per_step * window["steps"] / (now - clock)),
                          "expert_load": (loads / loads.sum(-1, keepdim=True).clamp(min=1))
                          .round(decimals=4).tolist()}
                if evaluate_now:
                    val_loss = evaluate(forward, val_windows, device, amp, rt)
                    record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    if rt.is_main:
                            bar.write(f"step {step:>6}: train loss {record['loss']:.3f}  val loss "
                                  f"{val_loss:.3f} (ppl {record['val_ppl']:.2f})  nats/token")
                if log is not None:
                    log.write(record)
                window = {"loss": 0.0, "aux": 0.0, "steps": 0,
                          "loads": torch.zeros(L, E, dtype=torch.long)}
                clock = time.perf_counter()   # eval time does not count against tokens/s
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
                saved_step = step
        if step != saved_step:   # stopped by Ctrl-C between checkpoints
            checkpoint()
    if log is not None:
        log.file.close()
    elapsed = time.perf_counter() - start_time

    plots = write_plots(run_dir, baseline) if rt.is_main else []
    finished = step == cfg.steps
    sample = None
    sample_model = model if finished and cfg.sample_tokens else None
    if sample_model is not None and rt.world > 1:
        # rank 0 samples alone from the gathered weights: a decoding step of collectives across
        # every rank per token would cost far more than one gather
        full, _ = dckpt.full_state(model)
        sample_model = None
        if rt.is_main:
            sample_model = Transformer(model_cfg)
            sample_model.load_state_dict(full)
            sample_model.to(device).set_backend(cfg.backend)
    if sample_model is not None:
        prompt = tok.encode(SAMPLE_PROMPT).tolist()
        new = generate(sample_model, [prompt],
                       min(cfg.sample_tokens, model_cfg.max_seq_len - len(prompt)),
                       temperature=0.8, top_k=40, seed=cfg.seed)[0]
        sample = SAMPLE_PROMPT + tok.decode(new)
    return {"run_dir": str(run_dir), "preset": cfg.preset, "params": num_params, "step": step,
            "steps": cfg.steps, "finished": finished, "elapsed_s": elapsed,
            "tokens_per_s": tokens_per_step * (step - start_step) / max(elapsed, 1e-9),
            "train_loss": sum(recent) / len(recent) if recent else None,
            "val_loss": val_loss if finished else None, "unigram_baseline": baseline,
            "plots": [str(p) for p in plots], "sample": sample}
