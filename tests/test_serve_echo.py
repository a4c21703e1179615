"""A prompt's log-probabilities (SamplingParams.prompt_logprobs), max_tokens 0, and the completions
`echo` built on them: what lm-evaluation-harness's "local-completions" model sends to score a
text's log-likelihood. The engine's entries against one full forward's log_softmax (across chunk
boundaries); the server's reply against the same, streamed == non-streamed, and the refusals."""

import pytest
import torch

from dropless import MoEConfig
from dropless.generate import greedy_recompute
from dropless.serve import Engine, Request, SamplingParams
from tests import test_serve_server as live_server
from tests import test_serve_server_edges as edges
from tests.test_serve_engine import PROMPTS, tiny_model
from tests.test_serve_logprobs import CHAT, COMPLETION, MESSAGES, complete, offsets, piece, sse

run_dir = live_server.run_dir   # the module-scoped fixture: the tiny model's run directory
MODEL, post, refused = edges.MODEL, edges.post, edges.refused
live = edges.live   # the server; `live.requests`: every engine Request, in the order submitted

ATOL = 1e-4   # float32 on CPU
PROMPT = [3, 17, 5, 60, 2, 2, 41, 9, 33, 12]   # 10 tokens: chunks of 3 end inside it


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: log_softmax of one forward's logits at positions 0 .. len - 2, no
    cache: row i scores ids[i + 1]."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids], device=next(model.parameters()).device))
    return logits[0, :-1].float().log_softmax(-1)


def check_entries(entries, ids: list[int], ref: torch.Tensor, n: int) -> None:
    assert len(entries) == len(ids) - 1 == len(ref)
    for (chosen, top), token, ref_V in zip(entries, ids[1:], ref):
        assert chosen == pytest.approx(float(ref_V[token]), abs=ATOL)
        values, top_ids = ref_V.topk(n)
        assert [t for t, _ in top] == top_ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=ATOL)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


@pytest.mark.parametrize("chunk, step_tokens", [(3, 0), (3, 128), (4, 0), (16, 128)])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_prompt_logprobs_equal_the_forward(chunk, step_tokens, n):
    """Chunks of 3 and 4 on a 10-token prompt (a chunk's last position scores the next chunk's
    first token), through the model's blocks (step_tokens 0) and the decode step's path; beside a
    request that asks for none and one on another prompt."""
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=chunk,
                    prefill_step_tokens=step_tokens)
    prompts = [PROMPT, PROMPTS[0], PROMPTS[3]]
    asks = [n, None, 2]
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=4, temperature=0,
                                                        prompt_logprobs=a)))
                for p, a in zip(prompts, asks)]
    engine.run_until_done()
    for request, a in zip(requests, asks):
        assert request.output == greedy_recompute(model, request.prompt, 4)
        if a is None:
            assert request.prompt_logprobs == []
        else:
            check_entries(request.prompt_logprobs, request.prompt,
                          forward_logprobs(model, request.prompt), a)


def test_prompt_logprobs_in_slices(monkeypatch):
    """A chunk longer than a slice of logits: the slices' entries join in order."""
    from dropless.serve import prefill as prefill_module
    monkeypatch.setattr(prefill_module, "PROMPT_SLICE", 4)
    model = tiny_model()
    engine = Engine(model, max_batch=1, max_len=40, prefill_chunk=16, prefill_step_tokens=0)
    request = engine.submit(Request(PROMPT + PROMPTS[3], SamplingParams(
        max_tokens=0, prompt_logprobs=3)))
    engine.run_until_done()
    check_entries(request.prompt_logprobs, request.prompt,
                  forward_logprobs(model, request.prompt), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_prompt_logprobs_on_cuda(dtype, atol):
    """On CUDA, beside graphed decode steps: a prompt's entries (chunks of 4, a request of
    max_tokens 0 and one that goes on) against the forward's, the greedy tokens a recompute's."""
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)
    model = tiny_model(qk_norm=True, moe=moe).to("cuda", dtype)
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=4, lengths=(8, 16))
    engine.warm_up()
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=m, temperature=0,
                                                        prompt_logprobs=a)))
                for p, m, a in [(PROMPT, 0, 3), (PROMPTS[0], 6, None), (PROMPTS[3], 5, 1)]]
    engine.run_until_done()
    assert requests[0].output == [] and requests[1].prompt_logprobs == []
    for request in requests[::2]:
        ref = forward_logprobs(model, request.prompt)
        assert len(request.prompt_logprobs) == len(request.prompt) - 1
        for (chosen, top), token, ref_V in zip(request.prompt_logprobs, request.prompt[1:], ref):
            assert abs(chosen - float(ref_V[token])) <= atol
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert abs(top[0][1] - float(ref_V.max())) <= atol
    if dtype == torch.float32:
        assert requests[2].output == greedy_recompute(model, requests[2].prompt, 5)


def test_max_tokens_0_scores_the_prompt_and_disturbs_no_one():
    """Requests of max_tokens 0 finish right after their prefill with no output, never sampled
    nor in a decode step, their slots left at the scratch position; the greedy requests around
    them (before, between, after in the slots, and admitted into the slots they free) get the
    tokens of a recompute."""
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=3)
    decodes = []   # each decode step's requests, and those whose first token it carries
    launch = engine._launch
    engine._launch = lambda rows: decodes.append([engine.slots[s] for s in rows] + [
        r for _, pairs in engine.firsts for _, r in pairs]) or launch(rows)
    scored = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1)
    plan = [(PROMPTS[0], 6), (PROMPT, 0), (PROMPTS[1], 9), (PROMPTS[3], 0), (PROMPTS[4], 5),
            (PROMPTS[2], 0), (PROMPT, 7)]
    requests = [engine.submit(Request(p, scored if m == 0 else SamplingParams(
        max_tokens=m, temperature=0))) for p, m in plan]
    while engine.has_work():
        engine.step()
        free = [s for s, r in enumerate(engine.slots) if r is None]
        assert engine.positions_B[free].tolist() == [engine.max_len - 1] * len(free)
    for request, (prompt, m) in zip(requests, plan):
        assert request.finish_reason == "length" and request.done.is_set()
        if m == 0:
            assert request.output == [] and request.logprobs == []
            assert len(request.prompt_logprobs) == len(prompt) - 1
            assert all(request not in rows for rows in decodes)
        else:
            assert request.output == greedy_recompute(model, prompt, m)
    assert all(r is None for r in engine.slots)


@pytest.mark.parametrize("fields, says", [
    (dict(max_tokens=0), "max_tokens=0 is invalid: must be >= 1"),
    (dict(max_tokens=0, logprobs=2), "max_tokens=0 is invalid: must be >= 1"),
    (dict(max_tokens=-1, prompt_logprobs=0), "max_tokens=-1 is invalid"),
    (dict(prompt_logprobs=21), r"prompt_logprobs=21 is invalid: must be None or in \[0, 20\]"),
    (dict(prompt_logprobs=-1), "prompt_logprobs=-1 is invalid"),
])
def test_sampling_params_bounds(fields, says):
    with pytest.raises(ValueError, match=says):
        SamplingParams(**fields)


# ---- the server: /v1/completions echo ---------------------------------------------------------

TEXT = "def f(x): return x"
# lm-evaluation-harness's "local-completions" model scoring a text's log-likelihood
LM_EVAL = {"model": MODEL, "prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 0,
           "temperature": 0}


def check_prompt_logprobs(logprobs: dict, ids: list[int], ref: torch.Tensor, n: int) -> None:
    """The reply's first len(ids) entries: the prompt's, against the forward's."""
    m = len(ids)
    assert logprobs["tokens"][:m] == [piece(t)[0] for t in ids]
    assert logprobs["text_offset"][:m] == offsets(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:m] == pytest.approx(
        [float(ref_V[t]) for ref_V, t in zip(ref, ids[1:])], abs=ATOL)
    for top, ref_V in zip(logprobs["top_logprobs"][1:m], ref):
        values, top_ids = ref_V.topk(n)
        expected = {}   # tokens of one text keep the likelier's (test_serve_logprobs)
        for value, i in zip(values.tolist(), top_ids.tolist()):
            expected.setdefault(piece(i)[0], value)
        assert list(top) == list(expected)
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=ATOL)


def test_lm_eval_harness_scores_a_prompt(live):
    """max_tokens 0: the prompt only, its tokens' log-probabilities the forward's, the first
    null; no token generated, finish_reason length, never a decode step."""
    code, reply = post(live.port, COMPLETION, LM_EVAL)
    assert code == 200, reply
    [choice] = reply["choices"]
    request = live.requests[-1]
    ids = list(TEXT.encode())
    assert request.prompt == ids and request.output == []
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                              "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids)
    check_prompt_logprobs(logprobs, ids, forward_logprobs(live.served.model, ids), 1)
    # the openai client reads it (lm-eval's own reading: token_logprobs[1:], top_logprobs)
    out = live.client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1,
                                         max_tokens=0, temperature=0)
    assert out.choices[0].logprobs.token_logprobs == logprobs["token_logprobs"]
    assert out.choices[0].logprobs.top_logprobs[0] is None


@pytest.mark.parametrize("fields", [dict(logprobs=3), dict(logprobs=0), {}, dict(n=2, seed=4),
                                    dict(prompt=[104, 105, 0xC3, 0xA9]),
                                    dict(logprobs=2, stop=["\n"], max_tokens=30)])
def test_echo_is_the_prompt_then_the_completion(live, fields):
    """The text: the prompt's (token ids: decoded) then the reply's without echo; logprobs: the
    prompt's entries, then the reply's, their offsets past the prompt's text; streamed ==
    non-streamed, the first chunk the prompt's."""
    code, plain = post(live.port, COMPLETION, {"model": MODEL, "prompt": TEXT, "max_tokens": 8,
                                               "temperature": 0, **fields})
    assert code == 200, plain
    code, reply = post(live.port, COMPLETION, {"model": MODEL, "prompt": TEXT, "max_tokens": 8,
                                               "temperature": 0, "echo": True, **fields})
    assert code == 200, reply
    request = live.requests[-1]
    prompt = fields.get("prompt", TEXT)
    shown = prompt if isinstance(prompt, str) else bytes(prompt).decode(errors="replace")
    assert reply["usage"] == plain["usage"]
    for echoed, alone in zip(reply["choices"], plain["choices"], strict=True):
        assert echoed["text"] == shown + alone["text"]
        assert echoed["finish_reason"] == alone["finish_reason"]
        if "logprobs" not in fields:
            assert echoed["logprobs"] is None
            continue
        m, lps, ref = len(request.prompt), echoed["logprobs"], alone["logprobs"]
        check_prompt_logprobs(lps, request.prompt, forward_logprobs(
            live.served.model, request.prompt), fields["logprobs"])
        assert {k: v[m:] for k, v in lps.items() if k != "text_offset"} == {
            k: v for k, v in ref.items() if k != "text_offset"}
        assert lps["text_offset"][m:] == [len(shown) + o for o in ref["text_offset"]]
    if "n" not in fields:
        chunks = [c["choices"][0] for c in sse(live.port, COMPLETION, {
            "model": MODEL, "prompt": TEXT, "max_tokens": 8, "temperature": 0, "echo": True,
            **fields})]
        assert chunks[0]["text"].startswith(shown)
        if "logprobs" in fields:
            assert chunks[0]["logprobs"]["token_logprobs"][0] is None
        streamed = complete(live, True, **{"prompt": TEXT, "echo": True, **fields})
        assert streamed == (reply["choices"][0]["text"], reply["choices"][0]["logprobs"])


@pytest.mark.parametrize("logprobs", [None, 2])
def test_max_tokens_0_streamed(live, logprobs):
    body = {**LM_EVAL, "logprobs": logprobs, "stream_options": {"include_usage": True}}
    before = len(live.requests)
    chunks = sse(live.port, COMPLETION, body)
    # without logprobs there is nothing to compute: the reply is the echo, no engine request
    assert len(live.requests) == before + (logprobs is not None)
    first, last, totals = chunks[0]["choices"][0], chunks[1]["choices"][0], chunks[2]
    assert len(chunks) == 3 and first["text"] == TEXT and last["finish_reason"] == "length"
    assert totals["usage"]["completion_tokens"] == 0
    code, reply = post(live.port, COMPLETION, {**LM_EVAL, "logprobs": logprobs})
    assert reply["choices"][0]["logprobs"] == first["logprobs"]


@pytest.mark.parametrize("path, fields, param, says", [
    (COMPLETION, {"echo": "yes"}, "echo", "must be true or false"),
    (COMPLETION, {"echo": 1}, "echo", "must be true or false"),
    (COMPLETION, {"max_tokens": 0}, "max_tokens", "must be an integer >= 1 (0 only with echo)"),
    (COMPLETION, {"max_tokens": 0, "echo": False}, "max_tokens", ">= 1"),
    (COMPLETION, {"max_tokens": -1, "echo": True}, "max_tokens", "must be an integer >= 0"),
    (CHAT, {"echo": True}, "echo", "not supported"),
    (CHAT, {"echo": True, "max_tokens": 0}, "echo", "not supported"),
    (CHAT, {"max_tokens": 0}, "max_tokens", "must be an integer >= 1"),
])
def test_echo_refusals(live, path, fields, param, says):
    body = {"model": MODEL, **fields}
    body.update({"messages": MESSAGES} if path == CHAT else {"prompt": "a"})
    before = len(live.requests)
    message = refused(live, path, body, param)
    assert message.startswith(f"{param}=") and says in message, message
    assert len(live.requests) == before   # refused before the engine saw it
