"""A prompt's log-probabilities (SamplingParams.prompt_logprobs), max_tokens 0, and the completions
`echo` built on them: what lm-evaluation-harness's "local-completions" model sends to score a
text's log-likelihood. The engine's entries against one full forward's log_softmax (across chunk
boundaries); the server's reply against the same, streamed == non-streamed, and the refusals."""

import pytest
import torch

from dropless.generate import greedy_recompute
from dropless.serve import Engine, Request, SamplingParams
from tests.test_serve_engine import PROMPTS, tiny_model

ATOL = 1e-4   # float32 on CPU
PROMPT = [3, 17, 5, 60, 2, 2, 41, 9, 33, 12]   # 10 tokens: chunks of 3 end inside it


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: log_softmax of one forward's logits at positions 0 .. len - 2, no
    cache: row i scores ids[i + 1]."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
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
    from dropless.serve import engine as engine_module
    monkeypatch.setattr(engine_module, "PROMPT_SLICE", 4)
    model = tiny_model()
    engine = Engine(model, max_batch=1, max_len=40, prefill_chunk=16, prefill_step_tokens=0)
    request = engine.submit(Request(PROMPT + PROMPTS[3], SamplingParams(
        max_tokens=0, prompt_logprobs=3)))
    engine.run_until_done()
    check_entries(request.prompt_logprobs, request.prompt,
                  forward_logprobs(model, request.prompt), 3)


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
