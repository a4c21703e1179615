"""The benchmark scripts as a user runs them (`python benchmarks/X.py ...`, from benchmarks/ where
they import their siblings), at the smallest settings that still take the code paths of their GPU
run that a CPU can: a script that breaks fails here, not on a rented GPU. Each test reads what the
script printed (or its --json): every row there, numbers finite and positive, and its correctness
columns within tolerance (the scripts catch a failing provider and go on, so their exit status
alone says little). No timing bounds but those the scripts' own invariants set.

The Triton kernels' scripts, under the interpreter: tests/test_benchmarks_kernels.py.

Left out:
- GPU-only: gemv_tiles.py (the Triton driver), train_scaling.py (several GPUs), train.py (CUDA
  events, exits without CUDA: its medium-preset step is what it measures).
- gemv_layout.py: its smoke command (TRITON_INTERPRET=1, --shapes cpu) runs past 5 minutes. It
  has no --check-only: it times every provider, 6 x 24 calls each, and one interpreted call of
  `current` takes ~0.35 s (~50 s), before 16 k-major tiles; with one tile, ~65 s in all. Its
  kernels are tested in tests/test_ops_triton_kmajor.py.
- awq.py: bf16 throughout, and on the CPU it runs only under TRITON_INTERPRET=1 (its "bf16
  decode" row calls the Triton GEMV): ~15 s for one token count, and the interpreter's bf16 is
  wrong (tests/triton_env.py), its check column ~1e11 from 16 tokens up. Its kernels are tested
  in tests/test_ops_awq.py.
- decode.py's --compile and --serve-compile-prefill: torch.compile of the decode step and of the
  prefill, tens of seconds on the CPU (the engine's compiled prefill: tests/test_serve_engine.py).
"""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env
from dropless import ModelConfig, MoEConfig, Transformer
from dropless.checkpoint import config_to_dict
from dropless.config import TrainConfig
from dropless.parallel.checkpoint import save
from dropless.tokenizer import ENCODE_CHUNK_CHARS, ByteTokenizer

pytest.importorskip("fastapi")
pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args, env: dict | None = None) -> str:
    """`python script *args` in benchmarks/ (script may be "-m" and a module), with `env` over
    the test environment: its stdout (its stderr on failure)."""
    # as a user runs them: without the Triton interpreter that the kernel tests switch on for the
    # session unless `env` asks for it (scripts add Triton providers under it, and its int4
    # kernels take minutes)
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"} | (env or {})
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=BENCHMARKS, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def positive(*values) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def table(out: str, header: str) -> list[list[str]]:
    """The whitespace-split rows under the line that starts with `header`, up to a blank line."""
    lines = out[out.index(header):].splitlines()[1:]
    return [line.split() for line in lines[:lines.index("") if "" in lines else None]]


# ---- decode.py --------------------------------------------------------------------------------

NEW, BATCHES, CLIENTS = 16, (1, 32), (1, 4)


def check_engine_rows(res: dict, variants: list[str], out: str) -> None:
    """Every variant at every batch ran; all decode the same greedy tokens (same fp32 weights);
    the table lists each row."""
    printed = {row[0] for row in table(out, "tiny on cpu")}
    for b in BATCHES:
        # prompts of b * 32 tokens over the engine's 128 take the blocks' path anyway: no row
        names = [v for v in variants if v != "engine_blocks_prefill" or b * 32 <= 128]
        rows = [res[f"{v}_bs{b}"] for v in names]
        assert all("error" not in r for r in rows), rows
        assert all(positive(r["tokens_per_s"], r["ms_per_step"], r["ms_per_call_step"])
                   for r in rows)
        assert len(rows[0]["first_tokens"]) == 8
        assert all(r["first_tokens"] == rows[0]["first_tokens"] for r in rows), rows
        assert positive(res[f"generate_bs{b}"]["tokens_per_s"])
        assert {f"{v}_bs{b}" for v in names + ["generate"]} <= printed
    assert "engine_blocks_prefill_bs32" not in res


def test_decode_engine_hf_and_server(tmp_path):
    """decode.py's GPU run on `tiny`: engine variants, generate(), HF, two servers' admit delays,
    an ungated server (its event loop not waiting out the prefills)."""
    out = run("decode.py", "--preset", "tiny", "--device", "cpu", "--new", NEW, "--batches",
              *BATCHES, "--clients", *CLIENTS, "--admit-delay-ms", 0, 2,
              "--prefill-step-tokens", 1024, "--ungated", "--json", tmp_path / "decode.json")
    res = json.loads((tmp_path / "decode.json").read_text())
    assert (res["preset"], res["device"], res["new"], res["context"]) == ("tiny", "cpu", NEW, 48)
    # the floor: the weights a step reads, once, over this machine's measured copy bandwidth
    assert positive(res["copy_bandwidth"]) and math.isclose(
        res["floor_ms_per_step_bs1"], res["step_params"] * 2 / res["copy_bandwidth"] * 1e3)
    assert res["step_params"] == res["active_params"]   # tiny's embedding is its LM head
    assert f"(copy bandwidth {res['copy_bandwidth'] / 1e12:.2f} TB/s)" in out
    check_engine_rows(res, ["engine", "engine_blocks_prefill", "engine_step1024"], out)
    for b in BATCHES:   # HF generate on the same weights: the same greedy tokens in fp32
        hf = res[f"hf_bs{b}"]
        assert hf["first_tokens"] == res[f"engine_bs{b}"]["first_tokens"], hf
        assert hf["leading_tokens_equal_to_engine"] == 8 and positive(hf["tokens_per_s"])
    printed = {row[0]: row for row in table(out, "tiny on cpu")}
    for n in CLIENTS:
        for key, delay in ((f"server_{n}_clients", 0), (f"server_{n}_clients_delay2ms", 2),
                           (f"server_{n}_clients_ungated", 0)):   # the first delay's
            r = res[key]
            assert "error" not in r, r
            assert r["completion_tokens"] == n * NEW and r["prefill_rows"] == n
            assert r["prefills"] >= 1 and r["steps"] >= NEW - 1 and r["admit_delay_ms"] == delay
            assert r["prefill"] == "eager"   # no --serve-compile-prefill here
            assert positive(r["tokens_per_s"], r["ttft_ms"], r["itl_ms"])
            assert "TTFT" in printed[key]
            # three timed rounds, each with its own engine counts; the reported one is the median
            rounds = r["rounds"]
            assert len(rounds) == 3 and all(x["prefill_rows"] == n for x in rounds)
            assert sorted(x["tokens_per_s"] for x in rounds)[1] == r["tokens_per_s"]
            assert r["prefill_s"] in [x["prefill_s"] for x in rounds]


def test_decode_served_context(tmp_path):
    """--context: every cache holds 128 positions; engine_one_length reads all of them."""
    out = run("decode.py", "--preset", "tiny", "--device", "cpu", "--new", NEW, "--batches",
              *BATCHES, "--no-hf", "--no-server", "--context", 128, "--json",
              tmp_path / "decode.json")
    res = json.loads((tmp_path / "decode.json").read_text())
    assert res["context"] == 128
    check_engine_rows(res, ["engine", "engine_blocks_prefill", "engine_one_length"], out)
    assert not any(k.startswith(("hf_", "server_")) for k in res)


# ---- prefill.py --------------------------------------------------------------------------------

def test_prefill_times_each_row_count_on_both_paths():
    """prefill.py on `tiny`: a row per row count, the path the engine takes for it (32 tokens fit
    its 128 step tokens, 256 do not), every time positive, launch never after the whole; then
    the kernel tables of the eager and the compiled engine."""
    out = run("prefill.py", "--preset", "tiny", "--device", "cpu", "--rows", 1, 8,
              "--repeats", 1)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r[:3] for r in rows] == [["1", "32", "decode step"], ["8", "256", "blocks"]]
    for r in rows:
        times = [float(c) for c in r[3:]]   # (first, launch, whole) x 3, model forward
        assert len(times) == 10 and positive(*times)
        assert all(times[i] <= times[i + 1] for i in (1, 4, 7))   # launch <= whole
    assert "### eager: one prefill of 8 rows" in out and "### compiled: one prefill" in out


# ---- decode_kernels.py ------------------------------------------------------------------------

def test_decode_kernels_counts_aten_ops():
    out = run("decode_kernels.py", "--preset", "tiny", "--device", "cpu", "--batches", 1, 32,
              "--top", 40)
    assert "tiny: aten ops per decode step on cpu (torch.float32)" in out
    rows = table(out, " " * 16 + " batch")
    assert [row[:2] for row in rows[::2]] == [["eager", "1"], ["eager", "32"]]
    for row, top in zip(rows[::2], rows[1::2]):
        per_layer, rest, total = map(int, row[2:])
        assert per_layer > 0 and rest > 0 and total == rest + 4 * per_layer   # tiny: 4 layers
        ops = dict(zip(top[::2], (int(c.rstrip(",")) for c in top[1::2])))
        assert len(ops) == len(top) // 2 and all(c > 0 for c in ops.values())
        assert list(ops.values()) == sorted(ops.values(), reverse=True)
        assert {"mm", "bmm", "addmm"} & set(ops), ops   # a layer's matmuls are counted


def test_decode_kernels_prefill_profile():
    out = run("decode_kernels.py", "--preset", "tiny", "--device", "cpu", "--prefill", 1, 4,
              "--top", 8)
    for n in (1, 4):
        wall = re.search(rf"prefill step of {n} x 32 tokens: ([\d.]+) ms wall", out)
        assert wall and positive(float(wall[1])), out
    ops = re.findall(r"^    (.{60}) +(\d+) calls +([\d.]+) ms$", out, re.M)
    assert len(ops) == 2 * 8 and all(int(calls) > 0 for _, calls, _ in ops)
    assert "aten::mm" in {name.strip() for name, _, _ in ops}


# ---- attention.py, moe_layer.py ---------------------------------------------------------------

def test_attention_backends_agree():
    out = run("attention.py", "--preset", "tiny", "--device", "cpu", "--batch", 2, "--seq", 64)
    assert "not run" not in out, out
    rows = {" ".join(row[:-4]): [float(v) for v in row[-4:]] for row in table(out, "backend")}
    assert list(rows) == ["math", "dropless", "dropless compiled"]   # the CPU has math only
    for fwd_ms, step_ms, _, diff in rows.values():
        assert positive(fwd_ms, step_ms) and 0 <= diff < 1e-5   # fp32, against math


def test_moe_layer_providers_match_the_loop():
    out = run("moe_layer.py", "--device", "cpu", "--shapes", "cpu-tiny", "--check")
    checks = dict(re.findall(r"^# check (\S+): rel err y, dx, dw, dgate_up, ddown = (.+)$", out,
                             re.M))
    assert list(checks) == ["reference_loop", "grouped_mm_round1", "grouped_mm", "grouped_fused"]
    for errs in checks.values():
        assert all(float(e) < 1e-5 for e in errs.split(", ")), checks   # fp32
    assert "### cpu-tiny: T 100, D 64, F 96, E 4, K 2, float32, cpu" in out
    rows = {row[1]: row[3:-1:2] for row in table(out, "| provider")[1:] if row[0] == "|"}
    assert list(rows) == ["dense_equiv", *checks, "capacity_bmm_1.25", "hf_mixtral_block"]
    for fwd_ms, tflops, _, step_ms, step_tflops, _, _, _ in rows.values():
        assert positive(*map(float, (fwd_ms, tflops, step_ms, step_tflops)))
    assert rows["dense_equiv"][2] == rows["dense_equiv"][5] == "1.00"
    overheads = re.search(r"^overheads: router .*", out, re.M)[0]
    assert positive(*map(float, re.findall(r"([\d.]+) ms", overheads)))
    assert overheads.count(" ms") == 4


# ---- serve_host.py, awq_model.py --------------------------------------------------------------

@pytest.mark.parametrize("flags,servers", [
    ((), [("0.00", "yes"), ("1.50", "yes")]),
    # the prefill simulated as launches, on a gated and an ungated server
    (("--prefill-launches", 50, "--ungated"), [("0.00", "yes"), ("0.00", "no"),
                                                ("1.50", "yes"), ("1.50", "no")]),
])
def test_serve_host_streams_below_the_simulated_device(flags, servers):
    out = run("serve_host.py", "--step-ms", 0, 1.5, "--clients", 2, *flags)
    assert ("prefill simulated as 50 launches: " in out) == bool(flags)
    rows = table(out, " step ms")
    assert [(row[0], row[2]) for row in rows] == servers
    for step_ms, clients, _, tokens_s, ceiling, ratio, ttft, itl, prefills, prefill_ms in rows:
        assert clients == "2" and int(prefills) >= 1
        assert positive(float(tokens_s.replace(",", "")), float(ttft), float(itl),
                        float(prefill_ms))
        if step_ms == "0.00":
            assert ceiling == ratio == "-"
        else:   # 256 tokens need 255 steps of 1.5 ms at least, whatever the machine
            assert ceiling == "1,333" and 0 < float(ratio) <= 256 / 255 + 0.01


@pytest.fixture
def awq_run(tmp_path, corpus):
    """A run directory of one MoE layer on the test corpus (quantize_run's 128 windows of 512
    tokens take ~4 s a layer here), with small evaluation windows."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=128, num_layers=1, num_heads=4, num_kv_heads=2,
                      max_seq_len=512, moe=MoEConfig(dim=128, hidden_dim=128, num_experts=4,
                                                     top_k=2))
    path = tmp_path / "run"
    train_cfg = TrainConfig(out=str(path), data=str(corpus), cache_dir=str(tmp_path / "cache"),
                            batch_size=4, seq_len=32, eval_batches=1)
    save(path, 0, Transformer(cfg), None, {"model_config": config_to_dict(cfg),
                                           "tokenizer": ByteTokenizer().to_json(),
                                           "train_config": asdict(train_cfg)})
    return path


def test_awq_model_quality_and_big(tmp_path, awq_run):
    out = run("awq_model.py", "--device", "cpu", "--run", awq_run, "--big", "tiny",
              "--calib-samples", 4, "--calib-seq-len", 32, "--work", tmp_path / "work",
              "--json", tmp_path / "awq.json")
    res = json.loads((tmp_path / "awq.json").read_text())
    q, big = res["quality"], res["big"]
    assert q["eval_tokens"] == 4 * 32 and positive(q["quantize_s"], q["val_loss_bf16"],
                                                     q["val_loss_int4"])
    assert 0.95 < q["ppl_ratio"] < 1.05   # int4 of a random model: about its fp32 perplexity
    assert 0.25 < q["expert_bytes_ratio"] < 0.27   # 4 bits, a scale and zero per 128 weights
    assert big["preset"] == "tiny" and big["calib"] == [4, 32]
    assert positive(big["quantize_s"], big["decode_bf16_tokens_per_s"],
                    big["decode_int4_tokens_per_s"], big["decode_ratio"])
    assert len(table(out, "| measurement")) == 1 + 4 + 2   # the rule, quality's rows, big's


def test_awq_model_ab(tmp_path):
    """--ab decodes with a switch off and on: speeds, and how far their greedy tokens agree (the
    CPU runs one path either way: all of them)."""
    out = run("awq_model.py", "--device", "cpu", "--big", "tiny", "--rtn", "--ab",
              "DROPLESS_DECODE_FUSION", "--reps", 1, "--json", tmp_path / "ab.json")
    ab = json.loads((tmp_path / "ab.json").read_text())["big"]["ab"]
    assert ab["switch"] == "DROPLESS_DECODE_FUSION"
    assert ab["bf16"]["agree"] == ab["int4"]["agree"] == 64
    assert positive(ab["bf16"]["0"], ab["bf16"]["1"], ab["int4"]["0"], ab["int4"]["1"])
    assert "| tiny: greedy tokens equal with DROPLESS_DECODE_FUSION 0 and 1 (of 64) | 64 | 64 |" in out


def test_decode_switches_alternates_configs_and_restores_the_environment(tmp_path, monkeypatch):
    """Every config is timed --reps times and its greedy tokens compared with the first's (on the
    CPU every config runs one path: all 64 agree); a malformed config is refused by name; `under`
    sets the switches for one call and restores the environment."""
    out = run("decode_switches.py", "--device", "cpu", "--preset", "tiny", "--new", 8,
              "--reps", 2, "--configs", "", "DROPLESS_PDL=1,DROPLESS_DECODE_FUSION=1",
              "--json", tmp_path / "switches.json")
    saved = json.loads((tmp_path / "switches.json").read_text())
    assert [r["config"] for r in saved["rows"]] == [{}, {"DROPLESS_PDL": "1",
                                                        "DROPLESS_DECODE_FUSION": "1"}]
    assert all(len(r["runs"]) == 2 and r["agree"] == 64 for r in saved["rows"])
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["(environment)", "DROPLESS_PDL=1,DROPLESS_DECODE_FUSION=1"]
    for _, median, runs, ratio, step, agree in rows:
        assert positive(float(median), float(ratio), float(step), *map(float, runs.split(", ")))
        assert len(runs.split(", ")) == 2 and agree == "64"
    assert rows[0][3] == "1.000"
    failed = subprocess.run([sys.executable, "decode_switches.py", "--device", "cpu", "--configs",
                             "DROPLESS_PDL"], cwd=BENCHMARKS, capture_output=True, text=True,
                            env=subprocess_env())
    assert failed.returncode != 0 and "'DROPLESS_PDL' is invalid: allowed: NAME=VALUE" in \
        failed.stderr
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from decode_switches import under
    monkeypatch.delenv("DROPLESS_PDL", raising=False)
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "0")
    seen = under({"DROPLESS_PDL": "1", "DROPLESS_DECODE_FUSION": "1"},
                 lambda: (os.environ["DROPLESS_PDL"], os.environ["DROPLESS_DECODE_FUSION"]))
    assert seen == ("1", "1") and "DROPLESS_PDL" not in os.environ
    assert os.environ["DROPLESS_DECODE_FUSION"] == "0"


# ---- token_cache.py ---------------------------------------------------------------------------

def test_token_cache_chunked_and_whole_agree(tmp_path):
    """Both settings build the same tokens; the chunked one holds less while it tokenizes (the
    whole corpus at once keeps every id in int64, ~20 bytes a character with its joins)."""
    out = run("token_cache.py", "--copies", "1", "--tokenizers", "byte", "--json",
              tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["chunk"] for r in rows] == [f"{ENCODE_CHUNK_CHARS:,}", "one chunk"]
    # bytes: a token a character (ASCII mostly), and the separators between documents
    assert rows[0]["tokens"] == rows[1]["tokens"] >= rows[0]["chars"]
    assert all(positive(r["seconds"], r["rss_peak_mb"]) for r in rows)
    assert rows[0]["growth_bytes_per_char"] < rows[1]["growth_bytes_per_char"]
    assert len(table(out, "| tokenizer")) == 3   # the separator line and two rows


def test_token_cache_of_one_file_in_pieces(tmp_path):
    """--one-file: the corpus as one document of the first N characters, which is now tokenized
    in pieces (the same tokens as whole, in less memory: ~20 bytes a character held whole)."""
    run("token_cache.py", "--one-file", "20000000", "--copies", "1", "--tokenizers", "byte",
        "--json", tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["chars"] for r in rows] == [20_000_000] * 2
    assert rows[0]["tokens"] == rows[1]["tokens"] >= 20_000_000
    assert rows[0]["growth_bytes_per_char"] < rows[1]["growth_bytes_per_char"] / 2


def test_token_cache_of_one_file_on_disk_miss_then_hit(tmp_path):
    """--on-disk: the file read as --data is; the hit reads it again but holds none of it."""
    run("token_cache.py", "--one-file", "5000000", "--copies", "1", "--tokenizers", "byte",
        "--on-disk", "--json", tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["chunk"], r["chars"]) for r in rows] == [("miss", 5_000_000), ("hit", 5_000_000)]
    assert rows[0]["tokens"] == rows[1]["tokens"] >= 5_000_000
    assert rows[1]["rss_peak_mb"] - rows[1]["rss_read_mb"] < 5


# ---- init_memory.py ---------------------------------------------------------------------------

def test_init_memory_ranks_hold_their_shards(tmp_path):
    """`train --init` on 2 ranks (ep=2): each rank holds about half the parameters, one process
    all of them; the table has a row per rank."""
    out = run("init_memory.py", "--preset", "tiny", "--layouts", "ep", "--json",
              tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["layout"], r["rank"]) for r in rows] == [("one process", 0), ("ep", 0), ("ep", 1)]
    whole = rows[0]["model_fp32_bytes"]
    assert rows[0]["param_bytes"] == whole
    assert all(0.4 * whole < r["param_bytes"] < 0.6 * whole for r in rows[1:]), rows
    assert all(positive(r["rss_start_mb"]) and r["rss_built_peak_mb"] <= r["rss_peak_mb"]
               for r in rows)
    assert len(table(out, "| layout")) == 4   # the separator line and three rows


# ---- export_memory.py -------------------------------------------------------------------------

def test_export_memory_writes_the_model_in_shards(tmp_path):
    """to_hf of tiny in bf16 under a 1 MB shard limit: several shards, every byte of the model
    written once, and a row per limit."""
    out = run("export_memory.py", "--preset", "tiny", "--shard-gb", "0.001", "1", "--json",
              tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["shard_bytes"] for r in rows] == [10**6, 10**9]
    assert rows[0]["shards"] > 1 and rows[1]["shards"] == 1
    for r in rows:
        assert r["model_bytes"] == 2 * 1_807_488   # tiny's parameters (tied) in bf16
        assert r["model_bytes"] < r["written_bytes"] < r["model_bytes"] + 10**5   # + headers
        assert r["largest_shard_bytes"] <= max(r["shard_bytes"], 256 * 128 * 2) + 10**5
        assert positive(r["rss_built_mb"], r["seconds"]) and r["rss_peak_mb"] >= r["rss_built_mb"]
    assert len(table(out, "| shard limit MB")) == 3   # the separator line and two rows


# ---- logprobs.py, expert_parallel.py ----------------------------------------------------------

def cells(out: str, header: str) -> list[list[str]]:
    """The cells of a markdown table's rows under the line that starts with `header`."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in out[out.index(header):].splitlines()[2:] if line.startswith("| ")]


def test_logprobs_costs_a_step():
    """The engine's decode step with and without log-probabilities, at each batch (no check
    column: the engine's logprobs are tested in tests/test_serve_engine_logprobs.py)."""
    out = run("logprobs.py", "--device", "cpu", "--preset", "tiny", "--batches", 1, 4)
    assert "# tiny, cpu, " in out and ", torch.float32, context 256; " in out
    rows = cells(out, "| batch")
    assert [row[0] for row in rows] == ["1", "4"]
    for _, off, on, ratio in rows:
        off, on, ratio = map(float, (off, on, ratio))
        assert positive(off, on, ratio) and abs(ratio - on / off) < 1e-3


def test_expert_parallel_on_two_cpu_ranks():
    """torchrun, 2 ranks on gloo: the EP layer equals one process holding every expert (fp32,
    the same weights and tokens), and every time of rank 0's row is positive."""
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2,
              "expert_parallel.py", "--shapes", "tiny", "--tokens", 64)
    assert "# cpu, world 2, " in out
    [row] = cells(out, "| shape")
    shape, world, tokens, per_token, err, dc, raw, ratio, slots, layer, local, weak = row
    assert (shape, world, tokens) == ("tiny", "2", "64")
    assert 1 <= float(per_token) <= 2   # tiny's K = 2: a token goes to 1 or 2 ranks
    assert float(err) < 1e-5
    raw_ms, raw_gbps = re.fullmatch(r"([\d.]+) \(([\d.]+)\)", raw).groups()
    dc, raw_ms, slots, layer, local = map(float, (dc, raw_ms, slots, layer, local))
    assert positive(dc, raw_ms, slots, layer, local) and float(raw_gbps) >= 0   # CPU: rounds to 0
    assert abs(float(ratio) - raw_ms / dc) < 0.01 and abs(float(weak) - local / layer) < 0.01
