"""GGUF block quantization formats in PyTorch: pack float weights into blocks, unpack blocks to float.

A packed weight is a uint8 tensor (out_features, in_features / block values * block bytes) holding each row's blocks
exactly as a GGUF file stores them (see lmstack/models/kernels/qmatmul.cpp for the byte layouts), so a GGUF tensor is
used as read, and an lmstack checkpoint stores the same bytes. These functions are the pure-PyTorch reference: the
native kernels (lmstack/models/kernels.py) compute on the same bytes without unpacking — in memory with each 16 rows
of Q8_0 / Q4_0 / Q4_1 interleaved (`repack_r16_`, a byte permutation; `unrepack_r16` gives GGUF's bytes back).

Formats (values per block, bytes per block), as llama.cpp / ggml lay them out:
  q8_0 (32, 34) q4_0 (32, 18) q4_1 (32, 20) q5_0 (32, 22) q5_1 (32, 24)    -- `pack` and `unpack`
  q4_k (256, 144) q5_k (256, 176) q6_k (256, 210)                          -- `unpack` only (K-quants, from GGUF files)
Packing follows llama.cpp's reference quantizers, so `pack(w, fmt)` equals the `gguf` package's `quants.quantize`
byte for byte: Q8_0 / Q4_0 / Q5_0 take d from the value of largest magnitude (d = max / 127, max / -8, max / -16),
Q4_1 / Q5_1 take d = (max - min) / 15 (31), m = min. The K-quants are read from files llama.cpp quantized (its
quantizers search scales iteratively; there is no packer for them here).
"""
from __future__ import annotations

import torch

from ..errors import LMStackError

BLOCK = 32  # values per block of x the kernels quantize, and of the 32-value formats
QK_K = 256  # values per K-quant super-block
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # packable from float
K_FORMATS = ("q4_k", "q5_k", "q6_k")
ALL_FORMATS = FORMATS + K_FORMATS
BLOCK_VALUES = {**{f: BLOCK for f in FORMATS}, **{f: QK_K for f in K_FORMATS}}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q4_k": 144, "q5_k": 176, "q6_k": 210}
FORMAT_IDS = {f: i for i, f in enumerate(ALL_FORMATS)}  # the kernels' enum (common.h)


SEGMENTED = 1 << 62  # a mixed layer's format code (kernels/qmatmul.cpp segments())
MAX_SEGMENTS, MAX_SEGMENT_ROWS = 3, (1 << 16) - 1


def segments(fmt: str) -> list[tuple[str, int]] | None:
    """A mixed layer's format 'q4_k:768,q6_k:192' (its rows in runs of one format: a fused q/k/v whose GGUF tensors
    differ) -> [('q4_k', 768), ('q6_k', 192)]; None for a single format."""
    if ":" not in fmt:
        return None
    try:
        parts = [(f, int(n)) for f, n in (p.split(":") for p in fmt.split(","))]
    except ValueError:
        raise LMStackError(f"bad mixed block format {fmt!r}; expected e.g. 'q4_k:768,q6_k:192'") from None
    return parts


def mixed_format(parts: list[tuple[str, int]]) -> str:
    """[(format, rows), ...] -> the layer's format string (consecutive runs merged; one run: the plain format)."""
    runs: list[list] = []
    for f, n in parts:
        if runs and runs[-1][0] == f:
            runs[-1][1] += n
        else:
            runs.append([f, n])
    return runs[0][0] if len(runs) == 1 else ",".join(f"{f}:{n}" for f, n in runs)


def can_segment(parts: list[tuple[str, int]]) -> bool:
    """Whether the kernels take this mixed layer as it is (else it is re-packed in one format)."""
    runs = segments(mixed_format(parts)) or []
    return len(runs) <= MAX_SEGMENTS and all(n <= MAX_SEGMENT_ROWS for _, n in runs)


def check_format(fmt: str) -> str:
    parts = segments(fmt)
    for f in [p[0] for p in parts] if parts else [fmt]:
        if f not in BLOCK_BYTES:
            raise LMStackError(f"unknown block format {f!r}; supported: {', '.join(ALL_FORMATS)}")
    if parts and not can_segment(parts):
        raise LMStackError(f"mixed block format {fmt!r}: at most {MAX_SEGMENTS} runs of <= {MAX_SEGMENT_ROWS} rows")
    return fmt


def base_formats(fmt: str) -> list[str]:
    """The block formats a (possibly mixed) format uses."""
    parts = segments(fmt)
    return [f for f, _ in parts] if parts else [fmt]


def format_code(fmt: str) -> int:
    """The kernels' format argument: the format id, or for a mixed layer SEGMENTED | its runs (20 bits each)."""
    parts = segments(check_format(fmt))
    if parts is None:
        return FORMAT_IDS[fmt]
    return SEGMENTED | sum((FORMAT_IDS[f] + 1 | n << 4) << (20 * i) for i, (f, n) in enumerate(parts))


def code_rows(code: int, packed_rows: int) -> int:
    """Output features of a kernel call with format argument `code` on a packed tensor of `packed_rows` rows (a mixed
    layer's bytes are 1-D: its rows are in the code)."""
    if not code & SEGMENTED:
        return packed_rows
    return sum(((code >> (20 * i)) & 0xFFFFF) >> 4 for i in range(MAX_SEGMENTS))


def packed_shape(out_features: int, in_features: int, fmt: str) -> tuple[int, ...]:
    """(N, bytes per row), or for a mixed layer (total bytes,): the runs' blocks one after the other."""
    parts = segments(check_format(fmt))
    if parts is not None:
        if sum(n for _, n in parts) != out_features:
            raise LMStackError(f"mixed format {fmt!r} has {sum(n for _, n in parts)} rows, expected {out_features}")
        return (sum(n * packed_shape(n, in_features, f)[1] for f, n in parts),)
    qk = BLOCK_VALUES[fmt]
    if in_features % qk:
        raise LMStackError(f"{fmt} needs in_features divisible by {qk}, got {in_features}")
    return out_features, in_features // qk * BLOCK_BYTES[fmt]


def split_segments(packed: torch.Tensor, in_features: int, fmt: str) -> list[tuple[torch.Tensor, str]]:
    """A layer's packed bytes -> [(the run's (rows, bytes) view, its format), ...] (one entry for a single format)."""
    parts = segments(fmt)
    if parts is None:
        return [(packed, fmt)]
    out, at = [], 0
    for f, n in parts:
        rb = packed_shape(n, in_features, f)[1]
        out.append((packed[at:at + n * rb].view(n, rb), f))
        at += n * rb
    return out


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) float -> (..., 2) uint8 (little-endian half)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) integer values 0..15 -> (..., 16) bytes: low nibble = value j, high nibble = value j + 16."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) integer values 0..31 -> (..., 4) bytes: bit j of the little-endian uint32 = bit 4 of value j."""
    bits = ((q.to(torch.int64) >> 4) & 1).reshape(*q.shape[:-1], 4, 8)
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)


def pack(w: torch.Tensor, fmt: str, rows_at_once: int = 4096) -> torch.Tensor:
    """Float weight (N, K) -> packed blocks (N, K / 32 * block bytes) uint8, in row chunks (bounded temporaries)."""
    if check_format(fmt) not in FORMATS:
        raise LMStackError(f"packing float weights as {fmt} is not supported (K-quants are read from GGUF files "
                           f"llama.cpp wrote); use one of {', '.join(FORMATS)}")
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
    elif fmt in ("q4_0", "q5_0"):
        half = 8.0 if fmt == "q4_0" else 16.0
        idx = b.abs().argmax(-1, keepdim=True)
        d = torch.gather(b, -1, idx) / -half
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc(b * inv + half + 0.5).clamp(0, 2 * half - 1).to(torch.int64)
        parts = [_f16_bytes(d), _nibbles(q & 15)] if fmt == "q4_0" else [_f16_bytes(d), _high_bits(q), _nibbles(q & 15)]
    else:  # q4_1 / q5_1
        top = 15.0 if fmt == "q4_1" else 31.0
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (hi - lo) / top
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc((b - lo) * inv + 0.5).clamp(0, top).to(torch.int64)
        parts = [_f16_bytes(d), _f16_bytes(lo)] + ([_high_bits(q)] if fmt == "q5_1" else []) + [_nibbles(q & 15)]
    return torch.cat(parts, dim=-1).reshape(n, -1)


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16).float()


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes -> (..., 32) bits 0/1 in little-endian bit order."""
    return ((qh[..., :, None].to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(*qh.shape[:-1], 32)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins -> (sc (..., 8), m (..., 8)) (ggml's get_scale_min_k4)."""
    s = s.to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc.float(), m.float()


def _unpack_k(b: torch.Tensor, fmt: str) -> torch.Tensor:
    """(n, blocks, bytes) K-quant super-blocks -> (n, blocks, 256) float."""
    if fmt == "q6_k":
        ql, qh = b[..., :128].to(torch.int32), b[..., 128:192].to(torch.int32)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = _half(b, 208)
        halves = []
        for h in range(2):  # 128 values each: ql[64h:64h+64], qh[32h:32h+32]
            l0, l1, hh = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
            halves += [(l0 & 15) | ((hh & 3) << 4), (l1 & 15) | (((hh >> 2) & 3) << 4),
                       (l0 >> 4) | (((hh >> 4) & 3) << 4), (l1 >> 4) | (((hh >> 6) & 3) << 4)]
        q = torch.cat(halves, dim=-1).float() - 32.0  # (n, blocks, 256)
        return (d * sc.repeat_interleave(16, dim=-1)) * q
    d, dmin = _half(b, 0), _half(b, 2)
    sc, m = _scale_min_k4(b[..., 4:16])
    qs = b[..., -128:].to(torch.int32)
    q = torch.cat([_low_high(qs[..., 32 * c:32 * c + 32]) for c in range(4)], dim=-1)  # sub-block order
    if fmt == "q5_k":
        qh = b[..., 16:48].to(torch.int32)
        q = q + 16 * torch.cat([(qh >> i) & 1 for i in range(8)], dim=-1)
    w = (d * sc).repeat_interleave(32, dim=-1) * q.float() - (dmin * m).repeat_interleave(32, dim=-1)
    return w


def unpack(packed: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32, in_features: int | None = None
           ) -> torch.Tensor:
    """Packed blocks (N, nbytes) uint8 -> float weight (N, K); a mixed layer's 1-D bytes need in_features."""
    if segments(check_format(fmt)) is not None:
        return torch.cat([unpack(p, f, dtype) for p, f in split_segments(packed, in_features, fmt)])
    bb = BLOCK_BYTES[fmt]
    n = packed.shape[0]
    b = packed.reshape(n, -1, bb)
    if fmt in K_FORMATS:
        return _unpack_k(b, fmt).reshape(n, -1).to(dtype)
    d = _half(b, 0)
    if fmt == "q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    else:
        q = _low_high(b[..., bb - 16:]).float()
        if fmt in ("q5_0", "q5_1"):
            q = q + 16.0 * _bits32(b[..., bb - 20:bb - 16]).float()
        if fmt in ("q4_0", "q5_0"):
            w = d * (q - (8.0 if fmt == "q4_0" else 16.0))
        else:
            w = d * q + _half(b, 2)
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
    return (xq @ unpack(packed, fmt, in_features=x.shape[1]).double().T).float()


def random_blocks(rows: int, cols: int, fmt: str, generator: torch.Generator | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """Valid random packed blocks (N, bytes) of any format (for tests of the K-quants, which have no packer): random
    quant bytes, positive half-precision scales (d ~ 1e-2 for the 32-value formats, d and dmin ~ 1e-3 for the
    K-quants; times `scale`)."""
    n, nbytes = packed_shape(rows, cols, fmt)
    bb = BLOCK_BYTES[fmt]
    b = torch.randint(0, 256, (n, nbytes // bb, bb), dtype=torch.uint8, generator=generator)

    def put_half(at: int, size: float) -> None:
        v = (torch.rand(n, nbytes // bb, 1, generator=generator) + 0.5) * scale * size
        b[..., at:at + 2] = _f16_bytes(v)
    if fmt == "q6_k":
        put_half(208, 1e-3)
    elif fmt in K_FORMATS:
        put_half(0, 1e-3)
        put_half(2, 1e-3)
    else:
        put_half(0, 1e-2)
        if fmt in ("q4_1", "q5_1"):
            put_half(2, -1e-1)
    return b.reshape(n, nbytes)


# ---- the kernels' 16-row interleaved layout (kernels/interleaved.cpp) ------------------------------------------------
R16 = 1 << 61  # set in a kernel format code: the layer's Q8_0 / Q4_0 / Q4_1 runs hold their whole 16-row groups so
R16_FORMATS = ("q8_0", "q4_0", "q4_1")
_QS_AT = {"q8_0": 2, "q4_0": 2, "q4_1": 4}  # where a block's quant bytes start (after d, and m for q4_1)
_perms: dict[tuple[str, int], torch.Tensor] = {}


def _r16_perm(fmt: str, nb: int) -> torch.Tensor:
    """For one group of 16 rows of nb blocks: perm[i] = the GGUF-layout byte (r * row bytes + b * bb + k) that lands
    at interleaved byte i. Per block b: d of rows 0..15, m of rows 0..15 (q4_1), then chunk c = the quant bytes
    4c..4c+3 of rows 0..15."""
    key = (fmt, nb)
    if key not in _perms:
        bb, qs = BLOCK_BYTES[fmt], _QS_AT[fmt]
        r, b, k = torch.meshgrid(torch.arange(16), torch.arange(nb), torch.arange(bb), indexing="ij")
        src = r * nb * bb + b * bb + k
        j = k - qs
        dst = torch.where(k < qs, b * 16 * bb + (k // 2) * 32 + r * 2 + k % 2,
                          b * 16 * bb + qs * 16 + (j // 4) * 64 + r * 4 + j % 4)
        perm = torch.empty(16 * nb * bb, dtype=torch.long)
        perm[dst.reshape(-1)] = src.reshape(-1)
        _perms[key] = perm
    return _perms[key]


def _r16_inv(fmt: str, nb: int) -> torch.Tensor:
    """inv[r * row bytes + k] = where row r's GGUF byte k lies in its interleaved group."""
    key = (fmt, nb, "inv")
    if key not in _perms:
        _perms[key] = torch.argsort(_r16_perm(fmt, nb))
    return _perms[key]


def r16_runs(packed: torch.Tensor, in_features: int, fmt: str) -> list[tuple[torch.Tensor, str]]:
    """The (rows, bytes) views of a layer's runs that take the interleaved layout: their whole groups of 16 rows."""
    out = []
    for part, f in split_segments(packed, in_features, fmt):
        g = part.shape[0] // 16
        if f in R16_FORMATS and g:
            out.append((part[:16 * g].view(g, 16 * part.shape[1]), f))
    return out


def repack_r16_(packed: torch.Tensor, in_features: int, fmt: str, native=None) -> bool:
    """GGUF layout -> the interleaved layout, in place; False if nothing changed. native: the kernel extension, whose
    repack_r16 moves one group at a time (this reference permutes a run at once: a temporary of its size)."""
    runs = r16_runs(packed, in_features, fmt)
    for groups, f in runs:
        if native is not None and groups.device.type == "cpu":
            native.repack_r16(groups.view(-1, groups.shape[1] // 16), FORMAT_IDS[f])
        else:
            groups.copy_(groups[:, _r16_perm(f, in_features // BLOCK).to(groups.device)])
    return bool(runs)


def unrepack_r16(packed: torch.Tensor, in_features: int, fmt: str) -> torch.Tensor:
    """The interleaved layout -> a copy in GGUF's layout."""
    out = packed.clone()
    for (src, f), (dst, _) in zip(r16_runs(packed, in_features, fmt), r16_runs(out, in_features, fmt)):
        dst[:, _r16_perm(f, in_features // BLOCK).to(src.device)] = src
    return out


def rows_r16(packed: torch.Tensor, idx: torch.Tensor, in_features: int, fmt: str) -> torch.Tensor:
    """Rows `idx` of an interleaved (N, bytes) weight of one format, in GGUF's layout (an embedding's lookups)."""
    n, rb = packed.shape
    groups = n // 16 if fmt in R16_FORMATS else 0
    idx = idx.reshape(-1).to(packed.device)
    k = torch.arange(rb, device=packed.device)
    start = idx * rb  # rows past the last whole group: as in GGUF
    at = start[:, None] + k
    inside = idx < 16 * groups
    if bool(inside.any()):
        inv = _r16_inv(fmt, in_features // BLOCK).to(packed.device).view(16, rb)
        grouped = (idx // 16 * 16 * rb)[:, None] + inv[idx % 16]
        at = torch.where(inside[:, None], grouped, at)
    return packed.reshape(-1)[at]
