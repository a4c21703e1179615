"""The command line's checks of its arguments, made before a model loads or anything is written:
each a DroplessError of one line naming the flag, its value and what is allowed."""

from __future__ import annotations

import math

from dropless.errors import DroplessError

# chat's reply budget when --max-new-tokens is left out: at most half the context, so that a
# message fits beside it (tiny's context is 512 tokens)
CHAT_MAX_NEW_TOKENS = 512


def require(ok: bool, flag: str, value, allowed: str) -> None:
    if not ok:
        raise DroplessError(f"{flag} {value} is invalid: {allowed}")


def sampling_flags(args) -> None:
    """generate's and chat's flags checked, before a model is loaded, not after."""
    from dropless.ops.device import check_switches

    check_switches()
    require(args.max_new_tokens is None or args.max_new_tokens > 0, "--max-new-tokens",
            args.max_new_tokens, "must be > 0")
    require(math.isfinite(args.temperature) and args.temperature >= 0, "--temperature",
            args.temperature, "must be a finite number >= 0")
    require(args.top_k is None or args.top_k >= 1, "--top-k", args.top_k, "must be >= 1")
    require(args.top_p is None or 0 < args.top_p <= 1, "--top-p", args.top_p, "must be in (0, 1]")


def chat_max_new_tokens(given: int | None, context: int) -> int:
    """chat's tokens per reply: the flag's, below the context (a message needs a token at least),
    else min(512, context // 2)."""
    if given is None:
        return min(CHAT_MAX_NEW_TOKENS, context // 2)
    require(given < context, "--max-new-tokens", given, f"must be below the model's context of "
            f"{context} tokens (a message needs some; default {context // 2})")
    return given


def prompt_fits(prompt: int, max_new_tokens: int, context: int) -> None:
    """generate's longest prompt (tokens) and the tokens after it fit the model's context; a
    prompt that fills it alone is named as the mistake, not the --max-new-tokens left default."""
    if prompt >= context:
        raise DroplessError(f"--prompt is {prompt} tokens: the model's context is {context} "
                            "(max_seq_len), which must hold the prompt and a new token at least")
    require(prompt + max_new_tokens <= context, "--max-new-tokens", max_new_tokens, f"prompt + "
            f"it = {prompt + max_new_tokens} tokens exceeds the model's max_seq_len={context}")
