"""Overlap of the decode step's kernels with their neighbours (sm_90+). Imported only by kernel
modules (it imports triton).

Programmatic dependent launch: launched with `launch_pdl`, a kernel may be scheduled while the
kernel before it in the stream still runs its last wave. Every such kernel calls `pdl_start(PDL)`
first: it waits there until the kernel before it has finished and its writes are visible
(nothing is read or written before), then lets the kernel after it launch.

L2 prefetch: a kernel that reads little from memory (the attention prologue) asks L2 to fetch
the weights a later kernel of the step will read (`prefetch_l2`), so that memory is busy while
it would otherwise idle, and that kernel finds them in L2. A hint: it changes no result."""

import triton
import triton.language as tl


@triton.jit
def pdl_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _bulk_prefetch(ptr, nbytes):
    """One request to L2 for nbytes (a multiple of 16) from ptr (16-byte aligned): sm_90's bulk
    prefetch, issued by the program's first thread."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2(ptr, nbytes, part, parts, CHUNK: tl.constexpr):
    """This program's share of a prefetch of nbytes (a multiple of 16) from ptr (16-byte
    aligned) among `parts` programs: chunks part, part + parts, ... of CHUNK bytes."""
    base = ptr.to(tl.pointer_type(tl.int8))
    for off in range(part * CHUNK, nbytes, parts * CHUNK):
        _bulk_prefetch(base + off, tl.minimum(CHUNK, nbytes - off))
