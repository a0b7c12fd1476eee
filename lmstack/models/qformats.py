"""GGUF block quantization formats in PyTorch: pack float weights into Q8_0 / Q4_0 / Q4_1 blocks, unpack them.

A packed weight is a uint8 tensor (out_features, in_features / 32 * block bytes) holding each row's blocks exactly as
a GGUF file stores them (f16 scale first; see lmstack/models/kernels/qmatmul.cpp for the byte layout), so a GGUF
tensor is used as read, and an lmstack checkpoint stores the same bytes. These functions are the pure-PyTorch
reference: the native kernels (lmstack/models/kernels.py) compute on the same bytes without unpacking.

Quantization follows llama.cpp's reference quantizers (so `pack(w, "q8_0")` equals the `gguf` package's
`quants.quantize` byte for byte): Q8_0 and Q4_0 take d from the value of largest magnitude (d = max / 127,
d = max / -8), Q4_1 takes d = (max - min) / 15, m = min.
"""
from __future__ import annotations

import torch

from ..errors import LMStackError

BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
FORMATS = tuple(BLOCK_BYTES)


def check_format(fmt: str) -> str:
    if fmt not in BLOCK_BYTES:
        raise LMStackError(f"unknown block format {fmt!r}; supported: {', '.join(FORMATS)}")
    return fmt


def packed_shape(out_features: int, in_features: int, fmt: str) -> tuple[int, int]:
    if in_features % BLOCK:
        raise LMStackError(f"{fmt} needs in_features divisible by {BLOCK}, got {in_features}")
    return out_features, in_features // BLOCK * BLOCK_BYTES[check_format(fmt)]


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) float -> (..., 2) uint8 (little-endian half)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) integer values 0..15 -> (..., 16) bytes: low nibble = value j, high nibble = value j + 16."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def pack(w: torch.Tensor, fmt: str, rows_at_once: int = 4096) -> torch.Tensor:
    """Float weight (N, K) -> packed blocks (N, K / 32 * block bytes) uint8, in row chunks (bounded temporaries)."""
    N, K = w.shape
    out = torch.empty(packed_shape(N, K, fmt), dtype=torch.uint8)
    for i in range(0, N, rows_at_once):
        out[i:i + rows_at_once] = _pack_rows(w[i:i + rows_at_once].detach().float().cpu(), fmt)
    return out


def _pack_rows(w: torch.Tensor, fmt: str) -> torch.Tensor:
    n = w.shape[0]
    b = w.reshape(n, -1, BLOCK)
    if fmt == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        v = b * inv
        q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).to(torch.int8).view(torch.uint8)
        parts = [_f16_bytes(d), q]
    elif fmt == "q4_0":
        idx = b.abs().argmax(-1, keepdim=True)
        d = torch.gather(b, -1, idx) / -8.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc(b * inv + 8.5).clamp(0, 15)
        parts = [_f16_bytes(d), _nibbles(q)]
    else:  # q4_1
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (hi - lo) / 15.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc((b - lo) * inv + 0.5).clamp(0, 15)
        parts = [_f16_bytes(d), _f16_bytes(lo), _nibbles(q)]
    return torch.cat(parts, dim=-1).reshape(n, -1)


def unpack(packed: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed blocks (N, nbytes) uint8 -> float weight (N, K)."""
    bb = BLOCK_BYTES[check_format(fmt)]
    n = packed.shape[0]
    b = packed.reshape(n, -1, bb)
    d = b[..., :2].contiguous().view(torch.float16).float()
    if fmt == "q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[..., bb - 16:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        w = d * (q - 8.0) if fmt == "q4_0" else d * q + b[..., 2:4].contiguous().view(torch.float16).float()
    return w.reshape(n, -1).to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the native kernels do to x: per block of 32, q = round(x / d) with d = max|x| / 127.
    Returns (q as float (M, K), d (M, K / 32)); q * d is the x the kernels multiply with (for reference tests)."""
    M, K = x.shape
    b = x.float().reshape(M, -1, BLOCK)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.round(b * inv[..., None])
    return q.reshape(M, K), d


def reference_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """x @ W^T computed the way the native kernels do (x quantized per block to int8), in float64: the tight
    reference the kernel tests compare with."""
    q, d = quantize_activations(x)
    xq = (q.reshape(x.shape[0], -1, BLOCK) * d[..., None]).reshape(x.shape).double()
    return (xq @ unpack(packed, fmt).double().T).float()
