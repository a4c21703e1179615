"""Autoregressive sampling with a KV cache: batched prompts of any lengths, streaming callback.

Legend: B batch, T longest prompt.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dropless.model import Transformer


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | Sequence[int] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens (a row
    stops after its `eos_id`, or any of them given several, which it keeps). Runs on the
    inference engine (dropless.serve): each prompt is a request in its own cache slot; row b
    samples with seed `seed + b`. `compile`: torch.compile the engine's decode step."""
    from dropless.serve.request import Request, SamplingParams

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
    # the engine's own checks of temperature, top_k and top_p, up front (0 new tokens included)
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    B, T = len(prompts), max(len(p) for p in prompts)
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    was_training = model.training
    engine = _engine_for(model, B, T + max_new_tokens, compile)
    requests = []
    try:
        for b, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=None if seed is None else seed + b)
            callback = None if on_token is None else (lambda _, tok, b=b: on_token(b, tok))
            eos = () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else eos_id
            requests.append(engine.submit(Request(prompt, params, eos_ids=eos, on_token=callback)))
        engine.run_until_done()
    except BaseException:
        # Ctrl-C, a raising on_token, a refused prompt: the kept engine's queue and slots hold
        # this call's requests, which the next call would decode (and call back) too
        _KEPT.clear()
        raise
    finally:
        model.train(was_training)
    return [r.output for r in requests]


_KEPT: list[tuple] = []   # [(key, engine)]: one at a time, its KV cache holds device memory


def _engine_for(model: Transformer, batch: int, max_len: int, compile: bool):
    """An engine for this model and shape; on CUDA the last one is kept (with its captured decode
    graphs) and reused by the next call of the same shape on the same weights."""
    from dropless.serve.decode import restack_qkv
    from dropless.serve.engine import Engine

    p = next(model.parameters())
    # every parameter's address and strides: the kept graphs read them as they were, so a
    # replaced one, or one laid out anew in its own memory (kmajor_experts), needs a new engine
    key = (id(model), batch, max_len, p.device, p.dtype, compile,
           tuple((q.data_ptr(), q.stride()) for q in model.parameters()))
    if _KEPT and _KEPT[0][0] == key and _KEPT[0][1].model is model:
        engine = _KEPT[0][1]
        restack_qkv(model, engine.qkvs)   # its q|k|v copy: weights change in place
        return engine
    engine = Engine(model, max_batch=batch, max_len=max_len, buckets=(batch,), compile=compile)
    if _keeps(p.device):
        _KEPT[:] = [(key, engine)]
    return engine


def _keeps(device: torch.device) -> bool:
    """Whether the last engine is kept for the next call: on CUDA, for its captured graphs."""
    return device.type == "cuda"


@torch.no_grad()
def greedy_recompute(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache): the oracle for the KV-cache path."""
    device = next(model.parameters()).device
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([tokens], device=device))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]
