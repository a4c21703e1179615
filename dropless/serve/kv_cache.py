"""The engine's KV cache: its size, what fits in the device's free memory, and its allocation,
refused with a ValueError that says what fits instead of an out-of-memory traceback (a server
started with `--max-batch 100000` should say so in one line)."""

from __future__ import annotations

import torch

from dropless.model import Transformer

# The cache may take this share of the free memory: the rest is for the activations (a prefill
# chunk's, the decode graphs' pool). On the CPU, an allocation past the free memory may not fail
# at all: the kernel kills the process as the zeros are written.
SHARE = 0.9


def slot_bytes(model: Transformer, max_len: int) -> int:
    """One slot's cache over every layer, from the shapes alone (meta tensors: no memory)."""
    dtype = next(model.parameters()).dtype
    return sum(t.numel() * t.element_size() for layer in model.layers
               for t in layer.attn.new_cache(1, max_len, "meta", dtype))


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`; None where unknown (the allocation then decides)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = []
    try:   # Linux; MemAvailable counts the page cache the kernel can drop
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:   # a container's limit (cgroup v2), when it has one
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            free.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(free, default=None)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def new_kv_cache(model: Transformer, max_batch: int, max_len: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer, the cache of `max_batch` slots of `max_len` positions (layer.attn.new_cache),
    on the model's device and in its dtype; a ValueError naming max_batch when it does not fit."""
    p = next(model.parameters())
    one = slot_bytes(model, max_len)
    need, free = max_batch * one, free_bytes(p.device)
    what = f"its KV cache ({max_batch} slots of max_len={max_len} positions, {_gib(need)})"
    if free is not None and need > SHARE * free:
        fits = int(SHARE * free) // one
        raise ValueError(
            f"max_batch={max_batch} is invalid: {what} does not fit in {SHARE:.0%} of the "
            f"{_gib(free)} free on {p.device.type}; " + (
                f"at most max_batch={fits} fits at this max_len" if fits else
                f"not one slot of max_len={max_len} fits: a shorter max_len"))
    try:
        return [layer.attn.new_cache(max_batch, max_len, p.device, p.dtype)
                for layer in model.layers]
    except RuntimeError as e:   # torch.OutOfMemoryError on CUDA; "can't allocate memory" on the CPU
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"max_batch={max_batch} is invalid: {what} could not be allocated on "
                         f"{p.device.type} ({first}); a smaller max_batch or max_len") from None
