"""`train --init` under a 2-rank job (ep=2: each rank keeps half of the source's experts; or
FSDP) == one process fine-tuning from the same source; only rank 0 reads the source's weights.
CPU (gloo), fp32."""

from dataclasses import asdict
from pathlib import Path

import pytest

from _dist import launch
from dropless.config import TrainConfig
from dropless.train import train
from test_parallel_train import assert_close, metrics, train_body


def reading_body(rank, world, cfg, marks):
    """train_body, leaving a file in `marks` for each rank that reads the source's weights."""
    from dropless.finetune import Source

    read = Source.read_weights

    def read_and_mark(self):
        Path(marks, f"rank{rank}").touch()
        return read(self)
    Source.read_weights = read_and_mark
    train_body(rank, world, cfg)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind, layout", [("run", {"ep": 2}), ("hf-bf16", {"dp_shard": 2})])
def test_two_ranks_fine_tune_as_one_process(tmp_path, corpus, kind, layout):
    """ep=2 from a run directory; FSDP (dp_shard=2, the tied embedding sharded) from a Hugging
    Face directory stored in bf16."""
    import torch

    from dropless.checkpoint import load_run
    from dropless.convert import save_hf_dir

    base = dict(device="cpu", data=str(corpus), cache_dir=str(tmp_path / "cache"), batch_size=4,
                seq_len=32, warmup=0, eval_every=3, eval_batches=2, ckpt_every=10, log_every=1,
                sample_tokens=0)
    train(TrainConfig(out=str(tmp_path / "src"), steps=4, **base), progress=False)
    src = tmp_path / "src"
    if kind == "hf-bf16":
        model, tok, _ = load_run(src)
        src = tmp_path / "hf"
        save_hf_dir(model.to(torch.bfloat16), src, tok.to_json())
    tune = dict(base, init=str(src), steps=3, lr=1e-3)
    marks = tmp_path / "marks"
    marks.mkdir()
    launch(2, reading_body, asdict(TrainConfig(out=str(tmp_path / "two"), **layout, **tune)),
           str(marks))
    assert sorted(p.name for p in marks.iterdir()) == ["rank0"]
    train(TrainConfig(out=str(tmp_path / "one"), **tune), progress=False)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    assert_close(two, one, [1, 2, 3])
    source = metrics(tmp_path / "src")
    assert one[1]["loss"] < 0.9 * source[1]["loss"]   # from the source's weights, not a new init


@pytest.mark.timeout(240)
def test_two_ranks_train_assistant_turns_as_one_process(tmp_path):
    """--assistant-only-loss under 2 ranks (ep=2), with --grad-accum 2: the ranks' shares of a
    batch cover unequal numbers of targets, weighted by them (counted across ranks), so the loss,
    val_loss and weights follow one process's."""
    import json

    talks = tmp_path / "talks.jsonl"
    talks.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is {i} plus {i}? " * (1 + i % 4)},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n" for i in range(60)))
    base = dict(device="cpu", data=str(talks), cache_dir=str(tmp_path / "cache"), batch_size=4,
                seq_len=32, grad_accum=2, warmup=0, steps=3, eval_every=3, eval_batches=2,
                ckpt_every=10, log_every=1, sample_tokens=0, assistant_only_loss=True)
    launch(2, train_body, asdict(TrainConfig(out=str(tmp_path / "two"), ep=2, **base)))
    train(TrainConfig(out=str(tmp_path / "one"), **base), progress=False)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(two) == [1, 2, 3] and "val_loss" in two[3]
    assert_close(two, one, [1, 2, 3])
