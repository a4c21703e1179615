"""Peak host memory of each rank of `dropless train --init SRC` on 2 ranks (CPU, gloo), against
one process. Since round 29 only rank 0 reads the source and builds the whole model; every rank
builds its model on the meta device, shards it, and receives its shards from rank 0. Before,
every rank read the whole source and built the whole model, then sharded it.

    python benchmarks/init_memory.py                          # preset small, ep=2 and dp_shard=2
    python benchmarks/init_memory.py --preset tiny --layouts ep --json out.json

The source is the preset's model with random weights, saved as a Hugging Face directory in bf16
(as Hub models are). Each run trains one step of batch 4 x 64 tokens. Per rank, resident memory
in MB of the whole process (torch itself takes a few hundred): when train() starts; once the
model is built and sharded, with the peak up to then (tokenizing the data may set it); the peak
after the step (AdamW's state is made there). Then the bytes of the parameters the rank holds
(its shards) against the whole model's fp32 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

LAYOUTS = {"one process": {}, "ep": {"ep": 2}, "dp_shard": {"dp_shard": 2}}


def _rank(rank: int, world: int, rdzv: str, cfg: dict, out: str) -> None:
    """One rank: join the group (none for one process), train, report."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from dropless import train as training
    from dropless.config import TrainConfig

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank,
                                world_size=world)
    held = {}
    build = training._build_model

    def measured(*args, **kwargs):   # the bytes of parameters this rank holds, once built
        model, opt = build(*args, **kwargs)
        held["bytes"] = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes
                            for p in model.parameters())
        held["built_mb"] = _rss_now_mb()
        held["built_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        return model, opt
    training._build_model = measured
    start = _rss_now_mb()
    training.train(TrainConfig(**cfg), progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "rss_start_mb": start, "rss_built_mb": held["built_mb"],
        "rss_built_peak_mb": held["built_peak_mb"],
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        "param_bytes": held["bytes"]}))


def _rss_now_mb() -> float:
    """This process's resident memory now (ru_maxrss is the peak so far)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _source(preset: str, path: Path) -> int:
    """The preset's model, random, saved in bf16 as a Hugging Face directory; its fp32 bytes."""
    from dropless.config import PRESETS
    from dropless.convert import save_hf_dir
    from dropless.model import Transformer
    from dropless.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = Transformer(PRESETS[preset])
    whole = sum(p.nbytes for p in model.parameters())
    save_hf_dir(model.to(torch.bfloat16), path, ByteTokenizer().to_json())
    return whole


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layouts", nargs="+", default=["ep", "dp_shard"],
                   choices=[k for k in LAYOUTS if k != "one process"])
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        whole = _source(args.preset, tmp / "src")
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        text = "".join((stdlib / name).read_text() for name in ("argparse.py", "textwrap.py"))
        (tmp / "data.txt").write_text(text)
        for name in ["one process", *args.layouts]:
            layout = LAYOUTS[name]
            world = max([1, *layout.values()])
            out = tmp / name.replace(" ", "_")
            out.mkdir()
            cfg = dict(out=str(out / "run"), init=str(tmp / "src"), data=str(tmp / "data.txt"),
                       cache_dir=str(tmp / "cache"), device="cpu", steps=1, batch_size=4,
                       seq_len=64, warmup=0, eval_every=1000, eval_batches=1,
                       sample_tokens=0, **layout)
            mp.start_processes(_rank, args=(world, str(out / "rdzv"), cfg, str(out)),
                               nprocs=world, join=True, start_method="spawn")
            for rank in range(world):
                r = json.loads((out / f"rank{rank}.json").read_text())
                rows.append({"layout": name, **r, "model_fp32_bytes": whole})
    print(f"preset {args.preset}: the whole model {whole / 1e6:.0f} MB in fp32, the source "
          f"{whole / 2e6:.0f} MB (bf16)\n")
    print("| layout | rank | RSS MB at the start | RSS MB, model built | peak MB to then | "
          "peak MB after the step | parameters held MB | of the whole |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['rank']} | {r['rss_start_mb']:.0f} | "
              f"{r['rss_built_mb']:.0f} | {r['rss_built_peak_mb']:.0f} | "
              f"{r['rss_peak_mb']:.0f} | "
              f"{r['param_bytes'] / 1e6:.0f} | {r['param_bytes'] / whole:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
