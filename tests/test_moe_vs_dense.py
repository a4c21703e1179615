"""benchmarks/moe_vs_dense.py: reading runs (curves, crossing, table), one CPU run end to end;
the equal-compute presets it trains and `dropless info`'s table of them."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from dropless.config import PRESETS, dense_match, more_experts
from dropless.info import model_stats, preset_table

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_vs_dense.py"
_spec = importlib.util.spec_from_file_location("moe_vs_dense", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _curve(tokens, losses, seconds=None):
    seconds = seconds or [t / 100 for t in tokens]
    return [{"step": i + 1, "tokens": t, "seconds": s, "val_loss": v}
            for i, (t, s, v) in enumerate(zip(tokens, seconds, losses))]


def test_val_curve_sums_each_window_time():
    records = [{"step": 10, "tokens": 1000, "tokens_per_s": 500},                  # 2 s
               {"step": 20, "tokens": 2000, "tokens_per_s": 250, "val_loss": 3.0},  # +4 s
               {"step": 30, "tokens": 3000, "tokens_per_s": 1000},                 # +1 s
               {"step": 40, "tokens": 4000, "tokens_per_s": 100, "val_loss": 2.5}]  # +10 s
    assert bench.val_curve(records) == [
        {"step": 20, "tokens": 2000, "seconds": 6.0, "val_loss": 3.0},
        {"step": 40, "tokens": 4000, "seconds": 17.0, "val_loss": 2.5}]


def test_reach_interpolates_between_the_points_around_the_first_crossing():
    curve = _curve([100, 200, 300, 400], [4.0, 3.0, 2.0, 2.5], seconds=[1, 3, 7, 9])
    hit = bench.reach(curve, 2.25)          # between 3.0 @ 200 and 2.0 @ 300, 3/4 of the way
    assert hit["tokens"] == pytest.approx(275) and hit["seconds"] == pytest.approx(6)
    assert bench.reach(curve, 3.0) == {"tokens": 200, "seconds": 3}       # exactly on a point
    assert bench.reach(curve, 2.5)["tokens"] == pytest.approx(250)      # first crossing, not 400
    assert bench.reach(curve, 4.5) == {"tokens": 100, "seconds": 1}       # already at the start
    assert bench.reach(curve, 1.9) is None                                # never
    assert bench.reach(_curve([100], [float("nan")]), 3.0) is None        # a diverged run


def _run(preset, tokens, losses, seconds=None):
    return {"preset": preset, "ffn": "f", "total_params": 2e6, "active_params": 1e6,
            "flops_per_token": 6e6, "curve": _curve(tokens, losses, seconds)}


def test_summarize_and_table_against_the_dense_final_loss():
    M = 1e6
    dense = _run("x-dense", [M, 2 * M, 3 * M, 4 * M], [4.0, 3.0, 2.6, 2.4], seconds=[1, 2, 3, 4])
    moe = _run("x", [M, 2 * M, 3 * M, 4 * M], [3.6, 2.8, 2.2, 2.0], seconds=[2, 4, 6, 8])
    stuck = _run("x-2x", [M, 2 * M, 3 * M, 4 * M], [4.0, 3.5, 3.0, 2.9])
    target, rows = bench.summarize([dense, moe, stuck])
    assert target == 2.4
    assert rows[0]["reach_tokens"] == 4 * M and rows[0]["tokens_ratio"] == 1.0
    # the MoE crosses 2.4 two thirds of the way from 2 M (2.8) to 3 M (2.2) tokens, 4 s to 6 s
    assert rows[1]["reach_tokens"] == pytest.approx(M * (2 + 2 / 3))
    assert rows[1]["tokens_ratio"] == pytest.approx((2 + 2 / 3) / 4)
    assert rows[1]["seconds_ratio"] == pytest.approx((4 + 4 / 3) / 4)
    assert rows[1]["final_val_loss"] == 2.0 and rows[1]["tokens_per_s"] == M / 2
    assert rows[2]["reach_tokens"] is None and rows[2]["tokens_ratio"] is None
    table = bench.format_table(target, rows).splitlines()
    assert "2.4000" in table[0]
    assert len(table) == 4 + 3 and all(line.count("|") == 12 for line in table[2:])
    assert "| x | f | 2.0 M | 1.0 M | 0.006 | 500,000 | 2.0000 | 2.67 M | 0.67 | 5.3 | 1.33 |" \
        == table[5]
    assert table[6].endswith("| 2.9000 | not reached | - | not reached | - |")


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
def test_partners_match_the_moe_compute_per_token(name):
    moe, dense, double = PRESETS[name], PRESETS[f"{name}-dense"], PRESETS[f"{name}-2x"]
    assert dense == dense_match(moe) and double == more_experts(moe, 2)
    L, D, E = moe.num_layers, moe.dim, moe.moe.num_experts
    s_moe, s_dense, s_double = (model_stats(c, 512) for c in (moe, dense, double))
    # equal FLOPs per token but for the router's matmul (D x E per layer), which dense lacks
    assert s_moe["train_flops_per_token"] - s_dense["train_flops_per_token"] == 6 * L * D * E
    assert s_double["train_flops_per_token"] - s_moe["train_flops_per_token"] == 6 * L * D * E
    assert s_dense["total_params"] == s_dense["active_params"]
    expert = 3 * D * moe.moe.hidden_dim
    assert s_double["total_params"] - s_moe["total_params"] == L * E * (expert + D)
    assert s_moe["active_params"] - s_dense["active_params"] == L * D * E
    assert s_moe["train_flops_per_token"] < 1.01 * s_dense["train_flops_per_token"]


def test_preset_table_lists_partners_side_by_side():
    lines = preset_table(PRESETS, 512).splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names[:9] == ["tiny", "tiny-dense", "tiny-2x", "small", "small-dense", "small-2x",
                         "medium", "medium-dense", "medium-2x"]
    assert set(names) == set(PRESETS)
    small, dense = lines[4], lines[5]
    assert "16 x 512, top-2" in small and "dense 1024" in dense
    assert "151.44 MFLOP" in small and "151.05 MFLOP" in dense


def test_runs_three_models_on_cpu(tmp_path, corpus, capsys):
    out = tmp_path / "runs"
    flags = ["--device", "cpu", "--preset", "tiny", "--steps", "6", "--batch-size", "4",
             "--seq-len", "32", "--tokenizer", "bytes", "--eval-every", "3", "--eval-batches", "1",
             "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench.main([*flags, "--json", str(tmp_path / "r.json"),
                       "--plot", str(tmp_path / "r.png")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["preset"] for r in result["rows"]] == ["tiny-dense", "tiny", "tiny-2x"]
    for row in result["rows"]:
        curve = result["curves"][row["preset"]]
        assert [p["step"] for p in curve] == [3, 6] and row["tokens"] == 6 * 4 * 32
        assert math.isfinite(row["final_val_loss"]) and row["seconds"] > 0
        records = [json.loads(line) for line in (out / row["preset"] / "metrics.jsonl")
                   .read_text().splitlines()]
        assert [r["val_loss"] for r in records if "val_loss" in r] == \
            [p["val_loss"] for p in curve]
    assert result["target_val_loss"] == result["rows"][0]["final_val_loss"]
    assert result["corpus"]["train_tokens"] > 0 and result["settings"]["min_lr_ratio"] == 1.0
    assert (tmp_path / "r.png").stat().st_size > 10_000
    # the same command again reuses the finished runs; other settings in the same --out are refused
    capsys.readouterr()
    assert bench.main([*flags, "--json", str(tmp_path / "again.json")]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == result["rows"]
    assert bench.main([*flags, "--lr", "1e-3"]) == 1
    assert "holds runs made with other settings" in capsys.readouterr().err


def test_info_without_preset_prints_the_table(capsys):
    from dropless import cli

    assert cli.main(["info", "--seq-len", "512"]) == 0
    assert capsys.readouterr().out.strip() == preset_table(PRESETS, 512)


def test_dense_ffn_starts_like_an_expert():
    import torch

    from dropless.model import Transformer

    torch.manual_seed(0)
    dense, moe = Transformer(PRESETS["tiny-dense"]), Transformer(PRESETS["tiny"])
    ffn, experts = dense.layers[0].ffn, moe.layers[0].ffn.experts
    for weight, fan_in in ((ffn.gate_proj.weight, 128), (ffn.up_proj.weight, 128),
                           (ffn.down_proj.weight, 256), (experts.gate_up, 128),
                           (experts.down, 128)):
        assert weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.03)
