"""`GET /metrics`: Prometheus' text format, with counts that follow the requests served (a fresh
server of its own), cumulative histogram buckets, and the engine's counters."""

import re
import urllib.request

import pytest

from dropless.serve.metrics import BUCKETS_S, Histogram
from tests import test_serve_server as live_server

run_dir = live_server.run_dir
SAMPLE = re.compile(r'^(dropless_[a-z0-9_]+)(\{[a-z_]+="[^"]*"\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


@pytest.fixture(scope="module")
def fresh(run_dir):
    s = live_server.InProcessServer(run_dir)
    yield s
    s.stop()


def scrape(port) -> tuple[dict, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("# HELP "):
            m = SAMPLE.match(line)
            assert m, line
            name, labels, value = m.groups()
            samples[name + (labels or "")] = float(value)
            assert re.sub(r"_(bucket|sum|count)$", "", name) in typed, line   # TYPE before
    return samples, text


def test_counts_follow_the_requests(fresh):
    before, _ = scrape(fresh.port)
    assert before["dropless_generation_tokens_total"] == 0
    assert before["dropless_num_requests_running"] == before["dropless_num_requests_waiting"] == 0
    replies = [fresh.client.completions.create(model="tiny-run", prompt=p, max_tokens=5,
                                               temperature=0) for p in ("a", "hello")]
    after, text = scrape(fresh.port)
    assert after['dropless_request_success_total{finished_reason="length"}'] == 2
    assert after["dropless_generation_tokens_total"] == 10
    assert after["dropless_prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in replies)
    assert after["dropless_engine_steps_total"] > before["dropless_engine_steps_total"]
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds"):
        buckets = [after[f'dropless_{name}_bucket{{le="{b}"}}'] for b in
                   [repr(b) for b in BUCKETS_S[:-1]] + ["+Inf"]]
        assert buckets == sorted(buckets) and buckets[-1] == after[f"dropless_{name}_count"] == 2
        assert after[f"dropless_{name}_sum"] > 0
    assert after["dropless_e2e_request_latency_seconds_sum"] >= after[
        "dropless_time_to_first_token_seconds_sum"]


def test_histogram_buckets():
    h = Histogram()
    for v in (0.0005, 0.001, 0.3, 1e9):
        h.observe(v)
    lines = dict(line.rsplit(" ", 1) for line in h.lines("x"))
    assert lines['x_bucket{le="0.001"}'] == "2" and lines['x_bucket{le="0.25"}'] == "2"
    assert lines['x_bucket{le="0.5"}'] == "3" and lines['x_bucket{le="+Inf"}'] == "4"
    assert lines["x_count"] == "4" and float(lines["x_sum"]) == pytest.approx(1e9 + 0.3015)
