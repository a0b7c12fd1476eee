"""GGUF quantized tensors kept packed: which lmstack layers become QuantLinear / QuantEmbedding, and their bytes.

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K, Q6_K are read straight from the file into the layer's
`qweight` (os-level reads, no float copy and no memory map kept, so load memory stays near the file size), and the
native kernels compute on those bytes. lmstack fuses q/k/v and gate/up into one layer: their GGUF tensors are read
into consecutive rows of one packed tensor (the Q/K row permutation llama.cpp applies is undone on the packed rows:
each row is an independent run of blocks). A fused group whose tensors have different types, all with
kernels (a Q4_K_M file's attn_q/attn_k Q4_K with attn_v Q6_K in some layers), becomes one mixed-format layer
('q4_k:768,q6_k:192', lmstack/models/qlinear.py): each tensor's bytes as read, one kernel call. A group that mixes
float and quantized tensors, or holds a format without a kernel here (Q2_K, Q3_K), is dequantized and re-packed as
Q8_0: an 8-bit re-quantization, close, not bit-exact (the file's own float dequantization is one `dtype=float32`
away). F32/F16/BF16 tensors stay float.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import LMStackError
from ..models.qformats import can_segment, mixed_format, pack, packed_shape, segments
from ..models.qlinear import QuantEmbedding, QuantLinear

NATIVE = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K": "q4_k",
          "Q5_K": "q5_k", "Q6_K": "q6_k"}
FLOAT = ("F32", "F16", "BF16")


def layer_groups(cfg: ModelConfig, tied: bool) -> dict[str, list[tuple[str, int | None]]]:
    """lmstack layer name -> its GGUF tensors in row order, each with the head count to unpermute (q/k) or None."""
    H, KV = cfg.n_head, cfg.kv_heads
    groups: dict[str, list[tuple[str, int | None]]] = {"tok_emb": [("token_embd.weight", None)]}
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        groups[b + "attn.qkv"] = [(g + "attn_q.weight", H), (g + "attn_k.weight", KV), (g + "attn_v.weight", None)]
        groups[b + "attn.proj"] = [(g + "attn_output.weight", None)]
        groups[b + "mlp.fc"] = [(g + "ffn_gate.weight", None), (g + "ffn_up.weight", None)]
        groups[b + "mlp.proj"] = [(g + "ffn_down.weight", None)]
    if not tied:
        groups["lm_head"] = [("output.weight", None)]
    return groups


def _rows(t) -> int:
    return int(t.data.shape[0]) if t.data.ndim > 1 else 1


def group_format(types: list[str], rows: list[int] | None = None) -> str | None:
    """The packed format for a group of GGUF tensor types (with their row counts), or None to keep it float: their
    common format; a mixed one ('q4_k:768,q6_k:192') when every type has a kernel; else Q8_0."""
    if all(t in FLOAT for t in types):
        return None
    if all(t in NATIVE for t in types):
        if len(set(types)) == 1:
            return NATIVE[types[0]]
        parts = [(NATIVE[t], n) for t, n in zip(types, rows)] if rows is not None else None
        if parts is not None and can_segment(parts):
            return mixed_format(parts)
    return "q8_0"


def install(model: torch.nn.Module, cfg: ModelConfig, tensors: dict, tied: bool) -> dict[str, str]:
    """Swap the layers whose GGUF tensors are quantized for packed ones (on the meta device, before materialize).
    Returns {layer name: format}."""
    plan = {}
    for name, parts in layer_groups(cfg, tied).items():
        missing = [g for g, _ in parts if g not in tensors]
        if missing:
            continue  # the float loader reports missing tensors with its own message
        fmt = group_format([tensors[g].tensor_type.name for g, _ in parts], [_rows(tensors[g]) for g, _ in parts])
        if fmt is None:
            continue
        old = model.get_submodule(name)
        with torch.device("meta"):
            if name == "tok_emb":
                new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt)
            else:
                new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        plan[name] = fmt
    if tied and "tok_emb" in plan:
        with torch.device("meta"):
            model.lm_head = QuantLinear(cfg.n_embd, cfg.vocab_size, plan["tok_emb"])
        plan["lm_head"] = plan["tok_emb"]
    return plan


def _unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, -1).transpose(1, 2).reshape(out, -1)


def fill(model: torch.nn.Module, plan: dict[str, str], cfg: ModelConfig, tensors: dict, path: Path,
         dequantize) -> None:
    """Fill every planned layer's qweight from the file (after materialize); re-tie a shared head. Each GGUF tensor
    fills the next rows (a mixed layer: the next bytes) of the layer's packed tensor."""
    groups = layer_groups(cfg, cfg.tie_embeddings)
    with open(path, "rb") as f:
        for name, fmt in plan.items():
            if name not in groups:
                continue
            layer = model.get_submodule(name)
            flat = layer.qweight.view(-1)
            cols = layer.in_features if hasattr(layer, "in_features") else layer.embedding_dim
            expected = layer.out_features if hasattr(layer, "out_features") else layer.num_embeddings
            mixed = segments(fmt) is not None
            at = row = 0
            for gname, n_head in groups[name]:
                t = tensors[gname]
                rows = _rows(t)
                tfmt = NATIVE[t.tensor_type.name] if mixed else fmt
                rb = packed_shape(rows, cols, tfmt)[1]
                if at + rows * rb > flat.numel():
                    raise LMStackError(f"{path}: tensor {gname} has more rows than {name} holds ({expected} rows "
                                       f"of {cols} values); the file does not match its metadata")
                part = flat[at:at + rows * rb].view(rows, rb)
                if NATIVE.get(t.tensor_type.name) == tfmt:
                    _read_into(f, t, part, path)
                    if n_head is not None:
                        part.copy_(_unpermute_rows(part.clone(), n_head))
                else:
                    w = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)))
                    if n_head is not None:
                        w = _unpermute_rows(w, n_head)
                    part.copy_(pack(w, tfmt))
                at, row = at + rows * rb, row + rows
            if at != flat.numel():
                raise LMStackError(f"{path}: {name} got {row} rows from the file, expected {expected}")
    if cfg.tie_embeddings and "tok_emb" in plan:
        model.lm_head.qweight = model.tok_emb.qweight


def _read_into(f, t, dst: torch.Tensor, path: Path) -> None:
    """Read tensor t's raw bytes from the open file into the contiguous uint8 tensor dst."""
    n = int(t.n_bytes)
    if dst.numel() != n or not dst.is_contiguous():
        raise LMStackError(f"{path}: tensor {t.name} holds {n} bytes of {t.tensor_type.name}, expected "
                           f"{dst.numel()} for shape {tuple(dst.shape)}")
    f.seek(int(t.data_offset))
    got = f.readinto(memoryview(dst.numpy()).cast("B"))
    if got != n:
        raise LMStackError(f"{path}: tensor {t.name} is cut short ({got} of {n} bytes); the file is truncated")
