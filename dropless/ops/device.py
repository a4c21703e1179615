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


def pdl_launch(device: torch.device) -> dict:
    """Launch options for the decode step's Triton kernels: with DROPLESS_PDL=1 on sm_90 and
    newer, programmatic dependent launch ({"PDL": True, "launch_pdl": True}: each kernel waits
    for the one before it on entry (triton_pdl.pdl_start), so that its launch and ramp overlap
    that kernel's last wave), else none. Off by default until measured on the product path."""
    if os.environ.get(PDL_ENV, "0") not in ("0", "1"):
        raise ValueError(f"{PDL_ENV}={os.environ[PDL_ENV]!r} is invalid: allowed: 0, 1")
    on = (os.environ.get(PDL_ENV) == "1" and device.type == "cuda"
          and cuda_capability_major(device.index or 0) >= 9)
    return {"PDL": True, "launch_pdl": True} if on else {}
