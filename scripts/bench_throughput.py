"""Throughput benchmark: the real SDK against a Tinker server, and the same work in-process.

One invocation measures, for one base model and one fixed workload (LoRA SFT steps with
`cross_entropy`, then batches of concurrent `sample` calls):

- server, through the unmodified `tinker` SDK over HTTP: train tokens/s (`forward_backward`
  and `optim_step` submitted together, then both awaited; tokens = batch * seq per step) and
  sample tokens/s (all `sample` calls of a round submitted at once; tokens = tokens returned);
- a latency split of one training step, from serial raw HTTP requests encoded exactly as the
  SDK encodes them (TinkerCloud only; measured from the client side):
  `transfer` = the submit POST (upload, decode, validation, enqueue) + a second
  `retrieve_future` of the finished future (download of the stored result);
  `compute` = the in-process time of the same operation (below);
  `queue+IPC` = the first (long-polled) `retrieve_future` minus the download minus compute:
  scheduling, the shared-memory hop to the worker and back, result encoding, the futures store;
- the server's own transport numbers (TinkerCloud's `GET /api/v1/metrics`, read before and
  after the timed train steps and sampling rounds): array bytes carried per train step /
  sampling round, both ways (large arrays through shared memory, small ones inline); work items per phase (requests that arrive together
  go as one item; items that arrive while a sampling batch runs join it, and are counted); and
  the mean of each latency stage per
  request, from arrival at the HTTP handler to the worker's start, its compute and the stored
  future (other servers: not reported);
- in-process, in a subprocess with a torchrun environment of world size 1 and no server:
  the identical computation built from the same parts the worker uses (`build_model`,
  `LoraManager`, `token_logprobs`, `compute_loss`, `AdapterOptimizer`, the KV-cache `generate`),
  on the same tokens; then the overhead ratio server / in-process (time per token);
- on a GPU, the training MFU = flops per token * tokens/s / peak, with the usual LoRA
  approximation flops/token = 4 N + 6 N_lora + 12 L s d_attn (N: weights of every matmul a
  token passes through, unembedding included, input embedding excluded; forward 2N plus the
  activation gradients 2N, no weight gradients for frozen weights; LoRA factors train at 6 per
  parameter; attention scores and values as PaLM counts them, forward plus backward).

The SDK part needs only `tinker` (so it runs from an older SDK's virtualenv against another
Tinker server, e.g. `--url ... --no-inprocess`); everything else runs in the repository's
interpreter.

    python scripts/bench_throughput.py --start-server                         # embedded tiny model
    python scripts/bench_throughput.py --start-server --shape cpu-mid --json
    python scripts/bench_throughput.py --url http://127.0.0.1:8000 --base-model NAME --model-dir DIR
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.config import KERNELS  # noqa: E402  (light: no torch)
from engine.worker_env import WORKER_ENV  # noqa: E402  (light: no torch)
EMBEDDED_NAME = "tinkercloud/tiny-qwen3"
LORA_ALPHA = 32.0
ADAM = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}

# Random-init Qwen3 shapes (keyword arguments of scripts/make_tiny_model.make_tiny_model).
SHAPES = {
    "embedded": {},  # what the server generates when no model is configured (make_tiny_model's defaults)
    "embedded-random": dict(weights=False),  # its config only: in-process runs draw random weights
    "cpu-mid": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
                    vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960,
                       tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
                     tie_word_embeddings=False, weights=False),  # config only: random weights drawn on the device
}
# Dense peak TFLOP/s by GPU family and matmul dtype (fp32 = no TF32, torch's default).
PEAK_TFLOPS = {"H100 PCIe": {"bf16": 756.0, "fp32": 51.2}, "H100": {"bf16": 989.4, "fp32": 66.9},
               "H200": {"bf16": 989.4, "fp32": 66.9}}


@dataclass(frozen=True)
class Workload:
    batch: int = 8
    seq: int = 128
    steps: int = 5
    warmup: int = 1
    rank: int = 8
    train_unembed: bool = True
    sample_requests: int = 8
    num_samples: int = 1
    prompt_tokens: int = 32
    sample_tokens: int = 32
    sample_rounds: int = 3
    probe_steps: int = 3
    token_low: int = 3
    token_high: int = 400
    seed: int = 0

    def rows(self) -> list[list[int]]:
        """`batch` rows of seq + 1 token ids (inputs are [:-1], targets [1:])."""
        rng = random.Random(self.seed)
        return [[rng.randrange(self.token_low, self.token_high) for _ in range(self.seq + 1)] for _ in range(self.batch)]

    def prompts(self, round_index: int) -> list[list[int]]:
        """New prompts every round, so no server-side prefix cache can skip their prefill."""
        rng = random.Random(f"{self.seed}:prompts:{round_index}")
        return [[rng.randrange(self.token_low, self.token_high) for _ in range(self.prompt_tokens)]
                for _ in range(self.sample_requests)]

    @property
    def train_tokens(self) -> int:
        return self.batch * self.seq


def machine() -> dict:
    """CPU count, CPU model and RAM of this machine (Linux /proc)."""
    info = {"nproc": os.cpu_count()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        mem_kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")))
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def median_ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds), 2)


# ---- model shapes and flops --------------------------------------------------------------
def shape_facts(model_dir: str) -> dict:
    """Dimensions and parameter counts of an HF Qwen3/Llama config (for flops and MFU)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers, ffn, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_dim, kv_dim = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + hidden * 2 * ffn + ffn * hidden
    return {"hidden": hidden, "layers": layers, "ffn": ffn, "vocab": vocab, "q_dim": q_dim, "kv_dim": kv_dim,
            "matmul_params": layers * per_layer + vocab * hidden, "embedding_params": vocab * hidden,
            "tied": bool(cfg.get("tie_word_embeddings"))}


def lora_params(facts: dict, rank: int, train_unembed: bool) -> int:
    h, q, kv, f = facts["hidden"], facts["q_dim"], facts["kv_dim"], facts["ffn"]
    per_layer = rank * ((h + q + 2 * kv) + (q + h) + (h + 2 * f) + (f + h))
    return facts["layers"] * per_layer + (rank * (h + facts["vocab"]) if train_unembed else 0)


def train_flops_per_token(facts: dict, wl: Workload) -> float:
    attention = 12 * facts["layers"] * wl.seq * facts["q_dim"]
    return 4 * facts["matmul_params"] + 6 * lora_params(facts, wl.rank, wl.train_unembed) + attention


def mfu(facts: dict, wl: Workload, tokens_per_s: float | None, device: str, dtype: str) -> float | None:
    family = next((name for name in PEAK_TFLOPS if name in device), None)
    if family is None or not tokens_per_s:
        return None
    return train_flops_per_token(facts, wl) * tokens_per_s / (PEAK_TFLOPS[family][dtype] * 1e12)


def make_shape(shape: str, models_dir: Path) -> str:
    from scripts.make_tiny_model import make_tiny_model

    return make_tiny_model(str(models_dir / shape), "qwen3", **SHAPES[shape])


def has_weights(model_dir: str) -> bool:
    """Whether the checkpoint holds weights (a shape written with weights=False has only its config)."""
    return any(Path(model_dir).glob("*.safetensors"))


def default_name(shape: str) -> str:
    return EMBEDDED_NAME if shape == "embedded" else shape


# ---- the server --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python tinkercloud.py` serving one model on a free loopback port, in a throw-away data dir;
    the one of this checkout, or of the checkout at `root` (another commit, for a before/after run)."""

    def __init__(self, api_key: str, base_model: str, model_dir: str, workers: int, dtype: str, tp: int | None = None,
                 root: Path = ROOT, extra_args: tuple[str, ...] = ()):
        self.data_dir, self.port, self.root = Path(tempfile.mkdtemp(prefix="tinkercloud-bench-")), free_port(), root
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, str(root / "tinkercloud.py"), "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", str(self.data_dir), "--workers", str(workers), "--api-key", api_key,
                    "--model", f"{base_model}={model_dir}", "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype]]
        if tp is not None:
            self.cmd += ["--tp", str(tp)]
        self.cmd += list(extra_args)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> "Server":
        self.log = open(self.data_dir / "server.log", "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        tail = "\n".join((self.data_dir / "server.log").read_text(errors="replace").splitlines()[-20:])
        self.stop()
        raise RuntimeError(f"the server did not come up (exit code {self.proc.returncode}):\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # aiohttp shuts the worker pool down
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# ---- through the SDK ---------------------------------------------------------------------
def _resolved(client_or_future):
    """Newer SDKs return futures of clients (tinker 0.38), older ones the clients themselves (0.24)."""
    result = getattr(client_or_future, "result", None)
    return result() if callable(result) else client_or_future


def sdk_datums(wl: Workload):
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(tokens=row[:-1]),
                        loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * wl.seq}) for row in wl.rows()]


def sdk_step(tc, data):
    """One training step: `forward_backward` and `optim_step` submitted together, then both
    awaited; the forward_backward output."""
    from tinker import types

    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=ADAM["learning_rate"]))
    out = fb.result()
    opt.result()
    return out


def sdk_train(tc, wl: Workload, read_metrics=lambda: None) -> dict:
    data, step_s, losses = sdk_datums(wl), [], []
    for i in range(wl.warmup + wl.steps):
        if i == wl.warmup:
            before = read_metrics()
        t0 = time.perf_counter()
        out = sdk_step(tc, data)
        step_s.append(time.perf_counter() - t0)
        losses.append(-sum(sum(o["logprobs"].tolist()) for o in out.loss_fn_outputs) / wl.train_tokens)
    summary = train_summary(step_s, losses, wl)
    transport = transport_phase(before, read_metrics(), ("forward_backward", "optim_step"), wl.steps)
    return {**summary, "transport": transport} if transport else summary


def train_summary(step_s: list[float], losses: list[float], wl: Workload) -> dict:
    steady = step_s[wl.warmup:]
    return {"first_step_ms": round(1000 * step_s[0], 2), "step_ms": median_ms(steady),
            "tokens_per_s": round(wl.train_tokens / statistics.median(steady), 1),
            "mean_nll_first": round(losses[0], 4), "mean_nll_last": round(losses[-1], 4)}


def sdk_sample_round(sampler, wl: Workload, rnd: int) -> tuple[float, int]:
    """(seconds, tokens returned) of round `rnd`: its requests all submitted, then all awaited."""
    from tinker import types

    prompts = [types.ModelInput.from_ints(tokens=p) for p in wl.prompts(rnd)]
    params = [types.SamplingParams(max_tokens=wl.sample_tokens, temperature=1.0, seed=1000 * rnd + i, stop=[])
              for i in range(len(prompts))]
    t0 = time.perf_counter()
    futures = [sampler.sample(prompt=p, num_samples=wl.num_samples, sampling_params=sp) for p, sp in zip(prompts, params)]
    tokens = sum(len(s.tokens) for f in futures for s in f.result().sequences)
    return time.perf_counter() - t0, tokens


def sdk_sample(sampler, wl: Workload, read_metrics=lambda: None) -> dict:
    round_s, tokens = [], []
    for rnd in range(1 + wl.sample_rounds):  # round 0 warms up
        if rnd == 1:
            before = read_metrics()
        seconds, n = sdk_sample_round(sampler, wl, rnd)
        if rnd > 0:
            round_s.append(seconds)
            tokens.append(n)
    summary = sample_summary(round_s, tokens)
    transport = transport_phase(before, read_metrics(), ("sample",), wl.sample_rounds)
    return {**summary, "transport": transport} if transport else summary


def sample_summary(round_s: list[float], tokens: list[int]) -> dict:
    return {"round_ms": median_ms(round_s), "tokens_per_round": statistics.median(tokens),
            "tokens_per_s": round(statistics.median(tokens) / statistics.median(round_s), 1)}


def run_sdk(url: str, api_key: str, base_model: str, wl: Workload) -> dict:
    import tinker

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    tc = _resolved(service.create_lora_training_client(base_model=base_model, rank=wl.rank, seed=0,
                                                       train_unembed=wl.train_unembed))
    read = lambda: server_metrics(url, api_key)  # noqa: E731
    train = sdk_train(tc, wl, read)
    path = tc.save_weights_for_sampler(name="bench").result().path
    sample = sdk_sample(_resolved(service.create_sampling_client(model_path=path)), wl, read)
    return {"sdk_version": tinker.__version__, "train": train, "sample": sample}


# ---- the server's transport metrics (TinkerCloud) ---------------------------------------
TRANSPORT_STAGES = ("arrival_to_enqueued", "enqueued_to_start", "compute", "end_to_stored", "arrival_to_start", "total")


def server_metrics(url: str, api_key: str) -> dict | None:
    """The per-operation transport numbers of `GET /api/v1/metrics`; None where the server has none."""
    req = urllib.request.Request(f"{url}/api/v1/metrics", headers={"X-API-Key": api_key})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["transport"]["ops"]
    except (OSError, ValueError, KeyError):
        return None


def transport_phase(before: dict | None, after: dict | None, ops: tuple[str, ...], units: int) -> dict | None:
    """What moved between two readings of the metrics: array bytes per unit (a train step,
    a sampling round) both ways, and per operation its work items, requests and the mean ms of
    each latency stage over the requests of the phase."""
    if before is None or after is None:
        return None
    out: dict = {"request_bytes_per_unit": 0.0, "result_bytes_per_unit": 0.0, "ops": {}}
    for op in ops:
        now, then = after.get(op), before.get(op) or {}
        if now is None:
            continue
        delta = lambda key: now.get(key, 0) - then.get(key, 0)  # noqa: E731
        out["request_bytes_per_unit"] += round(delta("request_bytes") / units, 1)
        out["result_bytes_per_unit"] += round(delta("result_bytes") / units, 1)
        stages = {}
        for stage in TRANSPORT_STAGES:
            a, b = now["latency_ms"][stage], (then.get("latency_ms") or {}).get(stage, {})
            count = a["count"] - b.get("count", 0)
            stages[stage] = round((a["sum"] - b.get("sum", 0.0)) / count, 2) if count else None
        out["ops"][op] = {"items": delta("items"), "requests": delta("requests"), "joined": delta("joined_items"),
                          "mean_ms": stages}
    return out


# ---- raw HTTP latency probe (TinkerCloud, protobuf SDKs) ----------------------------------
class Probe:
    """One training run driven by serial raw requests, encoded with the SDK's own types."""

    def __init__(self, url: str, api_key: str, base_model: str, wl: Workload):
        import httpx

        self.http = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": api_key}, timeout=120)
        self.wl, self.seq = wl, 0
        session = self._json("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "bench",
                                                "type": "create_session"})["session_id"]
        handle = self._json("create_model", {
            "session_id": session, "model_seq_id": 0, "base_model": base_model, "type": "create_model",
            "lora_config": {"rank": wl.rank, "seed": 0, "train_unembed": wl.train_unembed}})
        self.model_id = self._retrieve(handle["request_id"])[0].json()["model_id"]

    def _json(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    def _retrieve(self, request_id: str):
        t0 = time.perf_counter()
        while True:
            r = self.http.post("retrieve_future", json={"request_id": request_id, "allow_metadata_only": False},
                               headers={"Accept": "application/x-protobuf"})
            r.raise_for_status()
            if "protobuf" in r.headers.get("content-type", ""):
                return r, time.perf_counter() - t0
            body = r.json()
            if "error" in body:
                raise RuntimeError(f"request {request_id} failed: {body}")
            if body.get("type") != "try_again":
                return r, time.perf_counter() - t0

    def _timed(self, post) -> dict[str, float]:
        t0 = time.perf_counter()
        r = post()
        r.raise_for_status()
        up = time.perf_counter() - t0
        _, wait = self._retrieve(r.json()["request_id"])
        _, down = self._retrieve(r.json()["request_id"])  # the finished result again: pure download
        return {"up": up, "wait": wait, "down": down}

    def step(self) -> tuple[dict, dict]:
        from tinker import types
        from tinker.proto.request_conv import forward_backward_request_to_proto

        self.seq += 2
        fb = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
            data=sdk_datums(self.wl), loss_fn="cross_entropy"), model_id=self.model_id, seq_id=self.seq - 1)
        body = forward_backward_request_to_proto(fb).SerializeToString()
        fb_t = self._timed(lambda: self.http.post("forward_backward", content=body,
                                                  headers={"Content-Type": "application/x-protobuf"}))
        opt = {"model_id": self.model_id, "adam_params": ADAM, "seq_id": self.seq, "type": "optim_step"}
        opt_t = self._timed(lambda: self.http.post("optim_step", json=opt))
        return fb_t, opt_t


def run_probe(url: str, api_key: str, base_model: str, wl: Workload) -> dict:
    """Median timings of serial raw steps (TinkerCloud's protobuf wire; use --no-probe for other servers)."""
    try:
        probe = Probe(url, api_key, base_model, wl)
        samples = [probe.step() for _ in range(wl.warmup + wl.probe_steps)][wl.warmup:]
    except Exception as e:  # noqa: BLE001 - keep the SDK numbers already measured
        return {"error": f"{type(e).__name__}: {e}"}
    out = {}
    for i, op in enumerate(("forward_backward", "optim_step")):
        out[op] = {k: median_ms([s[i][k] for s in samples]) for k in ("up", "wait", "down")}
    return out


def latency_split(probe: dict, inproc: dict) -> dict:
    split = {}
    for op, key in (("forward_backward", "fb_ms"), ("optim_step", "optim_ms")):
        p, compute = probe[op], inproc["train"][key]
        split[op] = {"transfer_ms": round(p["up"] + p["down"], 2), "queue_ipc_ms": round(p["wait"] - p["down"] - compute, 2),
                     "compute_ms": compute, "total_ms": round(p["up"] + p["wait"], 2)}
    return split


# ---- in-process (subprocess with a torchrun environment, world size 1) --------------------
def run_inprocess(model_dir: str, wl: Workload, dtype: str, profile: str | None = None,
                  lora_compute: str = "fp32", kernels: str = "eager") -> dict:
    spec = {"model_dir": model_dir, "workload": asdict(wl), "dtype": dtype, "profile": profile,
            "lora_compute": lora_compute, "kernels": kernels}
    env = {**WORKER_ENV, **os.environ,  # the allocators' settings, as the server's workers get them
           "PYTHONWARNINGS": "ignore", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--inprocess-spec", json.dumps(spec)], cwd=ROOT, env=env,
                         check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def inprocess_main(spec: dict) -> dict:
    """The identical computation on this process's device, timed; printed as one JSON line."""
    import torch
    from megatron.core import parallel_state

    from backends.common.optimizer import AdapterOptimizer
    from backends.miles.backend import pack_sampler_weights
    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model
    from backends.miles.parallel import ParallelDims, init_distributed

    wl = Workload(**spec["workload"])
    device = init_distributed(ParallelDims(tp=1))
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    kernels = spec.get("kernels", "eager")
    model = build_model(spec["model_dir"], device, dtype, random_weights=not has_weights(spec["model_dir"]),
                        kernels=kernels)
    lora = LoraManager(model, compute_dtype=dtype if spec.get("lora_compute") == "base" else torch.float32)
    lora.add_adapter("bench", wl.rank, LORA_ALPHA, train_unembed=wl.train_unembed, seed=0)
    pack_sampler_weights([lora], device)  # as the server's workers do (on CPU only)
    optimizer = AdapterOptimizer(lora.adapter_params("bench"), parallel_state.get_tensor_model_parallel_group())
    build_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {"device": name, "dtype": spec["dtype"], "lora_compute": spec.get("lora_compute", "fp32"), "kernels": kernels,
              "build_s": round(build_s, 1),
              "train": _inprocess_train(model, lora, optimizer, wl, device)}
    if device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if spec.get("profile"):
        _profile_train_step(model, lora, optimizer, wl, device, spec["profile"])
    report["sample"] = _inprocess_sample(model, lora, wl, device)
    return report


def _sync(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _inprocess_train(model, lora, optimizer, wl: Workload, device) -> dict:
    """What `MilesBackend.forward_backward` + `optim_step` compute, on the same tokens."""
    fb_s, opt_s, losses = [], [], []
    for _ in range(wl.warmup + wl.steps):
        fb, opt, loss = _train_step(model, lora, optimizer, wl, device)
        fb_s.append(fb)
        opt_s.append(opt)
        losses.append(loss)
    return {"fb_ms": median_ms(fb_s[wl.warmup:]), "optim_ms": median_ms(opt_s[wl.warmup:]),
            **train_summary([a + b for a, b in zip(fb_s, opt_s)], losses, wl)}


def _train_step(model, lora, optimizer, wl: Workload, device) -> tuple[float, float, float]:
    """One forward_backward + optim_step on the workload's rows: (fb seconds, optim seconds, mean NLL)."""
    import numpy as np
    import torch

    from backends.common.losses import compute_loss
    from backends.miles.model import token_logprobs

    rows = np.asarray(wl.rows(), dtype=np.int64)
    t0 = _sync(device)
    tok, tgt = torch.from_numpy(rows[:, :-1]).to(device), torch.from_numpy(rows[:, 1:]).to(device)
    with lora.route(["bench"] * wl.batch):
        lp = token_logprobs(model, tok, tgt)
        lps = [lp[i] for i in range(wl.batch)]
        inputs = [{"target_tokens": tgt[i], "weights": torch.ones(wl.seq, device=device)} for i in range(wl.batch)]
        loss, elementwise, _ = compute_loss("cross_entropy", lps, inputs, {})
        loss.backward()
    outputs = [(x.detach().float().cpu(), e.detach().float().cpu()) for x, e in zip(lps, elementwise)]
    t1 = _sync(device)
    optimizer.step(ADAM)
    t2 = _sync(device)
    return t1 - t0, t2 - t1, -sum(float(x.sum()) for x, _ in outputs) / wl.train_tokens


def _profile_train_step(model, lora, optimizer, wl: Workload, device, path: str) -> None:
    """One more training step under torch.profiler; its operator table (by device time) goes to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = _sync(device)
        _train_step(model, lora, optimizer, wl, device)
        wall_ms = 1000 * (_sync(device) - t0)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    head = f"profiled step: {wall_ms:.1f} ms wall"
    if device.type == "cuda":
        from torch.autograd import DeviceType

        kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        # device rows only, as the table's own total: operator rows repeat their kernels' time
        busy_ms = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1000
        head += f", device busy {busy_ms:.1f} ms, {kernels} device kernels/copies"
    Path(path).write_text(head + "\n" + averages.table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")


def _inprocess_sample(model, lora, wl: Workload, device) -> dict:
    """All of a round's requests in one `generate` call, from a frozen copy of the adapter."""
    from backends.miles.sampler import SampleSpec, generate

    lora.clone_adapter("bench", "bench-snapshot")
    round_s, tokens = [], []
    for rnd in range(1 + wl.sample_rounds):
        specs = [SampleSpec(prompt=p, num_samples=wl.num_samples, max_tokens=wl.sample_tokens, temperature=1.0,
                            seed=1000 * rnd + i, adapter="bench-snapshot") for i, p in enumerate(wl.prompts(rnd))]
        t0 = _sync(device)
        results = generate(model, specs, route=lora.route)
        t1 = _sync(device)
        if rnd > 0:
            round_s.append(t1 - t0)
            tokens.append(sum(len(s.tokens) for r in results for s in r.sequences))
    return sample_summary(round_s, tokens)


# ---- report ------------------------------------------------------------------------------
def summarize(report: dict) -> dict:
    """Adds overhead ratios (server time / in-process time per token) and MFU."""
    server, inproc = report.get("server"), report.get("inprocess")
    if server and inproc:
        report["overhead"] = {kind: round(inproc[kind]["tokens_per_s"] / server[kind]["tokens_per_s"], 2)
                              for kind in ("train", "sample")}
        if report.get("probe") and "error" not in report["probe"]:
            report["latency_split"] = latency_split(report["probe"], inproc)
    if inproc and report.get("facts"):
        wl, facts = Workload(**report["workload"]), report["facts"]
        report["mfu"] = {"inprocess": mfu(facts, wl, inproc["train"]["tokens_per_s"], inproc["device"], inproc["dtype"]),
                         "server": mfu(facts, wl, server and server["train"]["tokens_per_s"], inproc["device"],
                                       inproc["dtype"]),
                         "train_flops_per_token": train_flops_per_token(facts, wl)}
    return report


def table(report: dict) -> str:
    wl, facts = report["workload"], report.get("facts") or {}
    lines = [f"model {report['base_model']}"
             + (f" ({facts['matmul_params'] / 1e6:.1f}M matmul params, hidden {facts['hidden']}, {facts['layers']} layers, "
                f"vocab {facts['vocab']})" if facts else ""),
             f"workload: batch {wl['batch']} x {wl['seq']} tokens, LoRA rank {wl['rank']} "
             f"(unembed {'on' if wl['train_unembed'] else 'off'}); sampling {wl['sample_requests']} concurrent requests "
             f"x {wl['num_samples']} x {wl['sample_tokens']} tokens, prompt {wl['prompt_tokens']}",
             f"{'':24}{'server (SDK)':>14}{'in-process':>14}{'server/in-proc':>16}"]
    server, inproc, overhead = report.get("server") or {}, report.get("inprocess") or {}, report.get("overhead") or {}
    for kind, label in (("train", "train tokens/s"), ("sample", "sample tokens/s")):
        cells = [server.get(kind, {}).get("tokens_per_s"), inproc.get(kind, {}).get("tokens_per_s"), overhead.get(kind)]
        lines.append(f"{label:24}" + "".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (14, 14, 16))))
    if report.get("latency_split"):
        lines.append(f"{'step latency (ms)':24}{'transfer':>10}{'queue+IPC':>11}{'compute':>10}{'total':>10}")
        for op, s in report["latency_split"].items():
            lines.append(f"  {op:22}{s['transfer_ms']:>10}{s['queue_ipc_ms']:>11}{s['compute_ms']:>10}{s['total_ms']:>10}")
    lines += transport_table(server)
    if inproc:
        m = report.get("mfu") or {}
        shown = lambda v: "n/a (no GPU peak known)" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lora, kernels = inproc.get("lora_compute", "fp32"), inproc.get("kernels", "eager")
        lines.append(f"in-process: {inproc['device']}, {inproc['dtype']} (LoRA products in {lora}, {kernels} kernels), "
                     f"model built in "
                     f"{inproc['build_s']} s; MFU in-process {shown(m.get('inprocess'))}, server {shown(m.get('server'))}")
    for name, side in (("server", server), ("in-process", inproc)):
        if side.get("train"):
            lines.append(f"training sanity ({name}): mean NLL {side['train']['mean_nll_first']} -> "
                         f"{side['train']['mean_nll_last']}")
    m, load = report["machine"], lambda x: "/".join(f"{v:.2f}" for v in x)  # noqa: E731
    lines.append(f"machine: {m['nproc']} CPUs ({m.get('cpu', '?')}), {m.get('ram_gib', '?')} GiB RAM, "
                 f"OMP_NUM_THREADS {report['omp_num_threads']}; load average "
                 f"{load(report['load_before'])} before, {load(report['load_after'])} after; {report['date']}")
    return "\n".join(lines)


def transport_table(server: dict) -> list[str]:
    """The server's transport numbers over the timed phases (SDK runs against TinkerCloud)."""
    phases = [(kind, unit, server[kind]["transport"]) for kind, unit in (("train", "train step"), ("sample", "round"))
              if (server.get(kind) or {}).get("transport")]
    if not phases:
        return []
    cell = lambda v: "-" if v is None else v  # noqa: E731
    lines = [f"{'server transport (mean ms)':28}{'items':>6}{'req/item':>9}{'arr->enq':>9}{'enq->start':>11}"
             f"{'compute':>9}{'end->stored':>12}{'arr->start':>11}"]
    for kind, unit, t in phases:
        for op, o in t["ops"].items():
            m = o["mean_ms"]
            per_item = round(o["requests"] / o["items"], 1) if o["items"] else "-"
            lines.append(f"  {op:26}{o['items']:>6}{per_item:>9}{cell(m['arrival_to_enqueued']):>9}"
                         f"{cell(m['enqueued_to_start']):>11}{cell(m['compute']):>9}{cell(m['end_to_stored']):>12}"
                         f"{cell(m['arrival_to_start']):>11}")
        lines.append(f"  array bytes per {unit}: {t['request_bytes_per_unit']:.0f} B to the workers, "
                     f"{t['result_bytes_per_unit']:.0f} B back")
        joined = sum(o.get("joined", 0) for o in t["ops"].values())
        if joined:
            lines.append(f"  {joined} item(s) joined a sampling batch already running (continuous batching)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running Tinker server")
    where.add_argument("--start-server", action="store_true", help="start TinkerCloud on a free loopback port")
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-dev-key"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="embedded",
                   help="a random-init Qwen3 made by make_tiny_model (ignored with --model-dir)")
    p.add_argument("--model-dir", help="HF checkpoint dir of the base model (in-process run, --start-server)")
    p.add_argument("--base-model", help="the server's name for the base model")
    p.add_argument("--models-cache", default=str(Path(tempfile.gettempdir()) / "tinkercloud-bench-models"))
    p.add_argument("--workers", type=int, default=1, help="worker processes of a started server")
    p.add_argument("--tp", type=int, help="tensor-parallel degree of a started server (the rest of --workers is "
                   "data parallel; unset: the server's own choice, on CPU every worker in one TP group)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="base weights of the started server and the in-process run (adapters stay fp32)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the started server's workers and the in-process run")
    p.add_argument("--no-server", action="store_true", help="in-process only")
    p.add_argument("--no-inprocess", action="store_true")
    p.add_argument("--no-probe", action="store_true", help="skip the raw-HTTP latency split (needed for other servers)")
    p.add_argument("--repeats", type=int, default=1, help="alternating server / in-process repetitions (medians)")
    for f in Workload.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="the report as JSON: on stdout instead of the table, or into FILE besides the table")
    p.add_argument("--lora-compute", choices=("fp32", "base"), default="fp32",
                   help="the LoRA products in float32 (the server's default) or in the base weights' dtype (factors "
                        "and optimizer state stay float32), in-process and in a started server")
    p.add_argument("--kernels", choices=KERNELS, default="eager",
                   help="RMSNorm/RoPE/SwiGLU eager or compiled into fused kernels, or whole decoder layers compiled, "
                        "in-process and in a started server")
    p.add_argument("--profile", metavar="FILE", help="after the timed in-process steps, profile one more and write "
                   "torch.profiler's operator table (sorted by device time) to FILE")
    p.add_argument("--inprocess-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_model(args: argparse.Namespace) -> tuple[str | None, str]:
    """(HF checkpoint dir, or None when only a remote server is driven; the server's name for it)."""
    if args.model_dir:
        return args.model_dir, args.base_model or Path(args.model_dir).name
    if args.url and args.no_inprocess:
        return None, args.base_model or default_name(args.shape)
    return make_shape(args.shape, Path(args.models_cache)), args.base_model or default_name(args.shape)


def median_of(runs: list[dict]) -> dict:
    """Key-by-key median of repeated runs' nested results (non-numbers from the first run)."""
    out = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = median_of([r[key] for r in runs])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = round(statistics.median(r[key] for r in runs), 2)
        else:
            out[key] = first
    return out


def measure(args: argparse.Namespace, wl: Workload, model_dir: str | None, base_model: str, report: dict) -> None:
    """Server and in-process runs alternate `--repeats` times, so load drift hits both alike."""
    server = None
    if args.start_server and not args.no_server:
        if not has_weights(model_dir):
            sys.exit(f"{model_dir} holds no weights (a shape for in-process runs with random weights): add --no-server")
        server = Server(args.api_key, base_model, model_dir, args.workers, args.dtype, args.tp, extra_args=(
            "--lora-compute", {"fp32": "float32", "base": "base"}[args.lora_compute], "--kernels", args.kernels)).start()
    url = None if args.no_server else server.url if server else args.url
    runs: dict[str, list[dict]] = {"server": [], "inprocess": []}
    try:
        for _ in range(args.repeats):
            if url:
                runs["server"].append(run_sdk(url, args.api_key, base_model, wl))
            if model_dir and not args.no_inprocess:
                runs["inprocess"].append(run_inprocess(model_dir, wl, args.dtype, args.profile, args.lora_compute,
                                                       args.kernels))
        if url and not args.no_probe:
            report["probe"] = run_probe(url, args.api_key, base_model, wl)
    finally:
        if server:
            server.stop()
    for kind, done in runs.items():
        if done:
            report[kind] = median_of(done)
            report[f"{kind}_runs"] = done


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.inprocess_spec:
        print(json.dumps(inprocess_main(json.loads(args.inprocess_spec))))
        return
    wl = Workload(**{f: bool(getattr(args, f)) if f == "train_unembed" else getattr(args, f)
                     for f in Workload.__dataclass_fields__})
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server and the in-process run
    model_dir, base_model = resolve_model(args)
    report = {"base_model": base_model, "workload": asdict(wl), "repeats": args.repeats, "machine": machine(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch default: all cores)"),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": os.getloadavg()}
    if model_dir:
        report["facts"] = shape_facts(model_dir)
    measure(args, wl, model_dir, base_model, report)
    report["load_after"] = os.getloadavg()
    summarize(report)
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1) if args.json == "-" else table(report))


if __name__ == "__main__":
    main()
