"""`scripts/bench_sampling_ab.py` on a tiny workload: two real servers with different flags, rounds
in A B B A order through the SDK, and the report it prints (a smoke test; numbers in BENCHMARKS.md)."""
from __future__ import annotations

from scripts.bench_sampling_ab import abba, parse_args, run


def test_abba_alternates_so_neither_side_always_goes_first():
    assert abba(8) == list("ABBAABBA")


def test_two_servers_sample_in_alternating_rounds(tiny_models):
    args = parse_args(["--model-dir", str(tiny_models["tiny-qwen3"]), "--base-model", "tiny-qwen3", "--rounds", "4",
                       "--sample-requests", "2", "--sample-tokens", "3", "--a-args=--sample-gather-ms 0"])
    report = run(args)
    assert report["flags"] == {"A": "--sample-gather-ms 0", "B": ""}
    for side in "AB":
        assert report[side]["rounds"] == 2 and report[side]["round_ms_median"] > 0
        assert report[side]["tokens_per_s"] > 0  # 2 requests x 3 tokens a round, no early stop
    assert report["b_over_a_median_round"] > 0 and report["b_over_a_median_of_pairs"] > 0
