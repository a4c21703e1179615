"""Adversarial cases for `dropless serve`, one live server for the module (the tiny random model of
test_serve_server, whose greedy replies are mostly bytes that are not UTF-8).

The oracle (`cut`) decodes after every token: the first token whose text holds a stop string ends
the reply, cut where the earliest stop string in it starts; usage counts the tokens generated up to
it. Covered: stop strings (across tokens and split UTF-8 characters, in the first token,
overlapping, never matching, the whole reply, empty), streamed == non-streamed == alone == among
more requests than slots, wrong types for every parameter, bodies that are not JSON objects,
prompt and message forms, OpenAI parameters the server does not implement, defaults and the
context limit, clients that leave, shutdown, an engine failure mid-stream, the SSE wire format.
"""

import codecs
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropless.generate import greedy_recompute
from dropless.serve.text import TextStream
from dropless.tokenizer import ByteTokenizer
from tests import test_serve_server as live_server

openai, health = live_server.openai, live_server.health
CONTEXT, MODEL = live_server.CONTEXT, "tiny-run"
run_dir = live_server.run_dir   # the module-scoped fixture: the tiny model's run directory
_GREEDY = {}


@pytest.fixture(scope="module")
def live(run_dir):
    """The server; `live.requests`: every engine Request, in the order submitted."""
    s = live_server.InProcessServer(run_dir)
    s.requests, submit = [], s.engine.submit
    s.engine.submit = lambda request: submit(s.requests.append(request) or request)
    yield s
    s.stop()


def greedy(live, prompt: str, n: int) -> list[int]:
    if (prompt, n) not in _GREEDY:
        _GREEDY[prompt, n] = greedy_recompute(live.served.model, list(prompt.encode()), n)
    return _GREEDY[prompt, n]


def cut(pieces: list[bytes], stop: list[str]) -> tuple[str, int, str]:
    """The oracle -> (text, tokens used, finish_reason), each token's bytes in `pieces`."""
    decoder, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for k, piece in enumerate(pieces, 1):
        text += decoder.decode(piece)
        found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        if found:
            return text[:min(found)], k, "stop"
    return text + decoder.decode(b"", final=True), len(pieces), "length"


def complete(client, stream: bool, **kw):
    """(text, finish_reason, usage) of a completion, streamed (with usage) or not."""
    if not stream:
        out = client.completions.create(model=MODEL, **kw)
        return out.choices[0].text, out.choices[0].finish_reason, out.usage
    chunks = list(client.completions.create(model=MODEL, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and all(c.choices for c in chunks[:-1])
    return ("".join(c.choices[0].text for c in chunks[:-1]), chunks[-2].choices[0].finish_reason,
            chunks[-1].usage)


def post(port, path: str, body, content_type="application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def refused(live, path, body, param, status=400) -> str:
    """The error's message, after checking its shape, status and param; the server still serves."""
    code, reply = post(live.port, path, body)
    assert code == status and set(reply) == {"error"}, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param, reply
    assert health(live.port)["status"] == "ok"
    return reply["error"]["message"]


# ---- stop strings, usage, streamed == non-streamed --------------------------------------------

# prompt "a", greedy: "X" 0xE4 "X" 0xE4 0xB8 "h" ... 0xC7 0xB8 ("Ǹ", two tokens) ... "gdo"
FULL, LONGER = object(), object()   # the whole 40-token reply; it and one more character


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop, finish", [
    (["X"], "stop"),                                   # in the very first token: no text
    (["h\x1fgdo"], "stop"),                            # across five tokens
    (["Ǹ"], "stop"),                                   # a two-byte character split over tokens
    (["X\ufffdh"], "stop"),                            # a held prefix fails, then it matches
    (["\ufffd\r", "G\ufffd\ufffd\r"], "stop"),         # both complete at once: the earlier start
    (["h\ufffd6G\ufffd", "6G"], "stop"),               # the shorter one completes first
    (["\x00never"] * 15 + ["Ǹ"], "stop"),              # 16 stop strings
    ([""], "length"),                                  # an empty stop string: none
    ([LONGER], "length"),                              # never completes: held back, then sent
    ([FULL], "stop"),                                  # completes on the last token: no text
], ids=["first-token", "across-tokens", "split-utf8", "prefix-then-match", "overlap",
        "shorter-first", "sixteen", "empty", "longer-than-output", "whole-output"])
def test_stop_strings_against_the_oracle(live, stop, finish, stream):
    pieces = [bytes([t]) for t in greedy(live, "a", 40)]
    full = cut(pieces, [])[0]
    stop = [full if s is FULL else full + "!" if s is LONGER else s for s in stop]
    text, k, reason = cut(pieces, stop)
    assert reason == finish
    got = complete(live.client, stream, prompt="a", max_tokens=40, temperature=0,
                   stop=stop[0] if len(stop) == 1 else stop)
    assert got[:2] == (text, finish)
    # usage counts every token generated, those of the text a stop string cut off included
    assert (got[2].prompt_tokens, got[2].completion_tokens, got[2].total_tokens) == (1, k, k + 1)
    assert len(live.requests[-1].output) == k


def test_stop_string_and_max_tokens(live):
    """A stop string completed by the last allowed token is "stop"; one token less is "length",
    with the held-back prefix sent (here the lead byte of the split character: U+FFFD)."""
    pieces = [bytes([t]) for t in greedy(live, "a", 40)]
    _, k, _ = cut(pieces, ["Ǹ"])
    for n, finish in [(k, "stop"), (k - 1, "length")]:
        text = cut(pieces[:n], ["Ǹ"])[0]
        for stream in (False, True):
            got = complete(live.client, stream, prompt="a", max_tokens=n, temperature=0, stop="Ǹ")
            assert got[:2] == (text, finish) and got[2].completion_tokens == n
    assert text.endswith("\ufffd")
    assert "up to 16" in refused(live, "/v1/completions", {"model": MODEL, "prompt": "a",
                                                      "stop": ["x"] * 17}, "stop")


def test_sampled_and_greedy_alone_equal_streamed_and_among_more_than_the_slots(live):
    """12 requests at once on 4 slots (seeded sampling and greedy, with and without stops, half of
    them streamed) reply what each does alone, which is the oracle over its tokens; multi-byte
    characters split over tokens included."""
    kws = [dict(prompt=p, max_tokens=20 + 5 * (i % 4), temperature=0.9 if i % 2 else 0, seed=i,
                stop=["\x00", "o\ufffd"] if i % 3 == 0 else None)
           for i, p in enumerate(["a", "hello", "日本", "🙂", "x = 1\n", "def"] * 2)]
    alone = [complete(live.client, False, **kw) for kw in kws]
    for kw, request, (text, finish, usage) in zip(kws, live.requests[-len(kws):], alone):
        pieces = [bytes([t]) for t in request.output]
        assert cut(pieces, kw["stop"] or []) == (text, usage.completion_tokens, finish)
    assert any(c > "\x7f" and c != "\ufffd" for text, *_ in alone for c in text)
    with ThreadPoolExecutor(len(kws)) as pool:
        together = list(pool.map(lambda a: complete(live.client, a[0] % 2 == 0, **a[1]),
                                 enumerate(kws)))
    assert [(t, f, u.completion_tokens) for t, f, u in together] == [
        (t, f, u.completion_tokens) for t, f, u in alone]
    assert health(live.port)["running"] == health(live.port)["waiting"] == 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text("ab é日🙂\ufffd", max_size=24).map(str.encode),
                 st.binary(max_size=24)), st.data())
def test_text_stream_is_the_oracle_however_bytes_split_into_tokens(raw, data):
    bounds = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *bounds], [*bounds, len(raw)]) if a < b]
    text = raw.decode(errors="replace")
    spans = st.tuples(st.integers(0, len(text)), st.integers(1, 4))
    stop = [text[i:i + n] for i, n in data.draw(st.lists(spans, max_size=3))] + data.draw(
        st.lists(st.text("ab é🙂", max_size=3), max_size=2))
    tokenizer = type("Pieces", (), {"token_bytes": staticmethod(pieces.__getitem__)})
    stream, out, used = TextStream(tokenizer, stop), "", 0
    for token in range(len(pieces)):
        out, used = out + stream.push(token), used + 1
        if stream.stopped:
            break
    out += stream.finish()
    expected, k, finish = cut(pieces, stop)
    assert (out, used, stream.stopped) == (expected, k, finish == "stop"), (pieces, stop)


class Counted(str):
    """A stop string that counts the characters read from it (by index or slice), in `reads`."""
    reads = 0

    def __getitem__(self, i):
        out = str.__getitem__(self, i)
        Counted.reads += len(out)
        return out


def push_costs(stream, tokens, chars: int, num_stops: int) -> str:
    """Feed `tokens` of `chars` characters each; each push reads at most 16 characters of each stop
    string per new character (the KMP matchers and their tables as they grow: O(1) amortized),
    not a stop string's length or its square. Returns the text sent."""
    out = ""
    for token in tokens:
        before = Counted.reads
        out += stream.push(token)
        assert Counted.reads - before <= 16 * chars(token) * num_stops
    return out + stream.finish()


def test_long_stop_strings_cost_little_per_token(monkeypatch):
    """The hold-back check ran over every length of every stop string at each token: with 16 stop
    strings of 20,000 characters (a 320 kB body) the engine thread spent ~0.15 s a token, stalling
    every running request."""
    monkeypatch.setattr(Counted, "reads", 0)
    stream = TextStream(ByteTokenizer(), [Counted("ab" * 10_000 + str(i)) for i in range(16)])
    out = push_costs(stream, b"ababab, ba" * 20, lambda token: 1, 16)
    assert out == "ababab, ba" * 20 and Counted.reads > 0


def test_runs_of_a_stop_strings_first_character_cost_little_per_token(monkeypatch):
    """The hold-back check tried each position of the stop string's first character within its
    reach, each compared up to the text's end: a long run of that character (a model asked to
    repeat one), broken once, made every later token cost O(run^2), here ~0.15 s a token on the
    engine's thread. Two stop strings: one holds the run back while the other's tries fail."""
    class Runs:   # token 0: 64 "a"s, token 1: a space
        token_bytes = staticmethod(lambda token: b"a" * 64 if token == 0 else b" ")

    monkeypatch.setattr(Counted, "reads", 0)
    run = "a" * 16_000
    stream = TextStream(Runs(), [Counted(s) for s in [run + "b", run + " " + run + "b"] * 8])
    tokens = [0] * (len(run) // 64) + [1] + [0] * 20
    out = push_costs(stream, tokens, lambda token: 64 if token == 0 else 1, 16)
    assert out == run + " " + "a" * 64 * 20 and Counted.reads > 0


# ---- parameters and bodies --------------------------------------------------------------------

BODY = '{"model": "tiny-run", "prompt": "hi", "max_tokens": 4, %s}'   # the last key wins


@pytest.mark.parametrize("fields, param", [
    ('"max_tokens": "5"', "max_tokens"), ('"max_tokens": 5.0', "max_tokens"),
    ('"max_tokens": true', "max_tokens"), ('"max_tokens": Infinity', "max_tokens"),
    ('"max_tokens": 1000000000000000000000000000000', "max_tokens"),
    ('"max_tokens": null, "max_completion_tokens": 0', "max_completion_tokens"),
    ('"temperature": "0.5"', "temperature"), ('"temperature": NaN', "temperature"),
    ('"temperature": -Infinity', "temperature"), ('"temperature": false', "temperature"),
    ('"top_p": NaN', "top_p"), ('"top_p": "1"', "top_p"), ('"top_p": 0', "top_p"),
    ('"top_k": true', "top_k"), ('"top_k": -2', "top_k"), ('"top_k": 1.5', "top_k"),
    ('"seed": 1.5', "seed"), ('"seed": "1"', "seed"), ('"seed": true', "seed"),
    ('"n": 0', "n"), ('"n": "1"', "n"),
    ('"stop": 7', "stop"), ('"stop": ["a", 1]', "stop"), ('"stop": {"a": 1}', "stop"),
    ('"stream": "true"', "stream"), ('"stream": 1', "stream"),
    ('"stream": true, "stream_options": {"include_usage": "yes"}', "stream_options"),
    ('"logprobs": 21', "logprobs"), ('"logprobs": true', "logprobs"),
    ('"echo": "yes"', "echo"), ('"echo": 1', "echo"),
    # OpenAI parameters this server does not implement: refused, not silently ignored
    ('"suffix": "x"', "suffix"),
    ('"best_of": 2', "best_of"), ('"logit_bias": {"1": 500}', "logit_bias"),
    ('"logit_bias": {"-1": 5}', "logit_bias"), ('"logit_bias": [5]', "logit_bias"),
    ('"presence_penalty": 2.5', "presence_penalty"), ('"presence_penalty": "1"', "presence_penalty"),
    ('"frequency_penalty": -2.01', "frequency_penalty"),
    ('"frequency_penalty": true', "frequency_penalty"),
])
def test_bad_parameters_are_400_naming_them(live, fields, param):
    refused(live, "/v1/completions", (BODY % fields).encode(), param)


def test_a_huge_bad_value_is_named_in_a_short_error(live):
    """An error names the bad value cut to fields.SHOWN_CHARS characters: echoed whole, a
    rejected body of a megabyte cost a megabyte of reply per bad request."""
    from dropless.serve.fields import SHOWN_CHARS
    huge = "x" * 500_000
    for path, body, param in [
            ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": {"a": huge}}, "stop"),
            ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {huge: 1}},
             "logit_bias"),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": 1, "content": huge}]},
             "messages"),
            ("/v1/completions", {"model": huge, "prompt": "hi"}, "model")]:
        message = refused(live, path, body, param, 404 if param == "model" else 400)
        assert len(message) < SHOWN_CHARS + 200 and "(5000" in message, message


@pytest.mark.parametrize("fields, completion_tokens", [
    ('"seed": -5', 4), ('"seed": 1000000000000000000000000000000', 4), ('"temperature": null', 4),
    ('"top_k": -1', 4), ('"top_k": 0', 4), ('"top_k": 100000000000000000000', 4), ('"n": 1', 4),
    ('"stop": []', 4),
    ('"stream": null, "stream_options": null', 4), ('"max_tokens": null', 16),
    ('"max_tokens": null, "max_completion_tokens": 5', 5), ('"max_completion_tokens": 5', 4),
    ('"presence_penalty": 2, "frequency_penalty": -2', 4), ('"presence_penalty": null', 4),
    ('"logit_bias": {"1": 5, "2": -100}', 4),
    # the no-op values of what is not implemented, which clients send
    ('"echo": false, "logprobs": null, "suffix": "", "best_of": 1, "logit_bias": {}, '
     '"presence_penalty": 0, "frequency_penalty": 0.0, "user": "u"', 4),
])
def test_accepted_parameters(live, fields, completion_tokens):
    code, reply = post(live.port, "/v1/completions", (BODY % fields).encode())
    assert code == 200 and reply["usage"]["completion_tokens"] == completion_tokens, reply


@pytest.mark.parametrize("data", [
    b"[" * 100_000 + b"]" * 100_000,                                  # RecursionError: was a 500
    b'{"model": "tiny-run", "prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "tiny-run", "prompt": "\xff"}', b"", b"null", b'"text"', b"[1, 2]",
    b'{"model": "tiny-run", "prompt": "a"} and more', b"model=tiny-run&prompt=a",
])
def test_bodies_that_are_not_json_objects_are_400(live, data):
    refused(live, "/v1/completions", data, None)
    assert live.client.completions.create(model=MODEL, prompt="a", max_tokens=1).usage


def test_content_type_methods_and_a_missing_model(live):
    code, reply = post(live.port, "/v1/completions", {"model": MODEL, "prompt": "hi",
                                                      "max_tokens": 2}, "text/plain")
    assert code == 200 and reply["usage"]["completion_tokens"] == 2
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{live.port}/v1/completions")
    assert e.value.code == 405 and set(json.loads(e.value.read())["error"]) == {
        "message", "type", "param", "code"}
    assert refused(live, "/v1/completions", {"prompt": "a", "model": "other"}, "model", 404)
    # no model named: the one served (curl lines written for other servers leave it out)
    for body in ({"prompt": "a", "max_tokens": 1}, {"prompt": "a", "max_tokens": 1, "model": None}):
        code, reply = post(live.port, "/v1/completions", body)
        assert code == 200 and reply["model"] == MODEL, reply


@pytest.mark.parametrize("prompt", [[["a"]], ["a", [1]], [[1], "a"], [[1], [2.0]], [[]], [],
                                    "", [True], [1.5], [-1], [256], [[1], [256]], None, 5,
                                    {"text": "a"}, ["a"] * 129])
def test_bad_prompts(live, prompt):
    refused(live, "/v1/completions", {"model": MODEL, "prompt": prompt}, "prompt")


def test_prompt_forms_are_the_same_prompt(live):
    ask = dict(model=MODEL, max_tokens=6, temperature=0)
    replies = [live.client.completions.create(prompt=p, **ask) for p in
               ["日本🙂", ["日本🙂"], list("日本🙂".encode())]]
    assert len({r.choices[0].text for r in replies}) == 1
    assert [r.usage.prompt_tokens for r in replies] == [10] * 3   # bytes: 3 + 3 + 4


@pytest.mark.parametrize("messages", [
    [], "hi", ["hi"], [None], [{"content": "x"}], [{"role": 1, "content": "x"}],
    [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": 3}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": ["hi"]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
])
def test_bad_messages(live, messages):
    message = refused(live, "/v1/chat/completions", {"model": MODEL, "messages": messages},
                      "messages")
    assert "template" not in message   # said what is wrong with the messages


@pytest.mark.parametrize("fields, param", [
    ({"top_logprobs": 2}, "top_logprobs"),   # without logprobs: true
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),   # was silently ignored
])
def test_chat_parameters_not_implemented_are_400(live, fields, param):
    refused(live, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, **fields,
                                           "messages": [{"role": "user", "content": "hi"}]}, param)


def test_chat_content_parts_are_the_text(live):
    """Parts are blocks: joined by newlines, not glued into one word."""
    ask = dict(model=MODEL, max_tokens=5, temperature=0, logprobs=False,
               response_format={"type": "text"})
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    a, b = (live.client.chat.completions.create(messages=[{"role": "user", "content": c}], **ask)
            for c in ("h\ni", parts))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_defaults_and_the_context_limit(live):
    ids = list(range(65, 65 + CONTEXT - 16))
    out = live.client.completions.create(model=MODEL, prompt=ids, temperature=0)   # 16 by default
    assert out.usage.total_tokens == CONTEXT and out.choices[0].finish_reason == "length"
    chat = live.client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "hi"}], temperature=0)   # the rest of the context
    assert chat.usage.total_tokens == CONTEXT and chat.choices[0].finish_reason == "length"
    for body, path in [({"prompt": ids + [65]}, "/v1/completions"),
                       ({"prompt": ids, "max_tokens": 17}, "/v1/completions"),
                       ({"prompt": ids * 2, "max_tokens": 1}, "/v1/completions"),
                       ({"messages": [{"role": "user", "content": "x" * CONTEXT}]},
                        "/v1/chat/completions")]:
        assert "exceeds the model's context" in refused(live, path, {"model": MODEL, **body},
                                                        "max_tokens")


# ---- clients that leave, failures, the wire ---------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(live, monkeypatch, stream):
    """Streamed or not, a client gone mid-reply (a timeout, Ctrl-C) cancels its request: its slot
    does not go on generating for nobody (a non-streamed one did, up to the whole context)."""
    step = live.engine.step
    monkeypatch.setattr(live.engine, "step", lambda: time.sleep(0.02) or step())
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 80, "stream": stream}).encode()
    before = len(live.requests)
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while len(live.requests) == before or len(live.requests[-1].output) < 2:
            time.sleep(0.01)
    request = live.requests[-1]
    assert request.done.wait(10) and request.finish_reason == "cancelled"
    assert len(request.output) < 40 and health(live.port)["running"] == 0


def test_shutdown_lets_a_non_streamed_request_finish(run_dir, monkeypatch):
    """What SIGTERM does (uvicorn's should_exit): the request in flight is not taken for a
    client that left; it completes, then the server stops."""
    s = live_server.InProcessServer(run_dir)
    step = s.engine.step
    monkeypatch.setattr(s.engine, "step", lambda: time.sleep(0.02) or step())
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(s.client.completions.create, model=MODEL, prompt="a", max_tokens=30)
        while not any(r is not None and r.output for r in s.engine.slots):
            time.sleep(0.01)
        s.stop()
        assert reply.result(timeout=10).usage.completion_tokens == 30
    assert not s.thread.is_alive()


@pytest.mark.parametrize("n", [1, 2])
def test_an_engine_failure_is_an_openai_error_streamed_or_not(live, monkeypatch, n):
    """A failed step fails its requests: a 500, or mid-stream an error event the client raises
    (the stream used to break off without one); the server serves the next request. n = 2: a
    request of two choices, each an engine request of its own."""
    step, calls = live.engine.step, []

    def failing():
        calls.append(None)
        if len(calls) % 5 == 0:
            raise RuntimeError("injected")
        step()

    monkeypatch.setattr(live.engine, "step", failing)
    stream = live.client.completions.create(model=MODEL, prompt="a", max_tokens=60, stream=True,
                                            n=n)
    with pytest.raises(openai.APIError, match="generation failed"):
        list(stream)
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        live.client.completions.create(model=MODEL, prompt="a", max_tokens=60, n=n)
    monkeypatch.undo()
    assert len(live.client.completions.create(model=MODEL, prompt="a", max_tokens=3,
                                              n=n).choices) == n


def test_sse_wire_format(live):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    req = urllib.request.Request(f"http://127.0.0.1:{live.port}/v1/chat/completions",
                                 data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = r.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {
        "chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    # with include_usage every earlier chunk says "usage": null (as OpenAI's stream does)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
