"""Per-row sampling on the device, with no host sync: greedy, temperature, top-k, top-p and a
per-request seed, for a whole batch at once (each row has its own parameters).

Legend: B batch rows, V vocab.

Randomness is a Gumbel-max draw whose noise is a counter-based hash of (seed, step, token id), so a
request's samples depend only on its own seed and position in its output, never on which other
requests share the batch or on a global generator state; and the hash is plain integer arithmetic,
so it can live inside a CUDA graph.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2^32).
    Products may wrap past 2^63; the mask keeps the correct low 32 bits either way."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed_B: torch.Tensor, step_B: torch.Tensor, token_ids_BV: torch.Tensor) -> torch.Tensor:
    """float32 [B, V] standard Gumbel noise, a pure function of (seed, step, token id)."""
    row_B = _hash32((seed_B & _MASK32) ^ _hash32((step_B + (seed_B >> 32)) & _MASK32))
    h = _hash32(_hash32(row_B.unsqueeze(-1) ^ token_ids_BV) ^ 0x5BD1E995)
    # 24 random bits -> uniform in (0, 1), exact in float32
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def sample(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
           top_p_B: torch.Tensor, seed_B: torch.Tensor, step_B: torch.Tensor) -> torch.Tensor:
    """int64 [B] next tokens. Rows with temperature 0 take the argmax; the others sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens, then to the nucleus:
    a token is dropped once the probability mass before it (after top-k) reaches top_p.
    No filter is top_k = V and top_p = 1."""
    B, V = logits_BV.shape
    greedy_B = logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature_B.clamp(min=1e-6).unsqueeze(-1)
    sorted_BV, order_BV = logits.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=logits.device)
    sorted_BV = sorted_BV.masked_fill(rank_V >= top_k_B.unsqueeze(-1), float("-inf"))
    probs_BV = sorted_BV.softmax(-1)
    keep_BV = (probs_BV.cumsum(-1) - probs_BV) < top_p_B.unsqueeze(-1)
    keep_BV[:, 0] = True
    noisy_BV = sorted_BV + gumbel_noise(seed_B, step_B, order_BV)
    pick_B = noisy_BV.masked_fill(~keep_BV, float("-inf")).argmax(-1)
    sampled_B = order_BV.gather(1, pick_B.unsqueeze(-1)).squeeze(-1)
    return torch.where(temperature_B == 0, greedy_B, sampled_B)


def top_logprobs(logits_BV: torch.Tensor, chosen_B: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob_B of the chosen tokens, top_logprob_Bn, top_id_Bn: the n most likely, most likely
    first), all of the model's distribution: log_softmax(logits) in float32, before temperature,
    top-k and top-p."""
    logp_BV = logits_BV.float().log_softmax(-1)
    top_Bn, ids_Bn = logp_BV.topk(n, dim=-1)
    return logp_BV.gather(1, chosen_B.unsqueeze(-1)).squeeze(-1), top_Bn, ids_Bn


def adjusted(logits_BV: torch.Tensor, bias_BV: torch.Tensor, counts_BV: torch.Tensor,
             presence_B: torch.Tensor, frequency_B: torch.Tensor) -> torch.Tensor:
    """float32 logits plus each row's logit_bias (bias_BV), less OpenAI's penalties: presence
    once a token is in the output, frequency times how often (counts_BV: each row's output tokens
    counted)."""
    return (logits_BV.float() + bias_BV - frequency_B.unsqueeze(-1) * counts_BV
            - presence_B.unsqueeze(-1) * (counts_BV > 0).float())
