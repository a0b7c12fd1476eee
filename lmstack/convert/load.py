"""The one model loader: (model, tokenizer) from any source lmstack reads.

    load_any(path)   an lmstack checkpoint directory, a LoRA training checkpoint (adapter tensors, merged onto the
                     base model its adapter_config.json names), a Hugging Face model directory, or a GGUF file

`lmstack.load` wraps it in an `LM`; the trainers, eval and the server all load through it, so every verb that takes
`--model` accepts every source.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import has_interrupted_swap
from ..checkpoint import load_model, resolve_checkpoint
from ..config import ModelConfig
from ..errors import LMStackError
from ..models.lora import ADAPTER_CONFIG, load_adapter, merge_lora
from ..models.quant import dequantize_model, quant_layout
from ..models.transformer import Transformer
from ..models.utils import build_model
from ..tokenizer import Tokenizer


def resolve_source(path: str | Path) -> str:
    """What kind of model lives at `path`: 'lmstack' checkpoint dir, 'hf' directory, or 'gguf' file."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LMStackError(f"{p} is a file but not GGUF; pass a GGUF file, a Hugging Face model directory or an "
                           "lmstack checkpoint directory")
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.exists():
            try:
                data = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise LMStackError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno})") from None
            return "hf" if "model_type" in data else "lmstack"
        if p.name in ("last", "best") or has_interrupted_swap(p):
            return "lmstack"
        raise LMStackError(f"{p} has no config.json: not an lmstack checkpoint or a Hugging Face model directory")
    if not p.exists() and has_interrupted_swap(p):
        return "lmstack"  # a checkpoint swap interrupted by a crash; resolve_checkpoint recovers it
    hint = ("; to fetch a Hugging Face model run `lmstack download REPO_ID`"
            if "/" in str(path) and not p.is_absolute() else "")
    raise LMStackError(f"no model at {path} (expected an lmstack checkpoint directory, a Hugging Face model "
                       f"directory or a GGUF file){hint}")


def is_lora_checkpoint(path: str | Path) -> bool:
    """A LoRA training checkpoint: adapter files beside adapter tensors in model.safetensors."""
    return (Path(path) / ADAPTER_CONFIG).exists() and (Path(path) / "model.safetensors").exists()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter directory records (adapter_config.json's base_model_name_or_path)."""
    f = Path(adapter_dir) / ADAPTER_CONFIG
    base = json.loads(f.read_text()).get("base_model_name_or_path") if f.exists() else None
    if not base or not Path(base).exists():
        raise LMStackError(f"{adapter_dir} holds a LoRA adapter and its base model {base!r} is not there; merge "
                           f"it onto the base with `lmstack merge-lora --model BASE --adapter {adapter_dir} --out DIR`")
    return base


def _load_lora_checkpoint(path: Path) -> tuple[Transformer, Tokenizer | None]:
    """A LoRA run's checkpoint as the merged model. Adapter-only checkpoints take their base weights from the base
    model they record; older ones that also hold the base tensors build the base from them."""
    cfg = ModelConfig.load(path / "config.json")
    state = load_file(str(path / "model.safetensors"))
    base_state = {k: v for k, v in state.items() if ".lora_" not in k}
    if base_state:
        model = build_model(cfg, base_state, f"{path}/model.safetensors")
    else:
        model = load_any(adapter_base(path))[0].float()
    merge_lora(load_adapter(model, path))
    tok = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tok


def load_any(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             packed: bool = False) -> tuple[Transformer, Tokenizer | None]:
    """(model in eval mode on `device`, tokenizer or None) from a checkpoint dir, LoRA checkpoint, HF dir or GGUF.
    packed=True keeps a GGUF file's quantized tensors (and a quantized checkpoint's layers) packed, for inference;
    otherwise they are dequantized to float (what training needs)."""
    kind = resolve_source(path)
    if kind == "gguf":
        from .gguf import load_gguf
        model, tok = load_gguf(path, dtype=dtype, packed=packed)
    elif kind == "hf":
        from .hf import load_hf
        model, tok = load_hf(path, dtype=dtype)
    else:
        ckpt = resolve_checkpoint(path)
        if is_lora_checkpoint(ckpt):
            model, tok = _load_lora_checkpoint(ckpt)
            if dtype is not None:
                model.to(dtype)
        else:
            model, tok = load_model(ckpt)
            if not packed and quant_layout(model):
                dequantize_model(model)
            if dtype is not None:
                model.to(dtype)
    return model.to(device).eval(), tok
