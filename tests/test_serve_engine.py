import math
import threading
import time

import pytest
import torch

from dropless import ModelConfig, MoEConfig, Transformer
from dropless.generate import greedy_recompute
from dropless.moe import MoE
from dropless.serve import Engine, Request, SamplingParams
from dropless.serve.decode import MLA_QUERY_ROWS, step_tokens_cap
from dropless.serve.moe_decode import choose_path, moe_decode
from dropless.serve.sampling import sample
from tests.conftest import TOLERANCE, rel_err
from tests.test_mla import mla_config


def tiny_model(**kw):
    cfg = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
               moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2))
    cfg.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg)).eval()


# ---- the decode MoE path against the training path ---------------------------------------------

@pytest.mark.parametrize("path", ["gather", "dense", "grouped"])
@pytest.mark.parametrize("T,E,K,extra", [
    (1, 8, 2, {}),                                   # one token
    (5, 4, 4, {}),                                   # K == E
    (3, 8, 3, dict(num_shared_experts=1, shared_gate=True)),
    (7, 8, 2, dict(score_func="sigmoid", bias_update_rate=0.01, num_groups=4, topk_groups=2,
                   norm_topk_prob=True, route_scale=2.5)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_decode_matches_training_path(path, T, E, K, extra, dtype):
    torch.manual_seed(1)
    moe = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=E, top_k=K, **extra)).to(dtype).eval()
    if moe.router.bias is not None:
        moe.router.bias.normal_()
    x = torch.randn(T, 32, dtype=dtype)
    with torch.no_grad():
        ref, _ = moe(x)
        out = moe_decode(moe, x, path)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_choose_path():
    assert choose_path(1, 8, 64) == "gather" and choose_path(32, 8, 64) == "dense"
    assert choose_path(1, 4, 4) == "dense" and choose_path(1, 8, 64, "cuda") == "triton"
    # a prefill may take the layer's own path: past 128 tokens, or on a CPU (FLOPs cost there)
    assert choose_path(129, 8, 64, "cuda", grouped=True) == "grouped"
    assert choose_path(128, 8, 64, "cuda", grouped=True) == "dense"
    assert choose_path(32, 8, 64, "cpu", grouped=True) == "grouped"
    assert choose_path(129, 8, 64, "cuda") == "dense"   # a decode step: graphed


def test_short_prefill_cap():
    """MLA's short prefill mask has a row per (token, head): at most MLA_QUERY_ROWS of them; GQA
    with plain experts has no cap of its own (int4 experts: tests/test_quant.py)."""
    torch.manual_seed(0)
    mla = Transformer(mla_config())
    assert step_tokens_cap(mla) == MLA_QUERY_ROWS // mla.cfg.num_heads
    assert step_tokens_cap(tiny_model()) > 1 << 40
    assert Engine(mla, max_batch=1, max_len=8).step_tokens == min(128, step_tokens_cap(mla))


def test_context_buckets():
    model = tiny_model(max_seq_len=2048)
    assert Engine(model, max_len=2000).lengths == (256, 512, 1024, 2000)
    assert Engine(model, max_len=2000, lengths=(100, 3000)).lengths == (100, 2000)
    assert Engine(model, max_len=2000, compile=True).lengths == (2000,)   # a compile each
    assert Engine(model, max_batch=6, max_len=64).buckets == (1, 2, 4, 6)
    assert Engine(model, max_batch=6, max_len=64, buckets=(2, 9)).buckets == (2, 6)
    for bad in (dict(lengths=(0, 8)), dict(lengths=(-4,)), dict(buckets=(2.5,)),
                dict(buckets=(True,))):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* must be integers >= 1"):
            Engine(model, max_len=64, **bad)


# ---- sampling ------------------------------------------------------------------------------------

def _rows(B, temperature, top_k, top_p, V):
    return (torch.full((B,), temperature), torch.full((B,), top_k or V, dtype=torch.long),
            torch.full((B,), top_p), torch.arange(B, dtype=torch.long) * 7919,
            torch.zeros(B, dtype=torch.long))


def test_sampling_frequencies_and_filters():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    N, V = 6000, 5
    picks = sample(logits.expand(N, V), *_rows(N, 1.0, None, 1.0, V))
    freq = torch.bincount(picks, minlength=V).double() / N
    assert (freq - logits.double().softmax(-1)).abs().max() < 0.025
    hot = sample(logits.expand(N, V), *_rows(N, 0.5, None, 1.0, V))
    freq = torch.bincount(hot, minlength=V).double() / N
    assert (freq - (logits.double() / 0.5).softmax(-1)).abs().max() < 0.025
    assert set(sample(logits.expand(N, V), *_rows(N, 1.0, 2, 1.0, V)).tolist()) == {1, 2}
    # top-p: p(2) = 0.56, p(1) = 0.21 -> 0.6 keeps {2, 1}; 0.5 keeps {2}
    assert set(sample(logits.expand(N, V), *_rows(N, 1.0, None, 0.6, V)).tolist()) == {1, 2}
    assert set(sample(logits.expand(N, V), *_rows(N, 1.0, None, 0.5, V)).tolist()) == {2}
    assert sample(logits.expand(3, V), *_rows(3, 0.0, None, 1.0, V)).tolist() == [2, 2, 2]


def test_sampling_is_a_function_of_seed_and_step():
    logits = torch.randn(4, 50)
    t, k, p, seeds, steps = _rows(4, 1.0, None, 1.0, 50)
    a = sample(logits, t, k, p, seeds, steps)
    b = sample(logits.flip(0), t, k, p, seeds.flip(0), steps)
    assert a.tolist() == b.flip(0).tolist()
    draws = {tuple(sample(logits, t, k, p, seeds, steps + i).tolist()) for i in range(10)}
    assert len(draws) > 1


# ---- the engine ------------------------------------------------------------------------------------

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [33], [5] * 13, [2, 40, 41, 3, 3]]


@pytest.mark.parametrize("chunk,step_tokens,lengths", [(3, 0, None), (16, 0, None),
                                                       (3, 128, (5, 9, 17)), (16, 20, (12,))])
@pytest.mark.parametrize("model_kw", [{}, dict(qk_norm=True, first_dense_layers=1), "mla"])
def test_engine_continuous_batching_equals_recompute(model_kw, chunk, step_tokens, lengths):
    """step_tokens: prefill chunks of up to that many tokens (rows x tokens) through the decode
    step's path (0: every chunk through the model's blocks; 20: some of each); lengths: context
    buckets (decode steps read the first 5, 9, 17 or 40 cache positions)."""
    if model_kw == "mla":
        torch.manual_seed(0)
        model = Transformer(mla_config()).eval()
    else:
        model = tiny_model(**model_kw)
    # 3 slots for 5 requests: requests join as others leave; prompts prefill in chunks of 3, or
    # several at once as one padded batch
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=chunk,
                    prefill_step_tokens=step_tokens, lengths=lengths)
    lengths = [12, 3, 9, 1, 6]
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=0)))
                for p, n in zip(PROMPTS, lengths)]
    engine.run_until_done()
    for r, n in zip(requests, lengths):
        assert r.output == greedy_recompute(model, r.prompt, n)
        assert r.finish_reason == "length" and r.done.is_set()


@pytest.mark.parametrize("lengths", [None, (3, 6, 9)])
def test_engine_request_that_fills_the_context(lengths):
    """prompt + max_tokens == the cache length (what generate() sizes): the last steps run in the
    largest context bucket."""
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_len=12, lengths=lengths)
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=12 - len(p), temperature=0)))
                for p in ([1, 2, 3], [4] * 11)]
    engine.run_until_done()
    assert [r.output for r in requests] == [greedy_recompute(model, r.prompt, 12 - len(r.prompt))
                                            for r in requests]


def test_engine_short_prefill_of_many_rows_takes_the_grouped_path(monkeypatch):
    """A short prefill of more rows than DENSE_MAX_TOKENS runs the MoE layers' own path (patched
    down to 4 tokens here): outputs are greedy recompute, with MLA and shared experts too."""
    from dropless.serve import moe_decode as md

    monkeypatch.setattr(md, "DENSE_MAX_TOKENS", 4)
    paths = []
    choose = md.choose_path
    monkeypatch.setattr(md, "choose_path", lambda *a: paths.append(choose(*a)) or paths[-1])
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2, num_shared_experts=1)
    for model in (tiny_model(moe=moe), Transformer(mla_config()).eval()):
        engine = Engine(model, max_batch=3, max_len=40)
        requests = [engine.submit(Request(p, SamplingParams(max_tokens=4, temperature=0)))
                    for p in PROMPTS[:3]]
        engine.run_until_done()
        assert [r.output for r in requests] == [greedy_recompute(model, p, 4) for p in PROMPTS[:3]]
    assert "grouped" in paths


def test_engine_seeded_sampling_independent_of_batch():
    model = tiny_model()
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    alone = Engine(model, max_batch=1, max_len=32)
    a = alone.submit(Request([1, 2, 3], params))
    alone.run_until_done()
    crowd = Engine(model, max_batch=4, max_len=32, prefill_chunk=2)
    others = [crowd.submit(Request([7, 7], SamplingParams(max_tokens=8, temperature=0.7)))
              for _ in range(2)]
    b = crowd.submit(Request([1, 2, 3], params))
    crowd.run_until_done()
    assert a.output == b.output and all(len(o.output) == 8 for o in others)


def test_a_request_cancelled_while_waiting_takes_no_slot():
    model = tiny_model()
    engine = Engine(model, max_batch=1, max_len=32)
    gone = engine.submit(Request([4, 5], SamplingParams(max_tokens=10, temperature=0)))
    kept = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0)))
    gone.cancel()
    engine.step()
    assert gone.finish_reason == "cancelled" and gone.output == []
    assert engine.slots[0] is kept and kept.prefilled == 3   # admitted in the same step
    engine.run_until_done()
    assert kept.output == greedy_recompute(model, [1, 2, 3], 4)


def test_engine_eos_stop_callback_and_limits():
    model = tiny_model()
    ref = greedy_recompute(model, [1, 2, 3], 10)
    engine = Engine(model, max_batch=3, max_len=32)
    eos = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=10, temperature=0),
                                eos_ids=(ref[3],)))
    stopped = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=10, temperature=0),
                                    on_token=lambda req, tok: len(req.output) == 2))
    gone = engine.submit(Request([4, 5], SamplingParams(max_tokens=10, temperature=0)))
    gone.cancel()
    engine.run_until_done()
    first_eos = ref.index(ref[3])
    assert eos.output == ref[:first_eos + 1] and eos.finish_reason == "stop"
    assert stopped.output == ref[:2] and stopped.finish_reason == "stop"
    assert gone.finish_reason == "cancelled" and not engine.has_work()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\): got \[64, -1\]"):
        engine.submit(Request([1, 64, -1], SamplingParams(max_tokens=3)))
    with pytest.raises(ValueError, match="exceeds the context of 32"):
        engine.submit(Request([1] * 30, SamplingParams(max_tokens=3)))
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature=nan"):
        SamplingParams(temperature=math.nan)


@pytest.mark.parametrize("chunk", [2, 16])
def test_engine_prefill_padding_of_the_compiled_path(chunk):
    """With compile on, a prefill of one row takes a neighbour slot as padding (after it, or
    before it at the last slot) and a one-token chunk a padding token: outputs are unchanged
    (run eagerly here: the padding alone)."""
    model = tiny_model()
    engine = Engine(model, max_batch=3, max_len=40, prefill_chunk=chunk, prefill_step_tokens=0)
    shapes = padded_forward(engine)
    prompts, lengths = [[5], [9, 8, 7], [33], [1, 2, 3, 4, 5], [7]], [6, 1, 4, 3, 5]
    requests = []
    for p, n in zip(prompts, lengths):   # one at a time: single-row prefills in every slot
        requests.append(engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=0))))
        engine.step()
    engine.run_until_done()
    assert [r.output for r in requests] == [greedy_recompute(model, p, n)
                                            for p, n in zip(prompts, lengths)]
    assert min(min(shape) for shape in shapes) >= 2 and (2, 2) in shapes   # one row, one token


def padded_forward(engine) -> list:
    """Turn on the compiled path's padding with the eager forward; returns the list of the
    [rows, tokens] shapes the forward then gets."""
    engine.compiled, shapes = True, []

    def forward(tokens_nT, positions_nT, caches):
        shapes.append(tuple(tokens_nT.shape))
        assert all(t.shape[0] == tokens_nT.shape[0] for cache in caches for t in cache)
        return engine._hidden(tokens_nT, positions_nT, caches)

    engine.hidden_fn = forward
    return shapes


def test_compiled_prefill_is_one_graph_for_every_shape():
    import torch._dynamo as dynamo

    model = tiny_model()
    outputs = []
    for compile in (False, True):
        dynamo.reset()
        engine = Engine(model, max_batch=4, max_len=40, prefill_chunk=8, compile_prefill=compile,
                        prefill_step_tokens=0)
        start = dynamo.utils.counters["stats"]["unique_graphs"]
        engine.warm_up()
        before = dynamo.utils.counters["stats"]["unique_graphs"]
        # warm_up really compiled (a failed compile falls back to eager, which would pass below)
        assert engine.compiled == compile and (before > start) == compile
        requests = [engine.submit(Request(p, SamplingParams(max_tokens=4, temperature=0)))
                    for p in PROMPTS]
        engine.run_until_done()
        outputs.append([r.output for r in requests])
        if compile:   # warm_up compiled it; rows 1..4 and chunks of 1..8 tokens reuse it
            assert dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert outputs[0] == outputs[1]


def test_engine_prefill_that_does_not_compile_runs_eagerly_with_a_warning(caplog):
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_len=40, compile_prefill=True)

    def broken(*args):
        raise RuntimeError("backend compiler failed\ndetails")

    engine.hidden_fn = broken
    with caplog.at_level("WARNING", logger="dropless.serve"):
        engine.warm_up()
    assert "did not compile (RuntimeError: backend compiler failed)" in caplog.text
    assert not engine.compiled
    req = engine.submit(Request(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0)))
    engine.run_until_done()
    assert req.output == greedy_recompute(model, PROMPTS[0], 3)


@pytest.mark.parametrize("padded", [False, True])
def test_engine_random_traffic_equals_recompute(padded):
    """Requests of random prompt lengths (1-12), limits (1-6 tokens) and EOS ids arrive over
    random steps, some cancelled: every finished output is greedy recompute up to its first EOS;
    with the compiled path's padding (run eagerly) as without; without, with a context bucket
    of every length (a step reads no more cache positions than its rows need)."""
    import random

    model = tiny_model()
    rng = random.Random(7)
    engine = Engine(model, max_batch=3, max_len=24, prefill_chunk=rng.choice([2, 5, 16]),
                    prefill_step_tokens=0 if padded else 12,
                    lengths=None if padded else tuple(range(1, 25)))
    lengths = []
    if not padded:   # the buckets steps choose
        decode = engine.decode_fn
        engine.decode_fn = lambda b, greedy, n, *rest: (lengths.append(n), decode(b, greedy, n, *rest))
    shapes = padded_forward(engine) if padded else [(2, 2)]
    requests, expected = [], {}
    for step in range(60):
        for _ in range(rng.choice([0, 0, 1, 2])):
            prompt = [rng.randrange(64) for _ in range(rng.randint(1, 12))]
            n = rng.randint(1, 6)
            ref = greedy_recompute(model, prompt, n)
            eos = (rng.choice(ref),) if rng.random() < 0.3 else ()
            r = engine.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0),
                                      eos_ids=eos))
            cut = next((i + 1 for i, t in enumerate(ref) if t in eos), n)
            requests.append(r)
            expected[id(r)] = (ref[:cut], "stop" if cut < n or ref[cut - 1] in eos else "length")
        if requests and rng.random() < 0.05:
            rng.choice(requests).cancel()
        engine.step()
    engine.run_until_done()
    assert len(requests) > 30 and min(min(shape) for shape in shapes) >= 2
    assert padded or len(set(lengths)) > 10
    for r in requests:
        if r.finish_reason == "cancelled":
            assert r.output == expected[id(r)][0][:len(r.output)]
        else:
            assert (r.output, r.finish_reason) == expected[id(r)]


def test_engine_admit_delay_batches_arrivals():
    """Held requests are admitted together (one prefill forward) once they fill the free slots
    or the oldest has waited admit_delay; outputs are unchanged."""
    model = tiny_model()
    engine = Engine(model, max_batch=4, max_len=40, admit_delay=60.0)
    reqs = [engine.submit(Request(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0)))]
    engine.step()
    assert engine.slots == [None] * 4 and len(engine.waiting) == 1   # held: slots are free
    reqs += [engine.submit(Request(p, SamplingParams(max_tokens=5, temperature=0)))
             for p in PROMPTS[1:4]]
    engine.step()   # four waiting fill the four free slots: all admitted, one forward
    assert engine.stats["prefills"] == 1 and engine.stats["prefill_rows"] == 4
    engine.run_until_done()
    assert [r.output for r in reqs] == [greedy_recompute(model, p, 5) for p in PROMPTS[:4]]

    engine = Engine(model, max_batch=4, max_len=40, admit_delay=0.05)
    late = engine.submit(Request(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0)))
    engine.step()
    assert late.prefilled == 0
    time.sleep(0.06)
    engine.step()
    assert late.prefilled == len(PROMPTS[0])


def test_engine_thread_sleeps_while_holding_a_request():
    """serve_forever waits out the admission delay instead of stepping an empty batch."""
    engine = Engine(tiny_model(), max_batch=4, max_len=40, admit_delay=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        req = engine.submit(Request(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0)))
        assert req.done.wait(10) and len(req.output) == 2
    finally:
        stop.set()
        thread.join(10)
    assert engine.stats["steps"] < 20   # a spinning loop steps thousands of times in 0.2 s


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_cuda_graphs_equal_eager(dtype):
    # 8 experts, top-2: buckets 1 and 2 take the Triton GEMV path, 4 the dense one
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)
    model = tiny_model(qk_norm=True, moe=moe).to("cuda", dtype)
    outs = []
    for graphs in (False, True):
        engine = Engine(model, max_batch=4, max_len=48, prefill_chunk=4, cuda_graphs=graphs,
                        lengths=(8, 16))
        reqs = [engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=t, seed=5)))
                for p, n, t in zip(PROMPTS, [12, 3, 9, 1, 6], [0, 0.8, 0, 1.0, 0])]
        engine.run_until_done()
        outs.append([r.output for r in reqs])
    assert outs[0] == outs[1]
    if dtype == torch.float32:
        for p, o, n in zip(PROMPTS, outs[1], [12, 3, 9, 1, 6]):
            if n in (12, 9, 6):
                assert o == greedy_recompute(model, p, n)


@pytest.mark.gpu
def test_decode_step_never_syncs():
    model = tiny_model(moe=MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)).to("cuda")
    engine = Engine(model, max_batch=4, max_len=32, cuda_graphs=False)
    for p in PROMPTS[:3]:
        engine.submit(Request(p, SamplingParams(max_tokens=20, temperature=0.5)))
    engine.step()   # prefill (which may sync) and a first decode step
    steps = [(1, True), (4, False), (4, True)]   # Triton GEMV and dense MoE paths
    for b, greedy in steps:   # first calls compile and autotune the Triton kernels (and sync)
        engine._decode(b, greedy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b, greedy in steps:
            engine._decode(b, greedy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_engine_step_with_admission_never_syncs():
    """A whole engine step (admission, prefill, first-token sampling, decode launch) makes no
    implicit device sync: host-to-device copies are pinned, first tokens are read with the step's
    (the one wait is the collect's event, which sync-debug mode does not flag)."""
    model = tiny_model(moe=MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)).to("cuda")
    engine = Engine(model, max_batch=4, max_len=32)
    engine.warm_up()
    for p in PROMPTS[:2]:   # warm-up: prefill kernels compiled and autotuned
        engine.submit(Request(p, SamplingParams(max_tokens=4, temperature=0.5)))
    engine.run_until_done()
    torch.cuda.synchronize()
    steps_without_sync(engine, [engine.submit(Request(p, SamplingParams(
        max_tokens=6, temperature=0))) for p in PROMPTS[:3]])


def steps_without_sync(engine, requests):
    """Three engine steps under CUDA's sync-debug mode "error" (an implicit sync raises), then
    the rest: every request gets its 6 tokens."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.run_until_done()
    assert [len(r.output) for r in requests] == [6] * len(requests)
