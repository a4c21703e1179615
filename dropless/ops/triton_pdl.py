"""Programmatic dependent launch (sm_90+) for the decode step's kernels: launched with
`launch_pdl`, a kernel may be scheduled while the kernel before it in the stream still runs its
last wave. Every such kernel calls `pdl_start(PDL)` first: it waits there until the kernel before
it has finished and its writes are visible (nothing is read or written before), then lets the
kernel after it launch. Imported only by kernel modules (it imports triton)."""

import triton
import triton.language as tl


@triton.jit
def pdl_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
