"""Autoregressive sampling with a KV cache: batched prompts of any lengths, streaming callback.

Legend: B batch, T prompt length (padded), V vocab.
"""

from __future__ import annotations

from typing import Callable

import torch

from dropless.model import KVCache, Transformer


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row: greedy when temperature == 0, else softmax sampling after the
    top-k and nucleus (top-p) filters."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: must be in (0, 1]")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens.

    1. Prefill: all prompts in one forward, right-padded; each row's cache length is then set to
       its own prompt length, so padding is overwritten before it is ever attended to.
    2. Decode: one token per row per step, each row at its own position.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    lengths_B = torch.tensor([len(p) for p in prompts], device=device)
    tokens_BT = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens_BT[b, :len(p)] = torch.tensor(p, device=device)
    was_training = model.training
    model.eval()
    cache = KVCache(model, B, T + max_new_tokens)
    logits, _ = model(tokens_BT, cache)
    cache.lengths_B = lengths_B.clone()
    last_BV = logits[torch.arange(B, device=device), lengths_B - 1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        next_B = sample_next(last_BV, temperature, top_k, top_p, generator)
        for b, tok in enumerate(next_B.tolist()):  # sync: tokens go to the caller
            if not done[b]:
                out[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
                done[b] = eos_id is not None and tok == eos_id
        if all(done):
            break
        logits, _ = model(next_B.unsqueeze(-1), cache)
        last_BV = logits[:, -1]
    model.train(was_training)
    return out


@torch.no_grad()
def greedy_recompute(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache): the oracle for the KV-cache path."""
    device = next(model.parameters()).device
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([tokens], device=device))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]
