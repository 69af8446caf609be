"""Two tenants on one server: training and long generations from two clients at once.

A demanding user of a shared server trains while someone else runs long generations. This
benchmark drives a TinkerCloud server with the real SDK, from two clients, in three phases:

- training alone: the training client runs `--steps` steps (`forward_backward` + `optim_step`,
  submitted together, then both awaited), after one warm-up step;
- sampling alone: the sampling client runs `--sample-rounds` rounds of `--sample-requests`
  concurrent generations of `--sample-tokens` new tokens each (no early stop);
- both: the sampling client runs the same rounds again while the training client keeps taking
  steps until they are done.

It reports the training step latency alone and beside the sampling (median, p90, max), the
sampling client's tokens/s alone and beside the training, and both ratios. With `--repo DIR` the
server started is the one in checkout DIR (say, a `git worktree` of an earlier commit), for a
before/after comparison on the same machine and workload.

    python scripts/bench_mixed.py --start-server                      # embedded tiny model
    python scripts/bench_mixed.py --start-server --repo /tmp/old-checkout
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_throughput import (ROOT, SHAPES, Server, Workload, _resolved, default_name, machine,  # noqa: E402
                                      make_shape, sdk_datums, sdk_step)


def train_steps(tc, wl: Workload, until: threading.Event | None = None) -> list[float]:
    """Seconds of each training step: `wl.steps` of them after `wl.warmup` untimed ones, or,
    with `until`, as many as start before it is set."""
    data, out = sdk_datums(wl), []
    i = 0
    while (i < wl.warmup + wl.steps) if until is None else not until.is_set():
        t0 = time.perf_counter()
        sdk_step(tc, data)
        if until is not None or i >= wl.warmup:
            out.append(time.perf_counter() - t0)
        i += 1
    return out


def sample_rounds(sampler, wl: Workload) -> tuple[int, float]:
    """(tokens, seconds) of `wl.sample_rounds` rounds of `wl.sample_requests` concurrent generations."""
    from tinker import types

    tokens, t0 = 0, time.perf_counter()
    for rnd in range(wl.sample_rounds):
        futures = [sampler.sample(types.ModelInput.from_ints(p), 1, types.SamplingParams(
            max_tokens=wl.sample_tokens, temperature=1.0, seed=1000 * rnd + i, stop=[]))
            for i, p in enumerate(wl.prompts(rnd))]
        tokens += sum(len(f.result().sequences[0].tokens) for f in futures)
    return tokens, time.perf_counter() - t0


def latency(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"steps": len(ordered), "median_ms": round(1000 * statistics.median(ordered), 1),
            "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def run(url: str, api_key: str, base_model: str, wl: Workload) -> dict:
    import tinker

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    tc = _resolved(tinker.ServiceClient(base_url=url, api_key=api_key).create_lora_training_client(
        base_model=base_model, rank=wl.rank, seed=0))
    other = _resolved(tinker.ServiceClient(base_url=url, api_key=api_key).create_lora_training_client(
        base_model=base_model, rank=wl.rank, seed=1))
    sampler = _resolved(other.save_weights_and_get_sampling_client())
    train_alone = train_steps(tc, wl)
    tokens_alone, seconds_alone = sample_rounds(sampler, wl)
    done, both = threading.Event(), {}

    def sample_beside() -> None:
        both["tokens"], both["seconds"] = sample_rounds(sampler, wl)
        done.set()

    thread = threading.Thread(target=sample_beside)
    thread.start()
    time.sleep(0.5)  # the first generations are decoding
    train_beside = train_steps(tc, wl, until=done)
    thread.join()
    rate_alone, rate_beside = tokens_alone / seconds_alone, both["tokens"] / both["seconds"]
    return {"train_alone": latency(train_alone), "train_beside_sampling": latency(train_beside),
            "train_step_ratio": round(statistics.median(train_beside) / statistics.median(train_alone), 2),
            "sample_tokens_per_s_alone": round(rate_alone, 1),
            "sample_tokens_per_s_beside_training": round(rate_beside, 1),
            "sample_rate_ratio": round(rate_beside / rate_alone, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running TinkerCloud server")
    where.add_argument("--start-server", action="store_true", help="start one on a free loopback port")
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose server --start-server starts")
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-dev-key"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="embedded")
    p.add_argument("--model-dir", help="HF checkpoint dir of the base model (instead of --shape)")
    p.add_argument("--base-model", help="the server's name for the base model")
    p.add_argument("--models-cache", default="/tmp/tinkercloud-bench-models")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the started server's worker")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sample-requests", type=int, default=4, help="concurrent generations per round")
    p.add_argument("--sample-tokens", type=int, default=1000, help="new tokens of each generation")
    p.add_argument("--sample-rounds", type=int, default=2)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    knobs = ("batch", "seq", "steps", "sample_requests", "sample_tokens", "sample_rounds")
    wl = Workload(warmup=1, **{k: getattr(args, k) for k in knobs})
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model_dir = args.model_dir or make_shape(args.shape, Path(args.models_cache))
    base_model = args.base_model or (Path(model_dir).name if args.model_dir else default_name(args.shape))
    report = {"base_model": base_model, "workload": {k: getattr(args, k) for k in knobs}, "machine": machine(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": os.getloadavg()}
    server = None
    if args.start_server:
        server = Server(args.api_key, base_model, model_dir, 1, "fp32", root=Path(args.repo)).start()
        report["repo"] = args.repo
    try:
        report.update(run(server.url if server else args.url, args.api_key, base_model, wl))
    finally:
        if server:
            server.stop()
    report["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
