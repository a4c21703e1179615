"""`--val-data`: a validation text of its own; all of --data then trains. The token cache keeps it
apart from the default split; a resumed run and `dropless eval` validate on it too."""

import json

import numpy as np
import pytest

from dropless import cli, data
from dropless.tokenizer import ByteTokenizer

DOCS = [(f"d{i}.txt", f"document number {i}\n" * 20) for i in range(40)]
VAL = [("held.txt", "held out text\n" * 30), ("more.txt", "more held out\n" * 30)]


def test_tokens_of_each_side(tmp_path):
    split = data.load_tokens(DOCS, ByteTokenizer(), tmp_path)
    held = data.load_tokens(DOCS, ByteTokenizer(), tmp_path, VAL)
    join = data.DOC_SEPARATOR.join
    assert bytes(np.asarray(held.train, dtype=np.uint8)) == join(t for _, t in DOCS).encode()
    assert bytes(np.asarray(held.val, dtype=np.uint8)) == join(t for _, t in VAL).encode()
    assert len(held.train) > len(split.train)   # the default split's validation trains now
    keys = {split.key, held.key, data.cache_key(DOCS, ByteTokenizer(), VAL[:1]),
            data.cache_key(DOCS, ByteTokenizer(), [("held.txt", "other")]),
            data.cache_key(DOCS, ByteTokenizer(), [])}
    assert len(keys) == 5 and held.key == data.cache_key(DOCS, ByteTokenizer(), VAL)


def _files(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("".join(t for _, t in DOCS) * 3)
    val.write_text("def held_out(x):\n    return x * 2\n" * 40)
    return train, val


def test_train_resume_and_eval(tmp_path, capsys):
    train, val = _files(tmp_path)
    out = tmp_path / "run"
    common = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert cli.main(["train", "--data", str(train), "--val-data", str(val), "--out", str(out),
                     "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
                     "--eval-batches", "2", "--sample-tokens", "0", *common]) == 0
    assert cli.main(["train", "--resume", str(out), "--steps", "4", *common]) == 0
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "val_loss" in m] == [2, 4]
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    evaluated = json.loads(capsys.readouterr().out)["val_loss"]
    assert evaluated == pytest.approx(logged[-1]["val_loss"], rel=1e-5)   # the same windows
    # the default split of train.txt validates elsewhere: another loss
    assert cli.main(["eval", str(out), "--json", "--data", str(train), "--cache-dir",
                     str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] != pytest.approx(evaluated, rel=1e-3)


def test_a_missing_val_data_is_one_line(tmp_path, capsys):
    train, _ = _files(tmp_path)
    assert cli.main(["train", "--data", str(train), "--val-data", str(tmp_path / "nope.txt"),
                     "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val-data" in err and "nope.txt" in err, err
