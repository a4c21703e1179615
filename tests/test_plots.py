import json
import math
import sys

import pytest

from conftest import run_out_of_space
from dropless.plots import read_metrics, write_plots


def test_malformed_metrics_lines_are_skipped_with_a_warning(tmp_path):
    """A run killed mid-write leaves a partial last line in metrics.jsonl: read_metrics (and so
    the plots of every later `dropless train`) raised JSONDecodeError on it."""
    good = [{"step": s, "loss": 4.0 - s, "expert_load": [[0.5, 0.5]]} for s in (1, 2, 3)]
    lines = [json.dumps(good[0]), "", json.dumps(good[1]), "[1, 2]", json.dumps(good[2]),
             '{"step": 4, "lo']
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines))
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 2 malformed lines \(4, 6\)"):
        assert read_metrics(path) == good
    with pytest.warns(UserWarning, match="skipped 2"):
        assert [p.name for p in write_plots(tmp_path, baseline=3.0)] == ["loss.png",
                                                                        "expert_load.png"]


def test_well_formed_metrics_read_without_a_warning(tmp_path, recwarn):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    assert read_metrics(tmp_path / "absent.jsonl") == []
    assert not recwarn.list


def test_null_values_read_as_nan_and_non_records_are_skipped(tmp_path):
    """metrics.jsonl writes a diverged run's non-finite loss as null (strict JSON): read back as
    NaN, so the plots leave it out of their range instead of raising TypeError on None. JSON that is
    not a record (a list, a number, an object without an int step) is skipped like a cut line."""
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 3.0, "expert_load": [[0.5, 0.5]]}', "[]", "3", '{"loss": 1}',
             '{"step": null}', '{"step": 2, "loss": null, "val_loss": null, '
             '"expert_load": [[null, 0.5]]}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 4 malformed lines \(2, 3, 4, 5\)"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[1]["loss"]) and math.isnan(records[1]["val_loss"])
    assert math.isnan(records[1]["expert_load"][0][0])
    path.write_text("\n".join(lines[:1] + lines[-1:]) + "\n")
    assert [p.name for p in write_plots(tmp_path, baseline=3.0)] == ["loss.png", "expert_load.png"]


def test_a_plot_that_fails_midway_leaves_the_previous_one(tmp_path):
    """A full disk (here: a file size limit) while a plot was saved truncated the previous run's
    PNG in place."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    (path,) = write_plots(tmp_path, baseline=3.0)
    before = path.read_bytes()
    setup = ("import matplotlib.pyplot\nfrom pathlib import Path\n"
             "from dropless.plots import write_plots")
    assert run_out_of_space(setup, "write_plots(Path(sys.argv[1]), baseline=2.5)", tmp_path,
                            limit=1000) == 3
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


@pytest.mark.parametrize("reader", ["plots", "resume"])
def test_metrics_are_read_a_line_at_a_time(tmp_path, monkeypatch, reader):
    """metrics.jsonl was read whole into memory by the plots and by every resume (which rewrites
    it): a run directory from elsewhere may hold a file of any size. A line is held whole only up
    to MAX_LINE bytes; a longer one is read past in pieces and skipped as malformed."""
    import tracemalloc

    from dropless import runlog

    monkeypatch.setattr(runlog, "MAX_LINE", 2**20, raising=False)
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:   # a 32 MiB line between two records, then one past the resume
        f.write(json.dumps(good[0]) + '\n{"step": 3, "loss": 1' + "0" * 2**25 + "}\n")
        f.write(json.dumps(good[1]) + "\n" + json.dumps({"step": 3, "loss": 0.5}) + "\n")
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match=r"skipped 1 malformed lines \(2\)"):
            if reader == "plots":
                assert read_metrics(path)[:2] == good
            else:
                runlog.MetricsLog(path, keep_through=2).file.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    if reader == "resume":
        assert [json.loads(line) for line in path.read_text().splitlines()] == good


@pytest.mark.parametrize("reader", ["plots", "resume"])
def test_a_line_nested_deep_is_skipped_not_a_recursion_error(tmp_path, reader):
    """A line nested ~900 deep is JSON that json.loads reads, and then mapping its nulls recursed
    past Python's limit: a RecursionError traceback at every --resume and in the plots. Skipped
    whatever the limit (torch.compile, run earlier in the process, raises it)."""
    from dropless import runlog

    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    deep = '{"step": 3, "loss": 1.0, "x": ' + "[" * 900 + "]" * 900 + "}"
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), deep, json.dumps(good[1])]) + "\n")
    limit = sys.getrecursionlimit()
    for raised in (limit, 10_000):   # as it is, and raised
        sys.setrecursionlimit(raised)
        try:
            with pytest.warns(UserWarning, match=r"skipped 1 malformed lines \(2\)"):
                if reader == "plots":
                    assert [p.name for p in write_plots(tmp_path, baseline=3.0)] == ["loss.png"]
                else:
                    runlog.MetricsLog(path, keep_through=2).file.close()
                    assert [json.loads(line) for line in path.read_text().splitlines()] == good
        finally:
            sys.setrecursionlimit(limit)
        path.write_text("\n".join([json.dumps(good[0]), deep, json.dumps(good[1])]) + "\n")
