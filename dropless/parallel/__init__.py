"""Scale-out on torch.distributed, applied from outside the model: mesh, expert parallelism (an
all-to-all dispatcher), FSDP2/HSDP, distributed checkpoints. Importing sets nothing up."""

from dropless.parallel.mesh import ParallelConfig, build_mesh

__all__ = ["ParallelConfig", "build_mesh"]
