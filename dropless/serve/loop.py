"""The server's process: its event loop, paused while the engine prefills, and the GIL's switch
interval.

The engine thread and the event loop share one GIL. A prefill launches hundreds of kernels from
Python (thousands eagerly, at a long prompt), and while the event loop has work (new requests,
the running replies' stream chunks) each launch may wait for the GIL. So the loop, after each
wait for I/O, passes through the engine's gate (`Engine.gate`, held through a step's prefills):
it waits out a prefill, a few milliseconds on a GPU, and serves what came in after it. Decode
steps are not gated: a step's launches are a graph's replay, and the loop's work overlaps the
device's step.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from contextlib import suppress
from socket import AF_INET, AF_INET6, create_server

from dropless.errors import DroplessError

# How long a thread may hold the GIL while another waits for it. The engine thread lets go of
# the GIL while the device runs a step; when it wants it back and the event loop is busy
# (JSON, SSE writes), Python's default makes it wait up to 5 ms, more than a whole decode step.
SWITCH_INTERVAL_S = 2e-4


class GatedSelector(selectors.DefaultSelector):
    """The platform's selector, whose select() returns only when `gate` is free."""

    def __init__(self, gate: threading.Lock):
        super().__init__()
        self.gate = gate

    def select(self, timeout=None):
        events = super().select(timeout)
        with self.gate:
            return events


def check_listen(host: str, port: int) -> None:
    """Bind (host, port) as uvicorn will (":" in the host: IPv6) and let it go: a busy port or a
    bad host is one line before the model loads, not a traceback after it."""
    try:
        create_server((host, port), family=AF_INET6 if ":" in host else AF_INET).close()
    except OSError as e:
        raise DroplessError(f"cannot listen on --host {host} --port {port}: "
                            f"{e.strerror or e}") from None


def run_app(app, gate: threading.Lock, host: str, port: int) -> None:
    """uvicorn.run's one-process path (its Server on an asyncio.Runner, which uvicorn.run uses)
    on a loop gated by `gate`, until SIGINT/SIGTERM."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    loop_factory = lambda: asyncio.SelectorEventLoop(GatedSelector(gate))   # noqa: E731
    with suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve())
    if not server.started:
        raise DroplessError(f"the server did not start on --host {host} --port {port}")
