"""A completion of several prompts (OpenAI's list of strings or of token-id lists): each prompt's
n choices after the last prompt's, each equal to that prompt sent alone, streamed as non-streamed;
usage counts every prompt once; the bounds on how many."""

import pytest

from tests import test_serve_server_edges as edges
from tests.test_serve_logprobs import sse

live, run_dir = edges.live, edges.run_dir
PROMPTS = ["a", "Hello there", "日本🙂 x"]


def ask(live, prompt, **kw) -> dict:
    code, reply = edges.post(live.port, "/v1/completions", {
        "model": edges.MODEL, "prompt": prompt, "max_tokens": 6, **kw})
    assert code == 200, reply
    return reply


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"temperature": 0.9, "seed": 7, "n": 2},
                                    {"temperature": 0, "echo": True, "logprobs": 2}])
def test_each_prompt_as_if_alone(live, fields):
    n = fields.get("n", 1)
    batch = ask(live, PROMPTS, **fields)
    assert [c["index"] for c in batch["choices"]] == list(range(len(PROMPTS) * n))
    for j, prompt in enumerate(PROMPTS):
        alone = ask(live, prompt, **fields)["choices"]
        mine = batch["choices"][j * n:(j + 1) * n]
        assert [(c["text"], c["finish_reason"]) for c in mine] == [
            (c["text"], c["finish_reason"]) for c in alone]
        for c, d in zip(mine, alone):   # batched: the same values up to float rounding
            if c["logprobs"] is not None:
                assert c["logprobs"]["tokens"] == d["logprobs"]["tokens"]
                assert c["logprobs"]["text_offset"] == d["logprobs"]["text_offset"]
                assert all(x == y or abs(x - y) < 1e-5 for x, y in zip(
                    c["logprobs"]["token_logprobs"], d["logprobs"]["token_logprobs"]))
        if fields.get("echo"):
            assert all(c["text"].startswith(prompt) for c in mine)
    tokens = sum(len(p.encode()) for p in PROMPTS)   # the byte tokenizer: a token a byte
    assert batch["usage"]["prompt_tokens"] == tokens
    assert batch["usage"]["completion_tokens"] == 6 * n * len(PROMPTS)


def test_token_id_lists_and_streaming(live):
    ids = [list(p.encode()) for p in PROMPTS]
    body = {"model": edges.MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0,
            "stream_options": {"include_usage": True}}
    plain = ask(live, PROMPTS, max_tokens=5, temperature=0)
    chunks = sse(live.port, "/v1/completions", body)
    texts = [""] * len(PROMPTS)
    for chunk in chunks[:-1]:
        [c] = chunk["choices"]
        texts[c["index"]] += c["text"]
    assert texts == [c["text"] for c in plain["choices"]]
    assert chunks[-1]["usage"] == plain["usage"] and chunks[-1]["choices"] == []
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks[:-1]) == len(PROMPTS)


def test_bounds(live):
    """More choices than the server takes at once (max_queue 32 + 4 slots) is a 400, not a 429
    to retry forever; one prompt over the context refuses the whole request before any is run."""
    before = len(live.requests)
    message = edges.refused(live, "/v1/completions", {
        "model": edges.MODEL, "prompt": ["a"] * 19, "n": 2}, "prompt")
    assert "19 prompts x n=2 = 38 choices" in message and "(36)" in message
    message = edges.refused(live, "/v1/completions", {
        "model": edges.MODEL, "prompt": ["a", "b" * edges.CONTEXT], "max_tokens": 1},
        "max_tokens")
    assert "exceeds the model's context" in message
    assert len(live.requests) == before
    ask(live, ["a"] * 18, n=2, max_tokens=1)   # 36: at once, on an idle server
