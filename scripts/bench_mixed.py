"""Two tenants on one server: how long a training step takes while another client samples.

A demanding user of a shared server trains while someone else runs long generations. This
benchmark drives a TinkerCloud server with the real SDK in two phases:

- alone: one client runs `--steps` training steps (`forward_backward` + `optim_step`, submitted
  together, then both awaited), as `bench_throughput.py` does;
- mixed: a second client keeps `--sample-requests` long generations (`--sample-tokens` new tokens
  each, no early stop) in flight, submitting a new one whenever one ends, while the first client
  runs the same number of steps again.

It reports the training step latency of each phase (median, p90, max), the ratio mixed / alone,
and the sampling client's tokens/s during the mixed phase. With `--repo DIR` the server started is
the one in checkout DIR (say, a `git worktree` of an earlier commit), for a before/after
comparison on the same machine and workload.

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
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_throughput import (ADAM, ROOT, SHAPES, Server, Workload, _resolved, default_name,  # noqa: E402
                                      machine, make_shape, sdk_datums)


def step_latencies(tc, wl: Workload) -> list[float]:
    """Seconds of each of `wl.steps` training steps (after `wl.warmup` untimed ones)."""
    from tinker import types

    data, out = sdk_datums(wl), []
    for i in range(wl.warmup + wl.steps):
        t0 = time.perf_counter()
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=ADAM["learning_rate"]))
        fb.result()
        opt.result()
        if i >= wl.warmup:
            out.append(time.perf_counter() - t0)
    return out


class SamplingTenant:
    """Keeps `n` long generations in flight from its own client until stopped."""

    def __init__(self, sampler, wl: Workload) -> None:
        self.sampler, self.wl, self.tokens, self.stop = sampler, wl, 0, threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(wl.sample_requests)]

    def _loop(self, i: int) -> None:
        from tinker import types

        prompt = types.ModelInput.from_ints(self.wl.prompts(0)[i % len(self.wl.prompts(0))])
        k = 0
        while not self.stop.is_set():
            params = types.SamplingParams(max_tokens=self.wl.sample_tokens, temperature=1.0, seed=1000 * i + k, stop=[])
            got = len(self.sampler.sample(prompt, 1, params).result().sequences[0].tokens)
            with self.lock:
                self.tokens += got
            k += 1

    def __enter__(self) -> "SamplingTenant":
        self.started = time.perf_counter()
        for t in self.threads:
            t.start()
        time.sleep(1.0)  # the generations are decoding
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.stop.set()
        for t in self.threads:
            t.join()


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"median_ms": round(1000 * statistics.median(ordered), 1),
            "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def run(url: str, api_key: str, base_model: str, wl: Workload) -> dict:
    import tinker

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    trainer = tinker.ServiceClient(base_url=url, api_key=api_key)
    tc = _resolved(trainer.create_lora_training_client(base_model=base_model, rank=wl.rank, seed=0))
    alone = step_latencies(tc, wl)
    other = tinker.ServiceClient(base_url=url, api_key=api_key)
    run2 = _resolved(other.create_lora_training_client(base_model=base_model, rank=wl.rank, seed=1))
    sampler = _resolved(run2.save_weights_and_get_sampling_client())
    with SamplingTenant(sampler, wl) as tenant:
        mixed = step_latencies(tc, replace(wl, warmup=0))
    return {"alone": summary(alone), "mixed": summary(mixed),
            "mixed_over_alone": round(statistics.median(mixed) / statistics.median(alone), 2),
            "sample_tokens_per_s_during_mixed": round(tenant.tokens / tenant.seconds, 1)}


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
    p.add_argument("--sample-requests", type=int, default=4, help="long generations kept in flight")
    p.add_argument("--sample-tokens", type=int, default=1000, help="new tokens of each generation")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    wl = Workload(batch=args.batch, seq=args.seq, steps=args.steps, warmup=1, sample_requests=args.sample_requests,
                  sample_tokens=args.sample_tokens)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model_dir = args.model_dir or make_shape(args.shape, Path(args.models_cache))
    base_model = args.base_model or (Path(model_dir).name if args.model_dir else default_name(args.shape))
    report = {"base_model": base_model, "workload": {k: getattr(args, k) for k in
                                                     ("batch", "seq", "steps", "sample_requests", "sample_tokens")},
              "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
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
