"""CUDA graphs of one function, one graph per key (the engine's decode step: batch bucket, greedy,
context bucket, log-probabilities), all in one memory pool, captured on first use or all at once at start."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable

import torch


class Graphs:
    def __init__(self, fn: Callable, device: torch.device, state: list[torch.Tensor],
                 stats: Counter):
        """fn(*key) launches the work; `state`: buffers fn advances in place (its warm-up runs
        before a capture are undone); stats counts captures and their seconds."""
        self.fn, self.device, self.state, self.stats = fn, device, state, stats
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def __contains__(self, key: tuple) -> bool:
        return key in self.graphs

    def replay(self, *key) -> None:
        graph = self.graphs.get(key)
        (graph or self.capture(*key)).replay()

    def capture(self, *key) -> torch.cuda.CUDAGraph:
        start = time.perf_counter()
        saved = [t.clone() for t in self.state]
        stream = torch.cuda.Stream(self.device)   # warm-up runs (compiles, autotuning) off-graph
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.fn(*key)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):   # recorded, not run: state is as saved
            self.fn(*key)
        for buf, value in zip(self.state, saved):
            buf.copy_(value)
        self.graphs[key] = graph
        self.stats.update(captures=1, capture_s=time.perf_counter() - start)
        return graph


def sizes(name: str, given: Iterable[int] | None, top: int, default: Iterable[int]
          ) -> tuple[int, ...]:
    """The sizes graphs are keyed by (batch rows, context positions), sorted: `given` (None: those
    of `default` below `top`), capped at `top`, which is always one of them."""
    chosen = [n for n in default if n < top] if given is None else list(given)
    if not all(type(n) is int and n >= 1 for n in chosen):
        raise ValueError(f"{name}={given} is invalid: must be integers >= 1")
    return tuple(sorted({min(n, top) for n in chosen} | {top}))
