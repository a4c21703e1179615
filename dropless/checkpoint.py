"""Run directories: loading a trained (or converted, or quantized) run back for generation, and
ownership of a run directory. The checkpoint format itself is `dropless.parallel.checkpoint` (DCP).

Ownership: the process writing a run directory holds an exclusive lock on its `.lock` file (released
by the kernel when the process dies, however it dies); the file also marks the directory as a
dropless run, so a new run refuses a directory holding anything else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from dropless.config import ModelConfig, MoEConfig, TrainConfig
from dropless.errors import DroplessError
from dropless.files import need_dir
from dropless.model import Transformer
from dropless.parallel.checkpoint import STATE, latest, latest_path, load, read_state, verify
from dropless.tokenizer import tokenizer_from_json

LOCK = ".lock"


# flags a resumed run may change; every other one must match the checkpoint
RESUMABLE = ("out", "steps", "device", "backend", "precision", "eval_every", "eval_batches",
             "ckpt_every", "log_every", "compile", "cache_dir", "sample_tokens", "ep", "dp_shard",
             "dp_replicate")


def config_to_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)


def architecture(model_config: dict) -> dict:
    """A saved model config without the expert backend, which a resumed run may change."""
    return {**model_config, "moe": {**model_config["moe"], "backend": None}}


def _from_json(cls, d, where: str, **fixed):
    """cls(**d, **fixed) of a JSON object read from a file: every error (not an object, an unknown
    field, a value out of range or of the wrong type) is one line naming `where`."""
    if not isinstance(d, dict):
        raise DroplessError(f"{where}: must be a JSON object, not {type(d).__name__}")
    try:
        return cls(**{**d, **fixed})
    except (TypeError, ValueError) as e:
        raise DroplessError(f"{where}: {e}") from None


def config_from_dict(d: dict, where: str = "model_config") -> ModelConfig:
    """The ModelConfig `config_to_dict` saved, checked as any ModelConfig is (LIMITS included);
    fields it lacks (a run of an older dropless) take their defaults."""
    moe = isinstance(d, dict) and _from_json(MoEConfig, d.get("moe"), f"{where}.moe")
    return _from_json(ModelConfig, d, where, moe=moe)


def _saved_model(path: Path, state: dict):
    """-> (a function building the model that the checkpoint at `path` holds, its tokenizer), from
    its state.json: every value checked, and the checkpoint's shards found able to hold that model
    (on the meta device) before any of its memory exists; run directories come from strangers."""
    where = path / STATE
    cfg = config_from_dict(state.get("model_config"), f"{where}: model_config")
    try:
        tokenizer = tokenizer_from_json(state.get("tokenizer"))
    except (TypeError, ValueError) as e:
        raise DroplessError(f"{where}: tokenizer: {e}") from None
    if tokenizer.vocab_size > cfg.vocab_size:   # ids past the embedding
        raise DroplessError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                            f"only {cfg.vocab_size}: they do not belong together")
    qcfg = None
    if "quant" in state:
        from dropless.quant.modules import QuantConfig, check_quantizable, quantize_modules
        qcfg = _from_json(QuantConfig, state["quant"], f"{where}: quant")
        try:   # the packed modules need whole groups: refuse here, not as build()'s ValueError
            check_quantizable(cfg, qcfg)
        except ValueError as e:
            raise DroplessError(f"{where}: quant: {e}") from None

    def build() -> Transformer:
        model = Transformer(cfg)
        if qcfg is not None:
            quantize_modules(model, qcfg)
        return model
    with torch.device("meta"):
        model = build()
    verify(path, model, sizes_only=True)
    return build, tokenizer


def saved_train_config(state: dict) -> TrainConfig | None:
    """The TrainConfig of the run whose checkpoint `state` is (load_run's, resume_config's),
    checked as every TrainConfig is (its sizes bounded): how --resume, eval and quantize read it.
    None for a model without one (converted from Hugging Face)."""
    if "train_config" not in state:
        return None
    return _from_json(TrainConfig, state["train_config"], f"{state['path'] / STATE}: train_config")


READ_TRIES = 3   # reads of a run's newest checkpoint, when its writer prunes the one being read


def _read_newest(run_dir: str | Path, read):
    """read(saved state + its "path") of a run directory's newest checkpoint. A run in training
    prunes its old checkpoints as it saves (KEEP of them): when the one being read goes
    meanwhile, the read fails and the newest is read instead (up to READ_TRIES times); an error
    on a checkpoint that is still there is raised at once."""
    need_dir(run_dir)
    for tries_left in reversed(range(READ_TRIES)):
        path = latest_path(Path(run_dir))
        try:
            return read({**read_state(path), "path": path})
        except (OSError, DroplessError):
            if not tries_left or path.exists():
                raise


def _header(state: dict) -> tuple[dict, object]:   # (state, tokenizer), checked: no weight read
    return state, _saved_model(state["path"], state)[1]


def latest_state(run_dir: str | Path) -> dict:
    """The saved state (JSON) of a run directory's newest checkpoint, with its "path", checked
    as load_run checks it (model config, tokenizer, quantization; nothing allocated)."""
    return _read_newest(run_dir, _header)[0]


def load_run(run_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             matmul_dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer, saved state + its "path") of a run directory's newest
    checkpoint, written by any mesh (or by `dropless quantize`: packed int4 modules). The model
    is made on `device` in `dtype` (default: float32), its matmul weights (optim.matmul_weights)
    in `matmul_dtype` when given, with no values (meta, then to_empty), and the checkpoint loads
    straight into it: an fp32 checkpoint served in bf16 never exists in fp32 on the device or
    the host (a 30B model's would be 122 GB). A checkpoint pruned mid-read gives way to the
    newest (`_read_newest`)."""
    return _read_newest(run_dir, lambda state: _load_checkpoint(state, device, dtype,
                                                                matmul_dtype))


def _load_checkpoint(state: dict, device, dtype, matmul_dtype):
    from dropless.optim import matmul_weights

    path = state["path"]
    build, tokenizer = _saved_model(path, state)
    with torch.device("meta"):   # .to(dtype) keeps the router's bias fp32 and int4 scales fp16
        model = build() if dtype is None else build().to(dtype)
        for p in (matmul_weights(model).values() if matmul_dtype is not None else ()):
            p.data = p.data.to(matmul_dtype)
    model = model.to_empty(device=device)   # every value comes from the checkpoint (DCP: all)
    if model.cfg.tie_embeddings:   # to_empty off the meta device gives each name its own tensor
        model.lm_head.weight = model.embed.weight
    load(path, model)
    return model.eval(), tokenizer, state


def _hf_dir(path) -> bool:
    return (Path(path) / "config.json").is_file()


def model_dir_header(path: str | Path, need_tokenizer: bool = True
                     ) -> tuple[ModelConfig, object, bool]:
    """-> (model config, tokenizer, whether its weights are quantized) of what load_model_dir
    reads, checked as it checks them, without reading a weight. `quantized` is False for a
    Hugging Face directory: whether its AWQ tensors stay packed shows only as they are read.
    Without `need_tokenizer`, a HF directory with no tokenizer.json gives None for it."""
    if _hf_dir(path):
        from dropless.convert import hf_dir_header
        try:
            cfg, tok_json = hf_dir_header(path)
        except ValueError as e:
            raise DroplessError(str(e)) from None
        if tok_json is None and need_tokenizer:
            raise DroplessError(f"{path} has no tokenizer.json: cannot encode prompts")
        return cfg, tok_json and tokenizer_from_json(tok_json), False
    state, tokenizer = _read_newest(path, _header)
    return config_from_dict(state["model_config"]), tokenizer, "quant" in state


def model_config_of(path: str | Path) -> tuple[ModelConfig, str]:
    """-> (model config, what the directory is) of a run directory (its latest checkpoint) or a
    Hugging Face directory, tokenizer or not; no weight is read (`dropless info PATH`)."""
    cfg, _, quantized = model_dir_header(path, need_tokenizer=False)
    if _hf_dir(path):
        return cfg, "Hugging Face directory"
    quant = ", int4 AWQ weights (the sizes below are of float weights)" if quantized else ""
    return cfg, f"run directory{quant}"


def load_model_dir(path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                   matmul_dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer) of a run directory or a Hugging Face directory (one
    with a config.json), the model in `dtype` (its matmul weights in `matmul_dtype`) when given:
    what generate, serve and eval read."""
    if _hf_dir(path):
        from dropless.hf import from_hf
        tokenizer = model_dir_header(path)[1]
        try:
            model = from_hf(path, dtype or torch.float32, device, matmul_dtype)
        except ValueError as e:
            raise DroplessError(str(e)) from None
        return model.eval(), tokenizer
    return load_run(path, device, dtype, matmul_dtype)[:2]


def _open_lock(path: Path):
    """`path` opened for reading and writing, created if missing; never through a symbolic link
    (one to a user's file would have it truncated and overwritten with a PID) nor as anything but
    a regular file (a FIFO or device is no lock). O_NONBLOCK: opening a FIFO never waits."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:   # ELOOP: a symbolic link; EISDIR: a directory
        if e.errno not in (errno.ELOOP, errno.EISDIR):
            raise DroplessError(f"{path}: cannot open ({e.strerror})") from None
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise DroplessError(f"{path}: not a regular file; a run directory's lock must be its own "
                            "file (remove it if no dropless process uses the run)")
    return os.fdopen(fd, "r+")


def _lock_or_refuse(run_dir: Path, lock) -> None:
    """Take the run's lock, or refuse: another process holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise DroplessError(f"{run_dir} is in use by another dropless process (pid "
                            f"{lock.read().strip() or '?'}); wait for it to finish or "
                            "choose another --out") from None


def refuse_if_in_use(run_dir: Path) -> None:
    """Refuse a run that another process holds, before reading it: its writer prunes old
    checkpoints as it saves, so one could go mid-read. The lock is let go at once (the claim
    comes later, in `claim_run_dir`)."""
    if (Path(run_dir) / LOCK).is_file():
        with _open_lock(Path(run_dir) / LOCK) as lock:
            _lock_or_refuse(run_dir, lock)


@contextmanager
def claim_run_dir(run_dir: Path, new: bool):
    """Hold `run_dir` (created if missing) locked for this process while the block runs. A `new`
    run refuses a directory holding a run (pass --resume) or files that are not a dropless run's.
    A directory left holding only the lock (the run failed before writing) is removed again."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DroplessError(f"--out {run_dir} is a file, not a directory")
    created = not run_dir.exists()
    if new and not created and not (run_dir / LOCK).exists() and any(run_dir.iterdir()):
        raise DroplessError(f"--out {run_dir} is not empty and is not a dropless run: choose "
                            "an empty or new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with _open_lock(run_dir / LOCK) as lock:
        _lock_or_refuse(run_dir, lock)
        lock.truncate(0)   # at position 0: nothing was read
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            if new and latest(run_dir) is not None:
                raise DroplessError(f"{run_dir} already holds a run: pass --resume to continue "
                                    "it, or choose another --out")
            yield
        finally:
            if [p.name for p in run_dir.iterdir()] == [LOCK]:
                (run_dir / LOCK).unlink()
                if created:
                    run_dir.rmdir()


def _check_training_state(where: Path, state: dict) -> None:
    """What `train` restores on --resume besides the tensors, checked as read: a forged value is
    one line naming the file and the field, on every rank alike, before any process group."""
    def ints(v, n: int, high: int) -> bool:   # a list of n integers in [0, high]
        return isinstance(v, list) and len(v) == n and all(
            type(x) is int and 0 <= x <= high for x in v)

    cfg = config_from_dict(state["model_config"])   # checked by _saved_model
    L, E = cfg.num_layers - cfg.first_dense_layers, cfg.moe.num_experts
    data, rng, window = (state.get(k) if isinstance(state.get(k), dict) else {}
                         for k in ("data", "rng", "window"))
    loads = window.get("loads")
    for field, ok, allowed in (
            ("step", ints([state.get("step")], 1, 2**63 - 1), "an integer >= 0"),
            ("data.key", isinstance(data.get("key"), str), "a string"),
            ("rng.torch", ints(rng.get("torch"), torch.get_rng_state().numel(), 255),
             f"{torch.get_rng_state().numel()} bytes (torch.get_rng_state)"),
            # torch.cuda.get_rng_state(): a Philox seed and offset, 8 bytes each
            ("rng.cuda", rng.get("cuda") is None or ints(rng["cuda"], 16, 255),
             "null or 16 bytes"),
            *((f"window.{k}", type(window.get(k)) in (int, float), "a number")
              for k in ("loss", "aux")),
            ("window.steps", ints([window.get("steps")], 1, 2**63 - 1), "an integer >= 0"),
            ("window.recent", isinstance(window.get("recent", []), list)   # absent: older runs
             and all(type(x) in (int, float) for x in window.get("recent", [])),
             "a list of numbers (the last steps' losses)"),
            ("window.loads", isinstance(loads, list) and len(loads) == L
             and all(ints(row, E, 2**63 - 1) for row in loads),
             f"{L} lists (MoE layers) of {E} integers >= 0 (experts)")):
        if not ok:
            raise DroplessError(f"{where}: {field} is invalid: must be {allowed}")


def resume_config(run_dir: str | Path, overrides: dict) -> tuple[TrainConfig, dict]:
    """The saved run's config with `overrides` (flags given on the command line) applied, and the
    checkpoint. Overriding anything outside RESUMABLE is a config mismatch. The parallel layout
    given (ep, dp_shard, dp_replicate) is taken whole, the ones left out at their defaults (--dp-shard
    2 on a run trained with --ep 2 means FSDP over 2, not 2 x 2 ranks); none given keeps the run's
    ep and replicas, its FSDP degree being what the new world leaves of them."""
    layout = ("dp_replicate", "dp_shard", "ep")
    if any(k in overrides for k in layout):
        overrides = {**{k: getattr(TrainConfig, k) for k in layout}, **overrides}
    else:
        overrides = {**overrides, "dp_shard": 0}
    if latest(run_dir) is None and (Path(run_dir) / LOCK).is_file():   # a run, killed early
        raise DroplessError(f"{run_dir}: the run stopped before its first checkpoint (every "
                            "--ckpt-every steps): there is nothing to resume; start it again "
                            "with the same flags and --out, without --resume")
    path = latest_path(run_dir)
    state = {**read_state(path), "path": path}   # where _build_model loads the tensors from
    if "train_config" not in state:
        raise DroplessError(f"{run_dir} holds a model without training state (converted from "
                            "Hugging Face?): `dropless generate` can sample it, --resume cannot")
    if "quant" in state:   # it keeps the source's train_config (for eval), not its training state
        raise DroplessError(f"{run_dir} holds a quantized model (`dropless quantize`): `dropless "
                            "generate`, `eval` and `serve` read it, --resume cannot; resume the "
                            "run it was quantized from")
    _saved_model(path, state)   # what train rebuilds from the run's preset and tokenizer
    _check_training_state(path / STATE, state)
    saved_train_config(state)   # before it is compared
    saved = state["train_config"]
    clashes = [f"--{k.replace('_', '-')} {v} (the run used {saved[k]})"
               for k, v in overrides.items() if k not in RESUMABLE and saved.get(k) != v]
    if clashes:
        raise DroplessError("config mismatch on resume: " + "; ".join(clashes)
                            + "; leave these flags out to continue the run as it was")
    cfg = _from_json(TrainConfig, saved, "invalid training config",
                     **{**overrides, "out": str(run_dir)})
    if cfg.steps <= state["step"]:
        raise DroplessError(f"{run_dir}: the run already finished {state['step']} steps; "
                            f"pass --steps larger than {state['step']} to train further")
    return cfg, state
