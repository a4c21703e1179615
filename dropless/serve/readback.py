"""What a decode step or a prefill computed for the host (sampled tokens; log-probabilities where a
request asked), on its way there without a sync: copied into pinned memory when the work is
launched, read once the work's event has passed.

Legend: b rows, n alternatives listed per token (the engine's top_n).
"""

from __future__ import annotations

import torch

LogprobEntry = tuple[float, list[tuple[int, float]]]   # (the token's, [(token, logprob)] top first)


class HostCopy:
    """Host tensors filled by queued copies (pinned on CUDA: from pageable memory a copy waits for
    the stream first). `logprobs`: (logprob_b, top_logprob_bn, top_id_bn), or None."""

    def __init__(self, tokens: torch.Tensor, logprobs: tuple | None):
        self.tokens, self.logprobs = tokens, logprobs

    @staticmethod
    def of(tokens_b: torch.Tensor, logprobs: tuple | None, into: HostCopy | None = None,
           pin: bool = False) -> HostCopy:
        """Queue the copies of device tensors into `into`'s buffers (their first rows), or into new
        ones (pinned if `pin`)."""
        def copy(src: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin) if dst is None else (
                dst[:len(src)])
            return dst.copy_(src, non_blocking=True)

        if into is None:
            into = HostCopy(None, None)
        buffers = into.logprobs or (None, None, None)
        return HostCopy(copy(tokens_b, into.tokens),
                        None if logprobs is None else tuple(map(copy, logprobs, buffers)))

    def read(self) -> tuple[list[int], list[LogprobEntry | None]]:
        """(tokens, each row's log-probability entry or None); only after the copies' event."""
        tokens = self.tokens.tolist()
        if self.logprobs is None:
            return tokens, [None] * len(tokens)
        chosen, top, ids = (t.tolist() for t in self.logprobs)
        return tokens, [(c, list(zip(i, t))) for c, t, i in zip(chosen, top, ids)]


class PinnedPair:
    """Two sets of host buffers for the decode step's outputs, taken in turn: a step's are read
    while the next step's copies are queued into the other."""

    def __init__(self, rows: int, top_n: int, pin: bool):
        def empty(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin)

        self.sets = [HostCopy(empty(rows), (empty(rows, dtype=torch.float32),
                                            empty(rows, top_n, dtype=torch.float32),
                                            empty(rows, top_n)))
                     for _ in range(2)]
        self.turn = 0

    def copy(self, tokens_b: torch.Tensor, logprobs: tuple | None) -> HostCopy:
        into, self.turn = self.sets[self.turn], self.turn ^ 1
        return HostCopy.of(tokens_b, logprobs, into)
