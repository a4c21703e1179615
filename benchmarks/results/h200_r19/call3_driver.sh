#!/usr/bin/env bash
# round 19 device call 3 (untracked driver): loop pipelining stages and programmatic dependent
# launch measured; what pays (>= 3% / 2%) exported; then the gpu-marked suite and the 30B decode
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/sp"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .commit_under_test; date -u; } > "$O/env.log"
cd benchmarks
timeout 60 python3 gemv_tiles.py --shapes qwen3 --tokens 1 --tiles 32,32,4,4 128,32,4,4 --stages 1 2 3 > "$O/stages_gemv.log" 2>&1
for st in 1 3; do DROPLESS_GEMV_STAGES=linear=$st timeout 30 python3 decode_linear.py --shapes qwen3 --tokens 1 > "$O/stages_linear_$st.log" 2>&1; done
CHOSEN=$(python3 - "$O" <<'PY'
import sys
o = sys.argv[1]
t = {}
for line in open(f"{o}/stages_gemv.log"):
    f = line.split()
    if len(f) == 11 and f[0] == "qwen3" and f[2] in ("plain", "int4"):
        tile = tuple(f[3:7])
        if (f[2] == "plain") == (tile == ("32", "32", "4", "4")):
            t.setdefault(f[2], {})[int(f[7])] = float(f[8])
for st in (1, 3):
    try:
        us = sum(float(f[4]) for f in map(str.split, open(f"{o}/stages_linear_{st}.log"))
                 if len(f) >= 5 and f[0] == "qwen3" and f[1] == "1")
        if us > 0:
            t.setdefault("linear", {})[st] = us
    except (OSError, ValueError):
        pass
out = [f"{k}={min(by, key=by.get)}" for k, by in t.items()
       if 1 in by and by[min(by, key=by.get)] < 0.97 * by[1]]
print(",".join(out))
PY
)
export DROPLESS_GEMV_STAGES="$CHOSEN"
timeout 90 python3 - "$O" > "$O/pdl_ab.log" 2>&1 <<'PY'
import json, os, statistics, sys, torch
from decode import build, prompts_for, time_engine
from dropless.serve.engine import Engine
model = build("medium", "cuda", torch.bfloat16)
res = {}
for rep in range(3):
    for pdl in ("0", "1"):
        os.environ["DROPLESS_PDL"] = pdl
        for b in (1, 8):
            e = Engine(model, max_batch=b, max_len=160, buckets=(b,))
            dt = time_engine(e, prompts_for(b, 32, model.cfg.vocab_size, seed=b), 128, "cuda")
            res.setdefault(f"pdl{pdl}_bs{b}", []).append(b * 128 / dt)
            e = None
    print(rep, {k: round(statistics.median(v), 1) for k, v in res.items()}, flush=True)
med = {k: statistics.median(v) for k, v in res.items()}
ok = med["pdl1_bs1"] > 1.02 * med["pdl0_bs1"] and med["pdl1_bs8"] > 0.99 * med["pdl0_bs8"]
print("medium tokens/s (median of 3):", json.dumps(med), "PDL pays:", ok)
open(sys.argv[1] + "/pdl_choice", "w").write("1" if ok else "0")
PY
export DROPLESS_PDL=$(cat "$O/pdl_choice" 2>/dev/null || echo 0)
echo "chosen: DROPLESS_GEMV_STAGES='$DROPLESS_GEMV_STAGES' DROPLESS_PDL=$DROPLESS_PDL $(date -u +%T)" | tee -a "$O/env.log"
cd ..
timeout 320 python3 -m pytest -q -n 12 -m gpu tests -p no:cacheprovider -rf --ignore=tests/parallel > "$O/tests.log" 2>&1
echo "rc $? $(date -u +%T)" >> "$O/tests.log"
cd benchmarks
timeout 130 python3 awq_model.py --big qwen3-30b-a3b --rtn --json "$O/awq_30b_rtn.json" > "$O/awq_30b_rtn.log" 2>&1
echo "rc $? $(date -u +%T)" >> "$O/awq_30b_rtn.log"
