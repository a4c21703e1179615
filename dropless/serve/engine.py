"""The decode engine: a KV cache preallocated in slots, chunked prefill, a decode step with no host
sync (a CUDA graph per batch-size bucket on CUDA), and continuous batching.
Legend: B slots (max batch), b a bucket's rows, T tokens of a chunk, S cache length, V vocab.

One engine `step()`:
1. admit waiting requests into free slots (lowest first, so active rows stay near the top), held up
   to `admit_delay` s or until they fill the free slots, so that arrivals together prefill as one;
2. prefill: up to `prefill_chunk` prompt tokens of the admitted requests, whole chunks in slot
   order, each run of adjacent slots as one padded batch into those slots' caches (a batch of at
   most `prefill_step_tokens` tokens through the decode step's few kernels, a longer one through
   the model's blocks); a finished prompt samples its first token into the decode buffers, read
   back with the step's tokens (one only scored, max_tokens 0, finishes instead); a request that
   asks for its prompt's log-probabilities has them computed from the chunk's hidden states;
3. decode: one token for every slot in rows [0, b), b the smallest bucket that holds every
   decoding slot, attending to cache positions [0, n), n the smallest context bucket past every
   decoding row's position. Inputs and outputs live in static device buffers (tokens, positions,
   sampling parameters, per-row step counters) that the step itself advances, so the host only
   writes them when a request joins or leaves. The step is launched before the previous step's
   tokens are read back (one sync per step), so host work overlaps the device's. Host-to-device
   copies go through pinned memory: from pageable memory CUDA waits for the stream first. A step
   with a row that asks for log-probabilities is a graph of its own that also writes them.

Rows of a bucket with no decoding request (free, finished, prefilling) compute garbage at position
S - 1, which no request uses (prompt + max_tokens <= S: real tokens sit at <= S - 2, masked past).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque

import torch
from tqdm.auto import tqdm

from dropless.model import Transformer
from dropless.ops.device import check_switches
from dropless.serve.decode import decode_blocks, fuse_qkv, make_step, step_tokens_cap
from dropless.serve.graphs import Graphs, sizes
from dropless.serve.kv_cache import new_kv_cache
from dropless.serve.prefill import Prefill
from dropless.serve.readback import LogprobEntry, PinnedPair
from dropless.serve.request import MAX_TOP_LOGPROBS, Request, SamplingParams, close
from dropless.serve.sampling import adjusted, sample, top_logprobs

__all__ = ["Engine", "Request", "SamplingParams"]   # Request types re-exported for callers
log = logging.getLogger("dropless.serve")


class Engine(Prefill):
    def __init__(self, model: Transformer, *, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 1024, cuda_graphs: bool | None = None,
                 buckets: tuple[int, ...] | None = None, compile: bool = False,
                 compile_prefill: bool = False, moe_path: str | None = None,
                 admit_delay: float = 0.0, prefill_step_tokens: int = 128,
                 lengths: tuple[int, ...] | None = None):
        check_switches()
        cfg = model.cfg
        max_len = max_len or cfg.max_seq_len
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} is invalid: must be >= 1")
        if not 2 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} is invalid: must be in [2, max_seq_len="
                             f"{cfg.max_seq_len}]")
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.max_batch, self.max_len = p.device, max_batch, max_len
        self.prefill_chunk, self.admit_delay = prefill_chunk, admit_delay
        self.moe_path = moe_path   # force a decode MoE path (moe_decode.py); None: by size
        # short prompt chunks take the decode step's path: 26 ops a layer, not the blocks' 57
        self.step_tokens = min(prefill_step_tokens, step_tokens_cap(model))
        self.cuda_graphs = p.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.buckets = sizes("buckets", buckets, max_batch, (1 << i for i in range(21)))
        # context buckets (docstring, 3.); compiled steps default to one (a compile each)
        self.lengths = sizes("lengths", lengths, max_len, () if compile else (
            256 << i for i in range(16)))
        # 1. the KV cache: per layer, slots x positions (MLA layers: the compressed latent cache)
        self.caches = new_kv_cache(model, max_batch, max_len)   # a ValueError if it cannot fit
        # GQA's q|k|v weights stacked once (a copy: decode.restack_qkv after weights change)
        self.qkvs = [fuse_qkv(layer.attn) for layer in model.layers]
        # 2. the decode step's static state, one row per slot
        B, dev = max_batch, p.device
        for name, fill, dtype in [("tokens", 0, torch.long), ("positions", max_len - 1, torch.long),
                                  ("steps", 0, torch.long), ("seeds", 0, torch.long),
                                  ("temperature", 0, torch.float32), ("top_k", cfg.vocab_size,
                                  torch.long), ("top_p", 1, torch.float32), ("presence", 0,
                                  torch.float32), ("frequency", 0, torch.float32)]:
            setattr(self, name + "_B", torch.full((B,), fill, dtype=dtype, device=dev))
        # log-probabilities, for the requests that ask: the sampled token's, the top_n most likely
        self.top_n = min(MAX_TOP_LOGPROBS, cfg.vocab_size)
        self.logprobs_B = (torch.zeros(B, device=dev), torch.zeros(B, self.top_n, device=dev),
                           torch.zeros(B, self.top_n, dtype=torch.long, device=dev))
        # each row's output tokens counted, and its logit_bias: made for the first request that
        # adjusts its logits (penalties, bias)
        self.counts_BV = self.bias_BV = None
        self.slots: list[Request | None] = [None] * B
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        # held through each step's prefills: the server's event loop waits on it between its
        # iterations (serve/loop.py), so that it does not take the GIL from a prefill's launches
        self.gate = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        # the last launched decode step, not yet read: (event, HostCopy, [(slot, request)],
        # first tokens sampled by this step's prefills [(HostCopy, [(slot, request)])])
        self.pending, self.firsts = None, []
        self.pin = p.device.type == "cuda"
        self.host = PinnedPair(B, self.top_n, self.pin)
        # for logs and benchmarks (every key from the start: /health copies it from another thread)
        self.stats = Counter(dict.fromkeys(["steps", "prefills", "prefill_rows", "prefill_s",
                                            "captures", "capture_s"], 0))
        # torch.compile fuses the step's elementwise kernels (fewer launches in each graph); one
        # specialisation per key of _run_decode, hence the raised recompile limit. The blocks'
        # prefill forward compiles once, dynamic in rows and tokens (`_prefill_forward`)
        self.decode_fn, self.hidden_fn, self.compiled = self._decode, self._hidden, compile_prefill
        if compile:
            import torch._dynamo as dynamo
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit,
                                                 8 * len(self.buckets) * len(self.lengths))
            self.decode_fn = torch.compile(self._decode, dynamic=False)
        if self.compiled:
            self.hidden_fn = torch.compile(self._hidden)
        self.graphs = Graphs(self.decode_fn, dev, [self.tokens_B, self.positions_B, self.steps_B],
                             self.stats)

    # ---- requests ---------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        vocab = self.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in request.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab}): got "
                             f"{[t for t in request.prompt if not 0 <= t < vocab][:5]}")
        if bad := [t for t, _ in request.params.logit_bias if t >= vocab]:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}): got {bad[:5]}")
        total = len(request.prompt) + request.params.max_tokens
        if total > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_tokens "
                             f"({request.params.max_tokens}) = {total} exceeds the context of "
                             f"{self.max_len} tokens")
        request.arrival = time.perf_counter()
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def has_work(self) -> bool:
        return (bool(self.waiting) or self.pending is not None
                or any(r is not None for r in self.slots))

    def _admit_wait(self) -> float:
        """Seconds the oldest waiting request is still held (0: admit now)."""
        free = self.slots.count(None)
        if not self.waiting or not free or len(self.waiting) >= free:
            return 0.0
        return max(0.0, self.waiting[0].arrival + self.admit_delay - time.perf_counter())

    def _device(self, values, dtype=torch.long) -> torch.Tensor:   # no sync: pinned on CUDA
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        return host.pin_memory().to(self.device, non_blocking=True) if self.pin else host

    def _set_row(self, slot: int, **values) -> None:
        for name, value in values.items():
            getattr(self, name + "_B")[slot] = value

    def _set_rows(self, slots: list[int], **values) -> None:
        idx = self._device(slots)
        for name, column in values.items():
            buf = getattr(self, name + "_B")
            buf[idx] = self._device(column, buf.dtype) if isinstance(column, list) else column

    def _finish(self, slot: int, reason: str) -> None:
        request = self.slots[slot]
        self.slots[slot] = None
        self._set_row(slot, positions=self.max_len - 1)   # back to the scratch position
        close(request, reason)

    def _emit(self, slot: int, token: int, logprobs: LogprobEntry | None) -> None:
        request = self.slots[slot]
        request.output.append(token)
        if (n := request.params.logprobs) is not None:
            request.logprobs.append((logprobs[0], logprobs[1][:n]))
        stop = request.on_token is not None and request.on_token(request, token)
        if token in request.eos_ids or stop:
            self._finish(slot, "stop")
        elif len(request.output) >= request.params.max_tokens:
            self._finish(slot, "length")

    # ---- the model, run over slots of the cache (the prefill: serve/prefill.py) ----------

    def _length(self, reach: int) -> int:   # the smallest context bucket holding positions < reach
        return next((n for n in self.lengths if n >= reach), self.max_len)

    def _logits(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.norm(x_BD))

    def _decode(self, b: int, greedy: bool, length: int | None = None,
                logprobs: bool = False, adjust: bool = False) -> None:
        """One token for rows [0, b), attending to cache positions [0, length) (the scratch rows
        at S - 1 get garbage), with `logprobs` their log-probabilities, with `adjust` sampled
        from the logits plus the rows' biases less their penalties: reads and advances the static
        buffers (no host sync)."""
        rows = slice(0, b)
        caches = [tuple(t[rows] for t in cache) for cache in self.caches]
        # 1. what every layer shares, once (dropless/serve/decode.py); 2. the blocks
        x_bD = self.model.embed(self.tokens_B[rows])
        step = make_step(self.model.cfg, self.positions_B[rows], self.max_len, x_bD.dtype, length)
        x = decode_blocks(self.model, x_bD, caches, step, self.moe_path, self.qkvs).unsqueeze(1)
        logits_bV = self._logits(x[:, -1])
        scores_bV = adjusted(logits_bV, self.bias_BV[rows], self.counts_BV[rows],
                             self.presence_B[rows], self.frequency_B[rows]) if adjust else logits_bV
        if greedy:
            next_b = scores_bV.argmax(-1)
        else:
            next_b = sample(scores_bV, self.temperature_B[rows], self.top_k_B[rows],
                            self.top_p_B[rows], self.seeds_B[rows], self.steps_B[rows])
        if adjust:
            self.counts_BV[rows].scatter_add_(1, next_b.unsqueeze(-1), torch.ones_like(
                self.counts_BV[rows, :1]))
        self.tokens_B[rows].copy_(next_b)
        if logprobs:
            for buf, value in zip(self.logprobs_B, top_logprobs(logits_bV, next_b, self.top_n)):
                buf[rows].copy_(value)
        self.positions_B[rows].add_(1).clamp_(max=self.max_len - 1)
        self.steps_B[rows].add_(1)

    @torch.no_grad()   # callers outside step() (benchmarks) must not record autograd graphs
    def _run_decode(self, b: int, greedy: bool, length: int | None = None,
                    logprobs: bool = False, adjust: bool = False) -> None:
        key = (b, greedy, length or self.max_len, logprobs, adjust)
        self.graphs.replay(*key) if self.cuda_graphs else self.decode_fn(*key)

    @torch.no_grad()
    def warm_up(self, progress: bool = False) -> None:
        """Capture every decode graph and compile the prefill now (a server does at start), not
        when a request first needs them, stalling every running request."""
        if self.compiled:   # rows of three tokens at the scratch position (3: no size in common)
            rows = min(2, self.max_batch)
            scratch = torch.full((rows, 3), self.max_len - 1, device=self.device)
            try:
                self._prefill_forward(torch.zeros_like(scratch), scratch, 0, rows)
            except Exception as e:   # a model the compiler cannot take is still served, eagerly
                log.warning("the prefill forward did not compile (%s: %s); it runs eagerly",
                            type(e).__name__, (str(e).splitlines() or [""])[0])
                self.compiled, self.hidden_fn = False, self._hidden
        if self.cuda_graphs:
            # log-probabilities' and adjusted logits' graphs: captured when first asked (few ask)
            keys = list(itertools.product(self.buckets, (True, False), self.lengths, (False,),
                                          (False,)))
            for key in tqdm(keys, "decode graphs", disable=not progress, unit="graph"):
                if key not in self.graphs:
                    self.graphs.capture(*key)

    # ---- continuous batching ----------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit, prefill a chunk, decode one token for every decoding request."""
        self.stats["steps"] += 1
        with self.lock:
            # a request cancelled while it waited never takes a slot (the queue: rebuilt only then)
            if gone := [r for r in self.waiting if r.cancelled]:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            for slot in range(self.max_batch if self._admit_wait() == 0 else 0):
                if not self.waiting:
                    break
                if self.slots[slot] is None:
                    request = self.waiting.popleft()
                    self.slots[slot] = request
                    request.prefilled = 0
        for request in gone:
            close(request, "cancelled")
        for slot, request in enumerate(self.slots):
            if request is not None and request.cancelled:
                self._finish(slot, "cancelled")
        # prefill: whole chunks, in slot order, up to prefill_chunk tokens per step (at least one
        # chunk); each run of adjacent slots goes through the model as one batch
        chosen, budget = [], self.prefill_chunk
        for slot, request in enumerate(self.slots):
            if request is not None and request.prefilled < len(request.prompt):
                size = min(len(request.prompt) - request.prefilled, self.prefill_chunk)
                if chosen and size > budget:
                    break
                chosen.append(slot)
                budget -= size
        start = time.perf_counter()
        with self.gate:
            while chosen:
                run = [chosen.pop(0)]
                while chosen and chosen[0] == run[-1] + 1:
                    run.append(chosen.pop(0))
                self._prefill(run)
                self.stats.update(prefills=1, prefill_rows=len(run))
        self.stats["prefill_s"] += time.perf_counter() - start
        decoding = [s for s, r in enumerate(self.slots)
                    if r is not None and r.prefilled == len(r.prompt)]
        # launch this step before reading the previous one's tokens: the host's bookkeeping (and
        # the server's callbacks) run while the device computes
        previous, self.pending = self.pending, (self._launch(decoding) if decoding else None)
        if previous is not None:
            self._collect(*previous)

    def _launch(self, decoding: list[int]):
        b = next(size for size in self.buckets if size > decoding[-1])
        greedy = all(self.slots[s].params.temperature == 0 for s in decoding)
        # a row feeds position <= prompt + output + 1 (its first token and last step's unread)
        reach = max(len(self.slots[s].prompt) + len(self.slots[s].output) for s in decoding) + 2
        logprobs = any(self.slots[s].params.logprobs is not None for s in decoding)
        adjust = any(self.slots[s].params.adjusts for s in decoding)
        self._run_decode(b, greedy, self._length(reach), logprobs, adjust)
        host = self.host.copy(self.tokens_B[:b], tuple(t[:b] for t in self.logprobs_B)
                              if logprobs else None)   # the previous step's: still unread
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        firsts, self.firsts = self.firsts, []
        return event, host, [(s, self.slots[s]) for s in decoding], firsts

    def _collect(self, event, host, rows, firsts) -> None:
        """A launched step's tokens to the requests then decoding, after its prefills' first tokens
        (one computed for a request that finished meanwhile is dropped here)."""
        if event is not None:
            event.synchronize()   # sync: the step's tokens (waits with the GIL released)
        for first, pairs in firsts:
            for (slot, request), token, lp in zip(pairs, *first.read()):
                if self.slots[slot] is request:
                    self._emit(slot, token, lp)
        tokens, lps = host.read()
        for slot, request in rows:
            if self.slots[slot] is request:
                self._emit(slot, tokens[slot], lps[slot])

    def _idle(self) -> bool:   # nothing to run but requests held for admission
        return self.pending is None and self.slots.count(None) == self.max_batch and (
            self._admit_wait() > 0)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def serve_forever(self, stop: threading.Event) -> None:
        """The server's engine thread: step while there is work, sleep while there is none;
        after `stop` is set, finish the requests already admitted or waiting, then return."""
        while True:
            with self.wakeup:
                while not stop.is_set() and (not self.has_work() or self._idle()):
                    self.wakeup.wait(timeout=self._admit_wait() or 0.1)
                if stop.is_set() and not self.has_work():
                    return
            try:
                self.step()
            except Exception:   # a failed step fails its requests, never the server
                log.exception("engine step failed")
                with self.lock:
                    failed = [r for r in self.slots if r is not None] + list(self.waiting)
                    self.slots, self.waiting = [None] * self.max_batch, deque()
                    self.pending, self.firsts = None, []
                self.positions_B.fill_(self.max_len - 1)
                for request in failed:
                    close(request, "error")
