"""The command line: every bad input is one clear line on stderr and a non-zero exit code."""

import builtins
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from dropless import cli
from dropless.checkpoint import load_run
from dropless.config import TrainConfig
from dropless.errors import DroplessError
from dropless.parallel import checkpoint as ckpt


def _fails(capsys, argv, message: str, code: int = 1) -> None:
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dropless: error: "), err
    assert message in err, err


def test_train_prints_a_summary(trained_run, capsys):
    metrics = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2] and "val_loss" in metrics[0]
    assert cli.main(["generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "5",
                     "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and "tokens/s" in captured.err


def test_generate_batched_prompts(trained_run, capsys):
    assert cli.main(["generate", str(trained_run), "--prompt", "import", "--prompt", "class X",
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "[0] ---\nimport" in out and "[1] ---\nclass X" in out


def test_info_matches_hand_count(capsys):
    # tiny: embedding 256*128 (tied) + final norm 128 + 4 layers x (attention q,o 128*128 each,
    # k,v 128*64 each; two norms 2*128; router 8*128; 8 experts x 3*128*128)
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 2 * 128 + 8 * 128 + 8 * 3 * 128 * 128
    total = 256 * 128 + 128 + 4 * per_layer
    active = total - 4 * (8 - 2) * 3 * 128 * 128
    assert cli.main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"{total:,}" in out and f"{active:,}" in out and total == 1_807_488


def test_info_of_a_run_and_a_hf_directory(tmp_path, trained_run, capsys):
    """`info PATH`: the directory's own model (its config, no weight read), as the preset's."""
    from dropless.config import get_preset
    from dropless.info import format_stats, model_stats

    want = format_stats(model_stats(get_preset("tiny"), 64))
    assert cli.main(["info", str(trained_run), "--seq-len", "64"]) == 0
    assert capsys.readouterr().out == f"{trained_run}: run directory\n{want}\n"
    assert cli.main(["convert", "--to-hf", str(trained_run), str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "tokenizer.json").unlink()   # info needs no tokenizer
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not read")
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "hf"), "--seq-len", "64"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'hf'}: Hugging Face directory\n{want}\n"
    _fails(capsys, ["info", str(trained_run), "--preset", "tiny"],
           "--preset tiny is invalid: give a preset or a directory, not both")
    _fails(capsys, ["info", str(tmp_path / "nothere")], "no such run directory")
    _fails(capsys, ["info", str(tmp_path / "hf" / "config.json")], "a file, not a run directory")


def test_main_leaves_the_callers_warning_format(capsys):
    """`dropless: warning: ...` lines while a command runs; a caller's own format afterwards,
    after a success and after a user mistake alike."""
    import warnings
    before = warnings.formatwarning
    assert cli.main(["info", "--preset", "tiny"]) == 0
    assert warnings.formatwarning is before
    assert cli.main(["info", "--preset", "gigantic"]) == 1
    assert warnings.formatwarning is before


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "dropless", "info", "--preset", "small"],
                            env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "total parameters" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "steps=0 is invalid"),
    (["--steps=-3"], "steps=-3 is invalid"),
    (["--lr", "0"], "lr=0.0 is invalid"),
    (["--lr=-1e-3"], "lr=-0.001 is invalid"),
    (["--lr", "nan"], "lr=nan is invalid"),
    (["--lr", "1e300"], "lr=1e+300 is invalid: must be a finite number in (0, 1e30]"),
    (["--grad-clip", "inf"], "grad_clip=inf is invalid"),
    (["--weight-decay", "nan"], "weight_decay=nan is invalid"),
    (["--batch-size", "0"], "batch_size=0 is invalid"),
    (["--seq-len", "0"], "seq_len=0 is invalid"),
    (["--grad-accum", "0"], "grad_accum=0 is invalid"),
    (["--warmup=-1"], "warmup=-1 is invalid"),
    (["--eval-every", "0"], "eval_every=0 is invalid"),
    # sizes of what is allocated: within a run's train_config too (`dropless eval` reads them)
    (["--batch-size", str(10**12)], "batch_size*seq_len=128000000000000 is invalid: must be at"),
    (["--eval-batches", str(10**12)], "eval_batches*batch_size*seq_len=2048000000000000 is inv"),
    (["--grad-accum", str(10**9)], "batch_size*seq_len*grad_accum=2048000000000 is invalid"),
    (["--seq-len", str(2**30)], "seq_len=1073741824 is invalid: must be an integer in [1, 1677"),
    (["--seed", str(2**64)], "seed=18446744073709551616 is invalid"),   # torch.manual_seed's range
    (["--preset", "gigantic"], "preset='gigantic' is invalid"),
    (["--tokenizer", "words"], "tokenizer='words' is invalid"),
    (["--device", "tpu9"], "error: --device 'tpu9' is not a device"),   # not a "parallel layout"
    (["--ep", "2"], "--ep 2 needs several processes and this is one: start it with torchrun"),
    (["--dp-shard", "2", "--ep", "1"], "--dp-shard 2 --ep 1 needs several processes"),
])
def test_train_rejects_bad_numbers_and_names(capsys, tmp_path, flags, message):
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), *flags], message)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_under_torchrun_one_rank_per_machine_reports_a_mistake(capsys, monkeypatch, local_rank):
    """Every rank of a torchrun job raises the same error on a bad command line; the local rank 0
    alone prints it, the others exit with the same code in silence (one line, not one per rank)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    if local_rank == "0":
        _fails(capsys, ["train", "--ep", "2"], "under torchrun, pass --out RUN_DIR")
    else:
        assert cli.main(["train", "--ep", "2"]) == 1
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, layout", [
    ([], "dp_replicate=1 dp_shard=0 ep=2"),   # the run's ep; FSDP over what this world leaves
    (["--dp-shard", "2"], "dp_replicate=1 dp_shard=2 ep=1"),   # the flags given: the layout
])
def test_resume_under_torchrun_fits_the_layout_to_the_new_world(capsys, monkeypatch, tmp_path,
                                                               corpus, flags, layout):
    """A run trained as --ep 2 --dp-shard 2 (4 ranks, as in the README) resumed on 2 ranks: without
    layout flags it keeps ep 2 and lets the world size its FSDP degree (it kept dp_shard 2 and was
    refused: 2 x 2 != 2); with some, those make the whole layout (--dp-shard 2 kept ep 2)."""
    import dropless.train

    out = tmp_path / "run"
    dropless.train.train(TrainConfig(out=str(out), device="cpu", data=str(corpus), steps=1,
                                     cache_dir=str(tmp_path / "cache"), batch_size=2, seq_len=16,
                                     sample_tokens=0, ep=2, dp_shard=2), progress=False)

    def layout_of(cfg, **_):   # what train() would be asked to run on the 2 ranks
        raise DroplessError(f"dp_replicate={cfg.dp_replicate} dp_shard={cfg.dp_shard} ep={cfg.ep}")
    monkeypatch.setattr(dropless.train, "train", layout_of)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(capsys, ["train", "--resume", str(out), "--steps", "2", *flags], layout)


def test_ep_that_does_not_divide_the_experts_is_named_first(capsys, monkeypatch, tmp_path):
    """--ep 3 of tiny's 8 experts on 2 ranks: the experts are the mistake (the world size was
    named first: 'dp_replicate*ep=3 is invalid: must divide the world size 2')."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    _fails(capsys, ["train", "--ep", "3", "--out", str(tmp_path / "run")],
           "invalid parallel layout: ep=3 is invalid: must divide num_experts=8")


def test_train_rejects_unparsable_numbers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--steps", "ten"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'ten'" in err


def _bad_data(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "nope.txt"
    if kind == "empty file":
        (tmp_path / "empty.txt").write_text("")
        return tmp_path / "empty.txt"
    if kind == "empty dir":
        (tmp_path / "d").mkdir()
        return tmp_path / "d"
    if kind == "unreadable":   # a dangling link in a directory cannot be read, even by root
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "gone.txt").symlink_to(tmp_path / "deleted.txt")
        return tmp_path / "d"
    if kind == "jsonl without text":
        (tmp_path / "x.jsonl").write_text('{"body": "hello"}\n')
        return tmp_path / "x.jsonl"
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    return tmp_path / "x.jsonl"


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file or directory"),
    ("empty file", "no text found"),
    ("empty dir", "no text found"),
    ("unreadable", "cannot read"),
    ("jsonl without text", 'line 1 has no "text" string field'),
    ("jsonl broken", "line 2 is not valid JSON"),
])
def test_train_rejects_bad_data(capsys, tmp_path, kind, message):
    path = _bad_data(tmp_path, kind)
    _fails(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "run")], message)
    assert not (tmp_path / "run").exists()


def _denied(monkeypatch, owner, name: str, denied) -> None:
    """owner.name(path, ...) raises EACCES where denied(path), as for a user who is not root
    (root, as in CI, reads and writes whatever the mode)."""
    real = getattr(owner, name)

    def guarded(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and denied(Path(path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(owner, name, guarded)


def test_unreadable_file(capsys, tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    _denied(monkeypatch, builtins, "open", lambda p: p == path)   # how a corpus file is read
    _fails(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "run")],
           f"cannot read {path} (Permission denied)")
    assert not (tmp_path / "run").exists()


def test_too_little_data_for_the_sequence_length(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("x = 1\n" * 20)
    _fails(capsys, ["train", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "r"),
                    "--seq-len", "512", "--cache-dir", str(tmp_path / "c")], "too few for --seq-len 512")


def test_run_dir_without_checkpoint(capsys, tmp_path):
    _fails(capsys, ["generate", str(tmp_path)], "no checkpoint found")
    _fails(capsys, ["train", "--resume", str(tmp_path)], "no checkpoint found")
    _fails(capsys, ["generate", str(tmp_path / "missing")], "no such run directory")
    _fails(capsys, ["train", "--resume"], "--resume needs a run directory")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_checkpoint(capsys, tmp_path, trained_run, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".lock"))
    shard = ckpt.latest_path(run) / "__0_0.distcp"
    raw = shard.read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) - 1000]
    else:
        raw = raw[:5000] + bytes(100) + raw[5100:]
    shard.write_bytes(raw)
    _fails(capsys, ["generate", str(run)], f"{shard}: checkpoint file is damaged")
    _fails(capsys, ["train", "--resume", str(run), "--steps", "5"],
           f"{shard}: checkpoint file is damaged")


def test_resume_config_mismatch(capsys, trained_run):
    _fails(capsys, ["train", "--resume", str(trained_run), "--steps", "4", "--lr", "0.5",
                    "--seq-len", "64"], "config mismatch on resume: --seq-len 64 (the run used 16); "
                    "--lr 0.5 (the run used 0.003)")
    _fails(capsys, ["train", "--resume", str(trained_run)], "already finished 2 steps")
    _fails(capsys, ["train", "--resume", str(trained_run), "--steps", "-1"],   # not a traceback
           "invalid training config: steps=-1 is invalid: must be an integer >= 1")


def test_resume_and_out_must_agree(capsys, tmp_path, trained_run):
    """--out is not where a resumed run's checkpoints would go: it was ignored without a word."""
    _fails(capsys, ["train", "--resume", str(trained_run), "--out", str(tmp_path / "elsewhere"),
                    "--steps", "3"], "name different directories")
    assert not (tmp_path / "elsewhere").exists()


def test_eval_and_resume_of_a_run_whose_data_is_gone_name_the_run_data(capsys, tmp_path, corpus):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--cache-dir",
                     str(tmp_path / "cache"), "--steps", "1", "--batch-size", "2", "--seq-len",
                     "16", "--sample-tokens", "0", "--quiet"]) == 0
    capsys.readouterr()
    shutil.rmtree(data)
    _fails(capsys, ["eval", str(tmp_path / "run")],   # not "--data", which was not passed
           f"dropless: error: the run's --data {data}: no such file or directory")
    _fails(capsys, ["train", "--resume", str(tmp_path / "run"), "--steps", "2"],
           f"dropless: error: the run's --data {data}: no such file or directory")


def test_resume_over_a_hand_edited_metrics_log(tmp_path, trained_run):
    """Lines of metrics.jsonl edited to hold a string loss, a list val_loss, ragged or foreign
    expert loads or a 400-digit step crashed the resumed run's plots at its end, a traceback."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".lock"))
    metrics = run / "metrics.jsonl"
    edited = ['{"step": 1, "loss": "low"}', '{"step": 1}',
              '{"step": 1, "loss": 1, "val_loss": [1]}',
              '{"step": 1, "loss": 1, "expert_load": [[0.5], [0.5, 0.5]]}',
              '{"step": 1, "loss": 1, "expert_load": [["a"]]}',
              '{"step": 1%s, "loss": 1}' % ("0" * 400),
              '{"step": 1, "loss": 1, "expert_load": [[0.5, 0.5]]}']   # a record, but 1 x 2
    metrics.write_text("\n".join(edited) + "\n" + metrics.read_text())
    with pytest.warns(UserWarning, match=r"skipped 6 malformed lines \(1, 2, 3, 4, 5 \.\.\.\)"):
        assert cli.main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert (run / "expert_load.png").is_file()


def test_model_only_run_cannot_resume(capsys, tmp_path, trained_run):
    model, _, state = load_run(trained_run)
    ckpt.save(tmp_path / "converted", 0, model, None,
              {k: state[k] for k in ("model_config", "tokenizer")})
    _fails(capsys, ["train", "--resume", str(tmp_path / "converted")], "without training state")
    assert cli.main(["generate", str(tmp_path / "converted"), "--max-new-tokens", "2"]) == 0


def test_existing_run_needs_resume(capsys, trained_run):
    _fails(capsys, ["train", "--out", str(trained_run)], "pass --resume")


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is invalid"),
    (["--temperature=-1"], "--temperature -1.0 is invalid"),
    (["--top-k", "0"], "--top-k 0 is invalid"),
    (["--top-p", "1.5"], "--top-p 1.5 is invalid"),
    (["--temperature", "nan"], "--temperature nan is invalid"),
    (["--temperature", "inf"], "--temperature inf is invalid"),
    (["--top-p", "nan"], "--top-p nan is invalid"),
    (["--prompt", ""], "--prompt must not be empty"),
    (["--max-new-tokens", "100000"], "exceeds the model's max_seq_len"),
])
def test_generate_rejects_bad_values(capsys, trained_run, flags, message):
    _fails(capsys, ["generate", str(trained_run), *flags], message)


@pytest.mark.parametrize("name, value, message", [
    ("DROPLESS_PDL", "yes", "DROPLESS_PDL='yes' is invalid: allowed: 0, 1"),
    ("DROPLESS_PDL_PRELOAD", "2", "DROPLESS_PDL_PRELOAD='2' is invalid: allowed: 0, 1"),
    ("DROPLESS_DECODE_FUSION", "top", "DROPLESS_DECODE_FUSION='top' is invalid"),
    ("DROPLESS_DECODE_ATTN_ONE_SPLIT", "-4", "allowed: an integer >= 0"),
    ("DROPLESS_GEMV_STAGES", "plain=9", "DROPLESS_GEMV_STAGES: 'plain=9' is invalid"),
    ("DROPLESS_AWQ_UNPACK", "fast", "DROPLESS_AWQ_UNPACK='fast' is invalid"),
    ("DROPLESS_AWQ_TILE", "1,2", "DROPLESS_AWQ_TILE='1,2' is invalid"),
])
def test_kernel_switches_are_checked_before_a_model_loads(capsys, monkeypatch, trained_run,
                                                          name, value, message):
    """A bad decode-kernel switch is a one-line error of generate and serve before any model is
    loaded (on a GPU it was raised inside the decode step: a traceback, and in a server every
    request failing), and of the engine (library callers) too."""
    from dropless import Transformer, get_preset
    from dropless.serve import Engine
    monkeypatch.setenv(name, value)
    _fails(capsys, ["generate", str(trained_run), "--prompt", "a"], message)
    _fails(capsys, ["serve", str(trained_run / "nowhere")], message)   # not "no such directory"
    with pytest.raises(DroplessError, match=re.escape(message)):
        Engine(Transformer(get_preset("tiny")))


def test_info_unknown_preset(capsys):
    _fails(capsys, ["info", "--preset", "gigantic"], "preset='gigantic' is unknown")
    _fails(capsys, ["info", "--preset", "tiny", "--seq-len", "0"], "--seq-len 0 is invalid")


@pytest.mark.parametrize("entry", ["python -m dropless", "the console script"])
def test_ctrl_c_while_loading_is_quiet(entry):
    """A Ctrl-C in the seconds `import torch` takes (a torchrun worker stopped as it starts) was a
    KeyboardInterrupt traceback: both entry points exit 130 with one line. The interrupt is made
    to arrive at torch's import, whichever module asks for it first."""
    import tomllib

    script = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, function = script["project"]["scripts"]["dropless"].split(":")
    start = ("import runpy; runpy.run_module('dropless', run_name='__main__', alter_sys=True)"
             if entry == "python -m dropless" else
             f"import importlib; sys.exit(importlib.import_module({module!r}).{function}())")
    code = ("import sys\n"
            "class CtrlC:\n"
            "    def find_spec(self, name, *args):\n"
            "        if name == 'torch':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, CtrlC())\n"
            "sys.argv = ['dropless', 'info']\n" + start)
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (130, "dropless: interrupted\n")


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dropless", "train", "--data",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
                            env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"dropless: error: --data {tmp_path / 'missing'}: no such file or directory"


# ---- nothing written is lost ---------------------------------------------------------------------

def test_convert_never_overwrites(capsys, tmp_path, trained_run):
    existing = trained_run / "tokenizer.json"
    before = existing.read_bytes()
    _fails(capsys, ["convert", str(trained_run), "--to-safetensors", str(existing)],
           f"{existing} already exists: refusing to overwrite it")
    _fails(capsys, ["convert", "--from-hf", str(tmp_path), str(trained_run)],
           f"{trained_run} already exists and is not an empty directory")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_text("stale")
    _fails(capsys, ["convert", "--to-hf", str(trained_run), str(tmp_path / "hf")],
           "is not an empty directory: refusing to overwrite it")
    assert existing.read_bytes() == before
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["model-00001-of-00002.safetensors"]


def test_convert_names_the_order_when_the_paths_are_swapped(capsys, tmp_path, trained_run):
    """`convert RUN --to-hf OUT` (the source where the output goes) says which path goes where,
    for each of the three ways; a path that is simply missing gets no such hint."""
    _fails(capsys, ["convert", str(trained_run), "--to-hf", str(tmp_path / "hf")],
           f"(--to-hf takes the run, the other path is the output: `dropless convert --to-hf "
           f"{trained_run} {tmp_path / 'hf'}`)")
    _fails(capsys, ["convert", str(tmp_path / "m.safetensors"), "--to-safetensors",
                    str(trained_run)],
           f"(the run comes first, --to-safetensors takes the output file: `dropless convert "
           f"{trained_run} --to-safetensors {tmp_path / 'm.safetensors'}`)")
    assert cli.main(["convert", "--to-hf", str(trained_run), str(tmp_path / "hf")]) == 0
    _fails(capsys, ["convert", str(tmp_path / "hf"), "--from-hf", str(tmp_path / "run2")],
           f"{tmp_path / 'run2'}: no such Hugging Face directory (--from-hf takes it, the other "
           f"path is the output: `dropless convert --from-hf {tmp_path / 'hf'} "
           f"{tmp_path / 'run2'}`)")
    assert not (tmp_path / "run2").exists() and not (tmp_path / "m.safetensors").exists()
    assert cli.main(["convert", str(tmp_path / "out"), "--to-hf", str(tmp_path / "hf2")]) == 1
    err = capsys.readouterr().err
    assert err == f"dropless: error: {tmp_path / 'hf2'}: no such run directory\n"
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("argv", [
    ["convert", "--to-hf", "RUN", ""], ["convert", "--from-hf", "HF", ""],
    ["convert", "RUN", "--to-safetensors", ""], ["eval", "RUN", "--data", ""],
    ["quantize", "RUN", "--out", "", "--quiet"],
    ["quantize", "RUN", "--out", "Q", "--calib-data", ""],
    ["generate", ""], ["eval", ""],
])
def test_an_empty_path_is_refused(capsys, monkeypatch, tmp_path, trained_run, argv):
    """"" is the working directory to os and pathlib: `convert --to-hf RUN ''` wrote config.json and
    the weights into (over) the directory the command ran in, and `eval --data ''` read it."""
    (tmp_path / "hf").mkdir()
    assert cli.main(["convert", "--to-hf", str(trained_run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    names = {"RUN": str(trained_run), "HF": str(tmp_path / "hf"), "Q": str(tmp_path / "q")}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "config.json").write_text("mine")
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([names.get(a, a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must name a path, not ''" in err, err
    assert [p.name for p in cwd.iterdir()] == ["config.json"]
    assert (cwd / "config.json").read_text() == "mine"


def test_convert_writes_files_others_can_read(capsys, tmp_path, trained_run):
    umask = os.umask(0o022)
    try:
        assert cli.main(["convert", str(trained_run), "--to-safetensors",
                         str(tmp_path / "m.safetensors")]) == 0
        assert cli.main(["convert", "--to-hf", str(trained_run), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(umask)
    for path in [tmp_path / "m.safetensors", *(tmp_path / "hf").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path   # not safetensors' private 0600


def test_convert_to_safetensors_into_no_directory_is_one_line(capsys, tmp_path, trained_run):
    """Named before the run loads: safetensors' own error named its temp file (".tmpXXXX")."""
    (tmp_path / "file").write_text("x")
    for out, found in ((tmp_path / "missing" / "m.safetensors", "no such directory"),
                       (tmp_path / "file" / "m.safetensors", "a file, not a directory")):
        _fails(capsys, ["convert", str(trained_run), "--to-safetensors", str(out)],
               f"dropless: error: {out.parent}: {found} for {out}")


def test_new_run_refuses_a_foreign_directory(capsys, tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("someone else's numbers\n")
    _fails(capsys, ["train", "--out", str(out), "--data", str(corpus)],
           f"--out {out} is not empty and is not a dropless run")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == "someone else's numbers\n"
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["train", "--out", str(tmp_path / "file"), "--data", str(corpus)],
           f"--out {tmp_path / 'file'} is a file, not a directory")
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--cache-dir",
                    str(tmp_path / "file")], "is a file, not a directory")
    assert not (tmp_path / "run").exists()   # a failed start leaves no run directory behind


def test_full_disk_is_one_line(capsys, tmp_path, corpus, monkeypatch):
    import errno

    from dropless import checkpoint

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint.os, "fsync", full)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--data", str(corpus), "--cache-dir",
                     str(tmp_path / "cache"), "--steps", "1", "--sample-tokens", "0"]) == 1
    err = capsys.readouterr().err   # one line naming the file it could not write
    assert re.fullmatch(rf"dropless: error: {tmp_path}/\S+: No space left on device\n", err), err
    assert not (out / ckpt.DCP_DIR).exists() and not list(tmp_path.glob("cache/*"))


def test_read_only_directory_is_one_line(capsys, tmp_path, corpus, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    _denied(monkeypatch, os, "mkdir", lambda p: p.parent == ro)
    _fails(capsys, ["train", "--out", str(ro / "run"), "--data", str(corpus)],
           f"dropless: error: {ro / 'run'}: Permission denied\n")
    assert not list(ro.iterdir())


@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch 0 is invalid: must be >= 1"),
    (["--max-batch=-3"], "--max-batch -3 is invalid: must be >= 1"),
    (["--admit-delay-ms", "-1"], "--admit-delay-ms -1.0 is invalid: must be in [0, 1000]"),
    (["--admit-delay-ms", "nan"], "--admit-delay-ms nan is invalid"),
    (["--port", "70000"], "--port 70000 is invalid: must be in [1, 65535]"),   # not a traceback
    (["--port=-1"], "--port -1 is invalid"),
    (["--max-len", "0"], "--max-len 0 is invalid: must be in [2, "),   # not "the default"
    (["--max-len=-5"], "--max-len -5 is invalid: must be in [2, the model's max_seq_len]"),
])
def test_serve_rejects_bad_values_before_loading_the_model(capsys, monkeypatch, trained_run,
                                                           flags, message):
    """--max-batch 0 was refused only once the model had loaded: minutes, for a large one."""
    from dropless.serve import text

    def load(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(text, "load_served_model", load)
    _fails(capsys, ["serve", str(trained_run), *flags], message)


def test_serve_on_a_busy_port_is_one_line(capsys, trained_run):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        _fails(capsys, ["serve", str(trained_run), "--port", str(port)],
               f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use")


def test_generate_to_a_stream_that_cannot_spell_the_text(trained_run):
    """An ASCII locale (or PYTHONIOENCODING=ascii) gets "?" for what it cannot spell, not a
    UnicodeEncodeError traceback."""
    result = subprocess.run([sys.executable, "-m", "dropless", "generate", str(trained_run),
                             "--prompt", "caf\u00e9 \u20ac", "--max-new-tokens", "4"],
                            env={**subprocess_env(), "PYTHONIOENCODING": "ascii"},
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert b"caf? ?" in result.stdout and b"Traceback" not in result.stderr


def test_eval_of_a_converted_byte_run_reuses_its_tokens(capsys, tmp_path, trained_run, corpus):
    """A byte run's HF directory holds the byte-level tokenizer.json that stands for the bytes:
    it reads back as the byte tokenizer, so its eval finds the run's token cache (no second
    tokenization; the windows differ: a HF directory has no run's sequence length)."""
    cache, hf = tmp_path / "cache", tmp_path / "hf"
    for path in (trained_run, hf):
        if path == hf:
            assert cli.main(["convert", "--to-hf", str(trained_run), str(hf)]) == 0
        assert cli.main(["eval", str(path), "--data", str(corpus), "--json", "--cache-dir",
                         str(cache)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["val_loss"] > 0
        assert len(list(cache.iterdir())) == 1, sorted(cache.iterdir())


def test_runs_started_in_the_same_second_get_their_own_directories(capsys, tmp_path, corpus,
                                                                    monkeypatch):
    """Without --out a run is runs/<time>: a second one started in the same second was refused
    ("runs/<time> already holds a run", or "is in use" while the first ran), naming an --out
    nobody passed. It gets runs/<time>-2 instead; a failed start leaves no directory behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20260101-000000")
    flags = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--steps", "1",
             "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--quiet"]
    for _ in range(3):
        assert cli.main(["train", *flags]) == 0, capsys.readouterr().err
    runs = tmp_path / "runs"
    names = ["20260101-000000", "20260101-000000-2", "20260101-000000-3"]
    assert sorted(p.name for p in runs.iterdir()) == names
    assert all(load_run(runs / name)[2]["step"] == 1 for name in names)
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["train", *flags, "--cache-dir", str(tmp_path / "file")],
           "is a file, not a directory")
    assert sorted(p.name for p in runs.iterdir()) == names
