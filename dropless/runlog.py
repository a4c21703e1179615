"""What a training run keeps beside the loop: the metrics log, and stopping cleanly on Ctrl-C or
when its output pipe closes."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from dropless.files import write_atomic


class StopOnInterrupt:
    """First Ctrl-C, or SIGTERM where `sigterm` (or `request_stop()`): the loop finishes its
    step, checkpoints and returns. A second one: interrupt now. SIGTERM is how `timeout`, `kill`,
    schedulers and `docker stop` stop a job; its default action lost every step since the last
    checkpoint. Not under torchrun: its agent also sends SIGTERM to the live workers when one has
    died, and they, stopping cleanly, would wait in a collective with the dead rank until the
    agent's SIGKILL (30 s on), delaying every restart."""

    requested = False
    signal_name = None   # the signal that asked to stop: "SIGINT" or "SIGTERM"
    active = None   # the instance whose loop runs now, for request_stop

    def __init__(self, sigterm: bool = True):
        self.signals = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        StopOnInterrupt.active = self
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def __exit__(self, *exc):
        StopOnInterrupt.active = None
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def request_stop() -> None:
    """Stop the running training loop as a first Ctrl-C does; nothing when no loop runs."""
    if StopOnInterrupt.active is not None:
        StopOnInterrupt.active.requested = True


def _to_devnull(stream) -> None:
    """From now on, `stream`'s file descriptor writes to /dev/null: what is buffered for a reader
    that went away, and all that follows, is discarded without another BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def discard_closed_output() -> None:
    """After a BrokenPipeError: stdout and stderr, each whose reader went away (its flush fails),
    write to /dev/null, so that the interpreter's flush at exit does not fail again."""
    for stream in filter(None, (sys.stdout, sys.stderr)):   # None: closed at start (`>&-`)
        try:
            stream.flush()
        except BrokenPipeError:
            _to_devnull(stream)


class StopWhenReaderLeaves:
    """sys.stdout or sys.stderr while `dropless train` runs: when the reader of the pipe goes away
    (`dropless train | head -1`), the run stops as on Ctrl-C (the step finishes, a checkpoint is
    saved) instead of dying at its next evaluation line with every step since the last checkpoint
    lost. Later output is discarded. Each line is flushed as it ends: a block-buffered pipe held
    them (`| tee log` showed nothing, `| head -1` never had its line until the run ended)."""

    def __init__(self, stream):
        self.stream, self.reader_left = stream, False

    def write(self, text: str) -> int:
        try:
            written = self.stream.write(text)
            if "\n" in text:
                self.stream.flush()
            return written
        except BrokenPipeError:
            self._left()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._left()

    def _left(self) -> None:
        if not self.reader_left:
            self.reader_left = True
            _to_devnull(self.stream)
            request_stop()

    def __getattr__(self, name):
        return getattr(self.stream, name)


# how deep a record may nest (a layer's expert loads: 3); a deeper line is malformed whatever
# Python's recursion limit (torch.compile raises it, so a bound on that alone varied by process)
MAX_DEPTH = 32


def _leaves(value, leaf, depth: int = 0):
    """`value` with `leaf` applied to every value that is not a list or a dict; ValueError past
    MAX_DEPTH levels."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} deep")
    if isinstance(value, dict):
        return {k: _leaves(v, leaf, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_leaves(v, leaf, depth + 1) for v in value]
    return leaf(value)


def _json_line(record: dict) -> str:
    """One line of strict JSON: a non-finite float (a diverged loss) is null, not the `NaN` or
    `Infinity` that Python's json writes and other readers (jq, JavaScript, ...) refuse."""
    finite = _leaves(record, lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)
    return json.dumps(finite, allow_nan=False) + "\n"


def _number(v) -> bool:   # a JSON number a plot can draw: a 400-digit int overflows a float
    return type(v) is float or (type(v) is int and abs(v) < 2**63)


def _is_record(r) -> bool:
    """Whether `r` holds what the plots read, as a run writes it: an int step, a number loss, a
    number val_loss if any, and an expert_load if any of equal-length rows of numbers (a line
    edited by hand to hold anything else crashed a resumed run at its end, with a traceback)."""
    load = r.get("expert_load", []) if isinstance(r, dict) else None
    return (isinstance(r, dict) and type(r.get("step")) is int and 0 <= r["step"] < 2**63
            and _number(r.get("loss")) and _number(r.get("val_loss", 0.0))
            and isinstance(load, list) and all(isinstance(row, list) and len(row) == len(load[0])
                                               and all(map(_number, row)) for row in load))


# the longest metrics.jsonl line held in memory whole: a run's own are far shorter (expert_load at
# config.LIMITS' largest model, 1024 layers x 4096 experts at ~8 characters a share, is ~34 MB); a
# longer one (a run directory from elsewhere) is read past a piece at a time and skipped as malformed
MAX_LINE = 64 * 2**20


def _lines(f):
    """The lines of the binary file `f`, one at a time; None for one over MAX_LINE bytes."""
    while line := f.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE)
            line = None
        yield line


def _records(path: Path):
    """The records of metrics.jsonl as read_metrics gives them, one at a time: the file is read a
    line at a time, never whole (a stranger's run directory may hold a file of any size)."""
    if not path.is_file():
        return
    bad = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(_lines(f), 1):
            if line is not None and not line.strip():
                continue
            record = None
            if line is not None:
                try:   # RecursionError: nested too deep for json, or (a little less deep) _leaves
                    record = _leaves(json.loads(line.decode(errors="replace")),
                                     lambda v: math.nan if v is None else v)
                except (ValueError, RecursionError):
                    pass
            if _is_record(record):
                yield record
            else:
                bad.append(lineno)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad)} malformed lines ({shown})", stacklevel=3)


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl, null read back as NaN. A line that is not a record (the
    partial last line of a run killed mid-write, JSON that is not an object as `_is_record` asks,
    a line over MAX_LINE bytes) is skipped, with one warning that counts them."""
    return list(_records(path))


class MetricsLog:
    """metrics.jsonl, one object per logged step. On resume, lines past the checkpoint's step
    (logged by the run after its last save), and lines that are not records, are dropped so the
    file reads as one straight run."""

    def __init__(self, path: Path, keep_through: int):
        kept = (_json_line(r).encode() for r in _records(path) if r["step"] <= keep_through)
        # streamed through a temp file, a line at a time: a failed rewrite (a full disk) leaves
        # the whole log as it was, and a long log is never held in memory
        write_atomic(path, kept)
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(_json_line(record))
        self.file.flush()

    def sync(self) -> None:
        """On disk, not only in the page cache: a resumed run keeps the lines through its
        checkpoint's step and never writes them again."""
        os.fsync(self.file.fileno())


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def format_summary(s: dict) -> str:
    """The end-of-run report of `dropless train`."""
    from dropless.train_report import SAMPLE_PROMPT

    if not s["finished"]:
        by = f" ({s['stopped_by']})" if s.get("stopped_by") else ""
        return (f"interrupted at step {s['step']}/{s['steps']}{by}: checkpoint saved in "
                f"{s['run_dir']}\nresume with: dropless train --resume {s['run_dir']}")
    here = f" ({s['steps_here']} in this process)" if s["steps_here"] != s["steps"] else ""
    first, last = s["timed_steps"]
    timed = f"step {last}" if first == last else f"steps {first}-{last}"
    # the wall time is the loop's; the rate's time leaves out the untimed first step of this
    # process (compilation, autotuning, the allocator's growth), evaluations and checkpoints
    rest = "evaluation and checkpoints" if first == last - s["steps_here"] + 1 else (
        f"step {first - 1}, evaluation and checkpoints")
    lines = [
        f"trained {s['preset']} ({s['params'] / 1e6:.2f} M params) for {s['steps']} steps{here}; "
        f"its training loop took {_clock(s['elapsed_s'])}, of which {timed} took "
        f"{_clock(s['training_s'])}: "
        f"{s['tokens_per_s']:,.0f} tokens/s, {s['precision']}"
        + (", compiled" if s.get("compiled") else "")
        + (f", MFU {s['mfu']:.1%}" if s.get("mfu") is not None else "")
        + f" (the rest: {rest})",
        f"  train loss        {s['train_loss']:.3f} nats/token (mean of the last "
        + ("step)" if s["train_loss_steps"] == 1 else f"{s['train_loss_steps']} steps)"),
        f"  val loss          {s['val_loss']:.3f} nats/token (perplexity "
        f"{math.exp(s['val_loss']):.2f})",
        f"  unigram baseline  {s['unigram_baseline']:.3f} nats/token (entropy of the validation "
        "tokens: the best loss without context)",
        f"run directory: {s['run_dir']} (dcp/, metrics.jsonl, "
        + ", ".join(Path(p).name for p in s["plots"]) + ")",
    ]
    if s["sample"] is not None:
        lines += [f"sample (temperature 0.8, top-k 40) from {SAMPLE_PROMPT!r}:",
                  "-" * 60, s["sample"], "-" * 60]
    return "\n".join(lines)
