import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import sysconfig
from pathlib import Path

import pytest
import torch

from dropless.config import TrainConfig
from dropless.ops import moe_loop

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def oracle(moe, x, grad_out):
    """Float64 copy of the layer computed with the expert loop (ops.reference.moe_loop).

    Returns (y, grads by parameter name, grad of x, routing) for a loss sum(y * grad_out) + losses."""
    m64 = copy.deepcopy(moe).double()
    x64 = x.detach().double().requires_grad_(True)
    x_TD = x64.reshape(-1, x64.shape[-1])
    route = m64.router(x_TD)
    ids = route.expert_ids_TK
    cap = m64.dispatcher.capacity(*ids.shape)
    if cap is not None:   # drop past-capacity assignments in token order
        seen = [0] * m64.cfg.num_experts
        ids = ids.clone()
        for t in range(ids.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                seen[e] += 1
                if seen[e] > cap:
                    ids[t, k] = -1
    y = moe_loop(x_TD, route.weights_TK, ids, m64.experts.gate_up, m64.experts.down)
    if m64.shared is not None:
        s = m64.shared(x_TD)
        if m64.shared_gate is not None:
            s = s * torch.sigmoid(m64.shared_gate(x_TD))
        y = y + s
    y = y.view(x64.shape)
    ((y * grad_out.double()).sum() + route.balance_loss + route.z_loss).backward()
    grads = {n: p.grad for n, p in m64.named_parameters()}
    return y, grads, x64.grad, ids


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The models here are tiny: one thread avoids OpenMP spin-waits on a busy 2-core machine
    (subprocesses get OMP_NUM_THREADS=1 through `subprocess_env`)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def scratch_dirs(tmp_path_factory):
    """What commands write by default goes under pytest's own temporary directory, which pytest
    removes once every test has passed (pyproject: tmp_path_retention_policy), not the user's
    home or /tmp: token caches (eval, quantize: ~/.cache/dropless/tokens, through XDG_CACHE_HOME),
    temporary files and directories (TMPDIR; torch.compile's cache sits in one) and those of
    subprocesses, which inherit both."""
    scratch = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        mp.setenv("TMPDIR", str(scratch))
        mp.setattr(tempfile, "tempdir", str(scratch))
        yield


def forge(step_dir: Path, name: str, raw: bytes) -> None:
    """An attacker's edit of a checkpoint: replace a file and fix its checksum in the manifest."""
    (step_dir / name).write_bytes(raw)
    manifest = json.loads((step_dir / "COMPLETE").read_text())
    manifest["sha256"][name] = hashlib.sha256(raw).hexdigest()
    (step_dir / "COMPLETE").write_text(json.dumps(manifest))


def subprocess_env() -> dict:
    repo = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


def run_out_of_space(setup: str, act: str, *argv, limit: int) -> int:
    """Python `setup`, then `act` with no file allowed past `limit` bytes (a disk that fills),
    in a fresh interpreter (argv in sys.argv[1:]); its exit code: 3 when `act` raised OSError."""
    script = (f"import resource, signal, sys\n{setup}\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
              f"try:\n    {act}\nexcept OSError:\n    sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", script, *map(str, argv)], env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode


def hub_cache_snapshot(src: Path, repo: Path) -> Path:
    """The files of the model directory `src` laid out as the HF hub cache keeps them:
    repo/snapshots/<rev>/* are symlinks into repo/blobs/; -> the snapshot directory."""
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    return snapshot


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~250 KB of Python source in a few files: a quick stand-in for the full stdlib corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "dataclasses.py", "textwrap.py", "shlex.py", "fnmatch.py",
                 "glob.py", "heapq.py", "bisect.py", "string.py", "colorsys.py"):
        (folder / name).write_text((root / name).read_text())
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus) -> Path:
    """A finished run of `tiny` (2 steps, with a sample) that the command-line tests read and
    convert; a test that changes a run copies it first."""
    from dropless import cli
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(out), "--cache-dir",
                     str(root / "cache"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                     "--sample-tokens", "4", "--quiet"]) == 0
    return out


@pytest.fixture
def small_cfg(tmp_path, corpus):
    """A TrainConfig for fast CPU tests: the tiny preset on short sequences and small batches."""
    def make(**kw) -> TrainConfig:
        base = dict(out=str(tmp_path / "run"), data=str(corpus), cache_dir=str(tmp_path / "cache"),
                    steps=6, batch_size=4, seq_len=32, warmup=2, eval_every=3, eval_batches=1,
                    ckpt_every=100, log_every=1, sample_tokens=8)
        return TrainConfig(**{**base, **kw})
    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (run on the device, "
                            "`pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu-marked)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def fresh_counters(monkeypatch) -> None:
    """No arrival counters yet (dropless.ops.device.counters), for this test only: so that
    counters_at_rest says whether THIS test used them."""
    from dropless.ops import device
    monkeypatch.setattr(device, "_counters", {})


def counters_at_rest() -> bool:
    """The decode kernels' arrival counters (dropless.ops.device.counters) were used (since
    fresh_counters) and are all back at zero: the last program to arrive rearms its own."""
    from dropless.ops import device
    return bool(device._counters) and all(int(buf.count_nonzero()) == 0
                                          for kept in device._counters.values() for buf in kept)
