"""What a Hugging Face directory's safetensors hold, checked before any weight is read: the
files an index names stay inside the directory, each name is stored once and where the index says,
and the names, shapes and dtypes match the layout expected from config.json."""

from __future__ import annotations

import os
from pathlib import Path

from dropless.files import read_small_json, resolves_inside

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")   # safetensors names; read and cast to the model dtype
_LIST = 12    # names shown per kind of problem in an error message


def _inside(root: Path, name, source: Path) -> Path:
    """root/name, refused unless it stays inside root with symlinks resolved (resolves_inside:
    a hub cache snapshot's links into its blobs/ are inside)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{source}: names {name!r}: weights must be files inside {root}")
    if not resolves_inside(root, root / name):
        raise ValueError(f"{source}: {name!r} resolves to {os.path.realpath(root / name)}, "
                         f"outside the model directory {root}")
    return root / name


def open_tensors(path: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """HF key -> (file, shape, dtype) from the index (sharded) or every *.safetensors (single)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        index_json = read_small_json(index, path)   # its errors name the file
        try:
            names = index_json["weight_map"].values()
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' object "
                             f"({type(err).__name__}: {err})") from None
        files = sorted({_inside(path, f, index) for f in names})
        mapped = {k: path / f for k, f in index_json["weight_map"].items()}
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{path}: shard files named in {index.name} are missing: {missing}")
    else:
        files = [_inside(path, f.name, f) for f in sorted(path.glob("*.safetensors"))]
        mapped = {}
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights found (torch .bin files are not read)")
    # safetensors opens a file to map it: a FIFO would block that open forever
    odd = [f.name for f in files if not f.is_file()]
    if odd:
        raise ValueError(f"{path}: weights {odd} are not a regular file (a FIFO, device or "
                         "directory is not read)")
    where, twice = {}, []
    for f in files:
        try:
            with safe_open(f, "pt") as handle:
                for k in handle.keys():
                    t = handle.get_slice(k)
                    if k in where:
                        twice.append(f"{k} (in {where[k][0].name} and {f.name})")
                    where[k] = (f, tuple(t.get_shape()), t.get_dtype())
        except Exception as err:   # safetensors raises its own error type for a bad header
            raise ValueError(f"{f}: not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from err
    # one name, one tensor, in the file the index names: else whichever file came last in sorted
    # order would be read, silently (transformers follows the index)
    misplaced = [f"{k} (in {where[k][0].name}, the index says {mapped[k].name})"
                 for k in mapped if k in where and where[k][0] != mapped[k]]
    problems = [f"{len(v)} {what}: {_short(v)}" for what, v in
                (("stored twice", twice), ("not where the index says", misplaced)) if v]
    if problems:
        raise ValueError(f"{path}: tensors are ambiguous:\n  " + "\n  ".join(problems))
    return where


def _short(names: list[str]) -> str:
    more = f" ... and {len(names) - _LIST} more" if len(names) > _LIST else ""
    return ", ".join(names[:_LIST]) + more


def check_tensors(path: Path, where, rows, ignore) -> None:
    expected = {r.hf_key: r.shape for r in rows}
    missing = [k for k in expected if k not in where]
    unexpected = sorted(k for k in where if k not in expected and not ignore(k))
    misshapen = [f"{where[k][0].name}: {k} {list(where[k][1])} (expected {list(s)})"
                 for k, s in expected.items() if k in where and where[k][1] != s]
    # a float weight typed as integers would otherwise be read as reinterpreted bits
    mistyped = [f"{where[k][0].name}: {k} is {where[k][2]} (allowed: {', '.join(FLOAT_DTYPES)})"
                for k in expected if k in where and where[k][2] not in FLOAT_DTYPES]
    problems = [f"{len(v)} {what}: {_short(v)}" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                 ("of the wrong dtype", mistyped)) if v]
    if problems:
        raise ValueError(f"{path}: weights do not match config.json:\n  " + "\n  ".join(problems))
