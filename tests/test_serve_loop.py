"""The server's event loop waits out the engine's prefills (dropless/serve/loop.py): the engine
holds its gate through a step's prefills and only then, and the loop's selector returns only when
the gate is free."""

import socket
import threading
import time
from urllib.request import urlopen

from dropless.serve import Engine, Request, SamplingParams
from dropless.serve.loop import GatedSelector, run_app
from tests.test_serve_engine import tiny_model


def test_selector_returns_only_when_the_gate_is_free():
    gate = threading.Lock()
    a, b = socket.socketpair()
    selector, returned = GatedSelector(gate), threading.Event()
    try:
        selector.register(a, 1)   # EVENT_READ
        gate.acquire()
        b.send(b"x")   # ready at once: only the gate holds select back
        waiter = threading.Thread(target=lambda: (selector.select(5), returned.set()))
        waiter.start()
        assert not returned.wait(0.2)
        gate.release()
        assert returned.wait(5)
        waiter.join()
        assert [key.fileobj for key, _ in selector.select(0)] == [a]
    finally:
        if gate.locked():
            gate.release()
        selector.close()
        a.close()
        b.close()


def test_engine_holds_its_gate_through_prefills_only():
    engine = Engine(tiny_model(), max_batch=4, max_len=32)
    held, prefill = [], engine._prefill

    def watched(slots):
        held.append(engine.gate.locked())
        prefill(slots)

    engine._prefill = watched
    for prompt in ([1, 2, 3], [4, 5]):
        engine.submit(Request(prompt, SamplingParams(max_tokens=3, temperature=0)))
    engine.step()   # both prompts prefill (one run of adjacent slots), the first decode step
    assert held == [True] and not engine.gate.locked()
    engine.step()   # decode only
    assert held == [True] and not engine.gate.locked()


def test_run_app_serves_on_the_gated_loop(monkeypatch):
    """run_app's loop is gated by the gate it is given: a request made while the gate is held
    is answered only after it is released."""
    async def app(scope, receive, send):   # a bare ASGI app: lifespan, then one plain reply
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    import uvicorn

    servers = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gate = threading.Lock()
    thread = threading.Thread(target=run_app, args=(app, gate, "127.0.0.1", port), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not (servers and servers[0].started):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/"
    assert urlopen(url, timeout=10).read() == b"ok"
    replies, answered = [], threading.Event()
    with gate:
        client = threading.Thread(target=lambda: (replies.append(urlopen(url, timeout=10).read()),
                                                  answered.set()))
        client.start()
        assert not answered.wait(0.3)   # the loop has the request, and waits for the gate
    assert answered.wait(10) and replies == [b"ok"]
    client.join()
    servers[0].should_exit = True
    thread.join(10)
    assert not thread.is_alive()
