"""The server's host path alone: can `dropless serve` stream tokens as fast as the device makes
them? The engine's decode step is replaced by a simulated device queue (each step ends `--step-ms`
after the previous one ends, and reading its tokens waits for that, as a CUDA event would), so
everything else is real: admission, the prefill (the model on the CPU), the engine's bookkeeping,
detokenisation, the event loop, SSE over HTTP to concurrent streaming clients (the same client
as benchmarks/decode.py). Prints tokens/s against the ceiling `clients / step`.

    python benchmarks/serve_host.py                        # 32 clients, steps of 0 and 1.5 ms
    python benchmarks/serve_host.py --step-ms 1.5 --clients 8 32 64

The tokens are whatever the buffers hold (the step computes nothing): this measures host costs
only, never a model's speed. Runs on any machine; a server on a GPU host has these costs plus the
device's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import torch

from decode import build, prompts_for   # this script's folder
from serve_clients import start_server, stop_server, stream_round

PROMPT, NEW = 32, 256


def serve_main(port: int, step_s: float, max_batch: int) -> None:
    """Subprocess: the `tiny` model on the CPU behind `dropless serve`'s app, its decode step
    replaced by the simulated device queue."""
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
    serve(served, engine, "127.0.0.1", port)


def measure(step_ms: float, clients: list[int]) -> None:
    proc, port = start_server(__file__, ["--step-ms", str(step_ms), "--max-batch",
                                         str(max(clients))])
    try:
        for n in clients:
            prompts = prompts_for(n, PROMPT, 256, seed=n)
            asyncio.run(stream_round(port, prompts, 8))   # warm-up
            r = asyncio.run(stream_round(port, prompts, NEW))
            ceiling = f"{n / (step_ms / 1e3):12,.0f}" if step_ms else f"{'-':>12}"
            ratio = f"{r['tokens_per_s'] * step_ms / 1e3 / n:8.2f}" if step_ms else f"{'-':>8}"
            print(f"{step_ms:8.2f}{n:9}{r['tokens_per_s']:12,.0f}{ceiling}{ratio}"
                  f"{r['ttft_ms']:10.1f}{r['itl_ms']:10.2f}", flush=True)
    finally:
        stop_server(proc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 1.5],
                    help="simulated device time of one decode step (1.5: the H200's batch-32 "
                         "step of the medium model, round 12)")
    ap.add_argument("--clients", type=int, nargs="+", default=[32])
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_port:
        return serve_main(args.serve_port, args.step_ms[0] / 1e3, args.max_batch)
    print(f"server host path, {PROMPT}-token prompts, {NEW} tokens each, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    print(f"{'step ms':>8}{'clients':>9}{'tokens/s':>12}{'ceiling':>12}{'ratio':>8}"
          f"{'TTFT ms':>10}{'ITL ms':>10}")
    for step_ms in args.step_ms:
        measure(step_ms, args.clients)


if __name__ == "__main__":
    main()
