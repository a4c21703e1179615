"""The server's host path alone: can `dropless serve` stream tokens as fast as the device makes
them? The engine's decode step is replaced by a simulated device queue (each step ends `--step-ms`
after the previous one ends, and reading its tokens waits for that, as a CUDA event would), so
everything else is real: admission, the prefill (the model on the CPU), the engine's bookkeeping,
detokenisation, the event loop, SSE over HTTP to concurrent streaming clients (the same client
as benchmarks/decode.py). Prints tokens/s against the ceiling `clients / step`.

    python benchmarks/serve_host.py                        # 32 clients, steps of 0 and 1.5 ms
    python benchmarks/serve_host.py --step-ms 1.5 --clients 8 32 64
    python benchmarks/serve_host.py --step-ms 1.5 --prefill-launches 700 --ungated

With `--prefill-launches N` the prefill is simulated too, as a GPU's is: N tiny torch ops (each
a few microseconds of host time, as a kernel launch is) and no model, so that its time is the host's
launches alone and what the event loop takes from them shows. `--ungated` adds a server whose event
loop does not wait out the prefills (dropless/serve/loop.py). Each round's prefill time in the
server is printed, and the same launches' time in this process alone above the table.

The tokens are whatever the buffers hold (the step computes nothing): this measures host costs
only, never a model's speed. Runs on any machine; a server on a GPU host has these costs plus the
device's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from contextlib import nullcontext

import torch

from decode import build, prompts_for   # this script's folder
from serve_clients import engine_counters, httpx_module, start_server, stop_server, stream_round

PROMPT, NEW = 32, 256


def launches(n: int) -> None:
    """n tiny torch ops: a launch-bound prefill's host time, with its GIL hand-offs."""
    one = torch.zeros(1)
    for _ in range(n):
        torch.add(one, 1)


def serve_main(port: int, step_s: float, max_batch: int, prefill_launches: int,
               ungated: bool) -> None:
    """Subprocess: the `tiny` model on the CPU behind `dropless serve`'s app, its decode step
    replaced by the simulated device queue (and its prefill forward, with prefill_launches)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dropless.serve import Engine
    from dropless.serve.server import serve
    from dropless.serve.text import DEFAULT_CHAT_TEMPLATE, ServedModel
    from dropless.tokenizer import BPETokenizer

    model = build("tiny", "cpu", torch.float32)
    vocab = model.cfg.vocab_size
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    served = ServedModel("bench", model, BPETokenizer(tok), (), DEFAULT_CHAT_TEMPLATE, {})
    engine = Engine(model, max_batch=max_batch, max_len=PROMPT + NEW, cuda_graphs=False)
    done_at = [0.0]   # when the last launched step ends on the simulated device

    class Event:   # what _collect waits on: the end of its step
        def __init__(self):
            self.at = done_at[0]

        def synchronize(self):
            time.sleep(max(0.0, self.at - time.perf_counter()))

    def run_decode(b, greedy, *rest):   # queued behind the previous step, returns at once
        done_at[0] = max(time.perf_counter(), done_at[0]) + step_s

    launch = engine._launch

    def launch_simulated(decoding):
        _, *rest = launch(decoding)   # runs run_decode
        return (Event(), *rest)

    engine._run_decode, engine._launch = run_decode, launch_simulated
    if prefill_launches:
        def prefill_simulated(tokens_nT, *rest):
            launches(prefill_launches)
            return torch.zeros(*tokens_nT.shape, model.cfg.dim)

        engine._prefill_forward = prefill_simulated
    if ungated:
        engine.gate = nullcontext()
    serve(served, engine, "127.0.0.1", port)


def measure(step_ms: float, clients: list[int], args, ungated: bool = False) -> None:
    proc, port = start_server(__file__, ["--step-ms", str(step_ms), "--max-batch",
                                         str(max(clients)), "--prefill-launches",
                                         str(args.prefill_launches)] + ["--ungated"] * ungated)
    try:
        httpx = httpx_module()
        for n in clients:
            prompts = prompts_for(n, PROMPT, 256, seed=n)
            for _ in range(args.warm_up):
                asyncio.run(stream_round(port, prompts, 8))
            for _ in range(args.rounds):
                before = engine_counters(httpx, port)
                r = asyncio.run(stream_round(port, prompts, NEW))
                after = engine_counters(httpx, port)
                prefills = after["prefills"] - before["prefills"]
                prefill_ms = (after["prefill_s"] - before["prefill_s"]) * 1e3
                ceiling = f"{n / (step_ms / 1e3):12,.0f}" if step_ms else f"{'-':>12}"
                ratio = f"{r['tokens_per_s'] * step_ms / 1e3 / n:8.2f}" if step_ms else f"{'-':>8}"
                print(f"{step_ms:8.2f}{n:9}{'no' if ungated else 'yes':>7}"
                      f"{r['tokens_per_s']:12,.0f}{ceiling}{ratio}{r['ttft_ms']:10.1f}"
                      f"{r['itl_ms']:10.2f}{prefills:10}{prefill_ms:12.1f}", flush=True)
    finally:
        stop_server(proc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 1.5],
                    help="simulated device time of one decode step (1.5: the H200's batch-32 "
                         "step of the medium model, round 12)")
    ap.add_argument("--clients", type=int, nargs="+", default=[32])
    ap.add_argument("--prefill-launches", type=int, default=0,
                    help="simulate the prefill forward as this many tiny torch ops (a GPU's "
                         "launch-bound prefill: ~700 for medium's eager blocks); 0: the model")
    ap.add_argument("--ungated", action="store_true",
                    help="also time a server whose event loop does not wait out the prefills")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per client count")
    ap.add_argument("--warm-up", type=int, default=1, help="untimed rounds first (8 tokens)")
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_port:
        return serve_main(args.serve_port, args.step_ms[0] / 1e3, args.max_batch,
                          args.prefill_launches, args.ungated)
    print(f"server host path, {PROMPT}-token prompts, {NEW} tokens each, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    if args.prefill_launches:
        launches(args.prefill_launches)
        start = time.perf_counter()
        launches(args.prefill_launches)
        print(f"prefill simulated as {args.prefill_launches} launches: "
              f"{(time.perf_counter() - start) * 1e3:.1f} ms in this process alone")
    print(f"{'step ms':>8}{'clients':>9}{'gated':>7}{'tokens/s':>12}{'ceiling':>12}{'ratio':>8}"
          f"{'TTFT ms':>10}{'ITL ms':>10}{'prefills':>10}{'prefill ms':>12}")
    for step_ms in args.step_ms:
        for ungated in [False] + [True] * args.ungated:
            measure(step_ms, args.clients, args, ungated)


if __name__ == "__main__":
    main()
