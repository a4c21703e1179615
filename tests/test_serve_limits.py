"""What `dropless serve` refuses before it does the work, and what it stops when nobody waits: a
prompt or body past its size bounds (refused before parsing or tokenizing, which hold up the
event loop every client shares), a KV cache that cannot fit in memory (one line, no traceback), a
stream whose client left before its first chunk; and OpenAI's response shape (chat choices'
logprobs, one model by id)."""

import asyncio
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dropless import ModelConfig, MoEConfig, Transformer, cli
from dropless.serve.engine import Engine
from tests import test_serve_server as live_server
from tests import test_serve_server_edges as edges

run_dir = live_server.run_dir   # the module-scoped fixtures: the tiny model's run directory,
live = edges.live               # its server (`live.requests`: every engine Request submitted)
health, CONTEXT, MODEL, post = live_server.health, live_server.CONTEXT, edges.MODEL, edges.post


def error(reply: dict) -> dict:
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    return reply["error"]


# ---- sizes, bounded before the work ----------------------------------------------------------

@pytest.mark.parametrize("path, field", [("/v1/completions", "prompt"),
                                         ("/v1/chat/completions", "messages")])
def test_a_prompt_past_the_character_bound_is_refused_untokenized(live, monkeypatch, path, field):
    from dropless.serve.fields import max_prompt_chars

    limit, encode, seen = max_prompt_chars(CONTEXT), live.served.tokenizer.encode, []
    monkeypatch.setattr(live.served.tokenizer, "encode", lambda text, *special: seen.append(text)
                        or encode(text, *special))
    long = "x" * (limit + 1)
    body = {"prompt": long} if field == "prompt" else {
        "messages": [{"role": "user", "content": long}]}
    code, reply = post(live.port, path, {"model": MODEL, **body})
    e = error(reply)
    assert code == 400 and e["param"] == field and e["code"] == "context_length_exceeded", reply
    assert f"at most {limit} (" in e["message"] and f"{CONTEXT}-token context" in e["message"]
    assert seen == []   # never tokenized
    assert health(live.port)["status"] == "ok"


def test_tokenizing_does_not_hold_up_other_clients(live, monkeypatch):
    """A slow tokenization (a long prompt, a slow tokenizer) runs off the event loop: /health
    answers while it is still running, and the request completes. (On the event loop, /health
    would answer only once the tokenization gave up waiting for the release.)"""
    encode = live.served.tokenizer.encode
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def slow(text, *special):
        started.set()
        release.wait(10)
        done.set()
        return encode(text, *special)

    monkeypatch.setattr(live.served.tokenizer, "encode", slow)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(post, live.port, "/v1/completions",
                            {"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert started.wait(10)
        assert health(live.port)["status"] == "ok"
        assert not done.is_set()   # answered while the tokenization is held
        release.set()
        code, body = reply.result(timeout=10)
    assert code == 200 and body["usage"]["completion_tokens"] == 2


def test_a_body_past_the_bound_is_413_before_it_is_read(live):
    """Content-Length says 1 GiB and nothing follows: the reply comes at once (it waited for the
    body, to read it all into memory and parse it)."""
    from dropless.serve.fields import max_body_bytes

    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        e = error(json.loads(reply.read()))
    assert reply.status == 413 and e["code"] == "request_too_large"
    assert f"at most {max_body_bytes(CONTEXT)} bytes" in e["message"]
    assert health(live.port)["status"] == "ok"


def test_a_chunked_body_is_refused_as_it_passes_the_bound():
    from dropless.serve.fields import APIError, read_body

    class Chunked:   # no Content-Length: only counting the chunks can tell
        headers, pulled = {}, 0

        async def stream(self):
            for _ in range(1000):
                self.pulled += 1
                yield b"x" * 1000

    chunked = Chunked()
    with pytest.raises(APIError, match="too large: this server takes at most 5000 bytes") as e:
        asyncio.run(read_body(chunked, 5000))
    assert e.value.status == 413 and chunked.pulled == 6
    assert asyncio.run(read_body(chunked, 10 ** 6)) == b"x" * 10 ** 6


# ---- the KV cache against memory -------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   max_seq_len=32, moe=MoEConfig(dim=32, hidden_dim=32,
                                                                 num_experts=4, top_k=2)))


def test_an_engine_whose_cache_does_not_fit_says_what_does(model, monkeypatch):
    """Measured against the free memory before it is allocated: max_batch=10**13 was a
    RuntimeError ("can't allocate memory") from deep in the cache's allocation."""
    from dropless.serve import kv_cache

    with pytest.raises(ValueError, match=r"max_batch=10000000000000 is invalid: its KV cache .* "
                                         r"at most max_batch=\d+ fits"):
        Engine(model, max_batch=10 ** 13, max_len=32)
    one = kv_cache.slot_bytes(model, 32)
    assert one == 2 * 2 * (2 * 32 * 8) * 4   # layers x (k, v) x [heads, positions, head size] fp32
    monkeypatch.setattr(kv_cache, "free_bytes", lambda device: 100 * one)
    with pytest.raises(ValueError, match=r"max_batch=91 is invalid: .*at most max_batch=90 fits"):
        Engine(model, max_batch=91, max_len=32)
    assert len(Engine(model, max_batch=90, max_len=32).slots) == 90
    monkeypatch.setattr(kv_cache, "free_bytes", lambda device: one)
    with pytest.raises(ValueError, match="not one slot of max_len=32 fits: a shorter max_len"):
        Engine(model, max_batch=1, max_len=32)


def test_an_engine_whose_cache_fails_to_allocate_says_so(model, monkeypatch):
    """Where the free memory is unknown (or the estimate was wrong), the allocation's failure."""
    from dropless.serve import kv_cache

    monkeypatch.setattr(kv_cache, "free_bytes", lambda device: None)
    with pytest.raises(ValueError, match="max_batch=10000000000000 is invalid: its KV cache .* "
                                         "could not be allocated on cpu"):
        Engine(model, max_batch=10 ** 13, max_len=32)


def test_serve_with_a_max_batch_past_memory_is_one_line(capsys, run_dir):
    argv = ["serve", str(run_dir), "--device", "cpu", "--port", str(live_server.free_port())]
    assert cli.main([*argv, "--max-batch", str(10 ** 13)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("dropless: error: --max-batch 10000000000000 is invalid: its KV cache "
                          f"(10000000000000 slots of --max-len {CONTEXT} positions"), err
    assert "at most --max-batch " in err
    assert cli.main([*argv, "--max-batch", "0"]) == 1
    assert capsys.readouterr().err == "dropless: error: --max-batch 0 is invalid: must be >= 1\n"


# ---- clients that leave ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, send_fails", [("2.3", False), ("2.4", False), ("2.4", True)])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})])
def test_a_stream_whose_client_left_before_its_first_chunk_is_cancelled(live, monkeypatch, path,
                                                                        body, spec, send_fails):
    """The disconnect is the next message after the body. Under ASGI 2.3 Starlette's
    StreamingResponse listens for it and cancels the generator (its `finally` cancelled the
    request). Under 2.4 it listens for nothing and counts on `send` raising: where it does, the
    first send (the response's start) raised before the generator was ever pulled, so its
    `finally` never ran; where it does not (uvicorn's drops messages once the client left), the
    stream went on. Either way the request generated for nobody, up to max_tokens."""
    from starlette.requests import ClientDisconnect

    from dropless.serve.server import create_app

    step = live.engine.step
    monkeypatch.setattr(live.engine, "step", lambda: time.sleep(0.02) or step())
    app = create_app(live.served, live.engine)   # no lifespan: the live server's engine steps
    data = json.dumps({"model": MODEL, "max_tokens": 60, "stream": True, **body}).encode()
    messages = [{"type": "http.request", "body": data, "more_body": False}]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    before = len(live.requests)

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if send_fails:
            raise OSError("the client left")

    async def run():
        try:
            await app(scope, receive, send)
        except ClientDisconnect:   # Starlette's word for send's OSError
            assert send_fails
        request = live.requests[before]   # this loop delivers its tokens until it finishes
        assert await asyncio.to_thread(request.done.wait, 10)
        return request

    request = asyncio.run(run())
    assert request.finish_reason == "cancelled" and len(request.output) < 30
    assert health(live.port)["running"] == 0


# ---- OpenAI's response shape ---------------------------------------------------------------

def test_chat_choices_say_logprobs_null(live):
    code, reply = post(live.port, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert code == 200 and reply["choices"][0]["logprobs"] is None
    assert list(reply["choices"][0]) == ["index", "message", "logprobs", "finish_reason"]


def test_a_model_by_id(live):
    def get(path):
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    listed = get("/v1/models")[1]["data"]
    assert get(f"/v1/models/{MODEL}") == (200, listed[0])
    assert live.client.models.retrieve(MODEL).id == MODEL
    for unknown in ("gpt-4o", "org/tiny-run", "tiny-run/x"):
        code, reply = get(f"/v1/models/{unknown}")
        e = error(reply)
        assert code == 404 and e["code"] == "model_not_found" and e["param"] == "model", reply
        assert repr(unknown) in e["message"]
