"""A request's replies on the event loop: the deltas its choices' engine requests post from the
engine's thread through one asyncio queue, as (choice, text or None at its end, log-probability
entries), coalesced into what a reply sends; and the counts and events a reply needs.
"""

from __future__ import annotations

import asyncio
import threading

from dropless.serve.request import Request

# a stream's headers: no cache or proxy may hold its events back (nginx buffers a reply whole,
# by default, until it ends)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Outbox:
    """Deltas from the engine thread to the event loop: buffered, with one wake-up of the loop per
    batch of them (a step's worth), not one per token."""

    def __init__(self):
        self.items: list[tuple[asyncio.Queue, tuple[int, str | None, tuple]]] = []
        self.lock = threading.Lock()

    def post(self, loop, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            first = len(self.items) == 1
        if first:
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


async def deltas(queue, n: int):
    """(choice, text, entries, done) as they come, until each of the n choices is done (done:
    its last, once a choice); what piled up while we were busy goes out as one a choice. The
    entries of tokens whose text is held back (a stop string's possible start, a character's
    first bytes) wait for their choice's next text, or go out with none at its end."""
    held: list[list] = [[] for _ in range(n)]
    while n:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        texts: dict[int, list[str]] = {}   # by choice, in the order they came
        ended = set()
        for choice, text, entries in items:
            parts = texts.setdefault(choice, [])
            if text is None:
                ended.add(choice)
            else:
                parts.append(text)
                held[choice].extend(entries)
        for choice, parts in texts.items():
            text, done = "".join(parts), choice in ended
            if text or done:
                yield choice, text, held[choice], done
                held[choice] = []
        n -= len(ended)


async def disconnected(http_request) -> None:
    """Returns once the client has gone (its body is read: the next message is that)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def texts_of(queue, n: int) -> list[tuple[str, list]]:
    """Each choice's (text, entries), once every choice is done."""
    texts, entries = [[] for _ in range(n)], [[] for _ in range(n)]
    async for choice, text, more, _ in deltas(queue, n):
        texts[choice].append(text)
        entries[choice].extend(more)
    return [("".join(t), e) for t, e in zip(texts, entries)]


def usage(requests: list[Request], n: int) -> dict:
    """Each prompt once (its n choices, side by side in `requests`, share it), and every choice's
    output."""
    p, m = sum(len(r.prompt) for r in requests[::n]), sum(len(r.output) for r in requests)
    return {"prompt_tokens": p, "completion_tokens": m, "total_tokens": p + m}
