"""The decode step of a packed Llama-style model as one native call for all its layers (kernels/decode_layer.cpp).

Decoding one token through the Python Transformer is ~40 small PyTorch ops per layer (norms, RoPE, cache writes,
SDPA, residuals): at SmolLM2's size their dispatch costs as much as the quantized matmuls themselves. When the model
and the call fit the fused layer — pre-norm RMSNorm / RoPE / SwiGLU blocks whose four linears are all QuantLinear,
no sliding window, one new token per row, a plain float32 KVCache, inference, a native kernel path — the
Transformer runs its blocks through `fused_blocks` instead (batch 1, or a continuous batch with per-row positions
and padding masks). A few new tokens of one sequence (a short prompt, the tokens a speculative step verifies: fewer
than QuantLinear.gemm_min_rows(), where prefill switches to unpacked GEMMs) run the same layer in its causal `seq`
mode. Anything else takes the ordinary path. Same math as the
ordinary path with the same kernels (attention summed in a different order: ~1e-6). LMSTACK_FUSED_DECODE=0 turns
it off. Any block formats, mixed-format layers included (the kernels take them in one call).
"""
from __future__ import annotations

import os

import torch

from . import kernels
from .kv_cache import KVCache
from .qlinear import QuantLinear


def eligible(model) -> bool:
    """Whether the model's blocks fit the fused layer (checked once, cached on the model)."""
    ok = getattr(model, "_fused_decode_ok", None)
    if ok is None:
        cfg = model.config
        ok = (cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.mlp == "swiglu" and cfg.pos_emb == "rope"
              and cfg.causal and not cfg.cross_attention and cfg.n_head % cfg.kv_heads == 0
              and cfg.head_dim % 8 == 0
              and all(cfg.layer_window(i) is None for i in range(cfg.n_layer))
              and all(isinstance(m, QuantLinear) for b in model.blocks
                      for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj))
              and all(b.norm1.weight is not None and b.norm2.weight is not None for b in model.blocks))
        model._fused_decode_ok = ok
    return ok


def fused_blocks(model, x: torch.Tensor, rope, cache, pos: int, padding_mask: torch.Tensor | None = None):
    """x (B, 1, d) after the embedding -> the blocks' output, or None when this call does not fit (the caller runs
    the ordinary blocks). rope: (cos, sin) rows for position `pos` ((1, D)) or per row ((B, 1, 1, D), a continuous
    batch's own positions); padding_mask (B, pos + 1) bool: the slots each row attends to."""
    B, T = x.shape[:2]
    seq = T > 1  # a few consecutive tokens of one row: causal within them
    if seq and (B != 1 or padding_mask is not None):
        return None
    if (type(cache) is not KVCache or rope is None or x.dtype != torch.float32
            or x.device.type != "cpu" or torch.is_grad_enabled() or model.training
            or os.environ.get("LMSTACK_FUSED_DECODE", "1") == "0" or torch.compiler.is_compiling()
            or not eligible(model) or (seq and T >= model.blocks[0].mlp.fc.gemm_min_rows())):
        return None
    ext = kernels.loaded()
    if ext is None:
        return None
    cfg = model.config
    cos, sin = (t.reshape(-1, t.shape[-1]) for t in rope)
    if (cos.shape[0] not in ((T,) if seq else (1, B)) or cache.k[0].shape[0] < B or not cache.k[0].is_contiguous()
            or pos + T > cache.k[0].shape[2]):
        return None
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    mask = None
    if padding_mask is not None:
        mask = padding_mask.to(torch.bool).contiguous()
        if mask.shape != (B, pos + 1):
            return None
    return ext.decode_layers(x.contiguous(), _layers(model, ext), cos, sin, cache.k, cache.v, pos, cfg.n_head,
                             cfg.kv_heads, mask, seq)


class _Layers:
    """The kernels' Layer objects of one model, cached on it; a deepcopy or pickle of the model gets None instead
    (they are rebuilt on its first fused step)."""
    __slots__ = ("key", "ext", "layers")

    def __init__(self, key, ext, layers):
        self.key, self.ext, self.layers = key, ext, layers

    def __reduce__(self):
        return type(None), ()


def _layers(model, ext) -> list:
    """Each layer's weights as decode_layers takes them (kernels' Layer), gathered once: module attribute lookups
    cost ~1 ms a token, and one native call for all layers releases the GIL once a step instead of once a layer (a
    server's stream and event-loop threads then run beside the step, not between its layers). Rebuilt when the
    first layer's weight was swapped since or another kernel build is in use (and by qlinear.native_layout, which
    changes the format codes)."""
    cached = model.__dict__.get("_fused_decode_layers")
    if cached is None or cached.key is not model.blocks[0].attn.qkv.qweight or cached.ext is not ext:
        layers = []
        for b in model.blocks:
            a, m = b.attn, b.mlp
            layers.append(ext.Layer(b.norm1.weight, a.qkv.qweight, a.qkv.fmt_id, a.qkv.bias, a.proj.qweight,
                                    a.proj.fmt_id, a.proj.bias, b.norm2.weight, m.fc.qweight, m.fc.fmt_id, m.fc.bias,
                                    m.proj.qweight, m.proj.fmt_id, m.proj.bias, _eps(b.norm1)))
        cached = model.__dict__["_fused_decode_layers"] = _Layers(model.blocks[0].attn.qkv.qweight, ext, layers)
    return cached.layers


def _eps(norm) -> float:
    return torch.finfo(torch.float32).eps if norm.eps is None else float(norm.eps)
