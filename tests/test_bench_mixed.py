"""`scripts/bench_mixed.py` against the test server, on a tiny workload: every phase runs through
the SDK and reports what the benchmark records (a smoke test; the numbers are in BENCHMARKS.md)."""
from __future__ import annotations

from scripts.bench_mixed import run
from scripts.bench_throughput import Workload
from tests.conftest import API_KEY


def test_bench_mixed_times_training_and_sampling_alone_and_side_by_side(server):
    wl = Workload(batch=2, seq=16, steps=2, warmup=1, sample_requests=2, sample_tokens=200, sample_rounds=1)
    report = run(server.url, API_KEY, "tiny-qwen3", wl)
    assert report["train_alone"]["steps"] == 2 and report["train_beside_sampling"]["steps"] >= 1
    for phase in ("train_alone", "train_beside_sampling"):
        assert 0 < report[phase]["median_ms"] <= report[phase]["p90_ms"] <= report[phase]["max_ms"]
    assert report["sample_tokens_per_s_alone"] > 0 and report["sample_tokens_per_s_beside_training"] > 0
    assert report["train_step_ratio"] > 0 and report["sample_rate_ratio"] > 0
