"""Chat templates, rendered in a child process of bounded memory and time.

A chat template is code from the model directory (tokenizer_config.json). jinja2's sandbox keeps it
from Python's internals but not from spending: `{{ 'x' * 10**10 }}` builds a 10 GB string, nested
loops over range(100000) run for hours holding the GIL the engine thread needs, and no thread can
be stopped. So templates render in one child process (Python and jinja2, no torch) whose address
space is capped (RLIMIT_AS), whose renders an alarm stops after `seconds`, and which the server kills
(and starts again for the next request) if it still has not answered a little later.

This file is also the child's program: it imports nothing of dropless.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

RENDER_SECONDS = 5.0    # a real template renders a long chat in milliseconds
BASE_MEMORY = 2**30     # the child's address space, besides 64 bytes per character of prompt
GRACE_SECONDS = 2.0     # past the alarm, before the child is killed
# a template's error message is cut to this many characters in the child: raise_exception of a
# 150 M-character string went whole to the server, bounded only by the child's memory
ERROR_CHARS = 2000


class PromptTooLong(ValueError):
    """The template renders more than max_chars characters (its rendering was cut off there)."""


class ChatRenderer:
    """Renders one template (with the model's special tokens) for a server's requests, one at a
    time, in a child started at the first; `close()` ends it."""

    def __init__(self, template: str, special_tokens: dict, max_chars: int,
                 seconds: float = RENDER_SECONDS):
        self.memory = BASE_MEMORY + 64 * max_chars
        self.setup = json.dumps({"template": template, "special": special_tokens, "seconds": seconds,
                                 "max_chars": max_chars, "memory": self.memory}).encode() + b"\n"
        self.seconds, self.lock, self.child = seconds, threading.Lock(), None
        # a reply's bytes: the text of at most max_chars characters, 12 bytes each as JSON at most
        self.reply_bytes = 12 * max_chars + 4 * ERROR_CHARS + 256

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               variables: dict | None = None) -> str:
        """The prompt (a whole conversation, for training: add_generation_prompt False);
        `variables`: more for the template (a request's chat_template_kwargs). ValueError (one
        line) when the template does not compile, raises, renders more than max_chars characters
        (PromptTooLong), or runs past its memory or time."""
        request = json.dumps({"messages": messages, "add_generation_prompt": add_generation_prompt,
                              "variables": variables or {}}).encode() + b"\n"
        with self.lock:
            if self.child is None:
                self.child = subprocess.Popen([sys.executable, "-I", __file__], bufsize=0,
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL)
                request = self.setup + request
            try:
                reply = self._exchange(request)
            except (TimeoutError, EOFError) as e:
                self.close()
                raise ValueError(f"the chat template {e}") from None
        if "error" in reply:
            raise (PromptTooLong if reply.get("too_long") else ValueError)(reply["error"])
        return reply["text"]

    def _exchange(self, data: bytes) -> dict:
        """Write `data`, read one reply line, both before the deadline: a child stuck rendering
        reads no more of a large request, and a write to it would block for good."""
        deadline = time.monotonic() + self.seconds + GRACE_SECONDS
        stdin, stdout = self.child.stdin.fileno(), self.child.stdout.fileno()
        os.set_blocking(stdin, False)
        poll, reply = select.poll(), bytearray()   # poll: no FD_SETSIZE limit, as select has
        poll.register(stdout, select.POLLIN)
        poll.register(stdin, select.POLLOUT)
        while not reply.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"did not finish in {self.seconds:g} s")
            for fd, _ in poll.poll(left * 1000):
                if fd == stdin:
                    try:
                        data = data[os.write(stdin, data[:1 << 16]):]
                    except BrokenPipeError:   # the child died: its stdout says so
                        data = b""
                    if not data:
                        poll.unregister(stdin)
                elif not (chunk := os.read(stdout, 1 << 20)):
                    raise EOFError(f"renderer died (code {self.child.wait()}; over its "
                                   f"{self.memory // 2**20} MiB of memory?)")
                else:
                    reply += chunk
                    if len(reply) > self.reply_bytes:
                        raise EOFError(f"renderer replied more than {self.reply_bytes} bytes")
        return json.loads(reply)

    def close(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None


def render_chat(template: str, messages: list[dict], special_tokens: dict,
                max_chars: int = 2**20) -> str:
    """One render in a child of its own (a server keeps a ChatRenderer)."""
    renderer = ChatRenderer(template, special_tokens, max_chars)
    try:
        return renderer.render(messages)
    finally:
        renderer.close()


# ---- the child ---------------------------------------------------------------------------------------

def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # loopcontrols ({% break %}, {% continue %}): Hugging Face renders templates with them, and
    # models' templates use them (Qwen3.5's); without them such a template does not compile
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render(template, messages: list[dict], special: dict, max_chars: int,
            add_generation_prompt: bool = True, variables: dict | None = None) -> str:
    out, size = [], 0
    for piece in template.generate({**(variables or {}), **special, "messages": messages,
                                    "add_generation_prompt": add_generation_prompt}):
        size += len(piece)
        if size > max_chars:
            raise PromptTooLong(f"the chat template renders more than {max_chars} characters")
        out.append(piece)
    return "".join(out)


def _answer(template, line: bytes, setup: dict):
    """(the compiled template, the reply to one request)."""
    try:   # compiled at the first request: constant folding runs the template's arithmetic
        template = _compile(setup["template"]) if template is None else template
        request = json.loads(line)
        return template, {"text": _render(template, request["messages"], setup["special"],
                                          setup["max_chars"],
                                          request.get("add_generation_prompt", True) is True,
                                          request.get("variables"))}
    except PromptTooLong as e:
        return template, {"error": str(e), "too_long": True}
    except MemoryError:
        return template, {"error": f"the chat template needs more than its "
                                   f"{setup['memory'] // 2**20} MiB of memory"}
    except Exception as e:   # the template raised, or its time ran out
        return template, {"error": (str(e) or type(e).__name__)[:ERROR_CHARS]}


def _child() -> None:
    import resource

    def alarm(*_):
        raise TimeoutError(f"the chat template did not finish in {setup['seconds']:g} s")

    setup = json.loads(sys.stdin.buffer.readline())
    resource.setrlimit(resource.RLIMIT_AS, (setup["memory"], setup["memory"]))
    signal.signal(signal.SIGALRM, alarm)
    template = None
    for line in sys.stdin.buffer:
        signal.setitimer(signal.ITIMER_REAL, setup["seconds"])   # one shot
        try:
            template, reply = _answer(template, line, setup)
            signal.setitimer(signal.ITIMER_REAL, 0)
        except TimeoutError as e:   # the alarm rang while _answer reported another error
            reply = {"error": str(e)}
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    _child()
