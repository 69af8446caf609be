"""Server configuration: one `Config` read from CLI flags, environment variables or YAML.

Precedence: explicit flags > environment > YAML file > defaults. Variable names follow the
original TinkerCloud description (TRAINING_HOST, TRAINING_PORT, TINKER_API_KEY,
METADATA_DIR, FUTURES_DB_NAME, SUPPORTED_MODELS, ...) next to our own TINKERCLOUD_* ones.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from engine.model_source import public_model_name, resolve_model_dir

DEFAULT_API_KEY = "tml-dev-key"
EMBEDDED_MODEL_NAME = "tinkercloud/tiny-qwen3"
BACKENDS = ("miles", "nemo_rl")
DTYPES = ("auto", "float32", "bfloat16")
RECOMPUTE = ("none", "selective", "full")
LORA_COMPUTE = ("float32", "base")
KERNELS = ("eager", "compiled", "compiled_layers")  # what each is: backends/miles/fusions.py


@dataclass(frozen=True)
class ServedModel:
    """A base model the server trains and samples: its public name and HF checkpoint dir."""

    name: str
    path: str


@dataclass
class Config:
    backend: str = "miles"
    host: str = "0.0.0.0"
    port: int = 8000
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    data_dir: str = "./data"
    futures_dir: str = ""  # empty: <data_dir>/futures (see `futures_path`)
    models: tuple[ServedModel, ...] = ()  # empty: generate and serve the embedded tiny model
    workers: int = 0  # 0: one per local GPU, or 1 CPU worker without GPUs
    tp: int = 0  # tensor-parallel degree; 0: chosen from the model size and the GPUs (see parallel.choose_layout)
    pp: int = 0  # pipeline-parallel degree; 0: chosen likewise; tp x pp must divide the workers, the rest is DP
    dtype: str = "auto"  # base weights: bfloat16 on GPUs, float32 on CPU; adapters and Adam state stay float32
    recompute: str = "none"  # activation recomputation: none, selective (attention core) or full (whole layers)
    lora_compute: str = "float32"  # LoRA products in float32, or in the base weights' dtype ("base")
    # RMSNorm / RoPE / SwiGLU eager, or compiled into one fused kernel each ("compiled"), or every
    # decoder layer compiled whole, LoRA included ("compiled_layers")
    kernels: str = "eager"
    # while a sampling batch decodes, the share of the worker's time the operations that arrive
    # meanwhile (training, checkpoints) may take between its decode steps; 0: they wait for its end
    interleave_share: float = 0.5
    # while a replica is idle, a burst of sampling requests is gathered until none has come for this
    # long (at most 5x), so its prompts are prefilled together; 0: each event-loop turn's go at once
    sample_gather_ms: float = 2.0
    long_poll_seconds: float = 30.0
    session_timeout_seconds: float = 300.0  # no heartbeat for this long: the session's runs are unloaded
    max_sample_batch_rows: int = 64
    allow_partial_batches: bool = False
    ray_address: str = ""
    ray_namespace: str = "kgateway"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"TINKERCLOUD_BACKEND must be one of {BACKENDS}, got {self.backend!r}")
        if self.tp < 0 or self.pp < 0:
            raise ValueError(f"TINKERCLOUD_TP / TINKERCLOUD_PP must be 0 (automatic) or a positive degree, "
                             f"got tp={self.tp} pp={self.pp}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TINKERCLOUD_DTYPE must be one of {DTYPES}, got {self.dtype!r}")
        if self.lora_compute not in LORA_COMPUTE:
            raise ValueError(f"TINKERCLOUD_LORA_COMPUTE must be one of {LORA_COMPUTE}, got {self.lora_compute!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"TINKERCLOUD_KERNELS must be one of {KERNELS}, got {self.kernels!r}")
        if not 0.0 <= self.interleave_share <= 1.0:
            raise ValueError(f"TINKERCLOUD_INTERLEAVE_SHARE must be between 0 and 1, got {self.interleave_share}")
        if not 0.0 <= self.sample_gather_ms <= 1000.0:
            raise ValueError(f"TINKERCLOUD_SAMPLE_GATHER_MS must be between 0 and 1000, got {self.sample_gather_ms}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"TINKERCLOUD_RECOMPUTE must be one of {RECOMPUTE}, got {self.recompute!r}")
        for key in self.api_keys:
            if not key.startswith(("tml-", "eyJ")):
                raise ValueError(f"API key {key[:6]!r}... must start with 'tml-': the tinker SDK refuses others")

    @property
    def futures_path(self) -> str:
        return self.futures_dir or str(Path(self.data_dir) / "futures")

    # ---- sources -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**_coerce(raw))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, base: "Config | None" = None) -> "Config":
        env = dict(os.environ if env is None else env)
        values = _as_dict(base) if base else {}
        pick = {
            "backend": env.get("TINKERCLOUD_BACKEND"),
            "host": env.get("TINKERCLOUD_HOST") or env.get("TRAINING_HOST"),
            "port": env.get("TINKERCLOUD_PORT") or env.get("TRAINING_PORT"),
            "api_keys": env.get("TINKER_API_KEY"),
            "data_dir": env.get("TINKERCLOUD_DATA_DIR"),
            "workers": env.get("TINKERCLOUD_WORKERS"),
            "tp": env.get("TINKERCLOUD_TP"),
            "pp": env.get("TINKERCLOUD_PP"),
            "dtype": env.get("TINKERCLOUD_DTYPE"),
            "recompute": env.get("TINKERCLOUD_RECOMPUTE"),
            "lora_compute": env.get("TINKERCLOUD_LORA_COMPUTE"),
            "kernels": env.get("TINKERCLOUD_KERNELS"),
            "interleave_share": env.get("TINKERCLOUD_INTERLEAVE_SHARE"),
            "sample_gather_ms": env.get("TINKERCLOUD_SAMPLE_GATHER_MS"),
            "session_timeout_seconds": env.get("TINKERCLOUD_SESSION_TIMEOUT"),
            "models": env.get("TINKERCLOUD_MODELS") or env.get("SUPPORTED_MODELS"),
            "allow_partial_batches": env.get("ALLOW_PARTIAL_BATCHES"),
            "ray_address": env.get("RAY_ADDRESS"),
            "ray_namespace": env.get("RAY_NAMESPACE"),
        }
        if env.get("METADATA_DIR") or env.get("FUTURES_DB_NAME"):
            data_dir = pick["data_dir"] or values.get("data_dir") or Config.data_dir
            meta = env.get("METADATA_DIR") or str(Path(data_dir) / "metadata")
            pick["futures_dir"] = str(Path(meta) / env.get("FUTURES_DB_NAME", "futures.db"))
        values.update(_coerce({k: v for k, v in pick.items() if v not in (None, "")}))
        return cls(**values)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "Config":
        p = argparse.ArgumentParser(prog="tinkercloud", description="Self-hosted Tinker training server")
        p.add_argument("--config", help="YAML file with Config fields")
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--backend", choices=BACKENDS)
        p.add_argument("--data-dir")
        p.add_argument("--workers", type=int, help="worker processes (tp x dp ranks); CPU workers without GPUs")
        p.add_argument("--tp", type=int, help="tensor-parallel degree (default: chosen from model size and GPUs)")
        p.add_argument("--pp", type=int, help="pipeline-parallel degree; tp x pp must divide --workers")
        p.add_argument("--dtype", choices=DTYPES, help="base weight dtype (default: bfloat16 on GPU, float32 on CPU)")
        p.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation for long sequences")
        p.add_argument("--lora-compute", choices=LORA_COMPUTE,
                       help="dtype of the LoRA products: float32 (default) or the base weights' (factors stay float32)")
        p.add_argument("--kernels", choices=KERNELS,
                       help="RMSNorm, RoPE and SwiGLU as PyTorch's small kernels (eager, the default), "
                            "torch.compile'd into one fused kernel each (compiled), or each decoder layer compiled "
                            "whole, LoRA included (compiled_layers: fewest kernel launches)")
        p.add_argument("--interleave-share", type=float,
                       help="while a sampling batch decodes, the share of the worker's time other operations may "
                            "take between its decode steps (0..1, default 0.5; 0: they wait for the batch to end)")
        p.add_argument("--sample-gather-ms", type=float,
                       help="while a replica is idle, gather a burst of sampling requests until none has come for "
                            "this many milliseconds (at most 5x as long; a client that has sent fewer requests than in "
                            "its last burst: at most 20x; default 2; 0: no gathering)")
        p.add_argument("--model", action="append", metavar="NAME=PATH|ORG/NAME[@REV]",
                       help="serve an HF checkpoint dir, or a hub model from the local HF cache (repeatable)")
        p.add_argument("--api-key", action="append", help="accepted API key (repeatable)")
        a = p.parse_args(argv)
        base = cls.from_file(a.config) if a.config else None
        cfg = cls.from_env(base=base)
        flags = {
            "host": a.host, "port": a.port, "backend": a.backend, "data_dir": a.data_dir,
            "workers": a.workers, "tp": a.tp, "pp": a.pp, "dtype": a.dtype, "recompute": a.recompute,
            "lora_compute": a.lora_compute, "kernels": a.kernels, "interleave_share": a.interleave_share,
            "sample_gather_ms": a.sample_gather_ms,
            "models": ",".join(a.model) if a.model else None,
            "api_keys": ",".join(a.api_key) if a.api_key else None,
        }
        values = _as_dict(cfg)
        values.update(_coerce({k: v for k, v in flags.items() if v is not None}))
        return cls(**values)


def _as_dict(cfg: Config) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def parse_models(value) -> tuple[ServedModel, ...]:
    """`NAME=PATH,...`, a JSON array of such strings / {"model_name", "path"} objects, or a list.

    A bare item (no `=PATH`, no "path") is a local checkpoint directory, or else a hub name such as
    `Qwen/Qwen3-8B` (or `Qwen/Qwen3-8B@REVISION`) served from its snapshot in the local Hugging Face
    cache under that name (see engine/model_source.py; never a download).
    """
    if isinstance(value, str):
        value = value.strip()
        value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v.strip()]
    out = []
    for item in value:
        if isinstance(item, ServedModel):
            out.append(item)
        elif isinstance(item, dict):
            name = item.get("model_name") or item["name"]
            out.append(ServedModel(name, item["path"]) if item.get("path") else _bare_model(name))
        else:
            name, sep, path = str(item).partition("=")
            out.append(ServedModel(name.strip(), path.strip()) if sep else _bare_model(name.strip()))
    return tuple(out)


def _bare_model(name_or_path: str) -> ServedModel:
    return ServedModel(public_model_name(name_or_path), str(resolve_model_dir(name_or_path)))


def _coerce(raw: dict) -> dict:
    known = {f.name: f for f in fields(Config)}
    out = {}
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"unknown config field {key!r}")
        if key == "models":
            value = parse_models(value)
        elif key == "api_keys":
            value = tuple(k.strip() for k in (value.split(",") if isinstance(value, str) else value) if k.strip())
        elif key in ("port", "workers", "tp", "pp", "max_sample_batch_rows"):
            value = int(value)
        elif key in ("long_poll_seconds", "session_timeout_seconds", "interleave_share", "sample_gather_ms"):
            value = float(value)
        elif key == "allow_partial_batches" and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        out[key] = value
    return out
