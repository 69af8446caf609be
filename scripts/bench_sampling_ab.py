"""A/B of the sampling path: two servers that differ in their flags, driven in alternating rounds.

On a shared machine the speed of a 100 ms sampling round drifts by 10-20 % from one minute to
the next, more than most changes to the sampling path are worth. So this benchmark starts two
TinkerCloud servers of this checkout at once (A and B, the same model, each with its own flags),
gives each a sampler of the same freshly initialised LoRA adapter, and runs sampling rounds on
them in the order A B B A A B B A ...: every pair of neighbouring rounds sees the same machine.
While one server works the other waits idle (its worker blocks on its queue). With `--a-repo DIR`
server A is the one of checkout DIR (say, a `git worktree` of an earlier commit): a before/after
comparison of the whole server.

A round is what `bench_throughput.py` times: `--sample-requests` concurrent `sample` calls of the
real SDK (new random prompts each round, `temperature=1`, `stop=[]`, so every sample runs to
`--sample-tokens`), all submitted, then all awaited. The report gives, per server, the median and
mean round time, tokens/s at the median, and B's median round time as a share of A's, with the
median of the per-pair ratios (each B round against the A round next to it).

    python scripts/bench_sampling_ab.py --b-args="--sample-gather-ms 0"      # embedded tiny model
    python scripts/bench_sampling_ab.py --model-dir /tmp/tiny-qwen3 --base-model skyrl-tiny \\
        --threads 2 --rounds 60 --a-args="--sample-gather-ms 0"
    git worktree add /tmp/before HEAD~3 && python scripts/bench_sampling_ab.py --a-repo /tmp/before
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_throughput import (ROOT, SHAPES, Server, Workload, _resolved, default_name, machine,  # noqa: E402
                                      make_shape, sdk_sample_round)


def sampler_of(url: str, api_key: str, base_model: str, rank: int):
    """A sampling client of a new LoRA adapter (seed 0: the same factors on every server)."""
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    tc = _resolved(service.create_lora_training_client(base_model=base_model, rank=rank, seed=0))
    path = tc.save_weights_for_sampler(name="ab").result().path
    return _resolved(service.create_sampling_client(model_path=path))


def abba(rounds: int) -> list[str]:
    """A B B A A B B A ... (`rounds` long): neither side always goes first."""
    return [("A", "B", "B", "A")[i % 4] for i in range(rounds)]


def summary(times: list[float], tokens: list[int]) -> dict:
    med = statistics.median(times)
    return {"rounds": len(times), "round_ms_median": round(1000 * med, 2),
            "round_ms_mean": round(1000 * statistics.mean(times), 2),
            "tokens_per_s": round(statistics.median(tokens) / med, 1)}


def run(args: argparse.Namespace) -> dict:
    wl = Workload(sample_requests=args.sample_requests, num_samples=args.num_samples,
                  prompt_tokens=args.prompt_tokens, sample_tokens=args.sample_tokens, rank=args.rank)
    model_dir = args.model_dir or make_shape(args.shape, Path(args.models_cache))
    base_model = args.base_model or (Path(args.model_dir).name if args.model_dir else default_name(args.shape))
    flags = {"A": shlex.split(args.a_args), "B": shlex.split(args.b_args)}
    servers = {}
    try:
        for side in "AB":
            root = Path(args.a_repo) if side == "A" and args.a_repo else ROOT
            servers[side] = Server(args.api_key, base_model, model_dir, 1, args.dtype, root=root,
                                   extra_args=tuple(flags[side]))
            servers[side].start()
        samplers = {side: sampler_of(s.url, args.api_key, base_model, wl.rank) for side, s in servers.items()}
        for side in "AB":  # warm-up: one round each, not counted
            sdk_sample_round(samplers[side], wl, 0)
        order = abba(args.rounds)
        times: dict[str, list[float]] = {"A": [], "B": []}
        tokens: dict[str, list[int]] = {"A": [], "B": []}
        for i, side in enumerate(order):
            s, n = sdk_sample_round(samplers[side], wl, 1 + i)
            times[side].append(s)
            tokens[side].append(n)
    finally:
        for s in servers.values():
            s.stop()
    pairs = [times["B"][k] / times["A"][k] for k in range(min(len(times["A"]), len(times["B"])))]
    return {
        "base_model": base_model, "dtype": args.dtype, "workload": {
            "sample_requests": wl.sample_requests, "num_samples": wl.num_samples, "prompt_tokens": wl.prompt_tokens,
            "sample_tokens": wl.sample_tokens, "rank": wl.rank},
        "flags": {side: " ".join(f) for side, f in flags.items()}, "a_repo": args.a_repo,
        "A": summary(times["A"], tokens["A"]), "B": summary(times["B"], tokens["B"]),
        "b_over_a_median_round": round(statistics.median(times["B"]) / statistics.median(times["A"]), 3),
        "b_over_a_median_of_pairs": round(statistics.median(pairs), 3),
        "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a-args", default="", help="extra tinkercloud.py flags of server A (one string)")
    p.add_argument("--b-args", default="", help="extra tinkercloud.py flags of server B (one string)")
    p.add_argument("--a-repo", help="server A from this checkout instead of this one (B is always this one)")
    p.add_argument("--api-key", default="tml-bench-ab")
    p.add_argument("--shape", choices=sorted(SHAPES), default="embedded")
    p.add_argument("--model-dir", help="HF checkpoint dir of the base model (default: --shape)")
    p.add_argument("--base-model", help="the servers' name for it")
    p.add_argument("--models-cache", default=str(Path("/tmp") / "tinkercloud-bench-models"))
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both servers' workers")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds, both servers together")
    p.add_argument("--sample-requests", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--sample-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--json", metavar="FILE", help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    load_before = os.getloadavg()
    report = run(args)
    report["load_before"], report["load_after"] = load_before, os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    a, b = report["A"], report["B"]
    print(f"{report['base_model']}: {args.sample_requests} requests x {args.num_samples} x {args.sample_tokens} tokens "
          f"per round, prompt {args.prompt_tokens}; {args.rounds} rounds A B B A ...")
    for side, r in (("A", a), ("B", b)):
        where = f"{args.a_repo}: " if side == "A" and args.a_repo else ""
        print(f"  {side} [{where}{report['flags'][side] or 'defaults'}]: median round {r['round_ms_median']} ms, "
              f"mean {r['round_ms_mean']} ms, {r['tokens_per_s']} tokens/s ({r['rounds']} rounds)")
    print(f"  B/A median round {report['b_over_a_median_round']}, median of pairs {report['b_over_a_median_of_pairs']}")
    print(f"  machine: {report['machine']}, OMP_NUM_THREADS {report['omp_num_threads']}; load "
          f"{'/'.join(f'{x:.2f}' for x in report['load_before'])} before, "
          f"{'/'.join(f'{x:.2f}' for x in report['load_after'])} after; {report['date']}")


if __name__ == "__main__":
    main()
