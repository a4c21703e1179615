"""Adversarial cases for two engine features, against greedy recompute (and the model's logits):
the short prefill through the decode step's path (`prefill_step_tokens`, its caps) and context
buckets (a step reads only the cache positions its rows reach).

Every engine here is observed (`observe`): each prefill forward checks that a short chunk's tokens
sit below the cache positions it reads, each decode launch that every decoding row does, and the
first token's logits of every prompt are compared with the model's forward.
"""

import functools
import weakref
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dropless import MoEConfig, Transformer
from dropless.generate import greedy_recompute
from dropless.serve import Engine, Request, SamplingParams, decode, moe_decode
from tests.conftest import rel_err
from tests.test_mla import mla_config
from tests.test_serve_engine import padded_forward, tiny_model

_REFS = weakref.WeakKeyDictionary()   # model -> {prompt: greedy tokens}, longest asked so far


def reference(model, prompt, n):
    refs = _REFS.setdefault(model, {})
    if len(refs.get(tuple(prompt), ())) < n:
        refs[tuple(prompt)] = greedy_recompute(model, prompt, n)
    return refs[tuple(prompt)][:n]


def observe(engine):
    """Record the engine's prefill forwards [(rows, tokens), short length] and decode launches
    (bucket, length), checking that every real token's position is below the positions read
    (the scratch position S - 1 holds garbage only); record each prompt's first-token logits."""
    log = SimpleNamespace(prefills=[], decodes=[], firsts=[])
    S = engine.max_len
    forward, decode_fn, prefill, logits = (engine._prefill_forward, engine.decode_fn,
                                           engine._prefill, engine._logits)

    def prefill_forward(tokens, positions, lo, hi, short=0):
        real = positions[positions != S - 1]
        assert not short or real.max() < short <= S and short in engine.lengths
        log.prefills.append((tuple(tokens.shape), short))
        return forward(tokens, positions, lo, hi, short)

    def run_decode(b, greedy, length, *rest):
        real = engine.positions_B[:b][engine.positions_B[:b] != S - 1]
        assert length in engine.lengths and (real.numel() == 0 or real.max() < length)
        log.decodes.append((b, length))
        return decode_fn(b, greedy, length, *rest)

    def prefill_rows(slots):
        requests = [engine.slots[s] for s in slots]

        def first_logits(x):   # the rows of the requests this prefill finished, in slot order
            out = logits(x)
            log.firsts.extend(zip([r for r in requests if r.prefilled == len(r.prompt)], out))
            return out

        engine._logits = first_logits
        try:
            prefill(slots)
        finally:
            engine._logits = logits

    engine._prefill_forward, engine.decode_fn, engine._prefill = prefill_forward, run_decode, \
        prefill_rows
    return log


def check(engine, log, requests, tol=1e-5):
    """Every request not cancelled: greedy recompute up to its first EOS (a cancelled one: a
    prefix of it); its first token's logits: the model's forward's, to rounding."""
    model = engine.model
    for r in requests:
        ref = reference(model, r.prompt, r.params.max_tokens)
        cut = next((i + 1 for i, t in enumerate(ref) if t in r.eos_ids), len(ref))
        if r.finish_reason == "cancelled":
            assert r.output == ref[:len(r.output)]
        else:
            assert r.output == ref[:cut], (len(r.prompt), r.params.max_tokens)
            assert r.finish_reason == ("stop" if ref[cut - 1] in r.eos_ids else "length")
    with torch.no_grad():
        for r, out in log.firsts:
            assert rel_err(out, model(torch.tensor([r.prompt]))[0][0, -1]) < tol


def greedy(prompt, n, **kw):
    return Request(prompt, SamplingParams(max_tokens=n, temperature=0), **kw)


def prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


_choose_path = moe_decode.choose_path


def cuda_choice(T, K, E, device="cpu", grouped=False):
    """choose_path as on CUDA ("triton" runs as "gather", the same math)."""
    path = _choose_path(T, K, E, "cuda", grouped)
    return "gather" if path == "triton" else path


@pytest.fixture(params=["cpu", "cuda"])
def moe_paths(request, monkeypatch):
    """The MoE paths decode_blocks chooses: this CPU's (a short prefill runs the layer's own
    grouped path), or CUDA's (every expert densely up to 128 tokens, the grouped path past that).
    (GQA's prologue kernel with several tokens a row: tests/test_serve_decode.py.)"""
    if request.param == "cuda":
        monkeypatch.setattr(moe_decode, "choose_path", cuda_choice)


def qwen2_like():
    """Biased q/k/v (random biases: the init zeroes them), a dense first layer, a gated shared
    expert."""
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2, num_shared_experts=1,
                    shared_gate=True)
    model = tiny_model(attention_bias=True, first_dense_layers=1, moe=moe, max_seq_len=160)
    with torch.no_grad():
        for lin in model.modules():
            if isinstance(lin, torch.nn.Linear) and lin.bias is not None:
                lin.bias.normal_()
    return model


def deepseek_like():
    """Sigmoid routing with a selection bias, groups and a route scale; a shared expert."""
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2, score_func="sigmoid",
                    bias_update_rate=0.01, num_groups=4, topk_groups=2, norm_topk_prob=True,
                    route_scale=2.5, num_shared_experts=1)
    model = tiny_model(first_dense_layers=1, moe=moe, max_seq_len=160)
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.bias.normal_()
    return model


# ---- the short prefill's limit: rows x tokens <= prefill_step_tokens ------------------------------

@pytest.mark.parametrize("lengths,step_tokens,short", [
    ((1,), 128, 64), ((127,), 128, 128), ((128,), 128, 128), ((129,), 128, 0),
    ((129,), 256, 140),   # CUDA: past 128 tokens, the grouped MoE path
    ((64, 64), 128, 64), ((64, 65), 128, 0), ((1, 63), 128, 64), ((1, 64), 128, 64),
    ((1, 65), 128, 0), ((1, 127), 128, 0), ((32,) * 4, 128, 64), ((1,) * 8, 128, 64),
    ((16,) * 8, 128, 64), ((17,) + (16,) * 7, 128, 0), ((5, 1, 9), 27, 64), ((5, 1, 9), 26, 0),
])
@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_one_prefill_at_the_step_tokens_limit(kind, lengths, step_tokens, short, moe_paths):
    """One padded prefill of every prompt: through the decode step's path iff rows x (longest
    chunk) <= prefill_step_tokens, reading the smallest context bucket (64, 128, 140) that holds
    its tokens; the tokens and first logits are the model's either way."""
    model = tiny_model(max_seq_len=160) if kind == "tiny" else qwen2_like()
    engine = Engine(model, max_batch=8, max_len=140, prefill_step_tokens=step_tokens,
                    lengths=(64, 128))
    log = observe(engine)
    requests = [engine.submit(greedy(p, 6)) for p in prompts(lengths, 64)]
    engine.run_until_done()
    assert log.prefills[0] == ((len(lengths), max(lengths)), short) and len(log.prefills) == 1
    check(engine, log, requests)


@pytest.mark.parametrize("kind", ["qwen2", "deepseek", "mla", "mla-no-q-lora"])
def test_continuous_batching_mixes_both_prefills(kind, moe_paths):
    """Requests join while others decode: short prompts (1 token among them) take the decode
    step's path, long ones the blocks, prompts longer than a chunk both in turn."""
    if kind.startswith("mla"):
        torch.manual_seed(0)
        model = Transformer(mla_config(None if kind == "mla-no-q-lora" else 24)).eval()
    else:
        model = qwen2_like() if kind == "qwen2" else deepseek_like()
    engine = Engine(model, max_batch=4, max_len=60, prefill_chunk=24, prefill_step_tokens=16,
                    lengths=(8, 16, 32))
    log = observe(engine)
    plan = {0: [1, 30], 2: [3], 3: [1, 1, 7], 5: [40], 9: [2, 16, 1]}   # step: prompt lengths
    requests, V = [], model.cfg.vocab_size
    for step in range(12):
        for i, p in enumerate(prompts(plan.get(step, []), V, seed=step)):
            requests.append(engine.submit(greedy(p, 3 + (step + i) % 5)))
        engine.step()
    engine.run_until_done()
    assert {short > 0 for _, short in log.prefills} == {True, False}
    check(engine, log, requests)


def test_mla_query_rows_cap(monkeypatch):
    """MLA's cap (query rows = tokens x heads) lowered to 8 tokens: 8 rows x tokens take the
    decode step's path, 9 the blocks."""
    monkeypatch.setattr(decode, "MLA_QUERY_ROWS", 32)
    torch.manual_seed(0)
    model = Transformer(mla_config(None)).eval()
    engine = Engine(model, max_batch=4, max_len=40)
    assert engine.step_tokens == 8
    log = observe(engine)
    requests = []
    for lengths in ([8], [9], [4, 4], [1, 5], [2, 2, 2, 2], [1]):
        requests += [engine.submit(greedy(p, 3)) for p in prompts(lengths, 97, len(requests))]
        engine.run_until_done()
    assert [short > 0 for _, short in log.prefills] == [True, False, True, False, True, True]
    check(engine, log, requests)


def test_int4_experts_cap(moe_paths, monkeypatch):
    """int4 experts (8 experts, top-2): at most 4 rows x tokens through the decode step's path
    (on CUDA there every expert decodes per slot, QuantizedExperts.decode). The int4 ops run their
    torch reference, not the Triton interpreter the kernel tests turn on (minutes here)."""
    from dropless.quant.calibrate import quantize_model
    from dropless.quant.modules import QuantConfig

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(dim=64, moe=MoEConfig(dim=64, hidden_dim=64, num_experts=8, top_k=2))
    q = quantize_model(model, torch.randint(0, 64, (4, 32)), QuantConfig(group_size=64),
                       progress=False)
    engine = Engine(q, max_batch=4, max_len=40, lengths=(4, 8))
    assert engine.step_tokens == 4
    log = observe(engine)
    requests = []
    for lengths in ([4], [5], [2, 2], [1, 3], [1, 1, 1, 1], [1], [3, 9]):
        requests += [engine.submit(greedy(p, 5)) for p in prompts(lengths, 64, len(requests))]
        engine.run_until_done()
    assert [s for _, s in log.prefills] == [4, 0, 4, 0, 4, 4, 0]
    check(engine, log, requests)


# ---- context buckets ------------------------------------------------------------------------------

@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("step_tokens", [0, 4096])
def test_default_buckets_at_256_and_512(max_batch, step_tokens):
    """Contexts crossing 256 and 512 (the default buckets of a 520-token cache) by a token
    either way, one request reaching the cache's end exactly; prompts prefilled alone or as one
    batch, through the blocks or (up to 4096 rows x tokens) the decode step's path."""
    model = tiny_model(num_layers=1, max_seq_len=600)
    engine = Engine(model, max_batch=max_batch, max_len=520, prefill_step_tokens=step_tokens)
    assert engine.lengths == (256, 512, 520)
    log = observe(engine)
    lengths = [252, 253, 254, 255, 256, 257, 1, 510]
    requests = [engine.submit(greedy(p, 4 if n < 510 else 10))
                for p, n in zip(prompts(lengths, 64), lengths)]
    engine.run_until_done()
    # alone, each request steps in its own buckets; together, in the longest one's
    assert {n for _, n in log.decodes} == ({256, 512, 520} if max_batch == 1 else {512, 520})
    if step_tokens and max_batch == 1:   # each prompt alone: its own smallest bucket
        assert [s for _, s in log.prefills] == [256] * 5 + [512, 256, 512]
    check(engine, log, requests)


@pytest.mark.parametrize("lengths", [(1,), (1, 2), None])
def test_smallest_context(lengths):
    """A cache of 2 positions (the least an engine takes): a 1-token prompt and 1 new token; a
    short prefill that reads one position."""
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_len=2, lengths=lengths)
    log = observe(engine)
    requests = [engine.submit(greedy([t], 1)) for t in (5, 9, 60)]
    engine.run_until_done()
    assert log.prefills[0] == ((2, 1), 1 if lengths else 2)
    check(engine, log, requests)


@pytest.mark.parametrize("step_tokens", [0, 128])
def test_small_buckets_crossed_by_every_request(step_tokens):
    """Buckets at every other position: requests fill the cache exactly or stop a token short,
    each decode step at a different bucket boundary."""
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=24, prefill_chunk=5,
                    prefill_step_tokens=step_tokens, lengths=tuple(range(2, 24, 2)))
    log = observe(engine)
    spec = [(1, 23), (2, 22), (7, 17), (8, 15), (13, 11), (23, 1), (22, 1), (3, 21)]
    requests = [engine.submit(greedy(p, n))
                for p, (_, n) in zip(prompts([k for k, _ in spec], 64), spec)]
    engine.run_until_done()
    assert len({n for _, n in log.decodes}) > len(engine.lengths) // 2
    check(engine, log, requests)


# ---- sampling, stops and cancellation through either prefill --------------------------------------

def test_seeded_sampling_is_the_same_through_either_prefill():
    """A seeded request's samples depend on its seed and output position only: the same through
    the blocks' prefill or the decode step's, whole or chunked, alone or in a batch (fp32: the
    two paths' logits agree to rounding, far inside the Gumbel draws' gaps)."""
    model = tiny_model()
    params = [SamplingParams(max_tokens=10, temperature=t, top_k=k, top_p=p, seed=s)
              for t, k, p, s in [(1.0, None, None, 1), (0.7, 5, None, 2), (1.5, None, 0.9, 3),
                                 (0, None, None, None), (1.0, 3, 0.8, 2**70)]]
    ps = prompts([1, 6, 13, 2, 9], 64, seed=4)
    outputs = []
    for step_tokens, chunk, max_batch in [(0, 64, 5), (128, 64, 5), (128, 4, 5), (0, 4, 2),
                                          (128, 64, 1), (8, 3, 3)]:
        engine = Engine(model, max_batch=max_batch, max_len=40, prefill_chunk=chunk,
                        prefill_step_tokens=step_tokens)
        requests = [engine.submit(Request(p, sp)) for p, sp in zip(ps, params)]
        engine.run_until_done()
        outputs.append([r.output for r in requests])
    assert all(o == outputs[0] for o in outputs)
    assert outputs[0][3] == reference(model, ps[3], 10)   # the greedy one among sampled ones
    assert sum(o != reference(model, p, 10) for o, p in zip(outputs[0], ps)) >= 3


@pytest.mark.parametrize("max_batch", [1, 3])
@pytest.mark.parametrize("step_tokens", [0, 128])
def test_stop_at_the_first_token(step_tokens, max_batch):
    """EOS, a stop callback, and EOS on the only allowed token, each at the first token (sampled
    by the prefill): the request ends there and its slot serves the next request."""
    model = tiny_model()
    engine = Engine(model, max_batch=max_batch, max_len=40, prefill_step_tokens=step_tokens)
    log = observe(engine)
    ps = prompts([1, 6, 3, 17, 4], 64, seed=5)
    first = [reference(model, p, 1)[0] for p in ps]
    eos = engine.submit(greedy(ps[0], 5, eos_ids=(first[0],)))
    stop = engine.submit(greedy(ps[1], 5, on_token=lambda r, t: True))
    last = engine.submit(greedy(ps[2], 1, eos_ids=(first[2],)))
    rest = [engine.submit(greedy(p, 6)) for p in ps[3:]]
    engine.run_until_done()
    assert stop.output == [first[1]] and stop.finish_reason == "stop"
    assert eos.output == [first[0]] and last.finish_reason == "stop"
    check(engine, log, [eos, last, *rest])
    assert not engine.has_work() and engine.positions_B.eq(engine.max_len - 1).all()


@pytest.mark.parametrize("step_tokens", [0, 128])
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5])
def test_cancel_right_after_admission(step_tokens, steps):
    """Cancelled after `steps` engine steps: while waiting, right after its admission (its first
    token in flight), mid-prefill (chunks of 4), while decoding. The others' tokens are
    unchanged and the freed slot serves the waiting requests."""
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_len=40, prefill_chunk=4,
                    prefill_step_tokens=step_tokens)
    log = observe(engine)
    ps = prompts([3, 10, 1, 5, 2], 64, seed=6)
    requests = [engine.submit(greedy(p, 6)) for p in ps]
    for _ in range(steps):
        engine.step()
    victims = requests[:2] if steps < 3 else requests[1:3]
    for r in victims:
        r.cancel()
    engine.run_until_done()
    assert [r.finish_reason for r in victims] == ["cancelled"] * 2
    assert all(r.done.is_set() for r in requests) and not engine.has_work()
    check(engine, log, requests)


# ---- a property: random traffic gives greedy recompute --------------------------------------------

@functools.cache
def traffic_model(kind):
    torch.manual_seed(0)
    return qwen2_like() if kind == "qwen2" else Transformer(mla_config(None)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "mla"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_random_traffic_equals_recompute(kind, data):
    """Random prompts (1-20 tokens), limits (some filling the cache), arrival and cancel steps,
    EOS ids, engine shapes, prefill paths, context buckets, MoE paths as on the CPU or CUDA, the
    compiled prefill's padding (run eagerly): every output is greedy recompute (cancelled ones a
    prefix of it), every first token's logits the model's."""
    model = traffic_model(kind)
    V, S, max_batch = model.cfg.vocab_size, 26, data.draw(st.integers(1, 4))
    engine = Engine(model, max_batch=max_batch, max_len=S,
                    buckets=data.draw(st.sampled_from([None, (max_batch,)])),
                    prefill_chunk=data.draw(st.sampled_from([1, 3, 8, 64])),
                    prefill_step_tokens=data.draw(st.sampled_from([0, 1, 4, 16, 128])),
                    lengths=data.draw(st.none() | st.lists(st.integers(1, S), min_size=1,
                                                             max_size=5).map(tuple)))
    if data.draw(st.booleans()):
        padded_forward(engine)
    log = observe(engine)
    arrivals, cancels = {}, {}
    for _ in range(data.draw(st.integers(1, 6))):
        prompt = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=20))
        n = S - len(prompt) if data.draw(st.booleans()) else data.draw(st.integers(1, 6))
        ref = reference(model, prompt, n)
        eos = data.draw(st.sampled_from([(), (ref[0],), (ref[-1],)]))
        r = greedy(prompt, n, eos_ids=eos)
        arrivals.setdefault(data.draw(st.integers(0, 6)), []).append(r)
        cancel = data.draw(st.none() | st.integers(0, 10))
        if cancel is not None:
            cancels.setdefault(cancel, []).append(r)
    requests = []
    with mock.patch.object(moe_decode, "choose_path",
                           cuda_choice if data.draw(st.booleans()) else _choose_path):
        for step in range(11):
            requests += [engine.submit(r) for r in arrivals.get(step, [])]
            for r in cancels.get(step, []):
                r.cancel()
            engine.step()
        engine.run_until_done()
    assert not engine.has_work()
    check(engine, log, requests)
