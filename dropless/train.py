"""Training: `train()` is one visible loop; the data, checkpoint and plot helpers live beside it.

Legend: B batch, T sequence length, V vocab, L MoE layers, E experts.

Scale-out: under torchrun every rank runs this same loop on its slice of each global batch
(`--batch-size` is global), so 1 and N processes train on the same data; rank 0 alone prints,
logs and plots. Checkpoints (dropless.checkpoint) are DCP on 1 and N processes alike and load at
any world size.

Exact resume: a batch is a pure function of (seed, step, micro-batch) and the checkpoint holds the
model, AdamW state, step, RNG states and the log window, so on CPU a resumed run's losses are bitwise
equal to an uninterrupted run's. The LR schedule is a pure function of (step, config).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless import data
from dropless.parallel import checkpoint as ckpt
from dropless.checkpoint import architecture, claim_run_dir, config_to_dict
from dropless.config import TrainConfig
from dropless.conversations import IGNORE, loss_weights
from dropless.errors import DroplessError
from dropless.finetune import base_config, load_source, run_config
from dropless.optim import lr_at, make_optimizer, total_norm
from dropless.runlog import MetricsLog, StopOnInterrupt
from dropless.precision import (autocast_for, bf16_peak_flops, resolve_compile, resolve_device,
                                resolve_precision)
from dropless.plots import write_plots
from dropless.train_report import diverged, training_sample


def lm_loss(model: nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor, params=None):
    """(mean next-token cross-entropy in float32, the model's aux). The loss is part of the function
    that `--compile` compiles, so the logits' upcast fuses into the loss kernels: no float32 copy
    of the [B*T, V] logits nor of their gradient (~4 GB of traffic per step at the medium shape).
    `params`: tensors that stand in for some of the model's parameters (bf16-mixed's working
    copies, MasterAdamW)."""
    logits_BTV, aux = torch.func.functional_call(model, params, (x_BT,)) if params else model(x_BT)
    # a mean over the targets the loss covers (--assistant-only-loss: IGNORE elsewhere); 0, not
    # NaN, where it covers none
    total = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), reduction="sum",
                            ignore_index=IGNORE)
    return total / (y_BT != IGNORE).sum().clamp(min=1), aux


@torch.no_grad()
def evaluate(model: nn.Module, windows, device: torch.device, amp, rt=None) -> float:
    """Mean loss over the targets of `windows` (those the loss covers); under torchrun each rank
    takes its slice of every window. Eager under --compile too: a no-grad graph would compile
    once more (seconds) to save milliseconds per evaluation."""
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for x_BT, y_BT in windows:
        x_BT, y_BT = (x_BT, y_BT) if rt is None else (rt.shard_batch(x_BT), rt.shard_batch(y_BT))
        n = (y_BT != IGNORE).sum().to(device)
        with amp:
            total += lm_loss(model, x_BT.to(device), y_BT.to(device))[0].float() * n
        count += n
    model.train()
    total, count = (total, count) if rt is None else (rt.all_mean(total), rt.all_mean(count))
    return (total / count).item()   # sync: the value is logged


def train(cfg: TrainConfig, *, state: dict | None = None, progress: bool = True,
          on_step=None) -> dict:
    """Train (or, given a checkpoint `state` from `resume_config`, continue) one run; returns a
    summary dict. `on_step(step, loss)` is called after every optimizer step. Under torchrun,
    every rank calls this; the process group lives for the duration of the call."""
    from dropless.parallel import runtime
    from dropless.parallel.mesh import ParallelConfig

    device = resolve_device(cfg.device)   # its own message, not an "invalid parallel layout"
    # every rank reads the source's config and tokenizer; its weights, rank 0 alone
    source = load_source(cfg.init) if cfg.init and state is None else None
    base = base_config(cfg, state, source)
    try:
        pcfg = ParallelConfig(dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, ep=cfg.ep)
        rt = runtime.init(pcfg, device, base.moe.num_experts)
    except ValueError as e:
        kept = "" if state is None else (   # the layout flags may come from the run
            f" (resuming: --ep {cfg.ep} --dp-replicate {cfg.dp_replicate} are the run's unless "
            "--ep/--dp-shard/--dp-replicate are given)")
        raise DroplessError(f"invalid parallel layout: {e}{kept}") from None
    try:
        if cfg.batch_size % rt.world:
            raise DroplessError(f"--batch-size {cfg.batch_size} is invalid: the global batch must "
                                f"split evenly over {rt.world} ranks")
        with ExitStack() as claim:
            # rank 0 owns the run directory (in use, not a run, unwritable: refused on every rank)
            rt.main_first(lambda: claim.enter_context(claim_run_dir(Path(cfg.out),
                                                                    new=state is None)),
                          f"refused --out {cfg.out}")
            summary = _train(cfg, rt, state, progress, on_step, base, source)
        # rank 0 still writes the plots and reports: a rank that exited first with 130 (a stopped
        # run) would make torchrun kill it halfway, its message unsaid
        rt.barrier()
        return summary
    finally:
        rt.shutdown()


def train_step(model: nn.Module, loss_fn, opt, batches, amp, cfg: TrainConfig, rt, L: int, E: int):
    """One optimizer step over `batches` (the micro-batches, already on the device): forward and
    backward of LM + MoE losses, gradient clipping, AdamW, the aux-loss-free bias step. No host
    sync. `loss_fn`: lm_loss or its compiled form. Returns the step's mean LM loss, mean aux
    loss, grad norm and global loads [L, E]. The balance loss is taken per micro-batch (f and P
    over its tokens, Megatron-Core's default); the LM and z losses are per-token means, so
    their average over the equal micro-batches is the whole step's (the LM loss's weighted by
    covered targets under --assistant-only-loss)."""
    device = rt.device
    lm_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    loads_LE = torch.zeros(L, E, dtype=torch.long, device=device)
    params = opt.working_params()
    weights = loss_weights(batches, rt) if cfg.assistant_only_loss else [1] * len(batches)
    for (x_BT, y_BT), weight in zip(batches, weights):
        with amp:
            lm, aux = loss_fn(model, x_BT, y_BT, params)
        lm = lm * weight
        aux_loss = aux.balance_loss + aux.z_loss
        ((lm + aux_loss) / len(batches)).backward()
        if len(batches) > 1:
            opt.accumulate()
        lm_sum += lm.detach()
        aux_sum += aux_loss.detach()
        loads_LE += aux.tokens_per_expert
    if rt.mesh is None:
        # clipping inside the fused AdamW kernels where they run: they divide every gradient
        # as they read it (the hook GradScaler uses), which saves a pass over them all
        grad_norm = total_norm(opt.gradients())
        if cfg.grad_clip:
            opt.divide_gradients(((grad_norm + 1e-6) / cfg.grad_clip).clamp(min=1.0))
    else:   # gradients are DTensors on two meshes (dense, experts)
        from dropless.parallel.fsdp import clip_grad_norm_
        from dropless.parallel.loads import all_reduce_loads

        grad_norm = clip_grad_norm_(list(model.parameters()), cfg.grad_clip or math.inf)
        loads_LE = all_reduce_loads(loads_LE, rt.mesh)   # the global batch's loads
        lm_sum, aux_sum = rt.all_mean(lm_sum), rt.all_mean(aux_sum)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_bias(loads_LE)
    return lm_sum / len(batches), aux_sum / len(batches), grad_norm, loads_LE


def _build_model(cfg: TrainConfig, rt, model_cfg, state: dict | None, precision: str, source):
    """The model and optimizer, seeded (or the --init source's weights), parallelized under
    torchrun (the optimizer then holds the sharded parameters), restored from the checkpoint when
    resuming."""
    from dropless.model import Transformer
    from dropless.parallel import parallel_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def cast(model):   # an --init source's may be bf16; the router's bias (a buffer) stays fp32
        for p in model.parameters():
            p.data = p.data.to(dtype)
        return model
    torch.manual_seed(cfg.seed)
    # --init: the source's tensors become the model's (one host copy, none kept after)
    whole = (lambda: source.take_model(model_cfg)) if source else lambda: Transformer(model_cfg)
    if rt.mesh is None and state is None:
        model = cast(whole().to(rt.device))
    else:   # FSDP's bf16 parameters under bf16-mixed; none for fp32 and bf16. Resuming: empty
        model = parallel_model(whole, lambda: cast(Transformer(model_cfg)), rt,
                               mixed_precision=precision == "bf16-mixed", fill=state is None)
    opt = make_optimizer(model, cfg, working_copies=precision == "bf16-mixed" and rt.mesh is None)
    if state is not None:
        ckpt.load(state["path"], model, opt)   # any saved mesh -> this one
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        if rt.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(torch.tensor(state["rng"]["cuda"], dtype=torch.uint8),
                                     rt.device)
    return model, opt


def _train(cfg: TrainConfig, rt, state: dict | None, progress: bool, on_step, base,
           source) -> dict:
    from tqdm.auto import tqdm

    from dropless.info import model_stats

    run_dir = Path(cfg.out)
    device = rt.device

    # 1. data and tokenizer (the model's vocab follows the tokenizer); rank 0 fills the cache first
    prepared = rt.main_first(lambda: data.prepare(cfg, state, source, progress and rt.is_main),
                             "could not prepare the data")
    tok, tokens = prepared or data.prepare(cfg, state, source)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(run_dir / "tokenizer.json", tok.to_json().encode())
        if source is not None:   # a fine-tuned instruct model stops and chats as its source
            from dropless.serve.text import copy_chat_files
            copy_chat_files(cfg.init, run_dir, source.cfg.vocab_size, source.tokenizer)
    # the one source of the expert backend: --backend, recorded in the model config that is saved
    model_cfg = run_config(cfg, base, tok.vocab_size)
    name = f"{Path(cfg.init).name} (--init)" if cfg.init else cfg.preset
    if state is not None and architecture(state["model_config"]) != architecture(
            config_to_dict(model_cfg)):
        raise DroplessError(f"config mismatch on resume: preset {cfg.preset!r} no longer "
                            "matches the model in the checkpoint")
    baseline = data.unigram_entropy(tokens.val, tok.vocab_size, tokens.val_mask)

    # 2. model, optimizer, precision and the step's cost (for tokens/s and MFU)
    precision = resolve_precision(cfg.precision, device)
    model, opt = _build_model(cfg, rt, model_cfg, state, precision, source)
    L, E = len(model.moe_layers()), model_cfg.moe.num_experts
    step = 0
    # the log window's sums stay on the device (float64: as exact as the host's floats), so that
    # a step needs no host sync: the host launches the next step while the GPU runs this one,
    # and reads the window only when it logs (a sync per step cost ~15% at medium)
    saved = state["window"] if state is not None else {"loss": 0.0, "aux": 0.0, "steps": 0,
                                                       "loads": torch.zeros(L, E).tolist()}
    window = {"loss": torch.tensor(saved["loss"], dtype=torch.float64, device=device),
              "aux": torch.tensor(saved["aux"], dtype=torch.float64, device=device),
              "steps": saved["steps"],
              "loads": torch.tensor(saved["loads"], dtype=torch.long, device=device).reshape(L, E)}
    if state is not None:
        step = state["step"]
    compiled = resolve_compile(cfg.compile, device, rt.world)
    loss_fn = torch.compile(lm_loss) if compiled else lm_loss
    amp = autocast_for(precision, device)
    val_windows = data.eval_batches(tokens.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                    tokens.val_mask)
    # windows that hold no target the loss covers (--assistant-only-loss) evaluate to NaN
    val_covered = any(bool((y_BT != IGNORE).any()) for _, y_BT in val_windows)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model_stats(model_cfg, cfg.seq_len)["train_flops_per_token"]
    peak = bf16_peak_flops(device) if precision != "fp32" else None
    mfu = (lambda tokens_per_s: tokens_per_s * flops_per_token / (peak * rt.world)) if peak \
        else (lambda tokens_per_s: None)

    def checkpoint() -> None:   # JSON beside the tensors: RNG states and loads as lists of ints
        if not window["loss"].isfinite().item():   # sync: a checkpoint reads the window anyway
            raise diverged(cfg, precision, recent, step, clock_step, saved_step)
        extra = {
            "schedule": {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps,
                         "min_lr_ratio": cfg.min_lr_ratio},
            "rng": {"torch": torch.get_rng_state().tolist(),
                    "cuda": torch.cuda.get_rng_state(device).tolist()
                    if device.type == "cuda" else None},
            "data": {"key": tokens.key, "seed": cfg.seed},   # batches are f(seed, step)
            "window": {"loss": window["loss"].item(), "aux": window["aux"].item(),
                       "steps": window["steps"], "loads": window["loads"].tolist(),
                       "recent": torch.stack(list(recent)).tolist() if recent else []},
            "train_config": asdict(cfg),
            "model_config": config_to_dict(model_cfg), "tokenizer": tok.to_json(),
            # the torchrun job that wrote it: a restart of that job (and only of it) resumes it
            "job": os.environ.get("TORCHELASTIC_RUN_ID")}
        if log is not None:   # its lines through `step` outlive a power cut as the checkpoint does
            log.sync()
        ckpt.save(run_dir, step, model, opt, extra)

    # 3. the loop
    log = MetricsLog(run_dir / "metrics.jsonl", keep_through=step) if rt.is_main else None
    # the last steps' losses, on the device; a resumed run's summary takes in those before it
    recent = deque(torch.tensor(saved.get("recent", [])[-20:], dtype=torch.float32,
                                device=device).unbind(), maxlen=20)   # one copy, however long
    val_loss = None
    saved_step = step if state is not None else -1
    start_time = time.perf_counter()
    # tokens/s counts from the end of this process's first step (compilation, kernel autotuning
    # and the allocator's first growth happen there: seconds that a long run does not pay again)
    rate_step, rate_time, warm = step, start_time, False
    clock, clock_step = start_time, step   # a resumed window holds steps of the run before it
    paused = 0.0   # seconds spent evaluating and checkpointing: not training, so not in tokens/s
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (progress and rt.is_main), desc=f"train {name}")

    def timed(fn) -> float:   # a checkpoint's seconds: not training, so not in tokens/s
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def stop_now(stop) -> bool:
        """Whether to leave the loop; under torchrun every rank must leave after the same step, so
        they decide it together, here: a stop requested later on one rank (Ctrl-C, or the output
        pipe closing while rank 0 logs) waits for the next step's decision, never makes that rank
        leave alone while the others go on into the next step's collectives."""
        if rt.world == 1:
            return stop.requested
        flag = rt.all_mean(torch.tensor(float(stop.requested), device=device))
        return bool(flag > 0)   # sync: every rank must agree to stop

    with StopOnInterrupt(sigterm=rt.world == 1) as stop, bar:
        while step < cfg.steps and not stop_now(stop):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batches = []
            for micro in range(cfg.grad_accum):
                x_BT, y_BT = data.get_batch(tokens.train, cfg.batch_size, cfg.seq_len,
                                            seed=cfg.seed, step=step, micro=micro,
                                            mask=tokens.train_mask)
                batches.append((rt.shard_batch(x_BT).to(device, non_blocking=True),   # this
                                rt.shard_batch(y_BT).to(device, non_blocking=True)))  # rank's rows
            lm, aux_loss, grad_norm, loads_LE = train_step(model, loss_fn, opt, batches, amp,
                                                           cfg, rt, L, E)
            step += 1

            recent.append(lm.detach())
            window["loss"] += lm.detach()
            window["aux"] += aux_loss.detach()
            window["steps"] += 1
            window["loads"] += loads_LE
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            log_now = step % cfg.log_every == 0 or evaluate_now
            if not warm or log_now or on_step is not None:
                loss = lm.item()   # sync: the bar, the log and the callback
                # a diverged run stops before this step is logged or saved; at a log, the
                # window's mean covers the steps since the last one, which the host did not read
                if not math.isfinite(loss) or log_now and not window["loss"].isfinite().item():
                    raise diverged(cfg, precision, recent, step, clock_step, saved_step)
                now = time.perf_counter()
                if not warm and step < cfg.steps:   # the warm-up step ends: the clock starts
                    rate_step, rate_time, paused = step, now, 0.0   # (a run of one step keeps it)
                warm = True
                postfix = {"loss": f"{loss:.3f}"}
                if step > rate_step:
                    rate = tokens_per_step * (step - rate_step) / (now - rate_time - paused)
                    postfix["tok_s"] = f"{rate:,.0f}"
                    if mfu(rate) is not None:
                        postfix["mfu"] = f"{mfu(rate):.1%}"
                bar.set_postfix(postfix, refresh=False)
            bar.update()
            if on_step is not None:
                on_step(step, loss)

            if log_now:
                loads = window["loads"].double().cpu()
                record = {"step": step, "loss": window["loss"].item() / window["steps"],
                          "aux_loss": window["aux"].item() / window["steps"], "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens": step * tokens_per_step,
                          "tokens_per_s": round(tokens_per_step * (step - clock_step)
                                                / (now - clock)),
                          "expert_load": (loads / loads.sum(-1, keepdim=True).clamp(min=1))
                          .round(decimals=4).tolist()}
                if evaluate_now:
                    eval_start = time.perf_counter()
                    val_loss = evaluate(model, val_windows, device, amp, rt)
                    if val_covered and not math.isfinite(val_loss):   # not logged, not saved
                        raise diverged(cfg, precision, recent, step, step, saved_step, val_loss)
                    paused += time.perf_counter() - eval_start
                    record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    if rt.is_main:
                        bar.write(f"step {step:>6}: train loss {record['loss']:.3f}  val loss "
                                  f"{val_loss:.3f} (ppl {record['val_ppl']:.2f})  nats/token")
                if log is not None:
                    log.write(record)
                window = {"loss": torch.zeros((), dtype=torch.float64, device=device),
                          "aux": torch.zeros((), dtype=torch.float64, device=device),
                          "steps": 0, "loads": torch.zeros(L, E, dtype=torch.long, device=device)}
                clock, clock_step = time.perf_counter(), step   # eval time is not in tokens/s
            if step % cfg.ckpt_every == 0 and step < cfg.steps:   # the last: after the plots
                saved_step, paused = step, paused + timed(checkpoint)
        if step != saved_step and step < cfg.steps:   # stopped by Ctrl-C between checkpoints
            saved_step, paused = step, paused + timed(checkpoint)
        # 4. plots, then the last step's checkpoint: a run whose last step is saved has all its
        # files (a kill between the two resumes from the checkpoint before and writes them again)
        plot_start = time.perf_counter()
        plots = write_plots(run_dir, baseline) if rt.is_main else []
        plotting = time.perf_counter() - plot_start
        if step != saved_step:   # the last step's
            paused += timed(checkpoint)
    if log is not None:
        log.file.close()
    loop_end = time.perf_counter() - plotting   # the plots are not the loop's
    elapsed = loop_end - start_time

    # 5. a sample
    finished = step == cfg.steps
    sample = (training_sample(model, model_cfg, cfg, rt, tok) if finished and cfg.sample_tokens
              else None)
    training_s = max(loop_end - rate_time - paused, 1e-9)   # steps rate_step + 1 .. step
    tokens_per_s = tokens_per_step * (step - rate_step) / training_s
    return {"run_dir": str(run_dir), "preset": name, "params": num_params, "step": step,
            "steps": cfg.steps, "finished": finished, "elapsed_s": elapsed,
            "stopped_by": stop.signal_name, "timed_steps": [rate_step + 1, step],
            "steps_here": step - (state["step"] if state is not None else 0),
            "training_s": training_s, "train_loss_steps": len(recent),
            "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s), "precision": precision,
            "compiled": compiled,
            "train_loss": torch.stack(list(recent)).mean().item() if recent else None,
            "val_loss": val_loss if finished else None, "unigram_baseline": baseline,
            "plots": [str(p) for p in plots], "sample": sample}
