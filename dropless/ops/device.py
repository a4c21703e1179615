"""Facts about the machine that the kernels' choices depend on, each looked up once per process.

torch.compile takes their results as constants (`_constant`: it calls the function while
tracing instead of tracing into it). Traced, torch.cuda's device queries are calls marked as
skipped, and on CUDA they split the compiled graph once per MoE layer.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_facts: dict = {}


def _constant(fn):
    """What torch.compiler.assume_constant_result does (it sets this mark and returns fn), without
    importing torch._dynamo, and triton with it, when dropless is imported: `import dropless`
    stays inert, and the Triton interpreter (TRITON_INTERPRET=1, read when triton is imported)
    still works when a test switches it on after importing dropless."""
    fn._dynamo_marked_constant = True
    return fn


def _once(key, compute):
    if key not in _facts:
        _facts[key] = compute()
    return _facts[key]


@_constant
def has_triton() -> bool:
    # a path lookup; imports nothing
    return _once("triton", lambda: importlib.util.find_spec("triton") is not None)


@_constant
def cuda_capability_major(index: int) -> int:
    return _once(("capability", index), lambda: torch.cuda.get_device_capability(index)[0])


@_constant
def num_sms(index: int) -> int:
    """Multiprocessors of CUDA device `index`: the size of a persistent grid."""
    return _once(("sms", index),
                 lambda: torch.cuda.get_device_properties(index).multi_processor_count)


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1): a Triton block that holds n."""
    return 1 << (n - 1).bit_length()


PDL_ENV = "DROPLESS_PDL"
PRELOAD_ENV = "DROPLESS_PDL_PRELOAD"


def _switch(name: str, default: bool = False) -> bool:
    """An on/off environment switch: "0" off, "1" on, unset `default`, anything else refused."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r} is invalid: allowed: 0, 1")
    return value == "1"


def pdl_launch(device: torch.device, preload: bool = False) -> dict:
    """Launch options for the decode step's Triton kernels: on sm_90 and newer, unless
    DROPLESS_PDL=0, programmatic dependent launch ({"PDL": True, "launch_pdl": True}: each kernel
    waits for the one before it on entry (triton_pdl.pdl_start), so that its launch and ramp
    overlap that kernel's last wave), else none. On by default since round 23: +5.3% tokens/s at
    the Qwen3-30B-A3B shape and +9.5% at medium, batch 1 on an H100 (BENCHMARKS.md). `preload`
    (a kernel whose weights no kernel of the step writes: the projections, the router): with
    DROPLESS_PDL_PRELOAD=1 too, {"PRELOAD": True}: it loads its first step of weights before
    that wait, so that its memory reads overlap the kernel before as well; off by default (round
    23: -1.4% / +1.0%, within the runs' spread)."""
    on = (_switch(PDL_ENV, default=True) and device.type == "cuda"
          and cuda_capability_major(device.index or 0) >= 9)
    if not on:
        return {}
    return {"PDL": True, "launch_pdl": True, **({"PRELOAD": True} if preload and
                                                  _switch(PRELOAD_ENV) else {})}


DECODE_FUSION_ENV = "DROPLESS_DECODE_FUSION"
COUNTERS = 1 << 16   # int32 arrival counters per device at first (256 KB); more on demand
_counters: dict = {}


# The sites of the fused decode step, each a kernel boundary it removes or a hint it adds:
#   sum       the experts' slot partials and the int4 projections' split partials, summed by the
#             GEMV's last program to arrive (no sum_slots launch)
#   topk      the router's top-k in the logits kernel's last program per token block
#   combine   split-KV attention's combine in the split kernel's last program per (row, kv head)
#   norm      the int4 q|k|v GEMV normalising its rows itself (no norm launch)
#   prefetch  the attention prologue asking L2 for the output projection's weight
FUSION_SITES = ("sum", "topk", "combine", "norm", "prefetch")


def decode_fusion(site: str) -> bool:
    """Whether the decode step fuses at `site` (FUSION_SITES): DROPLESS_DECODE_FUSION=1 at every
    site, a list of sites joined by "+" (e.g. topk+combine) at those, unset or 0 at none. A
    kernel boundary costs ~2 us of a step even in a CUDA graph, but the last-program-to-arrive
    protocol (triton_sync.last_to_arrive) has its own costs: every site at once was 0.87x at
    the Qwen3-30B-A3B shape, batch 1 (round 23), hence the sites, to be measured one by one.
    Off by default."""
    assert site in FUSION_SITES, site
    value = os.environ.get(DECODE_FUSION_ENV, "0")
    if value in ("0", "1"):
        return value == "1"
    sites = value.split("+")
    if any(s not in FUSION_SITES for s in sites):
        raise ValueError(f"{DECODE_FUSION_ENV}={value!r} is invalid: allowed: 0, 1, or sites "
                         f"joined by '+' from {', '.join(FUSION_SITES)}")
    return site in sites


def check_switches() -> None:
    """Read every environment switch of the kernels now (DROPLESS_PDL, DROPLESS_PDL_PRELOAD,
    DROPLESS_DECODE_FUSION, DROPLESS_DECODE_ATTN_ONE_SPLIT, DROPLESS_GEMV_STAGES,
    DROPLESS_AWQ_UNPACK, DROPLESS_AWQ_TILE), so that a bad value is refused up front as a
    DroplessError (one line from the CLI), not from inside a decode step on a GPU: a traceback,
    and in a server every request failing."""
    from dropless.errors import DroplessError
    from dropless.ops import awq, gemv, triton_attention
    checks = (lambda: _switch(PDL_ENV, default=True), lambda: _switch(PRELOAD_ENV),
              lambda: decode_fusion(FUSION_SITES[0]), triton_attention.one_split_upto,
              lambda: [gemv.stages(kind) for kind in gemv.STAGES], awq._unpack,
              awq._tile_override)
    for check in checks:
        try:
            check()
        except ValueError as e:
            raise DroplessError(str(e)) from None


def counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 arrival counters at zero on `device` (triton_sync.last_to_arrive): a view of one
    buffer per device, which the kernels leave at zero (the last program to arrive resets its
    counter), so kernels that use it must run one after another (one stream), as a decode step's
    do. A larger buffer replaces it when needed; the old one stays allocated, since CUDA graphs
    captured with it still write there."""
    key = (device.type, device.index)
    kept = _counters.setdefault(key, [])
    if not kept or kept[-1].numel() < n:
        # captured, the zero fill would run only when the graph replays: uses before that would
        # read uninitialised counters (the engine runs each step eagerly before capturing it)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{n} arrival counters are first needed inside a CUDA graph "
                               "capture: run the captured work once before capturing it")
        kept.append(torch.zeros(max(n, COUNTERS), dtype=torch.int32, device=device))
    return kept[-1][:n]
