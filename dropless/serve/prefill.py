"""The engine's prefill (a mixin of serve.engine.Engine, whose state it reads and writes): a
prompt chunk of a run of adjacent slots through the model's blocks (or the decode step's kernels,
for a short one) into those slots' caches; a finished prompt's first token sampled into the decode
buffers, read back with the next decode step's tokens; the prompt's log-probabilities for the
requests that ask. Legend as serve/engine.py's.
"""

from __future__ import annotations

import torch

from dropless.model import rope_tables
from dropless.serve.decode import decode_blocks, make_step
from dropless.serve.readback import HostCopy
from dropless.serve.request import Request
from dropless.serve.sampling import sample, top_logprobs

# prompt log-probabilities: positions whose logits are computed at once (a slice's [T, V] float32)
PROMPT_SLICE = 256


class Prefill:
    def _hidden(self, tokens_BT, positions_BT, caches) -> torch.Tensor:
        """The model's blocks over a prompt chunk (RoPE tables once for all layers)."""
        cfg = self.model.cfg
        rope = rope_tables(cfg.rope_dim, positions_BT, cfg.rope_theta)
        x = self.model.embed(tokens_BT)
        for layer, cache in zip(self.model.layers, caches):
            x, _ = layer(x, positions_BT, cache, rope)
        return x

    def _prefill_forward(self, tokens_nT, positions_nT, lo: int, hi: int,
                         short: int = 0) -> torch.Tensor:
        """The blocks over a chunk into cache slots [lo, hi) -> x_nTD; `short`: through the decode
        step's path, reading that many cache positions; compiled: dynamic rows and tokens."""
        caches = [tuple(t[lo:hi] for t in cache) for cache in self.caches]
        if short:
            x_mD = self.model.embed(tokens_nT).flatten(0, 1)
            step = make_step(self.model.cfg, positions_nT, self.max_len, x_mD.dtype, short)
            x_mD = decode_blocks(self.model, x_mD, caches, step, None, self.qkvs)
            return x_mD.view(*tokens_nT.shape, -1)
        if self.compiled:
            rows = (tokens_nT, positions_nT, *sum(caches, ())) if self.max_batch > 1 else ()
            for t, dim in [(t, 0) for t in rows] + [(tokens_nT, 1), (positions_nT, 1)]:
                torch._dynamo.mark_dynamic(t, dim)
        return self.hidden_fn(tokens_nT, positions_nT, caches)

    def _prefill(self, slots: list[int]) -> None:
        """The next prompt chunk of each request in a run of adjacent slots, as one forward."""
        requests = [self.slots[s] for s in slots]
        chunks = [r.prompt[r.prefilled:r.prefilled + self.prefill_chunk] for r in requests]
        n, T = len(slots), max(map(len, chunks))
        reach = max(r.prefilled + len(c) for r, c in zip(requests, chunks))   # positions < reach
        short = self._length(reach) if n * T <= self.step_tokens else 0
        # compiled: a lone row gets a neighbour slot (at its scratch position) as padding, and a
        # lone token a padding token, so no size is 1
        lo, hi = slots[0], slots[-1] + 1
        padded = self.compiled and not short
        if padded and n == 1 and self.max_batch > 1:
            lo, hi = (lo, hi + 1) if hi < self.max_batch else (lo - 1, hi)
        T = max(T, 1 + padded)
        tokens_nT = torch.zeros(hi - lo, T, dtype=torch.long)
        positions_nT = torch.full((hi - lo, T), self.max_len - 1, dtype=torch.long)
        for i, (r, chunk) in enumerate(zip(requests, chunks), start=slots[0] - lo):
            tokens_nT[i, :len(chunk)] = torch.tensor(chunk)
            positions_nT[i, :len(chunk)] = torch.arange(r.prefilled, r.prefilled + len(chunk))
        x_nTD = self._prefill_forward(self._device(tokens_nT), self._device(positions_nT), lo, hi,
                                      short)
        x_nTD = x_nTD[slots[0] - lo:slots[0] - lo + n]
        done = []
        for i, (r, chunk) in enumerate(zip(requests, chunks)):
            if r.params.prompt_logprobs is not None:
                self._prompt_logprobs(r, x_nTD[i, :len(chunk)])
            r.prefilled += len(chunk)
            if r.prefilled == len(r.prompt):
                done.append(i)
        # a prompt only scored (max_tokens 0) ends here: no first token, no decode step
        for i in [i for i in done if requests[i].params.max_tokens == 0]:
            self._finish(slots[i], "length")
        done = [i for i in done if requests[i].params.max_tokens > 0]
        if not done:
            return
        vocab = self.model.cfg.vocab_size
        done_slots = [slots[i] for i in done]
        params = [requests[i].params for i in done]
        self._set_rows(done_slots, steps=[0] * len(done), seeds=[requests[i].seed for i in done],
                       temperature=[p.temperature for p in params],
                       top_k=[min(p.top_k or vocab, vocab) for p in params],
                       top_p=[p.top_p or 1.0 for p in params],
                       presence=[p.presence_penalty for p in params],
                       frequency=[p.frequency_penalty for p in params])
        idx = self._device(done_slots)
        last = self._device([len(chunks[i]) - 1 for i in done])
        logits = self._logits(x_nTD[self._device(done), last])
        if any(p.adjusts for p in params) and self.counts_BV is None:
            self.counts_BV = torch.zeros(self.max_batch, vocab, device=self.device)
            self.bias_BV = torch.zeros_like(self.counts_BV)
            self.graphs.state.append(self.counts_BV)   # a step advances it: warm-ups undone
        if self.bias_BV is not None:   # every row's bias anew: a slot's last request's must go
            self._set_bias(done_slots, params)
        # the first token: no output to penalize yet, only the bias
        scores = logits.float() + self.bias_BV[idx] if any(p.logit_bias for p in params) else logits
        first = sample(scores, self.temperature_B[idx], self.top_k_B[idx], self.top_p_B[idx],
                       self.seeds_B[idx], self.steps_B[idx])
        # into the decode inputs; the host reads them with this step's decoded tokens (no sync)
        self._set_rows(done_slots, tokens=first, steps=[1] * len(done),
                       positions=[len(requests[i].prompt) for i in done])
        if any(p.penalizes for p in params):   # the rows' counts start at their first tokens
            # device values only: index_put_ copies a Python number's CPU tensor to the device
            # blocking (a sync, found by a GPU test), and one_hot checks the ids' range (another)
            self.counts_BV.index_fill_(0, idx, 0)
            self.counts_BV.index_put_((idx, first), torch.ones_like(first, dtype=torch.float32))
        lp = top_logprobs(logits, first, self.top_n) if any(
            p.logprobs is not None for p in params) else None
        self.firsts.append((HostCopy.of(first, lp, pin=self.pin),
                            [(s, requests[i]) for s, i in zip(done_slots, done)]))

    def _set_bias(self, slots: list[int], params: list) -> None:
        """The rows' logit_bias into bias_BV (zeros for a request without), device values only."""
        self.bias_BV.index_fill_(0, self._device(slots), 0)
        pairs = [(s, t, v) for s, p in zip(slots, params) for t, v in p.logit_bias]
        if pairs:
            rows, tokens, values = zip(*pairs)
            self.bias_BV.index_put_((self._device(list(rows)), self._device(list(tokens))),
                                    self._device(list(values), torch.float32))

    def _prompt_logprobs(self, request: Request, x_TD: torch.Tensor) -> None:
        """Append to request.prompt_logprobs the entries of the prompt tokens this chunk's
        positions predict: position j (prompt index prefilled + j) predicts prompt token
        prefilled + j + 1, the next chunk's first for the last j; the prompt's last position
        predicts the first output token, not scored here. Logits in slices of PROMPT_SLICE
        positions: a whole chunk's [T, V] float32 is a GiB at 2048 tokens of a 128k vocabulary."""
        start, k = request.prefilled, min(request.params.prompt_logprobs, self.top_n)
        targets = request.prompt[start + 1:start + 1 + len(x_TD)]
        for a in range(0, len(targets), PROMPT_SLICE):
            ids = self._device(targets[a:a + PROMPT_SLICE])
            chosen, top, top_ids = top_logprobs(self._logits(x_TD[a:a + len(ids)]), ids, k)
            # sync: the values to the host, once a slice, only for the requests that ask
            request.prompt_logprobs.extend(
                (c, list(zip(i, t))) for c, t, i in zip(chosen.tolist(), top.tolist(),
                                                        top_ids.tolist()))
