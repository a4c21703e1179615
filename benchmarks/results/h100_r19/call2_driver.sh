#!/usr/bin/env bash
# round 19 device call 2 (untracked driver)
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/sp"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$O/env.log"
cat .commit_under_test >> "$O/env.log"
T="64,32,4,6 64,32,2,8 128,32,4,4 32,64,2,8 64,64,2,6 64,128,1,6 32,128,1,8 128,64,2,4"
cd benchmarks
for u in nibble interleave; do
  timeout 100 python3 gemv_tiles.py --shapes qwen3 --tokens 1 --kinds int4 --unpack $u --tiles $T >> "$O/gemv_int4.log" 2>&1
done
timeout 80 python3 awq.py --shapes qwen3,mixtral > "$O/awq.log" 2>&1
timeout 90 python3 decode_kernels.py --preset qwen3-30b-a3b --int4 --batches 1 > "$O/decode_kernels_int4.log" 2>&1
timeout 60 python3 decode_kernels.py --preset qwen3-30b-a3b --batches 1 > "$O/decode_kernels_bf16.log" 2>&1
timeout 200 python3 awq_model.py --big qwen3-30b-a3b --rtn --json "$O/awq_30b_rtn.json" > "$O/awq_30b_rtn.log" 2>&1
echo "rc $?" >> "$O/awq_30b_rtn.log"
cd ..
timeout 150 python3 -m pytest -q -n 8 tests/test_ops_awq.py tests/test_serve_decode.py tests/test_quant.py tests/test_ops_triton_gemv.py -p no:cacheprovider -rf > "$O/tests.log" 2>&1
echo "rc $?" >> "$O/tests.log"
