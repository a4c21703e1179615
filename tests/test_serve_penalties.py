"""OpenAI's presence and frequency penalties and logit_bias in the engine (SamplingParams): each
step samples from the logits plus the bias, less presence once a token is in the request's output
and frequency times how often, checked against the model's full forward with the bias and
penalties applied by hand."""

import pytest
import torch

from dropless import MoEConfig
from dropless.generate import greedy_recompute
from dropless.serve import Engine, Request, SamplingParams
from dropless.serve.sampling import sample
from tests import test_serve_server_edges as edges
from tests.test_serve_engine import PROMPTS, steps_without_sync, tiny_model

live, run_dir = edges.live, edges.run_dir   # the live server (a tiny run) of the edge tests


def expected(model, request):
    """The request's tokens recomputed: a forward over prompt + output so far, the bias and the
    penalties of the output so far applied, then greedy or the engine's seeded draw (sample() at
    that step)."""
    p, out = request.params, []
    device = next(model.parameters()).device
    V = model.cfg.vocab_size
    while len(out) < len(request.output):
        with torch.no_grad():
            logits = model(torch.tensor([request.prompt + out], device=device))[0][0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V).float().to(device)
        scores = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        for token, bias in p.logit_bias:
            scores[token] += bias
        one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype, device=device)  # noqa
        out.append(int(sample(scores[None], one(p.temperature), one(V, torch.long), one(1.0),
                              one(request.seed, torch.long), one(len(out), torch.long))[0]))
    return out


@pytest.mark.parametrize("presence,frequency", [(2.0, 0.0), (0.0, 1.5), (0.7, 0.6), (-2.0, -1)])
def test_penalties_equal_the_forward(presence, frequency):
    """Greedy and seeded rows with penalties, beside rows without (their tokens as greedy's), in 3
    slots for 5 requests (a slot's counts start anew with each request)."""
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=4)
    penalized = [0, 1, 3]
    requests = [engine.submit(Request(prompt, SamplingParams(
        max_tokens=10, temperature=[0, 0.9, 0, 1.0, 0][i], seed=i,
        presence_penalty=presence if i in penalized else 0.0,
        frequency_penalty=frequency if i in penalized else 0.0)))
        for i, prompt in enumerate(PROMPTS)]
    engine.run_until_done()
    for i, request in enumerate(requests):
        assert len(request.output) == 10 and request.output == expected(model, request)
        if i not in penalized and request.params.temperature == 0:
            assert request.output == greedy_recompute(model, request.prompt, 10)
    plain = greedy_recompute(model, PROMPTS[0], 10)
    assert requests[0].output != plain   # the penalties changed something (the model repeats)
    if presence > 0:   # every token a new one while the vocabulary lasts
        assert len(set(requests[0].output)) == 10


def test_logprobs_stay_the_models():
    """With penalties, the log-probabilities are still the model's, not the penalized scores."""
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_len=40)
    request = engine.submit(Request(PROMPTS[1], SamplingParams(
        max_tokens=8, temperature=0, logprobs=3, presence_penalty=2.0)))
    engine.run_until_done()
    assert request.output == expected(model, request)
    for i, (token, (chosen, top)) in enumerate(zip(request.output, request.logprobs)):
        with torch.no_grad():
            logp = model(torch.tensor([request.prompt + request.output[:i]]))[0][0, -1]
        logp = logp.float().log_softmax(-1)
        assert abs(chosen - logp[token].item()) < 1e-4
        assert [t for t, _ in top] == logp.topk(3).indices.tolist()
    # greedy under penalties: not always the model's most likely
    assert any(top[0][0] != token for token, (_, top) in zip(request.output, request.logprobs))


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("bad", [-2.5, 2.01])
def test_penalty_bounds(name, bad):
    with pytest.raises(ValueError, match=rf"{name}={bad} is invalid: must be in \[-2, 2\]"):
        SamplingParams(**{name: bad})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_in_cuda_graphs(dtype):
    """On CUDA the steps with penalties or a bias are graphs of their own, captured when first
    needed: the same tokens as eager steps, and in fp32 as the forward's; a bias of 100 forces its
    token."""
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)
    model = tiny_model(qk_norm=True, moe=moe).to("cuda", dtype)
    outs = []
    for graphs in (False, True):
        engine = Engine(model, max_batch=4, max_len=48, prefill_chunk=4, lengths=(8, 16),
                        cuda_graphs=graphs)
        requests = [engine.submit(Request(p, SamplingParams(
            max_tokens=n, temperature=t, seed=5, presence_penalty=0.8 * (i % 2 == 0),
            frequency_penalty=0.5 * (i != 1), logprobs=2 if i == 2 else None,
            logit_bias=((3, 100.0),) if i == 1 else ((5, -100.0), (7, 2.5)))))
            for i, (p, n, t) in enumerate(zip(PROMPTS, [12, 3, 9, 1, 6], [0, 0.8, 0, 1.0, 0]))]
        engine.run_until_done()
        outs.append([r.output for r in requests])
        if graphs:
            assert any(key[4] for key in engine.graphs.graphs)   # a graph of its own
            if dtype == torch.float32:
                assert all(r.output == expected(model, r) for r in requests)
    assert outs[0] == outs[1]
    assert outs[0][1] == [3] * 3 and all(5 not in out for out in outs[0])


def test_served_penalties(live):
    """Through the server: a chat's penalties reach the engine and change the reply; its tokens
    are the forward's with the penalties applied."""
    body = {"model": edges.MODEL, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "aaaa"}]}
    code, plain = edges.post(live.port, "/v1/chat/completions", body)
    code2, reply = edges.post(live.port, "/v1/chat/completions",
                              {**body, "presence_penalty": 2, "frequency_penalty": 0.5})
    assert code == code2 == 200
    request = live.requests[-1]
    assert (request.params.presence_penalty, request.params.frequency_penalty) == (2.0, 0.5)
    assert request.output == expected(live.served.model, request)
    assert reply["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]


@pytest.mark.gpu
def test_penalties_and_logprobs_never_sync():
    """Steps with penalties and log-probabilities (admission, prefill, first tokens, their own
    graphs) make no implicit device sync either, once a first round captured those graphs."""
    model = tiny_model(moe=MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)).to("cuda")
    engine = Engine(model, max_batch=4, max_len=32)
    engine.warm_up()

    def submit():
        return [engine.submit(Request(p, SamplingParams(
            max_tokens=6, temperature=0, presence_penalty=0.5, frequency_penalty=0.2,
            logprobs=2, logit_bias=((4, 3.0),)))) for p in PROMPTS[:3]]

    submit()
    engine.run_until_done()   # the same steps' graphs captured, kernels compiled and tuned
    torch.cuda.synchronize()
    requests = submit()
    steps_without_sync(engine, requests)
    assert all(len(r.logprobs) == 6 for r in requests)


def test_counts_are_state_a_capture_restores():
    """The counts are advanced by the decode step: on CUDA a graph's capture runs the step three
    times first and must undo them (Graphs.state), or every penalized row counted those tokens
    too (the GPU tests of b1c697d failed so)."""
    engine = Engine(tiny_model(), max_batch=2, max_len=40)
    assert engine.counts_BV is None   # made for the first request that asks
    engine.submit(Request(PROMPTS[0], SamplingParams(max_tokens=2, presence_penalty=1.0)))
    engine.run_until_done()
    assert any(t is engine.counts_BV for t in engine.graphs.state)


def test_logit_bias_equals_the_forward():
    """A bias alone (no penalty) takes the adjusted step; greedy and seeded rows equal the forward
    with the bias added; -100 bans the model's greedy choice, +100 forces a token; a slot's next
    request starts without its last one's bias."""
    model = tiny_model()
    plain = greedy_recompute(model, PROMPTS[0], 6)
    engine = Engine(model, max_batch=2, max_len=40, prefill_chunk=4)
    biases = [((plain[0], -100.0), (plain[1], -100.0)), ((9, 100.0),), ((2, 1.5), (11, -0.5)), (),
              ()]
    requests = [engine.submit(Request(prompt, SamplingParams(
        max_tokens=6, temperature=[0, 0, 0.9, 0, 0][i], seed=i, logit_bias=biases[i])))
        for i, prompt in enumerate(PROMPTS)]
    engine.run_until_done()
    for request in requests:
        assert request.output == expected(model, request)
    assert plain[0] not in requests[0].output and plain[1] not in requests[0].output
    assert requests[1].output == [9] * 6
    for request in requests[3:]:   # in slots that held biased requests: no bias left over
        assert request.output == greedy_recompute(model, request.prompt, 6)


@pytest.mark.parametrize("bias,match", [
    (((1, 100.5),), r"\(1, 100.5\) is invalid"), (((-1, 1.0),), r"\(-1, 1.0\) is invalid"),
    (((1, 1.0), (1, 2.0)),  "each once"), (tuple((t, 1.0) for t in range(1025)), "at most 1024")])
def test_logit_bias_bounds(bias, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(logit_bias=bias)


def test_logit_bias_token_past_the_vocabulary():
    engine = Engine(tiny_model(), max_batch=1, max_len=40)
    V = engine.model.cfg.vocab_size
    with pytest.raises(ValueError,
                       match=rf"logit_bias token ids must be in \[0, {V}\): got \[{V}\]"):
        engine.submit(Request(PROMPTS[0], SamplingParams(logit_bias=((V, 1.0),))))


def test_served_logit_bias(live):
    """Through the server: a completion's logit_bias reaches the engine (string keys to ids) and
    its tokens are the forward's with the bias; a bad one is a 400 naming the field."""
    body = {"model": edges.MODEL, "max_tokens": 5, "temperature": 0, "prompt": "abc",
            "logit_bias": {"7": 100, "8": -3.5}}
    code, _ = edges.post(live.port, "/v1/completions", body)
    assert code == 200
    request = live.requests[-1]
    assert request.params.logit_bias == ((7, 100.0), (8, -3.5))
    assert request.output == [7] * 5 == expected(live.served.model, request)
    V = live.served.model.cfg.vocab_size
    for bad in [[1], {"x": 1}, {"1": 101}, {"1": True}, {str(V): 1}, {"1": 1, "01": 2},
                {"1" * 5000: 1}, {str(i): 1 for i in range(1025)}]:
        code, reply = edges.post(live.port, "/v1/chat/completions", {
            "model": edges.MODEL, "messages": [{"role": "user", "content": "a"}],
            "logit_bias": bad})
        assert code == 400 and reply["error"]["param"] == "logit_bias", bad
