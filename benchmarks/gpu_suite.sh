#!/usr/bin/env bash
# What CI cannot run, on one GPU (nvidia-h200), in named stages that each fit a 10-minute device
# call with the others left out. Logs and JSON go to $OUT (default /tmp/dropless-gpu); every stage
# has a time limit, and a stage cut short says so in its log.
#   bash benchmarks/gpu_suite.sh tests train layer       # one call
#   bash benchmarks/gpu_suite.sh decode product          # the next
# Stages:
#   tests    every gpu-marked test and the Triton kernel tests (pytest-xdist, 12 workers): the
#            stages gpu and kernels
#   train    benchmarks/train.py: dropless vs Hugging Face training step, both precision regimes
#   profile  where the compiled training steps (bf16-mixed, bf16) spend their GPU and host time
#   ab       profile (GPU kernels, host, wall time) of the compiled steps as one graph, then broken
#            once per MoE layer (round 7's question: the broken build timed 12 ms faster)
#   layer    benchmarks/moe_layer.py --check: the expert backends at the three anchor shapes
#   layerprof  the CUDA kernels of one fwd+bwd of grouped_mm, grouped_fused (`auto`) and dense at
#            OLMoE and Qwen3 (moe_layer.py --profile): where issue 10's remaining gap is
#   dispatch benchmarks/dispatch_ops.py: the plan's sort keys and the dispatch gather, op by op
#            and in the layer's fwd+bwd against the code before them (OLMoE, Qwen3; ~2 minutes)
#   serve    the serving tests (engine, decode step, server, logprobs, penalties, echo, n; gpu-marked
#            and not) and the
#            decode kernels
#            tests: the inference path alone
#   decode   benchmarks/decode.py (medium with HF and the server; the Qwen3-30B-A3B shape; medium
#            with a served cache of 4096 positions, with and without context buckets)
#   decode30 benchmarks/decode.py at the Qwen3-30B-A3B shape alone, batch 1 (~2 minutes)
#   prefill  the server alone at 8 and 32 clients with recompilations logged (TORCH_LOGS), its
#            event loop gated by the prefills and not, then benchmarks/prefill.py (the engine's
#            prefill by row count, eager and compiled): why round 36's 32-client TTFT spent
#            232 ms in two prefills (~6 minutes)
#   attn     benchmarks/decode_attention.py: SDPA vs the split-KV decode attention kernel, graphed
#   gemv     benchmarks/gemv_tiles.py: the decode experts' GEMV tiles swept, bf16 and int4 at batch 1
#   decodec  decode kernels per layer, the router's torch ops vs its kernels (benchmarks/router.py),
#            benchmarks/decode.py with compiled decode steps (medium)
#   product  `dropless train --preset medium --tokenizer bpe --vocab 32768` as a user runs it
#   awq      benchmarks/awq.py
#   awqmodel benchmarks/awq_model.py: int4 perplexity of a GPU-trained small run; quantization
#            time and batch-1 decode (bf16 vs int4) at the Qwen3-30B-A3B shape
#   moe      benchmarks/moe_vs_dense.py on a site-packages corpus
#   fusiontests  the serving and kernel tests (gpu-marked and not) with DROPLESS_DECODE_FUSION=1
#   fusiongemv  the experts' GEMVs at the Qwen3-30B-A3B shape (5 tiles, 4 and 8 warps) against a
#            streaming read of the same bytes (gemv_tiles.py's floor row)
#   fusion   DROPLESS_DECODE_FUSION off against on: decode kernels per layer at the Qwen3-30B-A3B
#            shape (bf16, int4) both ways; medium at batch 1 and 32 both ways (~4 minutes)
#   fusion30 the 30B's batch-1 decode, bf16 and int4, DROPLESS_DECODE_FUSION off and on
#            alternating, median of 3 (awq_model.py --ab; ~4 minutes)
#   awqtiles the grouped int4 kernel's tile swept at 64 tokens (benchmarks/awq.py --tiles)
#   kmajor   the k-major decode experts: their tests and the serving tests, the 30B's batch-1
#            decode (k-major against the training layout), their GEMVs against the training
#            layout's (~6 minutes)
#   switches the tests of the projection and router kernels and of the decode step (PDL, preload),
#            then benchmarks/decode_switches.py: batch-1 decode of the 30B shape and of medium
#            as default (PDL on), without PDL, with the weights' first step preloaded, with the
#            decode fusion
#            (~6 minutes)
#   sites    the decode fusion's sites one at a time (DROPLESS_DECODE_FUSION=SITE) and attention in
#            one split up to 512 keys, batch-1 decode of the 30B shape in bf16 and int4 (~9
#            minutes)
#   logprobs benchmarks/logprobs.py: a decode step with and without log-probabilities (medium at
#            batch 1 and 32, the Qwen3-30B-A3B shape at batch 1)
#   packed   the int4 tests (the grouped kernel's packed-order dequantization included), then
#            benchmarks/awq.py at 64 tokens with DROPLESS_AWQ_GROUPED_PACKED 1, small and 0
#            alternating in one process, and Mixtral's tiles with it on (~6 minutes)
#   int4tests  the int4 tests of packed alone (~1-2 minutes)
#   trainlowmem  benchmarks/train.py's dropless bf16-mixed rows (eager, compiled) with the experts
#            on grouped and on grouped_lowmem, side by side: whether `auto` may take grouped_lowmem
#            (~4 minutes)
#   int4layout  benchmarks/gemv_int4_layout.py: the int4 decode experts on AutoAWQ's packing
#            against a k-major repacking (tiles swept) and the bf16 k-major experts, batch 1
# The caller writes the commit into .commit_under_test with the hash spelled out in the command
# (`echo 1a2b3c4 > .commit_under_test`): the device's copy of .git can be stale, and
# `git rev-parse` there named an older commit than the tree it ran (round 13).
# All logs also land in $O/all.tgz (the device returns at most 8 files).
# Wheels for the server stack (fastapi, uvicorn, openai, ...: benchmarks/device-wheels.txt says how
# to fetch them) in .whl/ are installed first, if any.
set -u
O=${OUT:-/tmp/dropless-gpu}
mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/sp"
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
} >>"$O/env.log" 2>&1

for s in "$@"; do
  L="$O/$s.log"
  case $s in
    tests|gpu) stage "$L" 400 python3 -m pytest -q -n 12 -m gpu tests -p no:cacheprovider -rf \
                 --ignore=tests/parallel ;;&
    tests|kernels)
           stage "$L" 240 python3 -m pytest -q -n 12 tests/test_ops_triton.py tests/test_ops_triton_gemv.py tests/test_ops_triton_kmajor.py \
             tests/test_ops_triton_rope.py tests/test_ops_triton_router.py tests/test_ops_awq.py \
             tests/test_ops_blocksparse.py tests/test_master_adamw.py tests/test_ops_triton_attention.py \
             tests/test_ops_triton_linear.py -p no:cacheprovider -rf ;;
    gpu) ;;
    train) stage "$L" 300 python3 benchmarks/train.py --json "$O/train.json" ;;
    ab)    stage "$L" 170 python3 benchmarks/train.py \
             --profile "dropless bf16-mixed compiled,dropless bf16 compiled"
           stage "$L" 170 python3 benchmarks/train.py --graph-breaks \
             --profile "dropless bf16-mixed compiled,dropless bf16 compiled" ;;
    profile) stage "$L" 170 python3 benchmarks/train.py \
               --profile "dropless bf16-mixed compiled,dropless bf16 compiled" ;;
    layer) stage "$L" 90 python3 benchmarks/moe_layer.py --check --shapes mixtral,olmoe,qwen3 \
             --providers grouped_mm,grouped_fused ;;
    layerprof) stage "$L" 120 python3 benchmarks/moe_layer.py --profile --shapes olmoe,qwen3 \
                 --providers grouped_mm,grouped_fused ;;
    dispatch) stage "$L" 180 python3 benchmarks/dispatch_ops.py ;;
    serve) stage "$L" 420 python3 -m pytest -q -n 8 tests/test_serve_engine.py tests/test_serve_decode.py \
             tests/test_serve_server.py tests/test_serve_engine_logprobs.py tests/test_serve_logprobs.py \
             tests/test_serve_penalties.py tests/test_serve_echo.py tests/test_serve_choices.py \
             tests/test_ops_triton_rope.py tests/test_ops_triton_gemv.py tests/test_ops_triton_kmajor.py \
             tests/test_ops_triton_attention.py tests/test_ops_triton_router.py -p no:cacheprovider -rf ;;
    decode) stage "$L" 240 python3 benchmarks/decode.py --preset medium --batches 1 32 --clients 1 8 32 \
              --admit-delay-ms 2 --serve-compile-prefill --prefill-step-tokens 1024 \
              --json "$O/decode_medium.json"
            stage "$L" 150 python3 benchmarks/decode.py --preset qwen3-30b-a3b --batches 1 --no-hf \
              --no-server --json "$O/decode_qwen3.json"
            stage "$L" 120 python3 benchmarks/decode.py --preset medium --batches 1 32 --no-hf \
              --no-server --context 4096 --json "$O/decode_medium_4096.json" ;;
    attn) stage "$L" 120 python3 benchmarks/decode_attention.py ;;
    gemv) stage "$L" 420 python3 benchmarks/gemv_tiles.py --shapes qwen3 medium --tokens 1 ;;
    decodec) stage "$L" 60 python3 benchmarks/decode_kernels.py --preset medium --batches 1 32 --top 25
             stage "$L" 60 python3 benchmarks/router.py --preset qwen3-30b-a3b
             stage "$L" 120 python3 benchmarks/decode.py --preset medium --batches 1 32 --no-hf --no-server \
               --compile --json "$O/decode_medium_compiled.json" ;;
    prefill) TORCH_LOGS=recompiles stage "$L" 270 python3 benchmarks/decode.py --preset medium \
               --batches 32 --clients 8 32 --admit-delay-ms 2 --serve-compile-prefill --no-hf \
               --ungated --json "$O/decode_prefill.json"
             stage "$L" 200 python3 benchmarks/prefill.py ;;
    decode30) stage "$L" 150 python3 benchmarks/decode.py --preset qwen3-30b-a3b --batches 1 --no-hf \
              --no-server --json "$O/decode_qwen3.json" ;;
    decode30c) stage "$L" 240 python3 benchmarks/decode.py --preset qwen3-30b-a3b --batches 1 --no-hf \
              --no-server --compile --json "$O/decode_qwen3_compiled.json" ;;
    product) stage "$L" 300 python3 -m dropless train --preset medium --tokenizer bpe --vocab 32768 \
               --steps 150 --eval-every 150 --ckpt-every 150 --out /tmp/medium-run --sample-tokens 40 ;;
    awq) stage "$L" 120 python3 benchmarks/awq.py ;;
    awqmodel) stage "$L" 240 python3 benchmarks/awq_model.py --train small --train-steps 600 \
                --json "$O/awq_small.json"
              stage "$L" 330 python3 benchmarks/awq_model.py --big qwen3-30b-a3b --json "$O/awq_30b.json" ;;
    # tiny at ~340 training tokens per dense parameter (210 M byte tokens per model, 0.7 epochs):
    # the MoE pulls ahead once the dense model is capacity-bound (round 10's CPU study; round 11:
    # at 84 tokens per parameter 16 experts needed 0.60x the tokens, at 340 0.47x). Batches of
    # 131k tokens: at 33k a tiny step is host-bound (~2 ms of kernels in 11 ms), which hides the
    # FLOPs the comparison is about. About 3.5 minutes; MOE_VS_DENSE_ARGS replaces these
    moe) stage "$L" 540 python3 benchmarks/moe_vs_dense.py --device cuda --out /tmp/moe_vs_dense \
           --site-packages-mb 300 ${MOE_VS_DENSE_ARGS:---preset tiny --tokenizer bytes --batch-size 512 \
           --seq-len 256 --steps 1600 --lr 3e-3 --eval-batches 8 --compile} --json "$O/moe_vs_dense.json" \
           --plot "$O/moe_vs_dense.png" ;;
    fusiontests) DROPLESS_DECODE_FUSION=1 stage "$L" 300 python3 -m pytest -q -n 12 \
                   tests/test_serve_decode.py tests/test_serve_engine.py tests/test_ops_triton_rope.py \
                   tests/test_ops_triton_gemv.py tests/test_ops_triton_kmajor.py tests/test_ops_triton_attention.py \
                   tests/test_ops_triton_router.py tests/test_ops_awq.py tests/test_ops_triton_linear.py \
                   -p no:cacheprovider -rf ;;
    fusiongemv) stage "$L" 150 python3 benchmarks/gemv_tiles.py --shapes qwen3 --tokens 1 \
                  --tiles 32,32,4,4 32,32,4,8 32,32,8,8 128,32,4,4 256,16,4,4 --warps 4 8 ;;
    fusion) for f in 0 1; do
              DROPLESS_DECODE_FUSION=$f stage "$L" 60 python3 benchmarks/decode_kernels.py \
                --preset qwen3-30b-a3b --batches 1
              DROPLESS_DECODE_FUSION=$f stage "$L" 60 python3 benchmarks/decode_kernels.py \
                --preset qwen3-30b-a3b --batches 1 --int4
            done
            for f in 0 1; do
              DROPLESS_DECODE_FUSION=$f stage "$L" 90 python3 benchmarks/decode.py --preset medium \
                --batches 1 32 --no-hf --no-server --json "$O/fusion_medium_$f.json"
            done ;;
    fusion30) stage "$L" 420 python3 benchmarks/awq_model.py --big qwen3-30b-a3b --rtn \
                --ab DROPLESS_DECODE_FUSION --reps 3 --json "$O/fusion_30b.json" ;;
    awqtiles) stage "$L" 240 python3 benchmarks/awq.py --shapes qwen3,mixtral --tokens 64 --tiles \
                16,64,64,4,3 16,128,64,4,3 16,64,128,4,3 32,64,64,8,3 32,128,64,8,3 32,64,64,4,3 \
                32,64,64,8,1 32,64,64,8,4 64,64,64,4,3 64,128,64,8,3 64,64,128,8,3 ;;
    kmajor) stage "$L" 150 python3 -m pytest -q -n 8 tests/test_ops_triton_kmajor.py \
              tests/test_ops_triton_gemv.py tests/test_serve_server.py tests/test_serve_engine.py \
              -p no:cacheprovider -rf
            stage "$L" 150 python3 benchmarks/decode.py --preset qwen3-30b-a3b --batches 1 --no-hf \
              --no-server --json "$O/decode_qwen3_kmajor.json"
            stage "$L" 60 python3 benchmarks/gemv_layout.py --gate-up 1,1024,4 --down 1,256,2 1,256,1 ;;
    switches) stage "$L" 150 python3 -m pytest -q -n 8 tests/test_ops_triton_linear.py \
                tests/test_ops_triton_router.py tests/test_serve_decode.py -p no:cacheprovider -rf
              stage "$L" 300 python3 benchmarks/decode_switches.py --preset qwen3-30b-a3b --configs \
                "" DROPLESS_PDL=0 DROPLESS_PDL_PRELOAD=1 DROPLESS_DECODE_FUSION=1
              stage "$L" 90 python3 benchmarks/decode_switches.py --preset medium --configs \
                "" DROPLESS_PDL=0 DROPLESS_PDL_PRELOAD=1 DROPLESS_DECODE_FUSION=1 ;;
    sites) for q in "" --int4; do
             stage "$L" 280 python3 benchmarks/decode_switches.py --preset qwen3-30b-a3b $q --reps 2 \
               --json "$O/sites${q:+_int4}.json" --configs \
               "" DROPLESS_DECODE_FUSION=topk DROPLESS_DECODE_FUSION=combine \
               DROPLESS_DECODE_FUSION=prefetch DROPLESS_DECODE_FUSION=sum DROPLESS_DECODE_FUSION=norm \
               DROPLESS_DECODE_ATTN_ONE_SPLIT=512
           done ;;
    logprobs) stage "$L" 120 python3 benchmarks/logprobs.py --preset medium --batches 1 32
              stage "$L" 150 python3 benchmarks/logprobs.py --preset qwen3-30b-a3b --batches 1 ;;
    packed|int4tests) stage "$L" 150 python3 -m pytest -q -n 12 tests/test_ops_awq.py tests/test_quant.py \
              -p no:cacheprovider -rf ;;&   # the default, and =1 and =small in test_other_unpackings
    int4tests) ;;
    packed)
            # one process, alternating: the first spec compiles cold (round 26: cut at 50 s)
            stage "$L" 240 python3 benchmarks/awq.py --tokens 64 --tiles packed=1 packed=small \
              packed=0 packed=1 packed=small packed=0
            stage "$L" 150 python3 benchmarks/awq.py --shapes mixtral --tokens 64 --tiles default \
              64,64,64,4,3:packed=1 32,64,64,4,3:packed=1 64,128,64,8,3:packed=1 \
              64,64,128,4,3:packed=1 32,128,64,4,3:packed=1 ;;
    int4layout) stage "$L" 180 python3 benchmarks/gemv_int4_layout.py ;;
    trainlowmem) stage "$L" 300 python3 benchmarks/train.py --backends grouped,grouped_lowmem \
             --providers "dropless bf16-mixed eager,dropless bf16-mixed compiled" \
             --json "$O/train_lowmem.json" ;;
    *) echo "unknown stage $s" >>"$L" ;;
  esac
done
echo "done $(date -u +%T)" >>"$O/env.log"
# the device tool brings back at most 8 files from $OUT (round 19 lost a ninth, the tests' log):
# everything again as one archive
tar czf "/tmp/dropless-gpu-all.tgz" -C "$O" . && mv /tmp/dropless-gpu-all.tgz "$O/all.tgz"
