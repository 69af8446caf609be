"""Where a served model's checkpoint lives: a local directory, or a hub name in the local HF cache.

`--model Qwen/Qwen3-8B` (no `=PATH`, and no such local directory) means the snapshot that
`huggingface-cli download Qwen/Qwen3-8B` left in the Hugging Face cache, never a download:

    <cache>/models--Qwen--Qwen3-8B/refs/main            -> a commit hash
    <cache>/models--Qwen--Qwen3-8B/snapshots/<hash>/    config.json, *.safetensors (symlinks into blobs/)

The cache is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (the same order
as huggingface_hub). `NAME@REVISION` picks a branch, tag or commit instead of main.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

# A hub repo id (`org/name` or `name`), optionally `@revision`; anything else is a local path.
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)?)(?:@(?P<revision>[A-Za-z0-9_./-]+))?$")
CACHE_ORDER = "$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub"


class ModelNotFoundError(ValueError):
    """A configured model is neither a local directory nor a complete snapshot in the HF cache."""


def hf_hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache directory that `huggingface-cli download` writes to."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg_cache = env.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def split_hub_name(value: str) -> tuple[str, str | None] | None:
    """(`org/name`, revision or None) for a hub-style name; None for anything that reads as a path."""
    match = _HUB_NAME.match(value)
    if not match or value.startswith(".") or ".." in value or "--" in match["repo"]:
        return None
    return match["repo"], match["revision"]


def public_model_name(value: str) -> str:
    """The name clients use for a bare `--model VALUE`: the hub repo id, or the directory's name."""
    hub = None if Path(value).is_dir() else split_hub_name(value)
    return hub[0] if hub else Path(value).name


def resolve_model_dir(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory for a `--model` value, without touching the network.

    An existing local directory is itself; a hub-style name is its snapshot in the HF cache
    (ModelNotFoundError if absent or incomplete); any other value is returned as a path.
    """
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    hub = split_hub_name(name_or_path)
    if hub is None:
        return Path(name_or_path)
    repo_id, revision = hub
    cache_dir = hf_hub_cache_dir() if cache_dir is None else Path(cache_dir)
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    download = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
    how_to_fix = (f"Download it first with `{download}` (with the same HF_HUB_CACHE / HF_HOME as this server), "
                  f"or pass --model NAME=PATH with a local checkpoint directory.")
    if not repo_dir.is_dir():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local directory and is not in the Hugging Face cache: "
            f"no {repo_dir} (the cache is {CACHE_ORDER}). {how_to_fix}")
    snapshot = _snapshot_dir(repo_dir, revision)
    if snapshot is None:
        refs = sorted(str(p.relative_to(repo_dir / "refs")) for p in (repo_dir / "refs").rglob("*") if p.is_file())
        snapshots = sorted(p.name for p in (repo_dir / "snapshots").glob("*"))
        raise ModelNotFoundError(
            f"model {repo_id!r} is in the Hugging Face cache at {repo_dir}, but revision {revision or 'main'!r} "
            f"is not (refs: {refs or 'none'}; snapshots: {snapshots or 'none'}). {how_to_fix}")
    problem = _checkpoint_problem(snapshot)
    if problem:
        raise ModelNotFoundError(f"model {name_or_path!r}: the cached snapshot {snapshot} {problem}. {how_to_fix}")
    return snapshot


def _snapshot_dir(repo_dir: Path, revision: str | None) -> Path | None:
    """snapshots/<commit> for a branch or tag under refs/, or a commit hash; main by default."""
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
    elif revision is not None:
        commit = revision
    else:  # downloaded by commit only (no refs/main): take the one snapshot if there is exactly one
        snapshots = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
        return snapshots[0] if len(snapshots) == 1 else None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def _checkpoint_problem(snapshot: Path) -> str | None:
    """Why `snapshot` is not a loadable checkpoint (missing config or weights), or None."""
    if not (snapshot / "config.json").is_file():
        return "has no config.json (the download is incomplete)"
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in snapshot.glob("*.safetensors"))
        if not shards:
            return "has no *.safetensors weights (only safetensors checkpoints are supported)"
    missing = [name for name in shards if not (snapshot / name).is_file()]  # a dangling symlink: blob not there
    if missing:
        return f"lacks weight files {missing} (the download is incomplete)"
    return None
