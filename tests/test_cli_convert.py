"""`dropless convert --to-hf` and `--from-hf` write their output directory whole or not at all."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import subprocess_env
from dropless import cli, hf
from dropless.checkpoint import load_model_dir
from dropless.parallel import checkpoint as ckpt


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("way", ["--to-hf", "--from-hf"])
def test_an_interrupted_convert_leaves_no_output_directory(capsys, monkeypatch, tmp_path,
                                                           trained_run, way):
    """Ctrl-C after config.json (--to-hf) or the checkpoint's shards (--from-hf) were written left
    them in OUT: a directory that looks like a model with half its files, which the next convert
    into it refused as not empty."""
    src = trained_run
    if way == "--from-hf":
        src = tmp_path / "hf"
        assert cli.main(["convert", "--to-hf", str(trained_run), str(src)]) == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    with monkeypatch.context() as patch:   # the weights (or the checkpoint's state) never come
        patch.setattr(hf, "save_safetensors", _interrupt)
        patch.setattr(ckpt, "write_atomic", _interrupt)
        assert cli.main(["convert", way, str(src), str(out)]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # no OUT, no temp left behind
    capsys.readouterr()
    assert cli.main(["convert", way, str(src), str(out)]) == 0   # the next one writes it whole
    want = load_model_dir(trained_run)[0].state_dict()   # the run, whichever way it went
    got = load_model_dir(out)[0].state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])


def test_a_killed_convert_leaves_no_output_directory(tmp_path, trained_run):
    """SIGKILL mid-write: only a hidden temp directory is left, and the next convert beside it
    removes it (its process is gone)."""
    out = tmp_path / "hf"
    script = ("import os, signal, sys\nfrom dropless import cli, hf\n"
              "hf.save_safetensors = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "cli.main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", script, "convert", "--to-hf", str(trained_run),
                             str(out)], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()
    [left] = os.listdir(tmp_path)
    assert left.startswith(".hf.tmp-") and (tmp_path / left / "config.json").is_file()
    assert cli.main(["convert", "--to-hf", str(trained_run), str(out)]) == 0
    assert os.listdir(tmp_path) == ["hf"] and (out / "model.safetensors").is_file()


def test_a_killed_convert_to_safetensors_leaves_nothing_behind(tmp_path, trained_run):
    """safetensors writes a `.tmpXXXXXX` beside the path it is given and renames it: SIGKILLed
    mid-write, that file (the model's size, named for nothing) stayed beside OUT for good. The
    write goes into a temp directory named for OUT, which the next convert to OUT removes."""
    out = tmp_path / "m.safetensors"
    script = ("import os, signal, sys\nfrom pathlib import Path\nfrom dropless import cli, hf\n"
              "def save(tensors, path, metadata=None):   # as safetensors 0.8 does, then killed\n"
              "    (Path(path).parent / '.tmpAbC123').write_bytes(b'half a model')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "hf.save_safetensors = save\ncli.main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", script, "convert", str(trained_run),
                             "--to-safetensors", str(out)], env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()
    assert cli.main(["convert", str(trained_run), "--to-safetensors", str(out)]) == 0
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_to_hf_and_safetensors_in_bf16(tmp_path, trained_run, capsys):
    """--dtype bfloat16 writes the run's weights rounded to bf16 (the router's bias float32), at
    about half the bytes; --from-hf refuses it (a run directory holds training's float32)."""
    import torch
    from safetensors.torch import load_file

    from dropless.checkpoint import load_run

    model = load_run(trained_run)[0]
    for flags, name in (([], "hf32"), (["--dtype", "bfloat16"], "hf16")):
        assert cli.main(["convert", "--to-hf", str(trained_run), str(tmp_path / name),
                         *flags]) == 0
    sizes = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("hf32", "hf16")}
    assert 0.45 < sizes["hf16"] / sizes["hf32"] < 0.55, sizes
    assert hf.stored_dtype(tmp_path / "hf16") == torch.bfloat16
    back = load_model_dir(tmp_path / "hf16", dtype=torch.bfloat16)[0]
    for k, v in model.state_dict().items():
        want = v if k.endswith("router.bias") else v.to(torch.bfloat16)
        torch.testing.assert_close(back.state_dict()[k], want, rtol=0, atol=0)

    assert cli.main(["convert", str(trained_run), "--to-safetensors", str(tmp_path / "w.st"),
                     "--dtype", "bfloat16"]) == 0
    tensors = load_file(tmp_path / "w.st")
    assert set(tensors) == set(model.state_dict())
    for k, v in model.state_dict().items():
        want = v if k.endswith("router.bias") else v.to(torch.bfloat16)
        assert torch.equal(tensors[k], want), k
    capsys.readouterr()
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf16"), str(tmp_path / "run"),
                     "--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype is invalid with --from-hf" in err, err
