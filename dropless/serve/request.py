"""What the engine serves: a request (prompt, sampling parameters, callbacks, output) and its
sampling parameters."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Callable

# The most alternatives a token's logprobs may list (OpenAI's bound on top_logprobs)
MAX_TOP_LOGPROBS = 20
# The most tokens one request's logit_bias may name (ours), and the bound on a bias (OpenAI's)
MAX_LOGIT_BIAS, LOGIT_BIAS_BOUND = 1024, 100


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    # None: no log-probabilities; n in [0, MAX_TOP_LOGPROBS]: each output token's, and the n most
    # likely tokens' at its position (of the model's distribution: before temperature, top-k, top-p)
    logprobs: int | None = None
    # OpenAI's penalties on a token's logit: presence once it is in the output, frequency times
    # how often it is there (the output only, not the prompt)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: none; n in [0, MAX_TOP_LOGPROBS]: each prompt token's but the first (which nothing
    # predicts) and the n most likely at its position, computed by the prefill (a host sync a
    # chunk, for the requests that ask). With it, max_tokens may be 0: the prompt scored only
    prompt_logprobs: int | None = None
    # OpenAI's logit_bias: (token id, bias) pairs, each id once, added to the logits before the
    # penalties and sampling (log-probabilities stay the model's); -100 bans a token, 100 forces it
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens={self.max_tokens} is invalid: must be >= 1 (0 only "
                             "with prompt_logprobs)")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} is invalid: must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} is invalid: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is invalid: must be in (0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name}={n} is invalid: must be None or in "
                                 f"[0, {MAX_TOP_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be in [-2, 2]")
        ids = [t for t, _ in self.logit_bias]
        if len(ids) > MAX_LOGIT_BIAS or len(set(ids)) < len(ids):
            raise ValueError(f"logit_bias names {len(ids)} tokens ({len(set(ids))} distinct): "
                             f"allowed are at most {MAX_LOGIT_BIAS}, each once")
        for token, bias in self.logit_bias:
            if not (isinstance(token, int) and token >= 0
                    and -LOGIT_BIAS_BOUND <= bias <= LOGIT_BIAS_BOUND):
                raise ValueError(f"logit_bias entry ({token!r}, {bias!r}) is invalid: a token id "
                                 f">= 0 and a bias in [-{LOGIT_BIAS_BOUND}, {LOGIT_BIAS_BOUND}]")

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def adjusts(self) -> bool:
        """Sampled from adjusted logits (penalties or a bias): the decode step's graphs of their
        own, with the rows' counts and biases."""
        return self.penalizes or bool(self.logit_bias)


class Request:
    """One prompt's generation. `on_token(request, token)` runs on the engine's thread after each
    new token and may return True to finish the request (a stop string matched). When the request
    finishes, `finish_reason` is "stop" (EOS, or on_token asked), "length", "cancelled" or "error",
    `on_finish(request)` runs (engine thread) and `done` is set. With `params.logprobs` set,
    `logprobs[i]` is output token i's (logprob, [(token, logprob)] of the params.logprobs most
    likely, most likely first), appended before on_token sees the token. With
    `params.prompt_logprobs` set, `prompt_logprobs[i]` is prompt token i + 1's, of the same form,
    complete when the prefill ends (before the first token; a request of max_tokens 0 then
    finishes, "length", with no output)."""

    def __init__(self, prompt: list[int], params: SamplingParams, *, eos_ids=(),
                 on_token: Callable[["Request", int], bool | None] | None = None,
                 on_finish: Callable[["Request"], None] | None = None):
        if not prompt:
            raise ValueError("prompt is empty: a request needs at least one token")
        self.prompt = list(prompt)
        self.params = params
        self.eos_ids = frozenset(eos_ids)
        self.on_token = on_token
        self.on_finish = on_finish
        # any int seeds: folded into the int64 range the device buffers hold
        self.seed = params.seed % (1 << 63) if params.seed is not None else random.getrandbits(63)
        self.output: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None
        self.done = threading.Event()
        self.cancelled = False
        self.prefilled = 0   # prompt tokens already in the cache

    def cancel(self) -> None:
        """Leave the batch at the next step (the client went away)."""
        self.cancelled = True


def close(request: Request, reason: str) -> None:
    """Record why the request ended, run its on_finish, wake its waiters."""
    request.finish_reason = reason
    if request.on_finish is not None:
        request.on_finish(request)
    request.done.set()
