"""Arrival counters: a kernel whose programs each leave a partial result finishes the reduction
in the last program to arrive, instead of a kernel launched after it for that sum. Imported only
by kernel modules (it imports triton).

Protocol: every program that contributes to one output stores its partial, then calls
`last_to_arrive(counter, arrivals)`; the one call that returns True loads all partials with
cache_modifier=".cg" (from L2: another multiprocessor's L1 may hold stale lines), writes the
result, then `rearm(counter)` (the next launch finds it at zero). Every contributing program must
reach the call (no early return). The counters come from device.counters. The partials' sum is
taken in a fixed order, so the result does not depend on which program arrives last."""

import triton
import triton.language as tl


@triton.jit
def last_to_arrive(cnt_ptr, arrivals):
    """Count this program's arrival at the int32 counter cnt_ptr; True for the last of `arrivals`.
    A barrier first, so that all of the program's threads' stores come before the count, which is
    a release-acquire atomic at GPU scope: the last program sees every earlier program's stores."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit
def rearm(cnt_ptr):
    """The counter back to zero, by the last program, for the next launch."""
    tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
