"""The one checkpoint format, written atomically.

<dir>/config.json  <dir>/model.safetensors  <dir>/tokenizer.json (+ tokenizer_config.json)
<dir>/train_state.pt (optional: optimizer, step, RNG — enough to resume exactly)

A save writes everything into a hidden temporary directory next to <dir>, fsyncs it, then swaps it in with
renames. A crash at any point leaves either the old or the new checkpoint in place (never a mix, never a
half-written file); `resolve_checkpoint` finishes an interrupted swap.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, recover_dir
from .config import ModelConfig
from .errors import LMStackError
from .models.quant import apply_layout, quant_layout, tie_packed
from .models.qlinear import native_layout
from .models.transformer import Transformer
from .models.utils import build_model, make_model
from .tokenizer import Tokenizer

REQUIRED = ("config.json", "model.safetensors")
QUANT_KEY = "lmstack.quantization"  # safetensors metadata: {layer name: format} of a quantized checkpoint


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights to save: contiguous tensors, the tied output head stored once (as the embedding)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd.pop("lm_head.qweight", None)  # a packed tied head shares the embedding's blocks
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
                    train_state: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint directory atomically (lmstack.atomic.atomic_dir: temp dir + fsync + rename). weights: the
    tensors to store in model.safetensors (default: all of the model's); extra(dir): writes more files (an
    adapter, a reward head) into the temp dir, so they land in the same atomic swap."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.config.save(tmp / "config.json")
        meta = {"format": "pt"}
        layout = quant_layout(model) if weights is None else {}
        if layout:  # which layers hold quantized blocks (lmstack.models.quant): load_model rebuilds them
            meta[QUANT_KEY] = json.dumps(layout)
        save_file(model_state_dict(model) if weights is None else weights, str(tmp / "model.safetensors"),
                  metadata=meta)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if extra is not None:
            extra(tmp)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Return a complete checkpoint directory at `path`, recovering from a swap interrupted by a crash."""
    path = recover_dir(path)
    if not path.is_dir():
        raise LMStackError(f"no checkpoint directory at {path}; pass a directory written by `lmstack train` or "
                           "`lmstack convert`")
    missing = [f for f in REQUIRED if not (path / f).exists()]
    if missing:
        raise LMStackError(f"{path} is not an lmstack checkpoint (missing {', '.join(missing)})")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) of a full checkpoint directory. A LoRA training checkpoint (adapter tensors only) is an
    error here: `lmstack.load` (convert.load.load_any) merges it onto its base model."""
    path = resolve_checkpoint(path)
    cfg = ModelConfig.load(path / "config.json")
    state = load_file(str(path / "model.safetensors"))
    if any(".lora_" in k for k in state):
        raise LMStackError(f"{path} is a LoRA training checkpoint (adapter tensors); load it with lmstack.load, "
                           "which merges the adapter onto its base model, or run `lmstack merge-lora` first")
    layout = _quant_layout(path / "model.safetensors")
    if layout:
        model = apply_layout(make_model(cfg), layout)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("lm_head.") or not cfg.tie_embeddings]
        if missing or unexpected:
            raise LMStackError(f"{path}/model.safetensors: the quantized weights do not fit the model config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        tie_packed(model)
        native_layout(model)
    else:
        model = build_model(cfg, state, f"{path}/model.safetensors")
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    tok = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tok


def _quant_layout(file: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[QUANT_KEY]) if QUANT_KEY in meta else {}


def load_train_state(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    f = path / "train_state.pt"
    if not f.exists():
        raise LMStackError(f"{path} has no train_state.pt, so it cannot be resumed; start a fresh run instead")
    return torch.load(f, map_location="cpu", weights_only=True)
