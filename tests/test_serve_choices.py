"""OpenAI's n (several choices a request) in `dropless serve`, on the tiny random model of
test_serve_server (4 slots): each choice is the reply of its own request with the seed + its
index, streamed == non-streamed per index, chunks of the choices interleaved and each in order,
usage over the choices, logprobs per choice, the bounds on n and on the queue, clients that leave
and engine failures ending every choice."""

import json
import socket
import time

import pytest

from dropless.serve.fields import APIError, MAX_CHOICES, choices_count
from tests import test_serve_logprobs as logprobs_tests
from tests import test_serve_server_refusals as refusals
from tests.test_serve_server import reference

live, run_dir, held = refusals.live, refusals.run_dir, refusals.held   # the fixtures
edges, MODEL, openai = refusals.edges, refusals.MODEL, refusals.openai
post, refused, health = edges.post, edges.refused, edges.health
CHAT, COMPLETION, sse = logprobs_tests.CHAT, logprobs_tests.COMPLETION, logprobs_tests.sse
ATOL = logprobs_tests.ATOL
PROMPTS = {CHAT: {"messages": [{"role": "user", "content": "def f(x):"}]},
           COMPLETION: {"prompt": "def f(x):"}}
PATHS = [CHAT, COMPLETION]


def merged(path: str, pieces: list):
    """One choice's logprobs from its chunks' (or its reply's) in order: a chat's entries, a
    completion's lists; None when not asked."""
    if all(p is None for p in pieces):
        return None
    if path == CHAT:
        return [e for p in pieces for e in p["content"]]
    return {k: [x for p in pieces for x in p[k]] for k in pieces[0]}


def apart(value) -> tuple[str, list[float]]:
    """JSON with its floats taken out, and the floats: to compare those up to a tolerance (a
    batch of other rows may round them otherwise)."""
    floats = []

    def walk(v):
        if isinstance(v, float):
            floats.append(v)
            return None
        if isinstance(v, list):
            return [walk(u) for u in v]
        return {k: walk(u) for k, u in v.items()} if isinstance(v, dict) else v
    return json.dumps(walk(value)), floats


def choices(live, path: str, stream: bool, **fields) -> tuple[list[tuple], dict]:
    """([(text, finish_reason, logprobs)] by index, usage) of a reply, its chunks joined by index
    after checking their order: per choice, (chat) its role chunk first, its finish_reason chunk
    last, none between; then the usage chunk with no choices."""
    body = {"model": MODEL, "max_tokens": 10, **PROMPTS[path], **fields}
    if not stream:
        code, reply = post(live.port, path, body)
        assert code == 200, reply
        assert [c["index"] for c in reply["choices"]] == list(range(len(reply["choices"])))
        return [(c["message"]["content"] if path == CHAT else c["text"], c["finish_reason"],
                 merged(path, [c["logprobs"]])) for c in reply["choices"]], reply["usage"]
    chunks = sse(live.port, path, {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] is not None
    by_index: dict[int, list[dict]] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]   # one choice a chunk
        assert chunk["usage"] is None
        by_index.setdefault(choice["index"], []).append(choice)
    assert sorted(by_index) == list(range(len(by_index)))
    out = []
    for i in range(len(by_index)):
        parts = by_index[i]
        if path == CHAT:
            assert parts[0]["delta"] == {"role": "assistant", "content": ""}
            parts = parts[1:]
        *middle, last = parts
        assert last["finish_reason"] and last["logprobs"] is None
        assert all(p["finish_reason"] is None for p in middle)
        text = "".join(p["delta"].get("content", "") if path == CHAT else p["text"]
                       for p in middle)
        out.append((text, last["finish_reason"], merged(path, [p["logprobs"] for p in middle])))
    return out, chunks[-1]["usage"]


@pytest.mark.parametrize("path", PATHS)
def test_seeded_choices_are_separate_requests_with_seeds_in_a_row(live, path):
    """n=3 with seed s: choice i is what n=1 with seed s + i replies; the prompt counts once in
    usage, the completions' tokens add up; the same request replies the same."""
    ask = dict(temperature=1.0, seed=1234, max_tokens=12)
    together, usage = choices(live, path, False, n=3, **ask)
    alone = [choices(live, path, False, **{**ask, "seed": 1234 + i}) for i in range(3)]
    assert together == [reply[0][0] for reply in alone]
    assert len({text for text, *_ in together}) == 3   # the seeds differ, and so the choices
    assert usage["prompt_tokens"] == alone[0][1]["prompt_tokens"]
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for _, u in alone)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choices(live, path, False, n=3, **ask) == (together, usage)


def test_unseeded_choices_each_have_their_own_seed(live):
    replies, _ = choices(live, COMPLETION, False, n=3, temperature=1.0, max_tokens=12)
    assert len({text for text, *_ in replies}) == 3


@pytest.mark.parametrize("path", PATHS)
def test_greedy_choices_are_all_the_greedy_reply(live, path):
    replies, usage = choices(live, path, False, n=4, temperature=0, max_tokens=12)
    [alone], alone_usage = choices(live, path, False, temperature=0, max_tokens=12)
    if path == COMPLETION:
        assert alone[0] == reference(live.served, "def f(x):", 12)
    assert replies == [alone] * 4
    assert usage["completion_tokens"] == 4 * alone_usage["completion_tokens"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ask", [dict(temperature=1.0, seed=7), dict(temperature=0)])
def test_streamed_choices_are_the_non_streamed(live, path, ask):
    streamed = choices(live, path, True, n=3, max_tokens=16, **ask)
    assert streamed == choices(live, path, False, n=3, max_tokens=16, **ask)


def test_the_choices_chunks_interleave_as_they_come(live, monkeypatch):
    """A step at a time (a slow engine), each step's tokens go out as they come: not choice 0's
    whole reply before choice 1's."""
    step = live.engine.step
    monkeypatch.setattr(live.engine, "step", lambda: time.sleep(0.01) or step())
    chunks = sse(live.port, COMPLETION, {"model": MODEL, "prompt": "a", "max_tokens": 8, "n": 3,
                                         "temperature": 0, "ignore_eos": True})
    order = [c["choices"][0]["index"] for c in chunks]
    assert set(order) == {0, 1, 2} and order != sorted(order), order


@pytest.mark.parametrize("path, asked", [(CHAT, dict(logprobs=True, top_logprobs=3)),
                                         (COMPLETION, dict(logprobs=3))])
def test_logprobs_are_each_choices_own(live, path, asked):
    """n=2: each choice's logprobs are the model's at its own tokens (its engine request's),
    streamed as not, and those of the request with its seed alone."""
    ask = dict(temperature=1.0, seed=99, max_tokens=8, **asked)
    replies, _ = choices(live, path, False, n=2, **ask)
    requests = live.requests[-2:]   # submitted in the choices' order
    assert requests[0].output != requests[1].output
    for (_, _, logprobs), request in zip(replies, requests):
        ref = logprobs_tests.model_logprobs(live, request)
        values = ([e["logprob"] for e in logprobs] if path == CHAT
                  else logprobs["token_logprobs"])
        assert values == pytest.approx([float(ref_T[t]) for ref_T, t in zip(ref, request.output)],
                                       abs=ATOL)
    assert choices(live, path, True, n=2, **ask)[0] == replies
    for i, (text, finish, logprobs) in enumerate(replies):
        [(alone_text, alone_finish, alone_logprobs)], _ = choices(
            live, path, False, **{**ask, "seed": 99 + i})
        assert (alone_text, alone_finish) == (text, finish)
        (shape, values), (alone_shape, alone_values) = apart(logprobs), apart(alone_logprobs)
        assert shape == alone_shape and values == pytest.approx(alone_values, abs=ATOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, says", [(5, "[1, 4]"), (0, "[1, 4]"), (-1, "[1, 4]"),
                                     (True, "[1, 4]"), ("2", "[1, 4]"), (2.0, "[1, 4]")])
def test_bad_n_is_400_naming_it(live, path, n, says):
    """More choices than the engine's 4 slots, none, or not an integer."""
    before = len(live.requests)
    message = refused(live, path, {"model": MODEL, "max_tokens": 2, "n": n, **PROMPTS[path]}, "n")
    assert message.startswith(f"n={n!r}") and says in message, message
    assert len(live.requests) == before   # refused before the engine saw it


def test_n_is_bounded_by_openais_128_whatever_the_batch():
    assert choices_count({"n": MAX_CHOICES}, 1000) == MAX_CHOICES == 128
    assert choices_count({}, 1) == choices_count({"n": None}, 1) == 1
    with pytest.raises(APIError, match=r"\[1, 128\]"):
        choices_count({"n": 129}, 1000)


def test_the_openai_client_reads_several_choices(live):
    out = live.client.completions.create(model=MODEL, prompt="a", max_tokens=5, n=2, seed=3,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text != out.choices[1].text
    assert out.usage.completion_tokens == 10 and out.usage.prompt_tokens == 1
    out = live.client.chat.completions.create(model=MODEL, messages=PROMPTS[CHAT]["messages"],
                                              max_tokens=5, n=3, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 1
    chunks = list(live.client.chat.completions.create(
        model=MODEL, messages=PROMPTS[CHAT]["messages"], max_tokens=5, n=2, stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1}


def test_a_requests_choices_count_against_the_queue(held):
    """A queue of one, 4 slots, the engine held: 4 choices take the free slots; then 2 would be 2
    waiting (429), 1 is the one that may wait, and then even 1 is too many. What waits is
    served. The 429s are awaited from the pool: accepted, they would wait for the engine."""
    four = held.pool.submit(held.client.completions.create, **refusals.COMPLETION, n=4)
    assert refusals.wait_for(lambda: len(held.engine.waiting) == 4)
    code, reply = held.pool.submit(post, held.port, COMPLETION, {**refusals.COMPLETION, "n": 2}
                                   ).result(timeout=10)
    assert code == 429 and "no room for this request's 2 choices" in reply["error"]["message"]
    one = held.pool.submit(held.client.completions.create, **refusals.COMPLETION)
    assert refusals.wait_for(lambda: len(held.engine.waiting) == 5)
    code, reply = held.pool.submit(post, held.port, CHAT, refusals.CHAT).result(timeout=10)
    assert code == 429 and "1 requests already wait" in reply["error"]["message"], reply
    held.gate.set()
    assert len(four.result(timeout=30).choices) == 4 and one.result(timeout=30).choices


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_every_choice(live, monkeypatch, stream):
    step = live.engine.step
    monkeypatch.setattr(live.engine, "step", lambda: time.sleep(0.02) or step())
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 80, "n": 3,
                       "stream": stream}).encode()
    before = len(live.requests)
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while len(live.requests) < before + 3 or len(live.requests[-1].output) < 2:
            time.sleep(0.01)
    for request in live.requests[-3:]:
        assert request.done.wait(10) and request.finish_reason == "cancelled"
        assert len(request.output) < 40
    assert health(live.port)["running"] == 0
