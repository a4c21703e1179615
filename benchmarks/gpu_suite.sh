#!/usr/bin/env bash
# The GPU suite and the product path in ONE call on a machine with 2 GPUs (nvidia-h200-x2): what CI
# cannot run. Logs and JSON go to $OUT (default /tmp/dropless-gpu). Every stage has a time limit so
# that the whole fits a 10-minute call; a stage cut short says so in its log.
# Measured 2026-11-30: the test stages need more than these limits gave them (tests/test_gpu.py
# alone ~4 min serially: a dozen `dropless train` processes; the NCCL EP test > 120 s): run them
# with pytest-xdist (`-n 4`, installed there) or in a call of their own.
#   bash benchmarks/gpu_suite.sh            (wheels for the server stack in .whl/, if any)
set -u
O=${OUT:-/tmp/dropless-gpu}
mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/sp"
# multicast stays off on shared NVLink hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sp .whl/*.whl \
    >/dev/null 2>&1 || echo "wheel install failed"
fi
stage() {   # stage LOG SECONDS command...: run with a limit, append to LOG
  local log=$1 limit=$2; shift 2
  echo "== $(date -u +%T) $* (limit ${limit}s)" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "== CUT at ${limit}s" >>"$log"
  echo "== rc $rc" >>"$log"
}
{ echo "commit $(cat .commit_under_test 2>/dev/null)"; date -u
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
} >"$O/env.log" 2>&1

# 1. two GPUs together: the NCCL suite at world 2, the expert-parallel benchmark at world 2 and 1
E="$O/ep.log"
stage "$E" 50 python3 -m pytest -q -m gpu tests/parallel -rs -p no:cacheprovider
for n in 2 1; do
  stage "$E" 30 torchrun --standalone --nproc-per-node $n benchmarks/expert_parallel.py --shapes olmoe,qwen3
done

# 2. one GPU each, side by side
(
  export CUDA_VISIBLE_DEVICES=0; L="$O/gpu0.log"
  stage "$L" 220 python3 -m pytest -q -n 5 -m gpu tests/test_gpu.py -p no:cacheprovider
  stage "$L" 100 python3 benchmarks/decode.py --json "$O/decode.json"
  stage "$L" 45 python3 benchmarks/awq.py
  stage "$L" 35 python3 benchmarks/train.py --profile "dropless bf16-mixed eager"
) &
(
  export CUDA_VISIBLE_DEVICES=1; L="$O/gpu1.log"
  stage "$L" 330 python3 benchmarks/moe_vs_dense.py --device cuda --out /tmp/moe_vs_dense ${MOE_VS_DENSE_ARGS:-} --json "$O/moe_vs_dense.json" --plot "$O/moe_vs_dense.png"
  stage "$L" 70 python3 -m pytest -q -n 4 -m gpu tests --ignore=tests/parallel --ignore=tests/test_gpu.py -p no:cacheprovider
  stage "$L" 50 python3 -m pytest -q -n 4 tests/test_ops_triton.py tests/test_ops_triton_gemv.py tests/test_ops_awq.py -p no:cacheprovider
) &
wait
echo "done $(date -u +%T)" >>"$O/env.log"
