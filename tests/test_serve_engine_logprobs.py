"""Log-probabilities from the engine (SamplingParams.logprobs): each output token's and the most
likely tokens' at its position, of the model's own distribution, checked against the model's full
forward over the prompt and the output so far."""

import pytest
import torch

from dropless import MoEConfig
from dropless.serve import Engine, Request, SamplingParams
from dropless.serve.request import MAX_TOP_LOGPROBS
from tests.test_serve_engine import PROMPTS, tiny_model

TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def reference(model, request, tol):
    """Every entry of request.logprobs against log_softmax of the forward's logits."""
    n = request.params.logprobs
    assert len(request.logprobs) == len(request.output) > 0
    device = next(model.parameters()).device
    for i, (token, (chosen, top)) in enumerate(zip(request.output, request.logprobs)):
        ids = torch.tensor([request.prompt + request.output[:i]], device=device)
        with torch.no_grad():
            logp = model(ids)[0][0, -1].float().log_softmax(-1).cpu()
        assert abs(chosen - logp[token].item()) < tol
        assert len(top) == n and [t for t, _ in top] == [t for t, _ in sorted(
            top, key=lambda pair: -pair[1])]   # most likely first
        ref_values = logp.topk(n).values.tolist() if n else []
        assert all(abs(v - r) < tol for (_, v), r in zip(top, ref_values))
        assert all(abs(v - logp[t].item()) < tol for t, v in top)
        if request.params.temperature == 0 and n:
            assert top[0][0] == token   # greedy takes the most likely


@pytest.mark.parametrize("chunk", [3, 16])
def test_logprobs_equal_the_forward(chunk):
    """Greedy and sampled rows, 0, 1 and 20 alternatives, in one batch with a request that asks
    for none: every entry equals the forward's; the first token's (from the prefill) included."""
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=chunk)
    asks = [(5, 0.0, 8), (1, 0.9, 6), (None, 0.0, 7), (0, 1.0, 3), (MAX_TOP_LOGPROBS, 0.0, 4)]
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=m, temperature=t, seed=3,
                                                        logprobs=n)))
                for p, (n, t, m) in zip(PROMPTS, asks)]
    engine.run_until_done()
    for request, (n, _, m) in zip(requests, asks):
        assert len(request.output) == m
        if n is None:
            assert request.logprobs == []
        else:
            reference(model, request, TOL[torch.float32])


def test_logprobs_change_no_token():
    """A neighbour asking for log-probabilities (another graph, other kernels) changes no row's
    tokens, greedy or seeded."""
    model = tiny_model()
    outs = []
    for ask in (None, 3):
        engine = Engine(model, max_batch=4, max_len=40, prefill_chunk=4)
        requests = [engine.submit(Request(p, SamplingParams(
            max_tokens=9, temperature=t, seed=11, logprobs=ask if i == 1 else None)))
            for i, (p, t) in enumerate(zip(PROMPTS, [0, 0.7, 1.0, 0]))]
        engine.run_until_done()
        outs.append([r.output for r in requests])
    assert outs[0] == outs[1]


def test_on_token_sees_its_entry():
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_len=40)
    seen = []
    request = engine.submit(Request(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0,
                                                               logprobs=2),
                                    on_token=lambda r, t: seen.append((t, len(r.logprobs)))))
    engine.run_until_done()
    assert seen == [(t, i + 1) for i, t in enumerate(request.output)]


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1])
def test_logprobs_bounds(bad):
    with pytest.raises(ValueError, match=f"logprobs={bad} is invalid: must be None or in "
                                         rf"\[0, {MAX_TOP_LOGPROBS}\]"):
        SamplingParams(logprobs=bad)


def test_small_vocab_lists_every_token():
    """A vocabulary under MAX_TOP_LOGPROBS: the engine lists at most every token."""
    model = tiny_model(vocab_size=12)
    engine = Engine(model, max_batch=1, max_len=24)
    assert engine.top_n == 12
    request = engine.submit(Request([1, 2], SamplingParams(max_tokens=3, temperature=0,
                                                           logprobs=MAX_TOP_LOGPROBS)))
    engine.run_until_done()
    assert all(len(top) == 12 for _, top in request.logprobs)
    assert all(abs(sum(torch.tensor([v for _, v in top]).exp().tolist()) - 1) < 1e-4
               for _, top in request.logprobs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_in_cuda_graphs(dtype):
    """On CUDA the decode steps that ask are graphs of their own, captured when first asked for:
    the same entries as the forward's, the other rows' tokens as without them."""
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)
    model = tiny_model(qk_norm=True, moe=moe).to("cuda", dtype)
    outs = []
    for ask in (None, 4):
        engine = Engine(model, max_batch=4, max_len=48, prefill_chunk=4, lengths=(8, 16))
        engine.warm_up()
        requests = [engine.submit(Request(p, SamplingParams(
            max_tokens=n, temperature=t, seed=5, logprobs=ask if i % 2 == 0 else None)))
            for i, (p, n, t) in enumerate(zip(PROMPTS, [12, 3, 9, 1, 6], [0, 0.8, 0, 1.0, 0]))]
        engine.run_until_done()
        outs.append([r.output for r in requests])
        if ask is not None:
            assert any(key[3] for key in engine.graphs.graphs)   # a graph of its own
            for request in requests[::2]:
                reference(model, request, TOL[dtype])
    assert outs[0] == outs[1]
