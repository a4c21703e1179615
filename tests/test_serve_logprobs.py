"""OpenAI's logprobs in `dropless serve`, on the tiny random model of test_serve_server: the values
against the model's own log_softmax recomputed without the cache, the shapes of both endpoints,
streamed == non-streamed, entries lined up with the text (a stop string, split characters), and
the values refused. The oracle's prompt is the engine Request's (`live.requests`)."""

import codecs
import json
import urllib.request

import pytest
import torch

from tests import test_serve_server as live_server
from tests import test_serve_server_edges as edges

run_dir = live_server.run_dir   # the module-scoped fixture: the tiny model's run directory
MODEL, post, refused = edges.MODEL, edges.post, edges.refused
live = edges.live   # the server; `live.requests`: every engine Request, in the order submitted
CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "def f(x):"}]
ATOL = 1e-4   # float32 on CPU: the cached decode and a whole-sequence forward differ by ~1e-6




def model_logprobs(live, request) -> torch.Tensor:
    """[output tokens, vocab]: log_softmax of the model's logits at each output token's position,
    one forward over the prompt and output, no cache."""
    prompt, output = request.prompt, request.output
    with torch.no_grad():
        logits, _ = live.served.model(torch.tensor([prompt + output]))
    return torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), dim=-1)


def sse(port, path: str, body: dict) -> list[dict]:
    """A stream's chunks, as JSON, up to [DONE]."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={
        "Content-Type": "application/json"}, data=json.dumps({**body, "stream": True}).encode())
    chunks = []
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: "):
                if line.strip() == b"data: [DONE]":
                    return chunks
                chunks.append(json.loads(line[6:]))
    raise AssertionError(f"no [DONE] after {chunks}")


def chat(live, stream: bool, **fields) -> tuple[str, list[dict] | None]:
    """(content, logprobs content), streamed chunks joined or not; None: logprobs null."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, **fields}
    if not stream:
        code, reply = post(live.port, CHAT, body)
        assert code == 200, reply
        [choice] = reply["choices"]
        assert choice["logprobs"] is None or choice["logprobs"]["refusal"] is None
        return choice["message"]["content"], choice["logprobs"] and choice["logprobs"]["content"]
    chunks = [c["choices"][0] for c in sse(live.port, CHAT, body)]
    first, middle, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first["delta"]["role"] == "assistant" and first["logprobs"] is None
    assert last["finish_reason"] and last["logprobs"] is None
    text = "".join(c["delta"].get("content", "") for c in middle)
    if not fields.get("logprobs"):
        assert all(c["logprobs"] is None for c in middle)
        return text, None
    assert all(c["logprobs"]["refusal"] is None for c in middle)
    return text, [e for c in middle for e in c["logprobs"]["content"]]


def complete(live, stream: bool, **fields) -> tuple[str, dict | None]:
    """(text, logprobs), streamed chunks' lists concatenated or not."""
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 8, "temperature": 0, **fields}
    if not stream:
        code, reply = post(live.port, COMPLETION, body)
        assert code == 200, reply
        return reply["choices"][0]["text"], reply["choices"][0]["logprobs"]
    chunks = [c["choices"][0] for c in sse(live.port, COMPLETION, body)]
    assert chunks[-1]["finish_reason"] and chunks[-1]["logprobs"] is None
    text = "".join(c["text"] for c in chunks[:-1])
    if fields.get("logprobs") is None:
        assert all(c["logprobs"] is None for c in chunks)
        return text, None
    keys = ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    assert all(list(c["logprobs"]) == keys for c in chunks[:-1])
    return text, {k: [x for c in chunks[:-1] for x in c["logprobs"][k]] for k in keys}


def piece(token: int) -> tuple[str, list[int]]:
    raw = bytes([token])   # the byte tokenizer's token: one byte
    return raw.decode(errors="replace"), list(raw)


def offsets(tokens: list[int]) -> list[int]:
    """Where each token's text begins: the characters decoded before it (no stop string cut)."""
    decoder, text, out = codecs.getincrementaldecoder("utf-8")(errors="replace"), "", []
    for token in tokens:
        out.append(len(text))
        text += decoder.decode(bytes([token]))
    return out


@pytest.mark.parametrize("top", [0, 2, 20])
def test_chat_logprobs_are_the_models_and_stream_as_they_reply(live, top):
    content, entries = chat(live, False, logprobs=True, top_logprobs=top)
    request = live.requests[-1]
    ref = model_logprobs(live, request)
    assert len(entries) == len(request.output) == 8
    for entry, token, ref_T in zip(entries, request.output, ref):
        assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert (entry["token"], entry["bytes"]) == piece(token)
        assert entry["logprob"] <= 0 and entry["logprob"] == pytest.approx(float(ref_T[token]),
                                                                          abs=ATOL)
        assert len(entry["top_logprobs"]) == top
        values, ids = ref_T.topk(top)
        for alt, value, i in zip(entry["top_logprobs"], values.tolist(), ids.tolist()):
            assert (alt["token"], alt["bytes"]) == piece(i) and list(alt) == [
                "token", "logprob", "bytes"]
            assert alt["logprob"] == pytest.approx(value, abs=ATOL)
        if top:   # greedy: the sampled token is the most likely one
            assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]
            assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        lps = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)
    # no stop string cut: the tokens' bytes are the reply's
    assert bytes(b for e in entries for b in e["bytes"]).decode(errors="replace") == content
    assert chat(live, True, logprobs=True, top_logprobs=top) == (content, entries)


@pytest.mark.parametrize("n", [0, 3, 20])
def test_completion_logprobs_are_the_models_and_stream_as_they_reply(live, n):
    text, logprobs = complete(live, False, logprobs=n)
    request = live.requests[-1]
    ref = model_logprobs(live, request)
    assert list(logprobs) == ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    assert logprobs["tokens"] == [piece(t)[0] for t in request.output]
    assert logprobs["text_offset"] == offsets(request.output)
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert logprobs["token_logprobs"] == pytest.approx(
        [float(ref_T[t]) for ref_T, t in zip(ref, request.output)], abs=ATOL)
    for top, token, ref_T in zip(logprobs["top_logprobs"], request.output, ref):
        values, ids = ref_T.topk(n)
        expected = {}   # tokens of one text (lone bytes past 0x7f: U+FFFD) keep the likelier's
        for value, i in zip(values.tolist(), ids.tolist()):
            expected.setdefault(piece(i)[0], value)
        assert list(top) == list(expected) and list(top.values()) == pytest.approx(
            list(expected.values()), abs=ATOL)
        if n:
            assert next(iter(top)) == piece(token)[0]   # greedy: the most likely
    assert complete(live, True, logprobs=n) == (text, logprobs)


def test_the_openai_client_reads_both_shapes(live):
    out = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                              temperature=0, logprobs=True, top_logprobs=2)
    [first, *_] = out.choices[0].logprobs.content
    assert first.bytes == piece(live.requests[-1].output[0])[1]
    assert first.top_logprobs[0].logprob == pytest.approx(first.logprob)
    out = live.client.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0,
                                         logprobs=2)
    assert len(out.choices[0].logprobs.token_logprobs) == 3 and out.choices[0].logprobs.tokens


def test_logprobs_are_before_temperature_and_top_k(live):
    """Sampled at temperature 2 among the top 5: the logprobs are still the model's."""
    _, entries = chat(live, False, logprobs=True, top_logprobs=5, temperature=2.0, top_k=5,
                      seed=7, max_tokens=12)
    request = live.requests[-1]
    ref = model_logprobs(live, request)
    assert [e["logprob"] for e in entries] == pytest.approx(
        [float(ref_T[t]) for ref_T, t in zip(ref, request.output)], abs=ATOL)
    assert [a["logprob"] for e in entries for a in e["top_logprobs"]] == pytest.approx(
        ref.topk(5).values.flatten().tolist(), abs=ATOL)


# prompt "a", greedy: "X" 0xE4 "X" 0xE4 0xB8 "h" ... 0xC7 0xB8 ("Ǹ", two tokens) ...
@pytest.mark.parametrize("stop", [["X"], ["Ǹ"], ["h\x1fgdo"], ["X\ufffdh"]])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_keeps_the_entries_of_the_tokens_it_read(live, stop, stream):
    """Every token pushed until the stop string completes has its entry, the completing one
    included, though their text is cut off (and sent in a chunk of no text, streamed)."""
    ask = dict(prompt="a", max_tokens=40, stop=stop)
    text, logprobs = complete(live, stream, logprobs=1, **ask)
    request = live.requests[-1]
    assert request.finish_reason == "stop"
    assert logprobs["tokens"] == [piece(t)[0] for t in request.output]
    assert logprobs["text_offset"] == offsets(request.output)
    assert (text, logprobs) == complete(live, not stream, logprobs=1, **ask)
    assert text == edges.complete(live.client, False, temperature=0, **ask)[0]   # not asked


def test_no_logprobs_asked_is_null_everywhere(live):
    for fields in [{}, {"logprobs": False}, {"logprobs": None, "top_logprobs": 0},
                   {"logprobs": False, "top_logprobs": 0}]:
        assert chat(live, False, **fields)[1] is None and chat(live, True, **fields)[1] is None
    for fields in [{}, {"logprobs": None}, {"top_logprobs": 0}]:
        assert complete(live, False, **fields)[1] is None
        assert complete(live, True, **fields)[1] is None


@pytest.mark.parametrize("path, fields, param, says", [
    (CHAT, {"top_logprobs": 2}, "top_logprobs", "only allowed when logprobs is true"),
    (CHAT, {"logprobs": False, "top_logprobs": 1}, "top_logprobs", "only allowed"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "[0, 20]"),
    (CHAT, {"logprobs": True, "top_logprobs": True}, "top_logprobs", "[0, 20]"),
    (CHAT, {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs", "[0, 20]"),
    (CHAT, {"logprobs": "yes"}, "logprobs", "true or false"),
    (CHAT, {"logprobs": 1}, "logprobs", "true or false"),
    (COMPLETION, {"logprobs": 21}, "logprobs", "[0, 20]"),
    (COMPLETION, {"logprobs": -1}, "logprobs", "[0, 20]"),
    (COMPLETION, {"logprobs": True}, "logprobs", "[0, 20]"),
    (COMPLETION, {"logprobs": "2"}, "logprobs", "[0, 20]"),
    (COMPLETION, {"logprobs": 2, "top_logprobs": 2}, "top_logprobs", "not a completions"),
    (COMPLETION, {"top_logprobs": False}, "top_logprobs", "not a completions"),
])
def test_bad_logprobs_are_400_naming_the_field(live, path, fields, param, says):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    body.update({"messages": MESSAGES} if path == CHAT else {"prompt": "a"})
    before = len(live.requests)
    message = refused(live, path, body, param)
    assert message.startswith(f"{param}=") and says in message, message
    assert len(live.requests) == before   # refused before the engine saw it
