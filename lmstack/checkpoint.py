"""The one checkpoint format, written atomically.

<dir>/config.json  <dir>/model.safetensors  <dir>/tokenizer.json (+ tokenizer_config.json)
<dir>/train_state.pt (optional: optimizer, step, RNG — enough to resume exactly)

A save writes everything into a hidden temporary directory next to <dir>, fsyncs it, then swaps it in with
renames. A crash at any point leaves either the old or the new checkpoint in place (never a mix, never a
half-written file); `resolve_checkpoint` finishes an interrupted swap.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import LMStackError
from .models.transformer import Transformer
from .tokenizer import Tokenizer

REQUIRED = ("config.json", "model.safetensors")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights to save: contiguous tensors, the tied output head stored once (as the embedding)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
                    train_state: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint directory atomically (temp dir + fsync + rename). weights: the tensors to store in
    model.safetensors (default: all of the model's); extra(dir): writes more files (an adapter, a reward head)
    into the temp dir, so they land in the same atomic swap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.config.save(tmp / "config.json")
    save_file(model_state_dict(model) if weights is None else weights, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(tmp)
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    if extra is not None:
        extra(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)          # crash after this line: resolve_checkpoint() moves `old` back
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Return a complete checkpoint directory at `path`, recovering from a swap interrupted by a crash."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)
    if not path.is_dir():
        raise LMStackError(f"no checkpoint directory at {path}; pass a directory written by `lmstack train` or "
                           "`lmstack convert`")
    missing = [f for f in REQUIRED if not (path / f).exists()]
    if missing:
        raise LMStackError(f"{path} is not an lmstack checkpoint (missing {', '.join(missing)})")
    return path


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> Transformer:
    """A Transformer for `cfg` holding exactly the weights in `state` (the tied head may be absent)."""
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LMStackError(f"{source}: the weights do not fit the model config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    path = resolve_checkpoint(path)
    cfg = ModelConfig.load(path / "config.json")
    state = load_file(str(path / "model.safetensors"))
    lora_keys = [k for k in state if ".lora_" in k]
    if lora_keys and (path / "adapter_config.json").exists():
        # a LoRA training checkpoint (adapter tensors, for resuming; older ones also hold the base weights): load it
        # as the merged model, the base weights coming from the base model the adapter names
        from .models.lora import load_adapter, merge_lora
        base_state = {k: v for k, v in state.items() if k not in set(lora_keys)}
        if base_state:
            model = build_model(cfg, base_state, f"{path}/model.safetensors")
        else:
            model = _adapter_base(path)
        merge_lora(load_adapter(model, path))
    else:
        model = build_model(cfg, state, f"{path}/model.safetensors")
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    tok = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tok


def _adapter_base(path: Path) -> Transformer:
    """The base model of an adapter-only checkpoint, from its adapter_config.json's base_model_name_or_path."""
    import json
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise LMStackError(f"{path} holds a LoRA adapter (no base weights) and its base model {base!r} is not "
                           "there; merge it onto the base with `lmstack merge-lora --model BASE --adapter "
                           f"{path} --out DIR`")
    from .lm import load
    return load(base).model.float()


def load_train_state(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    f = path / "train_state.pt"
    if not f.exists():
        raise LMStackError(f"{path} has no train_state.pt, so it cannot be resumed; start a fresh run instead")
    return torch.load(f, map_location="cpu", weights_only=True)
