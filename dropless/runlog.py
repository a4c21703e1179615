"""What a training run keeps beside the loop: the metrics log, and stopping cleanly on Ctrl-C."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path


class StopOnInterrupt:
    """First Ctrl-C (or `request_stop()`): the loop finishes its step, checkpoints and returns.
    Second Ctrl-C: interrupt now."""

    requested = False
    active = None   # the instance whose loop runs now, for request_stop

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        StopOnInterrupt.active = self
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        StopOnInterrupt.active = None
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def request_stop() -> None:
    """Stop the running training loop as a first Ctrl-C does; nothing when no loop runs."""
    if StopOnInterrupt.active is not None:
        StopOnInterrupt.active.requested = True


class MetricsLog:
    """metrics.jsonl, one object per logged step. On resume, lines past the checkpoint's step
    (logged by the run after its last save) are dropped so the file reads as one straight run."""

    def __init__(self, path: Path, keep_through: int):
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:   # a line cut short by a crash
                continue
            if record["step"] <= keep_through:
                records.append(record)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
