"""What `dropless serve` refuses rather than do wrong: a request past the bound on those waiting
for a slot (429), OpenAI parameters it cannot honour (400, their no-op values accepted), and
stream_options without a stream (400, as OpenAI). One live server for the module (the tiny random
model of test_serve_server) and one with a queue of one."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dropless import cli
from tests import test_serve_server_edges as edges
from tests.test_cli import _fails

live, run_dir = edges.live, edges.run_dir   # the module-scoped fixtures
MODEL, openai, live_server = edges.MODEL, edges.openai, edges.live_server
CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "max_tokens": 2, "prompt": "hi"}


# ---- the bound on waiting requests ------------------------------------------------------------

@pytest.fixture
def held(run_dir, monkeypatch):
    """A server with a queue of one whose engine steps only once `held.gate` is set, and a pool
    (`held.pool`) to send it requests. The gate opens before the pool is waited for: the other
    way round, a failed assertion hung until the held clients' timeouts."""
    s = live_server.InProcessServer(run_dir, max_queue=1)
    s.gate, s.pool, step = threading.Event(), ThreadPoolExecutor(8), s.engine.step

    def held_step():
        s.gate.wait()
        step()

    monkeypatch.setattr(s.engine, "step", held_step)
    yield s
    s.gate.set()
    s.pool.shutdown()
    s.stop()


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_full_queue_is_429_and_what_waits_is_served(held):
    """A flood queued without bound. With the engine held, four requests wait for the four free
    slots (they do not count: the next step admits them) and one in the queue of one; the next
    is a 429 in OpenAI's shape (the openai client's RateLimitError) with a Retry-After. Those
    waiting are served."""
    replies = [held.pool.submit(held.client.completions.create, **COMPLETION) for _ in range(5)]
    assert wait_for(lambda: len(held.engine.waiting) == 5)
    code, reply = edges.post(held.port, "/v1/chat/completions", CHAT)
    assert code == 429 and reply["error"]["type"] == "rate_limit_error", reply
    assert reply["error"]["code"] == "rate_limit_exceeded" and reply["error"]["param"] is None
    assert "(at most 1)" in reply["error"]["message"]
    with pytest.raises(openai.RateLimitError) as busy:
        held.client.completions.create(**COMPLETION)
    # the seconds the openai client waits before its retry: without it, 0.5
    assert busy.value.response.headers["retry-after"] == "1"
    held.gate.set()
    assert [r.result(timeout=60).usage.completion_tokens for r in replies] == [2] * 5
    assert held.client.completions.create(**COMPLETION).usage.completion_tokens == 2


def test_a_client_that_left_while_waiting_frees_its_place_at_once(held):
    """The engine dropped a cancelled request from its queue only at its next step, and till
    then (a long prefill) it still counted: clients that had given up kept the next out with
    429s. With the engine held, four requests wait for the free slots and one, whose client
    then leaves, in the queue of one: the next request is taken before any step runs."""
    replies = [held.pool.submit(held.client.completions.create, **COMPLETION) for _ in range(4)]
    assert wait_for(lambda: len(held.engine.waiting) == 4)
    body = json.dumps(COMPLETION).encode()
    with socket.create_connection(("127.0.0.1", held.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: len(held.engine.waiting) == 5)
        assert edges.post(held.port, "/v1/completions", COMPLETION)[0] == 429   # full
    gone = held.engine.waiting[-1]
    assert wait_for(lambda: gone.cancelled)
    assert edges.health(held.port)["waiting"] == 4   # nor is it counted as waiting there
    steps = held.engine.stats["steps"]
    later = held.pool.submit(edges.post, held.port, "/v1/completions", COMPLETION)
    assert wait_for(lambda: len(held.engine.waiting) == 6 or later.done())
    assert not later.done(), later.result()   # queued (not a 429), and no step has run yet
    assert held.engine.stats["steps"] == steps
    held.gate.set()
    assert later.result(timeout=60)[1]["usage"]["completion_tokens"] == 2
    assert [r.result(timeout=60).usage.completion_tokens for r in replies] == [2] * 4
    assert gone.done.wait(10) and gone.finish_reason == "cancelled" and gone.output == []


@pytest.mark.parametrize("flags, message", [(["--max-queue", "0"], "--max-queue 0 is invalid: must be >= 1"),
                                            (["--max-queue=-2"], "--max-queue -2 is invalid: must be >= 1")])
def test_serve_refuses_a_bad_max_queue_in_one_line(capsys, monkeypatch, run_dir, flags, message):
    from dropless.serve import text

    monkeypatch.setattr(text, "load_served_model", lambda *a: pytest.fail("the model was loaded"))
    _fails(capsys, ["serve", str(run_dir), "--port", str(live_server.free_port()), *flags], message)


@pytest.mark.parametrize("flags, max_queue", [([], 8 * 3), (["--max-queue", "5"], 5)])
def test_serve_passes_max_queue_default_a_multiple_of_max_batch(capsys, monkeypatch, run_dir,
                                                               flags, max_queue):
    import dropless.serve.server as server

    monkeypatch.setattr(server, "serve", lambda served, engine, host, port, max_queue, *rest:
                        print(f"queue {max_queue}"))
    assert cli.main(["serve", str(run_dir), "--device", "cpu", "--max-batch", "3",
                     "--port", str(live_server.free_port()), *flags]) == 0
    out = capsys.readouterr()
    assert f"queue {max_queue}\n" in out.out and f"max queue {max_queue}," in out.err


# ---- parameters it cannot honour --------------------------------------------------------------

@pytest.mark.parametrize("fields, allowed", [
    ({"tool_choice": "required"}, '"none", "auto" or null'),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, '"none", "auto" or null'),
    ({"tool_choice": True}, '"none", "auto" or null'),
    ({"function_call": {"name": "f"}}, '"none", "auto" or null'),
    ({"modalities": ["text", "audio"]}, '["text"] or null'),
    ({"modalities": ["audio"]}, '["text"] or null'),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "only null"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "[] or null"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     '{"type": "text"} or null'),
    ({"prediction": {"type": "content", "content": "x"}}, "only null"),
    ({"web_search_options": {}}, "only null"),
    ({"reasoning_effort": "low"}, "only null"),
    ({"service_tier": "flex"}, '"auto", "default" or null'),
    ({"service_tier": "priority"}, '"auto", "default" or null'),
    ({"store": True}, "false or null"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_what_cannot_be_honoured_is_400_naming_it(live, path, fields, allowed):
    """tool_choice, function_call, modalities and audio were ignored: a client asking for a tool
    call or audio got plain text, as if the model had chosen it; and a predicted output, a web
    search, a reasoning effort, a faster tier or a stored completion went unserved unsaid."""
    body = {**(CHAT if "chat" in path else COMPLETION), **fields}
    [name] = fields
    message = edges.refused(live, path, body, name)
    assert message.startswith(f"{name}=") and "not supported" in message and allowed in message


@pytest.mark.parametrize("fields", [
    {"tool_choice": "none"}, {"tool_choice": "auto", "tools": []}, {"tools": None},
    {"function_call": "none", "functions": []}, {"response_format": {"type": "text"}}, {"n": 1},
    {"logprobs": False, "top_logprobs": 0}, {"logprobs": None}, {"logit_bias": {}},
    {"logit_bias": None}, {"modalities": ["text"]}, {"audio": None},
    {"stream": False, "stream_options": None},
    {"prediction": None, "web_search_options": None, "reasoning_effort": None},
    {"service_tier": "auto"}, {"service_tier": "default", "store": False},
    {"service_tier": None, "store": None}, {"parallel_tool_calls": True},
    {"parallel_tool_calls": False, "tools": []}, {"metadata": {"run": "a"}, "user": "u"},
    {"metadata": None},
])
def test_the_no_op_values_are_accepted(live, fields):
    code, reply = edges.post(live.port, "/v1/chat/completions", {**CHAT, **fields})
    assert code == 200 and reply["usage"]["completion_tokens"] == 2, reply


@pytest.mark.parametrize("fields, message", [
    ({"user": 7}, "must be a string"),
    ({"parallel_tool_calls": "yes"}, "must be true or false"),
    ({"parallel_tool_calls": 1}, "must be true or false"),
    ({"metadata": ["run", "a"]}, "an object of at most 16 string values"),
    ({"metadata": {"run": 1}}, "an object of at most 16 string values"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "an object of at most 16 string values"),
    ({"metadata": {"k" * 65: "v"}}, "keys of at most 64 characters"),
    ({"metadata": {"run": "v" * 513}}, "values of at most 512"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_labels_of_the_wrong_type_are_400_naming_them(live, path, fields, message):
    """user, metadata and parallel_tool_calls change no reply, but a malformed one is the
    client's mistake to hear about (as OpenAI answers it), not to have served silently; the
    bounds are OpenAI's (16 pairs, 64-character keys, 512-character values: at them, accepted)."""
    body = {**(CHAT if "chat" in path else COMPLETION), **fields}
    [name] = fields
    assert message in edges.refused(live, path, body, name)
    at_bounds = {"metadata": {f"{i:064d}": "v" * 512 for i in range(16)}, "user": "",
                 "parallel_tool_calls": False}
    code, reply = edges.post(live.port, path, {**body, **at_bounds})
    assert code == 200 and 1 <= reply["usage"]["completion_tokens"] <= 2, reply


# ---- stream_options without a stream ----------------------------------------------------------

@pytest.mark.parametrize("stream", [{}, {"stream": False}, {"stream": None}])
@pytest.mark.parametrize("options", [{"include_usage": True}, {}])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_options_without_a_stream_is_400(live, path, stream, options):
    """Accepted and ignored: OpenAI refuses it, and a client that set include_usage expecting a
    stream got one reply."""
    body = {**(CHAT if "chat" in path else COMPLETION), **stream, "stream_options": options}
    assert "only allowed when stream is true" in edges.refused(live, path, body, "stream_options")


def test_the_openai_client_gets_a_bad_request_for_stream_options_alone(live):
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        live.client.chat.completions.create(**CHAT, stream_options={"include_usage": True})


# ---- parameters the server does not know ------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"min_p": 0.1}, {"repetition_penalty": 1.2}, {"min_tokens": 4}, {"top_a": 1},
    {"guided_json": {}}, {"add_generation_prompt": False}, {"Temperature": 0},
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_unknown_parameter_is_400_naming_it(live, path, fields):
    """Another server's extension (min_p, repetition_penalty) was accepted and ignored: the
    reply was sampled other than the client asked for, unsaid. OpenAI refuses such a name too."""
    body = {**(CHAT if "chat" in path else COMPLETION), **fields}
    [name] = fields
    message = edges.refused(live, path, body, name)
    assert message.startswith(f"unrecognized request argument supplied: '{name}'"), message
    assert "temperature" in message and "max_tokens" in message   # what it takes


@pytest.mark.parametrize("path, field", [("/v1/chat/completions", {"prompt": "hi"}),
                                         ("/v1/completions", {"messages": []}),
                                         ("/v1/completions", {"chat_template_kwargs": {}})])
def test_the_other_endpoints_fields_are_unknown(live, path, field):
    body = {**(CHAT if "chat" in path else COMPLETION), **field}
    [name] = field
    assert "unrecognized" in edges.refused(live, path, body, name)


@pytest.mark.parametrize("fields, ok", [
    ({"safety_identifier": "h-42", "prompt_cache_key": "k"}, True),
    ({"safety_identifier": 42}, False), ({"prompt_cache_key": ["k"]}, False),
])
def test_the_newer_labels_are_taken_if_strings(live, fields, ok):
    if ok:
        code, reply = edges.post(live.port, "/v1/chat/completions", {**CHAT, **fields})
        assert code == 200 and reply["usage"]["completion_tokens"] == 2, reply
    else:
        [name] = fields
        assert "must be a string" in edges.refused(live, "/v1/chat/completions",
                                                   {**CHAT, **fields}, name)


# ---- chat: roles, template variables --------------------------------------------------------

def test_the_developer_role_is_a_system_message(live):
    """OpenAI's newer name for system instructions: the default template (and most models')
    knows only system; a template that names developer would get it as sent."""
    replies = [edges.post(live.port, "/v1/chat/completions", {
        **CHAT, "temperature": 0, "max_tokens": 4,
        "messages": [{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}]})
        for role in ("developer", "system")]
    assert all(code == 200 for code, _ in replies), replies
    (_, dev), (_, system) = replies
    assert dev["usage"] == system["usage"]
    assert dev["choices"][0]["message"] == system["choices"][0]["message"]


@pytest.mark.parametrize("value", [[], "x", {"1a": True}, {"a b": 1}])
def test_bad_chat_template_kwargs_are_400(live, value):
    message = edges.refused(live, "/v1/chat/completions",
                            {**CHAT, "chat_template_kwargs": value}, "chat_template_kwargs")
    assert "template variables" in message


def test_chat_template_kwargs_a_template_ignores_change_nothing(live):
    ask = {**CHAT, "temperature": 0, "max_tokens": 4}
    (c1, a), (c2, b) = (edges.post(live.port, "/v1/chat/completions", body) for body in (
        ask, {**ask, "chat_template_kwargs": {"enable_thinking": False, "messages": "x"}}))
    assert c1 == c2 == 200 and a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_models_card_and_stream_headers(live):
    """created: when the server started (0 read as 1970); a stream tells proxies not to buffer."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{live.port}/v1/models") as r:
        card = json.loads(r.read())["data"][0]
    assert abs(card["created"] - time.time()) < 24 * 3600
    request = urllib.request.Request(
        f"http://127.0.0.1:{live.port}/v1/completions", headers={"Content-Type":
                                                                 "application/json"},
        data=json.dumps({**COMPLETION, "stream": True}).encode())
    with urllib.request.urlopen(request) as r:
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.read().endswith(b"data: [DONE]\n\n")
