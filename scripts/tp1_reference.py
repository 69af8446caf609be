"""TP=1 correctness reference: fixed requests through the real server on a fixed tiny model.

`--write` (on a CPU machine) runs a server with one worker, sends a fixed sequence of SDK calls
(forward, forward_backward, optim_step, forward again, greedy sampling and prompt logprobs
from the trained weights) and stores what came back in `scripts/tp1_reference.json`.
`--check` (on a GPU machine) runs the same sequence there and compares with tolerances
(logprobs absolute, loss and gradient norm relative, greedy tokens exactly); it exits 1 on a
mismatch. The model's weights come from a fixed CPU generator, not from a library's
initialiser, and their digest is stored too, so both machines provably serve the same model.

    python scripts/tp1_reference.py --write
    python scripts/tp1_reference.py --check --json out.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_throughput import KERNELS, Server  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "tp1_reference.json"
BASE_MODEL = "tp1-ref"
API_KEY = "tml-tp1-reference"
CONFIG = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False, rope_theta=1_000_000.0, eos_token_id=2, pad_token_id=0, bos_token_id=1)
ROWS = ([5, 17, 300, 42, 8, 999, 64, 3, 77, 500, 12, 31, 250], [9, 400, 401, 402, 7, 7, 7, 88, 1000, 6])
PROMPT = [5, 6, 7, 8, 9]
TOLERANCE = {"logprobs_abs": 2e-3, "loss_rel": 1e-3, "grad_norm_rel": 5e-3}


def write_model(out_dir: Path) -> str:
    """A Qwen3 checkpoint whose every tensor is drawn from one seeded CPU generator; returns its digest."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(**CONFIG))
    generator, digest = torch.Generator().manual_seed(1234), hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
            digest.update(name.encode() + tensor.numpy().tobytes())
    model.save_pretrained(out_dir, safe_serialization=True)
    return digest.hexdigest()


def run_sequence(url: str) -> dict:
    """The fixed SDK calls; returns every number they produced."""
    import tinker
    from tinker import types

    def datum(row, weights):
        return types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                           loss_fn_inputs={"target_tokens": row[1:], "weights": weights})

    data = [datum(list(ROWS[0]), [1.0] * (len(ROWS[0]) - 1)),
            datum(list(ROWS[1]), [0.0, 0.0, 0.5] + [1.0] * (len(ROWS[1]) - 4))]
    logprobs = lambda out: [o["logprobs"].tolist() for o in out.loss_fn_outputs]  # noqa: E731
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    trainer = service.create_lora_training_client(BASE_MODEL, rank=4, seed=0, train_unembed=False).result()
    before = logprobs(trainer.forward(data, "cross_entropy").result())
    fb = trainer.forward_backward(data, "cross_entropy").result()
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = logprobs(trainer.forward(data, "cross_entropy").result())
    sampler = trainer.save_weights_and_get_sampling_client().result()
    greedy = sampler.sample(types.ModelInput.from_ints(PROMPT), 1,
                            types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result().sequences[0]
    prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
    return {"logprobs_before": before, "loss_sum": fb.metrics["loss:sum"],
            "grad_norm": step.metrics["grad_norm:mean"], "logprobs_after": after,
            "greedy_tokens": list(greedy.tokens), "greedy_logprobs": list(greedy.logprobs),
            "prompt_logprobs": [x for x in prompt_lp if x is not None]}


def measure(kernels: str = "eager") -> dict:
    with tempfile.TemporaryDirectory(prefix="tp1-ref-model-") as tmp:
        digest = write_model(Path(tmp))
        server = Server(API_KEY, BASE_MODEL, tmp, workers=1, dtype="fp32",  # the CPU reference is fp32
                        extra_args=("--kernels", kernels)).start()
        try:
            values = run_sequence(server.url)
        finally:
            server.stop()
    return {"model_digest": digest, "values": values}


def _max_abs(a, b) -> float:
    flat = lambda x: [v for row in x for v in (row if isinstance(row, list) else [row])]  # noqa: E731
    return max(abs(x - y) for x, y in zip(flat(a), flat(b), strict=True))


def compare(ref: dict, got: dict) -> dict:
    """Each check: (passed, measured difference)."""
    r, g = ref["values"], got["values"]
    rel = lambda x, y: abs(x - y) / max(abs(x), 1e-12)  # noqa: E731
    checks = {
        "model_digest": (ref["model_digest"] == got["model_digest"], got["model_digest"][:16]),
        "loss_sum": (rel(r["loss_sum"], g["loss_sum"]) <= TOLERANCE["loss_rel"], rel(r["loss_sum"], g["loss_sum"])),
        "grad_norm": (rel(r["grad_norm"], g["grad_norm"]) <= TOLERANCE["grad_norm_rel"],
                      rel(r["grad_norm"], g["grad_norm"])),
        "greedy_tokens": (r["greedy_tokens"] == g["greedy_tokens"], g["greedy_tokens"]),
    }
    for key in ("logprobs_before", "logprobs_after", "greedy_logprobs", "prompt_logprobs"):
        diff = _max_abs(r[key], g[key])
        checks[key] = (diff <= TOLERANCE["logprobs_abs"] and not math.isnan(diff), diff)
    return {name: {"ok": ok, "measured": value} for name, (ok, value) in checks.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"measure here and write {REFERENCE.name}")
    mode.add_argument("--check", action="store_true", help=f"measure here and compare with {REFERENCE.name}")
    p.add_argument("--json", help="also write the comparison to this file")
    p.add_argument("--kernels", choices=KERNELS, default="eager", help="the server's --kernels (the reference: eager)")
    args = p.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    if args.write and args.kernels != "eager":
        p.error("the reference is written with eager kernels")
    got = measure(args.kernels)
    if args.write:
        REFERENCE.write_text(json.dumps({"tolerance": TOLERANCE, **got}, indent=1) + "\n")
        print(f"wrote {REFERENCE}")
        return
    checks = compare(json.loads(REFERENCE.read_text()), got)
    for name, c in checks.items():
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {name:16} {c['measured']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": checks, "values": got["values"]}, indent=1))
    sys.exit(0 if all(c["ok"] for c in checks.values()) else 1)


if __name__ == "__main__":
    main()
