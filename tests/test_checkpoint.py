import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import forge, subprocess_env
from dropless import cli
from dropless.checkpoint import load_run
from dropless.parallel import checkpoint as ckpt
from dropless.parallel.checkpoint import PAUSE_ENV, latest_path, read_state
from dropless.config import PRESETS, ModelConfig, MoEConfig, TrainConfig
from dropless.errors import DroplessError
from dropless.generate import generate
from dropless.model import Transformer
from dropless.checkpoint import resume_config
from dropless.train import train


def test_round_trip_keeps_two_and_no_temp_files(tmp_path):
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    state = {"nested": {"s": "x", "none": None, "f": 0.1}, "ints": list(range(5))}
    for step in (3, 4, 5):
        path = ckpt.save(tmp_path, step, model, None, {**state, "step_seen": step})
    assert sorted(p.name for p in (tmp_path / ckpt.DCP_DIR).iterdir()) == \
        ["step-00000004", "step-00000005"]   # the two newest, no temp directory
    other = Transformer(PRESETS["tiny"])
    loaded = ckpt.load(path, other)
    assert loaded == {"step": 5, **state, "step_seen": 5}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  other.state_dict().values()))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ckpt.STATE])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage, name):
    model = Transformer(PRESETS["tiny"])
    path = ckpt.save(tmp_path, 1, model, None, {"w": list(range(1000))})
    raw = (path / name).read_bytes()
    if damage == "truncate":
        (path / name).write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        middle = len(raw) // 2
        (path / name).write_bytes(raw[:middle] + bytes([raw[middle] ^ 1]) + raw[middle + 1:])
    elif damage == "garbage":
        (path / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    else:
        (path / name).write_bytes(b"")
    with pytest.raises(DroplessError, match=f"{path / name}: checkpoint file is damaged"):
        ckpt.load(path, model)


def test_damaged_manifest_is_a_clear_error(tmp_path):
    model = Transformer(PRESETS["tiny"])
    path = ckpt.save(tmp_path, 1, model)
    (path / ckpt.MARKER).write_bytes(b"{not json")
    with pytest.raises(DroplessError, match="not a checksum manifest"):
        ckpt.load(path, model)


def test_kill_during_save_keeps_the_previous_checkpoint(small_cfg, tmp_path):
    """SIGKILL a training process while it sits between its fsynced temp directory and the
    rename: the previous checkpoint must still load, and the run must resume from it."""
    cfg = small_cfg(steps=2)
    train(cfg, progress=False)
    run = Path(cfg.out)
    env = {**subprocess_env(), PAUSE_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "-m", "dropless", "train", "--resume", str(run),
                             "--steps", "4", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    tmp = run / ckpt.DCP_DIR / ".step-00000004.tmp"
    deadline = time.monotonic() + 120
    while not (tmp / ckpt.MARKER).is_file():   # everything fsynced, the rename not yet done
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert latest_path(run).name == "step-00000002"
    assert read_state(latest_path(run))["step"] == 2
    load_run(run)   # the previous checkpoint loads whole
    resumed_cfg, state = resume_config(run, {"steps": 4})
    with pytest.warns(UserWarning, match="removing an interrupted checkpoint save"):
        assert train(resumed_cfg, state=state, progress=False)["step"] == 4
    assert sorted(p.name for p in (run / ckpt.DCP_DIR).iterdir()) == \
        ["step-00000002", "step-00000004"]   # stale temp directory removed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_and_exits_cleanly(small_cfg, tmp_path, capsys, sig):
    """Ctrl-C (SIGINT), and SIGTERM as `timeout`, `kill`, schedulers and `docker stop` send it:
    the step finishes, a checkpoint is saved, the resume command is printed, exit code 130."""
    cfg = small_cfg()
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "dropless", "train", "--data", cfg.data,
                             "--cache-dir", cfg.cache_dir, "--out", cfg.out, "--steps", "100000",
                             "--batch-size", "2", "--seq-len", "16", "--log-every", "1", "--quiet",
                             "--sample-tokens", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(cfg.out) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted at step" in out and f"({sig.name})" in out
    step = read_state(latest_path(cfg.out))["step"]
    assert step >= 2 and f"--resume {cfg.out}" in out
    assert cli.main(["train", "--resume", cfg.out, "--steps", str(step + 1), "--quiet"]) == 0
    assert "trained tiny" in capsys.readouterr().out


def test_resume_over_a_metrics_log_with_nulls_and_non_records(small_cfg):
    """A resumed run rereads metrics.jsonl: a null loss (how a NaN one is written) or a line that
    is JSON but not a record (`[]`, `3`, left by another tool) crashed it with a TypeError."""
    cfg = small_cfg(steps=2, sample_tokens=0)
    train(cfg, progress=False)
    metrics = Path(cfg.out) / "metrics.jsonl"
    first, *rest = metrics.read_text().splitlines()
    metrics.write_text("\n".join([json.dumps({**json.loads(first), "loss": None}), "[]", "3",
                                   *rest]) + "\n")
    resumed, state = resume_config(cfg.out, {"steps": 4})
    with pytest.warns(UserWarning, match=r"skipped 2 malformed lines \(2, 3\)"):
        assert train(resumed, state=state, progress=False)["finished"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["loss"] is None


# ---- nothing read runs code, nothing points outside the run, damage is refused ----------------

class _Payload:
    """Unpickling this would create `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def dcp_run(small_cfg):
    """A trained single-process run: its checkpoint directory and its model."""
    cfg = small_cfg(steps=2, sample_tokens=0)
    train(cfg, progress=False)
    run = Path(cfg.out)
    return run, latest_path(run), load_run(run)[0]


def test_oversized_or_special_manifest_is_refused_unread(tmp_path):
    """A sparse 8 GiB `COMPLETE` is refused by its size, a FIFO by its kind: no read, no hang."""
    model = Transformer(PRESETS["tiny"])
    path = ckpt.save(tmp_path, 1, model)
    with open(path / ckpt.MARKER, "r+b") as f:
        f.truncate(2**33)
    with pytest.raises(DroplessError, match="not a checksum manifest"):
        ckpt.load(path, model)
    (path / ckpt.MARKER).unlink()
    os.mkfifo(path / ckpt.MARKER)
    with pytest.raises(DroplessError, match="not a checksum manifest"):
        ckpt.read_state(path)


@pytest.mark.parametrize("how", ["grown", "planted"])
def test_oversized_shard_is_refused_unhashed(tmp_path, monkeypatch, how):
    """A shard grown sparse to 10 GiB, or a sparse one planted and listed in a forged manifest, is
    refused by its size against the model being loaded before any file is hashed (hashing it
    would take minutes)."""
    model = Transformer(PRESETS["tiny"])
    path = ckpt.save(tmp_path, 1, model)
    shard = path / ("__0_0.distcp" if how == "grown" else "__1_0.distcp")
    with open(shard, "ab") as f:
        f.truncate(10 * 2**30)
    if how == "planted":
        manifest = json.loads((path / ckpt.MARKER).read_text())
        manifest["sha256"][shard.name] = "0" * 64
        (path / ckpt.MARKER).write_text(json.dumps(manifest))
    monkeypatch.setattr(ckpt, "_sha256", lambda file: pytest.fail(f"{file} was hashed"))
    with pytest.raises(DroplessError, match=f"{shard}: the checkpoint's shards reach"):
        ckpt.load(path, model)


def test_symlinked_checkpoint_file_is_refused(tmp_path):
    """A shard replaced by a link to an identical copy elsewhere passes every checksum, yet is
    refused: a link could as well make the loader read any file of the machine into a model."""
    model = Transformer(PRESETS["tiny"])
    path = ckpt.save(tmp_path / "run", 1, model)
    shard = path / "__0_0.distcp"
    copy = tmp_path / "elsewhere.distcp"
    shutil.copy(shard, copy)
    shard.unlink()
    shard.symlink_to(copy)
    with pytest.raises(DroplessError, match="a symbolic link"):
        ckpt.load(path, model)


def _commands(run: Path, out: Path) -> list[list[str]]:
    return [["generate", str(run), "--max-new-tokens", "2"],
            ["train", "--resume", str(run), "--steps", "5", "--quiet"],
            ["convert", "--to-hf", str(run), str(out / "hf")],
            ["convert", str(run), "--to-safetensors", str(out / "model.safetensors")]]


def _fails_with(capsys, argv, message):
    assert cli.main(argv) == 1, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dropless: error: ") and message in err, err


def test_malicious_dcp_metadata_never_runs(dcp_run, tmp_path, capsys):
    run, step_dir, _ = dcp_run
    marker = tmp_path / "pwned"
    forge(step_dir, ".metadata", pickle.dumps(_Payload(marker)))
    for argv in _commands(run, tmp_path):
        code = cli.main(argv)
        assert not marker.exists(), argv
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert err == f"dropless: error: {step_dir / '.metadata'}: not a DCP metadata file " \
                      "(io.open is not DCP metadata)\n"   # what the pickle asked for, refused


def test_malicious_value_in_a_shard_never_runs(tmp_path):
    """Non-tensor values (optimizer hyperparameters) load with weights_only, not plain pickle."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = Transformer(PRESETS["tiny"])
    opt = torch.optim.AdamW(model.parameters())
    marker = tmp_path / "pwned"
    model_sd, optim_sd = get_state_dict(model, opt)
    optim_sd["param_groups"][0]["lr"] = _Payload(marker)
    path = ckpt.step_dir(tmp_path, 1)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    ckpt.write_atomic(path / ckpt.MARKER, json.dumps({"step": 1, "sha256": {
        f.name: ckpt._sha256(f) for f in path.iterdir()}}).encode())
    with pytest.raises(DroplessError, match="checkpoint cannot be loaded"):
        ckpt.load(path, model, opt)
    assert not marker.exists()


def test_bit_flipped_shard_is_refused(dcp_run, tmp_path, capsys):
    run, step_dir, model = dcp_run
    shard = step_dir / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))
    for argv in _commands(run, tmp_path):
        _fails_with(capsys, argv, f"{shard}: checkpoint file is damaged")
    with pytest.raises(DroplessError, match="damaged"):
        ckpt.load(step_dir, model)


def test_checkpoint_cannot_redirect_loading(dcp_run, tmp_path, capsys):
    """A `.metadata` naming shard files elsewhere (here: a real, intact one of another run) is
    refused; nothing is read from outside the checkpoint directory."""
    run, step_dir, _ = dcp_run
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    victim_dir = latest_path(victim)
    metadata = dcp.FileSystemReader(victim_dir).read_metadata()
    elsewhere = os.path.relpath(step_dir / "__0_0.distcp", victim_dir)
    for info in metadata.storage_data.values():
        info.relative_path = elsewhere
    forge(victim_dir, ".metadata", pickle.dumps(metadata))
    for argv in _commands(victim, tmp_path):
        _fails_with(capsys, argv, f"names {elsewhere!r}, not a file of its checkpoint directory")


# ---- a forged state.json: checked, and sized by the weights beside it, before any allocation ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("forge")
    train(TrainConfig(out=str(root / "run"), data=str(corpus), cache_dir=str(root / "cache"),
                      steps=2, batch_size=2, seq_len=16, sample_tokens=0), progress=False)
    return root / "run"


@pytest.fixture
def forged_run(trained, tmp_path, monkeypatch):
    """A copy of a trained run to forge, and from here on a failure once torch.empty (what
    nn.Linear, nn.Embedding and the experts allocate with) has made more than 2^24 elements off
    the meta device: a size from a forged file must be refused before it is allocated."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns(".lock"))
    real, made = torch.empty, [0]

    def empty(*size, **kwargs):
        if torch.device(kwargs.get("device") or torch.get_default_device()).type != "meta":
            made[0] += real(*size, **{**kwargs, "device": "meta"}).numel()
            if made[0] > 2**24:
                pytest.fail(f"{made[0]:,} elements allocated for a forged checkpoint")
        return real(*size, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)
    return run, latest_path(run)


def _run_commands(run: Path, out: Path) -> list[list[str]]:
    return [*_commands(run, out), ["eval", str(run)], ["quantize", str(run), "--out", str(out / "q")]]


_ABSENT = object()


def _wide_tokenizer() -> str:
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({"a": 0, "b": 300}, unk_token="a")).to_str()


@pytest.mark.parametrize("field,value,message", [
    ("model_config.moe.num_experts", 10**9,
     "state.json: model_config.moe: num_experts=1000000000 is invalid: must be an integer in [1, 4096]"),
    ("model_config.num_layers", 10**8,
     "state.json: model_config: num_layers=100000000 is invalid: must be an integer in [1, 1024]"),
    ("model_config.dim", 10**7, "model_config: dim=10000000 is invalid: must be an integer in [1, "),
    ("model_config.vocab_size", 10**10, "vocab_size=10000000000 is invalid"),
    ("model_config.max_seq_len", 2**40, "max_seq_len=1099511627776 is invalid"),
    # within the limits, but more than the weights beside it can hold
    ("model_config.moe.hidden_dim", 2**18, "shards hold 2"),
    ("model_config.num_layers", 1024, "they cannot hold it"),
    ("model_config.dim", "128", "model_config: dim='128' is invalid: must be an integer"),
    ("model_config.num_layers", True, "num_layers=True is invalid"),
    ("model_config.norm_eps", float("nan"), "norm_eps=nan is invalid: must be a finite number > 0"),
    ("model_config.norm_eps", -1e-5, "norm_eps=-1e-05 is invalid"),
    ("model_config.rope_theta", float("inf"), "rope_theta=inf is invalid"),
    ("model_config.moe.route_scale", "2", "model_config.moe: route_scale='2' is invalid"),
    ("model_config.tie_embeddings", "false", "tie_embeddings='false' is invalid"),
    ("model_config.experts", 8, "unexpected keyword argument 'experts'"),
    ("model_config.moe", _ABSENT, "model_config.moe: must be a JSON object, not NoneType"),
    ("model_config", _ABSENT, "model_config: must be a JSON object, not NoneType"),
    ("model_config", [1], "model_config: must be a JSON object, not list"),
    ("quant", [4], "quant: must be a JSON object, not list"),
    ("quant", {"group_size": 3}, "quant: group_size=3 is invalid"),
    ("tokenizer", 5, "tokenizer: the JSON object must be str"),
    ("tokenizer", _wide_tokenizer(), "the tokenizer has 301 tokens, the model only 256"),
])
def test_forged_state_json_is_one_line_before_any_allocation(forged_run, tmp_path, capsys, field,
                                                             value, message):
    """num_experts 10^9 allocated 512 GB, num_layers 10^8 built layers for hours, and the other
    values were tracebacks: every command names the file, the field and what is allowed."""
    run, step_dir = forged_run
    _forge_field(step_dir, field, value)
    for argv in _run_commands(run, tmp_path):
        if field == "quant" and argv[0] == "train":   # refused first as a quantized run
            continue
        _fails_naming(capsys, argv, step_dir, message)


def _forge_field(step_dir: Path, field: str, value) -> None:
    """Set (or, given _ABSENT, delete) the dotted `field` of the checkpoint's state.json."""
    state = json.loads((step_dir / ckpt.STATE).read_text())
    *parents, name = field.split(".")
    target = state
    for key in parents:
        target = target[key]
    if value is _ABSENT:
        del target[name]
    else:
        target[name] = value
    forge(step_dir, ckpt.STATE, json.dumps(state).encode())


def _fails_naming(capsys, argv, step_dir: Path, message: str) -> None:
    assert cli.main(argv) == 1, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dropless: error: {step_dir}"), err
    assert message in err, err


@pytest.mark.parametrize("field,value,message", [
    # the run's training config, which eval and quantize read too (eval sizes its windows by it)
    ("train_config.batch_size", 10**12,
     "state.json: train_config: batch_size*seq_len=16000000000000 is invalid: must be at most"),
    ("train_config.eval_batches", 10**12, "eval_batches*batch_size*seq_len=32000000000000 is inv"),
    ("train_config.seq_len", "16", "train_config: seq_len='16' is invalid"),
    ("train_config.cache_dir", 5, "cache_dir=5 is invalid: must be a string or null"),
    ("train_config.data", ["a.txt"], "data=['a.txt'] is invalid: must be a string or null"),
    ("train_config.min_lr_ratio", "0.1", "min_lr_ratio='0.1' is invalid: must be a finite number"),
    ("train_config", [1], "train_config: must be a JSON object, not list"),
    # the training state that --resume restores
    ("step", "2", "state.json: step is invalid: must be an integer >= 0"),
    ("step", -1, "step is invalid"),
    ("data", 5, "data.key is invalid: must be a string"),
    ("rng.torch", [0, 1, 2], "rng.torch is invalid: must be 5056 bytes"),
    ("rng.torch", [256] * 5056, "rng.torch is invalid"),
    ("rng.cuda", [0] * 3, "rng.cuda is invalid: must be null or 16 bytes"),
    ("window", _ABSENT, "window.loss is invalid: must be a number"),
    ("window.aux", "0.1", "window.aux is invalid"),
    ("window.steps", 1.5, "window.steps is invalid: must be an integer >= 0"),
    ("window.loads", [[1]], "window.loads is invalid: must be 4 lists (MoE layers) of 8 integers"),
])
def test_forged_training_state_is_one_line(forged_run, tmp_path, capsys, field, value, message):
    """Each was a traceback (a TypeError, an unpack of a long, a reshape) of `train --resume`, or
    for the training config of `eval` and `quantize` too, or an allocation that the size asked."""
    run, step_dir = forged_run
    _forge_field(step_dir, field, value)
    resume = ["train", "--resume", str(run), "--steps", "5", "--quiet"]
    readers = _run_commands(run, tmp_path)[-2:] if "train_config" in field else []   # eval, quant
    for argv in [resume, *readers]:
        _fails_naming(capsys, argv, step_dir, message)


@pytest.mark.parametrize("raw,message", [(b"[1, 2]", "must hold a JSON object, not list"),
                                         (b'{"step": 2', "is not readable JSON")])
def test_state_json_that_is_not_an_object_is_one_line(forged_run, tmp_path, capsys, raw, message):
    run, step_dir = forged_run
    forge(step_dir, ckpt.STATE, raw)
    for argv in _run_commands(run, tmp_path):
        _fails_with(capsys, argv, f"{step_dir / ckpt.STATE}{':' if raw[0] == 91 else ''} {message}")


def test_a_field_an_older_run_lacks_takes_its_default(forged_run, capsys):
    """The run recorded the defaults (tiny): without the fields it is the same model."""
    run, step_dir = forged_run
    prompt = [5, 17, 42]
    before = generate(load_run(run)[0], [prompt], 6, temperature=0)
    state = json.loads((step_dir / ckpt.STATE).read_text())
    del state["model_config"]["qk_norm_scope"], state["model_config"]["moe"]["shared_gate"]
    forge(step_dir, ckpt.STATE, json.dumps(state).encode())
    assert cli.main(["generate", str(run), "--max-new-tokens", "2"]) == 0
    model = load_run(run)[0]
    assert model.cfg.qk_norm_scope == ModelConfig.__dataclass_fields__["qk_norm_scope"].default
    assert model.cfg.moe.shared_gate is MoEConfig.__dataclass_fields__["shared_gate"].default
    assert generate(model, [prompt], 6, temperature=0) == before


def test_shards_too_small_for_the_model_are_refused(tmp_path):
    """The weights on disk must be able to hold the model (2 bytes a weight at least): loading a
    checkpoint of `tiny` into four times its layers is refused by stat, not a DCP 'missing key'."""
    path = ckpt.save(tmp_path, 1, Transformer(PRESETS["tiny"]))
    deeper = Transformer(replace(PRESETS["tiny"], num_layers=16))
    with pytest.raises(DroplessError, match=f"{path}: the checkpoint's shards hold .* they cannot "
                                            "hold it"):
        ckpt.load(path, deeper)


# ---- one writer per run directory, and kills at any moment ------------------------------------

def _train_cmd(cfg, *extra) -> list[str]:
    return [sys.executable, "-m", "dropless", "train", "--data", cfg.data, "--cache-dir",
            cfg.cache_dir, "--out", cfg.out, "--batch-size", str(cfg.batch_size), "--seq-len",
            str(cfg.seq_len), "--warmup", str(cfg.warmup), "--eval-every", str(cfg.eval_every),
            "--eval-batches", "1", "--log-every", "1", "--sample-tokens", "0", "--quiet", *extra]


def _wait_for_metrics(proc, run: Path, lines: int) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_two_writers_on_one_run_directory(small_cfg, capsys):
    cfg = small_cfg()
    first = subprocess.Popen(_train_cmd(cfg, "--steps", "100000", "--ckpt-every", "1"),
                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        _wait_for_metrics(first, Path(cfg.out), 2)   # step 1 is checkpointed: --resume reads it
        for argv in (["train", "--out", cfg.out, "--data", cfg.data], ["train", "--resume", cfg.out]):
            before = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[0]
            assert cli.main([*argv, "--quiet"]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert f"is in use by another dropless process (pid {first.pid})" in err, err
            assert (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[0] == before
        assert first.poll() is None   # the first writer goes on undisturbed
    finally:
        first.kill()
        first.wait()


def test_resume_of_a_run_in_use_is_refused_before_its_checkpoints_are_read(small_cfg, capsys):
    """The writer prunes old checkpoints as it saves (KEEP of them), so a --resume that read the
    run before asking for its lock could find a checkpoint gone mid-read and fail on that instead
    (test_two_writers_on_one_run_directory, under load). The lock is asked first: here the
    checkpoints are all gone, as if pruned, and the refusal still names the process in the way."""
    import fcntl

    cfg = small_cfg(steps=2, ckpt_every=1, sample_tokens=0)
    train(cfg, progress=False)
    shutil.rmtree(Path(cfg.out) / "dcp")
    with open(Path(cfg.out) / ".lock", "r+") as lock:   # another dropless process holds the run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("4242\n")
        lock.flush()
        assert cli.main(["train", "--resume", cfg.out, "--steps", "4", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "is in use by another dropless process (pid 4242)" in err, err


def test_a_checkpoint_pruned_while_it_is_read_gives_way_to_the_newest(small_cfg, monkeypatch):
    """`generate` (or eval, serve, ...) on a run in training: the writer prunes old checkpoints as
    it saves, so the one being read can go mid-read. load_run reads the newest again; an error
    on a checkpoint that is still there is not retried."""
    import dropless.checkpoint as checkpoint

    cfg = small_cfg(steps=2, ckpt_every=1, sample_tokens=0)
    train(cfg, progress=False)
    real, reads = checkpoint.load, []

    def pruned_during_the_first_read(path, model, optimizer=None):
        reads.append(path.name)
        if len(reads) == 1:   # the writer removes it as the reader opens its files
            shutil.rmtree(path)
            raise FileNotFoundError(2, "No such file or directory", str(path / "__0_0.distcp"))
        return real(path, model, optimizer)
    monkeypatch.setattr(checkpoint, "load", pruned_during_the_first_read)
    model, _, state = load_run(cfg.out)
    assert reads == ["step-00000002", "step-00000001"] and state["step"] == 1
    assert torch.isfinite(model.embed.weight).all()

    def damaged(path, model, optimizer=None):
        reads.append(path.name)
        raise DroplessError(f"{path}: damaged")
    monkeypatch.setattr(checkpoint, "load", damaged)
    reads.clear()
    with pytest.raises(DroplessError, match="damaged"):
        load_run(cfg.out)
    assert reads == ["step-00000001"]   # still there: no second read


def test_headers_of_a_run_in_training_give_way_to_the_newest_too(small_cfg, monkeypatch):
    """`dropless info` and the headers of generate / serve read only the newest checkpoint's
    state: pruned between finding it and reading it, the next newest is read; a damaged state
    that is still there is not retried."""
    import dropless.checkpoint as checkpoint
    from dropless.checkpoint import latest_state, model_config_of

    cfg = small_cfg(steps=3, ckpt_every=1, sample_tokens=0)
    train(cfg, progress=False)
    real, reads = checkpoint.read_state, []

    def pruned_as_it_is_read(path):
        reads.append(path.name)
        if path.name == "step-00000003":   # the writer removes it as the reader opens it
            shutil.rmtree(path)
            raise FileNotFoundError(2, "No such file or directory", str(path / "state.json"))
        return real(path)
    monkeypatch.setattr(checkpoint, "read_state", pruned_as_it_is_read)
    assert model_config_of(cfg.out)[1] == "run directory"
    assert reads == ["step-00000003", "step-00000002"]
    reads.clear()
    assert latest_state(cfg.out)["step"] == 2 and reads == ["step-00000002"]

    def damaged(path):
        reads.append(path.name)
        raise DroplessError(f"{path}: damaged")
    monkeypatch.setattr(checkpoint, "read_state", damaged)
    reads.clear()
    with pytest.raises(DroplessError, match="damaged"):
        model_config_of(cfg.out)
    assert reads == ["step-00000002"]


def test_random_kills_then_resume_is_bitwise(small_cfg, tmp_path):
    """SIGKILL `dropless train` at random moments (mid-step, mid-save, mid-eval, ...), restart it
    each time, then finish: the metrics and weights equal an uninterrupted run's, bitwise."""
    steps = 30
    straight = small_cfg(out=str(tmp_path / "straight"), steps=steps, ckpt_every=3,
                         eval_every=10, sample_tokens=0)
    train(straight, progress=False)
    cfg = replace(straight, out=str(tmp_path / "killed"))
    rng = random.Random(16)
    metrics = Path(cfg.out) / "metrics.jsonl"
    for _ in range(3):
        resume = ["--resume", cfg.out] if ckpt.latest(cfg.out) is not None else []
        if resume and read_state(latest_path(cfg.out))["step"] == steps:
            break   # a slow kill let the run finish
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = subprocess.Popen(_train_cmd(cfg, "--steps", str(steps), "--ckpt-every", "3",
                                           *resume),
                                env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        _wait_for_metrics(proc, Path(cfg.out), logged + 1)   # it made progress: now kill it
        time.sleep(rng.uniform(0, 0.6))
        proc.kill()
        proc.wait()
    if ckpt.latest(cfg.out) is not None:
        resumed, state = resume_config(cfg.out, {})
        assert train(resumed, state=state, progress=False)["finished"]
    else:
        train(cfg, progress=False)
    lines = [[{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
              for x in (Path(c.out) / "metrics.jsonl").read_text().splitlines()]
             for c in (straight, cfg)]
    assert lines[0] == lines[1] and len(lines[0]) == steps
    a, b = (load_run(c.out)[0].state_dict() for c in (straight, cfg))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_initialises_no_weights(small_cfg, tmp_path, monkeypatch):
    """The checkpoint fills every value, so resuming builds the model on the meta device and
    makes it uninitialised on its own (a 30B model's CPU init took minutes and 122 GB); the
    run then goes on from the saved weights (the bitwise test above: its trajectory)."""
    cfg = small_cfg(out=str(tmp_path / "run"), steps=2, ckpt_every=2, sample_tokens=0)
    train(cfg, progress=False)
    devices, real = [], Transformer.reset_parameters

    def record(self):
        devices.append(self.embed.weight.device.type)
        return real(self)
    monkeypatch.setattr(Transformer, "reset_parameters", record)
    resumed, state = resume_config(cfg.out, {"steps": 3})
    assert train(resumed, state=state, progress=False)["finished"]
    assert devices and set(devices) == {"meta"}   # every build: checks, and the model
    assert load_run(cfg.out)[2]["step"] == 3


def test_readme_says_which_flags_resume_lets_change_and_which_it_keeps():
    """The README said "only --steps and the cadence/device flags may change on resume": not
    --backend, --precision, --cache-dir, --sample-tokens or the parallel layout, which may, nor
    which flags must match. Its table now names each train flag in the row the code puts it in."""
    import re

    from dropless.checkpoint import RESUMABLE
    from dropless.cli_parser import TRAIN_FLAGS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {m[1]: set(re.findall(r"`--([a-z-]+)`", m[2])) for m in
            re.finditer(r"^\| (may change|must match)[^|]*\| (.*) \|$", readme, re.MULTILINE)}
    may = {d.replace("_", "-") for d in RESUMABLE if d != "out"} | {"no-compile"}
    assert rows["may change"] == may
    assert rows["must match"] == {d.replace("_", "-") for d in TRAIN_FLAGS if d not in RESUMABLE}


def test_a_run_loads_straight_into_the_dtype_asked_for(trained_run):
    """load_run(dtype=bf16) equals loading in fp32 and casting (the same rounding; a router
    bias, where there is one, stays fp32), keeps the tied embedding tied, and rebuilds the RoPE
    tables in fp32."""
    m32 = load_run(trained_run)[0]
    m16 = load_run(trained_run, "cpu", torch.bfloat16)[0]
    assert m16.lm_head.weight is m16.embed.weight and m32.lm_head.weight is m32.embed.weight
    s32, s16 = m32.state_dict(), m16.state_dict()
    assert s32.keys() == s16.keys()
    for k, v in s32.items():
        want = torch.float32 if k.endswith("router.bias") else torch.bfloat16
        assert s16[k].dtype == want, k
        assert torch.equal(s16[k], v.to(want)), k
    assert m16.rope_cos.dtype == torch.float32 and torch.equal(m16.rope_cos, m32.rope_cos)
