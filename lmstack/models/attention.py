"""The attention call every layer makes: `attend(q, k, v, **sdpa_kwargs)`, scaled_dot_product_attention's contract.

On the CPU two things change what is fastest (measured: benchmarks/RESULTS.md, issue 15 item 7):
* PyTorch's CPU flash-attention kernel is slow for short sequences. At B=24, H=4, T=64, D=32, forward + backward
  took 4.1 ms in float32 and 8.8 ms in bf16, against 2.8 / 1.1 ms for two batched matmuls and a softmax. So causal
  (or unmasked) attention over up to 128 queries (256 when training under bf16 autocast) runs as matmul + softmax +
  matmul. Longer sequences keep the flash kernel, which skips the masked half and never materializes the
  B*H*T*S scores: at T=512 it is faster both ways (forward 4.4 vs 13.6 ms at B=1, H=9, D=64).
* Under CPU bf16 autocast, the flash kernel runs in float32: its bf16 backward is the slow one.
* Attention dropout: no fused CPU kernel supports it (SDPA falls back to its math kernel, which materializes the
  scores too), so it always takes the matmul path.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5
SMALL_SCORES_BYTES = 1 << 25  # and at most 32 MB of float32 scores per call (T=64: B*H up to 2048)


@functools.lru_cache(maxsize=16)
def _causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)


def _matmul_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict) -> bool:
    """Whether the matmul path computes exactly what SDPA would and pays: CPU, no explicit mask or GQA broadcast,
    a causal mask only over as many keys as queries, not traced by torch.compile, and a short sequence or dropout."""
    if q.device.type != "cpu" or kw.get("attn_mask") is not None or kw.get("enable_gqa") or q.dim() != 4:
        return False
    if set(kw) - {"attn_mask", "is_causal", "dropout_p", "scale", "enable_gqa"} or k.shape[1] != q.shape[1]:
        return False
    if kw.get("is_causal") and k.shape[-2] != q.shape[-2]:
        return False
    if torch.compiler.is_compiling():
        return False
    if kw.get("dropout_p"):  # no fused CPU kernel takes dropout: SDPA's math kernel would keep the scores anyway
        return True
    autocast_training = torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    return short_enough(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], autocast_training)


def short_enough(batch_heads: int, queries: int, keys: int, autocast_training: bool) -> bool:
    """The length rule of the matmul path (also what scaling.memory assumes for CPU activations)."""
    max_t = 256 if autocast_training else 128
    return queries <= max_t and batch_heads * queries * keys * 4 <= SMALL_SCORES_BYTES


def _matmul_attention(q, k, v, is_causal=False, dropout_p=0.0, scale=None, **_) -> torch.Tensor:
    B, H, T, D = q.shape
    S = k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q3, k3 = q.reshape(B * H, T, D), k.reshape(B * H, S, D)
    if is_causal:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        s = torch.baddbmm(_causal_bias(T, dtype, q.device), q3, k3.mT, alpha=scale)
    else:
        s = torch.bmm(q3, k3.mT).mul_(scale)
    p = torch.softmax(s, dim=-1) if s.dtype == torch.float32 else torch.softmax(s.float(), dim=-1).to(s.dtype)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.bmm(p, v.reshape(B * H, S, -1)).view(B, H, T, -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, **kw), by the path that is fastest here (see the module docstring)."""
    if _matmul_path(q, k, v, kw):
        return _matmul_attention(q, k, v, **kw)
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        mask = kw.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kw["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)
