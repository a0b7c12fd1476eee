"""Linear layers and embeddings on GGUF block-quantized weights (Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 and the K-quants
Q4_K / Q5_K / Q6_K), kept packed.

`QuantLinear` holds `qweight`, a uint8 (out_features, in_features / block values * block bytes) tensor of blocks in
GGUF's own byte layout (lmstack/models/qformats.py), and multiplies with the native kernel of the CPU's best path
(lmstack/models/kernels.py; `LMSTACK_KERNEL` forces one), or unpacks to float for PyTorch (other devices, the
`torch` path). A fused layer whose GGUF tensors have different formats (a Q4_K_M file's q/k Q4_K with v Q6_K) has
a mixed format 'q4_k:768,q6_k:192': its qweight is the runs' bytes one after
the other (1-D), and one kernel call computes all of them. `QuantEmbedding` looks rows up in the same bytes; a tied
head shares the embedding's `qweight`.
Inference only: there are no float weights to train (load with dtype=float32 to fine-tune).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .qformats import (BLOCK, FORMAT_IDS, FORMATS, R16, R16_FORMATS, check_format, format_code, pack,
                       packed_shape, repack_r16_, rows_r16, segments, split_segments, unpack, unrepack_r16)


class _Packed(nn.Module):
    """What QuantLinear and QuantEmbedding share: `qweight` in GGUF's layout, or interleaved in place for the native
    kernels (layout "r16", kernels/interleaved.cpp: 16 rows per group, ~4x fewer instructions per weight byte than
    row-at-a-time, so decode runs at memory speed; the same bytes, only moved). state_dict(), dequantize() and every
    other reader see GGUF's layout."""
    layout = "gguf"  # subclasses define _cols(): the values per row

    def gguf_qweight(self) -> torch.Tensor:
        """The packed weight in GGUF's byte layout (qweight itself, or a copy when it is interleaved)."""
        return self.qweight if self.layout == "gguf" else unrepack_r16(self.qweight, self._cols(), self.fmt)

    def _set_layout(self, layout: str) -> None:
        self.layout = layout

    def to_native_layout(self) -> bool:
        """Interleave the Q8_0 / Q4_0 / Q4_1 rows in place (only where the native CPU kernels run)."""
        if self.layout != "gguf" or self.qweight.device.type != "cpu" or kernels.kernel_path() == "torch":
            return False
        if repack_r16_(self.qweight, self._cols(), self.fmt, native=kernels.loaded()):
            self._set_layout("r16")
        return self.layout == "r16"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "gguf" and prefix + "qweight" in destination:  # checkpoints hold GGUF's bytes
            destination[prefix + "qweight"] = self.gguf_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.layout != "gguf" and prefix + "qweight" in state_dict:  # GGUF's bytes were copied into qweight
            self._set_layout("gguf")
            self.to_native_layout()


class QuantLinear(_Packed):
    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False,
                 qweight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, check_format(fmt)
        self.fmt_id = format_code(fmt)  # the kernels' format argument
        shape = packed_shape(out_features, in_features, fmt)
        if qweight is None:
            qweight = torch.zeros(shape, dtype=torch.uint8)
        elif tuple(qweight.shape) != shape or qweight.dtype != torch.uint8:
            raise ValueError(f"packed {fmt} weight for ({out_features}, {in_features}) must be uint8 {shape}, "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # choose (and load) the kernel path now, not at the first matmul: the fused RMSNorm follows whether the
        # extension is loaded, and a first forward whose leading norms ran before it was would round differently
        # from every later one (the same prompt gave different greedy tokens on the first call of a process)
        kernels.kernel_path()

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, fmt, bias=lin.bias is not None, qweight=pack(lin.weight, fmt))
        if lin.bias is not None:
            q.bias = lin.bias.detach().float().cpu().clone()
        return q.to(lin.weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack(self.gguf_qweight(), self.fmt, dtype, self.in_features)

    def _cols(self) -> int:
        return self.in_features

    def gemm_min_rows(self) -> int:
        return kernels.gemm_min_rows(kernels.kernel_path(), self.layout == "r16")

    def _set_layout(self, layout: str) -> None:
        self.layout, self.fmt_id = layout, format_code(self.fmt) | (R16 if layout == "r16" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and not _op_registered:
            ext = kernels.loaded()  # the decode fast path: one native call, any leading dims
            if ext is not None and x.numel() < self.gemm_min_rows() * self.in_features and x.is_contiguous():
                return ext.qlinear(x, self.qweight, self.fmt_id, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        path = kernels.kernel_path() if x.device.type == "cpu" else "torch"
        if path == "torch":
            dt = x.dtype if x.dtype.is_floating_point else torch.float32
            y = F.linear(x2.to(dt), self.dequantize(dt), None if self.bias is None else self.bias.to(dt))
        elif x2.shape[0] >= self.gemm_min_rows():  # prefill: unpack natively, then a float GEMM
            dt = kernels.prefill_dtype(path)
            xq = x2.float().contiguous().to(dt)
            parts = split_segments(self.qweight, self.in_features, self.fmt)  # a mixed layer: per run of rows
            bias = None if self.bias is None else self.bias.to(dt)
            ys = []
            for part, fmt in parts:
                code = FORMAT_IDS[fmt] | (R16 if self.layout == "r16" and fmt in R16_FORMATS else 0)
                if _op_registered:  # compiled: a custom op with a fresh output (no scratch aliasing inside a graph)
                    w = torch.ops.lmstack.qdequant(part, code, path, dt)
                else:
                    w = kernels.dequantize(part, code, path, dt)
                ys.append(F.linear(xq, w, bias if len(parts) == 1 else None))  # use the scratch weight at once
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1) + (0 if bias is None else bias)
        else:
            y = _native(x2.float().contiguous(), self.qweight, self.fmt_id, self.bias, path)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(_Packed):
    """nn.Embedding over packed blocks: gathers the rows' blocks, then unpacks only those rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, qweight: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num_embeddings, embedding_dim, check_format(fmt)
        if segments(fmt) is not None:
            raise ValueError(f"an embedding holds one block format, not the mixed {fmt!r}")
        shape = packed_shape(num_embeddings, embedding_dim, fmt)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8) if qweight is None else qweight)
        self.out_dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str) -> "QuantEmbedding":
        return cls(emb.num_embeddings, emb.embedding_dim, fmt, pack(emb.weight, fmt), dtype=emb.weight.dtype)

    def _cols(self) -> int:
        return self.embedding_dim

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack(self.gguf_qweight(), self.fmt, dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if (self.out_dtype == torch.float32 and self.qweight.device.type == "cpu" and self.fmt in FORMATS
                and not torch.compiler.is_compiling()):
            ext = kernels.loaded()  # one native call (a decode step's lookup was ~15 small ops)
            if ext is not None:
                code = FORMAT_IDS[self.fmt] | (R16 if self.layout == "r16" else 0)
                return ext.embed_rows(self.qweight, code, idx.reshape(-1).long().contiguous()).view(
                    *idx.shape, self.embedding_dim)
        rows = (self.qweight.index_select(0, idx.reshape(-1)) if self.layout == "gguf" else
                rows_r16(self.qweight, idx, self.embedding_dim, self.fmt))  # a tied head's interleaved bytes
        rows = unpack(rows, self.fmt, self.out_dtype)
        return rows.view(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


def native_layout(model: nn.Module) -> int:
    """QuantLinear.to_native_layout on every packed linear of `model` (a tied head's embedding then reads its rows
    from the interleaved bytes); returns how many changed. The loaders call it."""
    embs = {m.qweight.data_ptr(): m for m in model.modules() if isinstance(m, QuantEmbedding)}
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.to_native_layout():
            n += 1
            if m.qweight.data_ptr() in embs:  # a tied head: its embedding reads the same bytes
                embs[m.qweight.data_ptr()]._set_layout("r16")
    if n:
        model.__dict__.pop("_fused_decode_layers", None)  # its cached format codes
    return n


def is_packable(module: nn.Module) -> bool:
    """Layers the block formats can hold: rows of a multiple of 32 values."""
    if isinstance(module, nn.Linear):
        return module.in_features % BLOCK == 0
    return isinstance(module, nn.Embedding) and module.embedding_dim % BLOCK == 0


_op_registered = False


def register_custom_op() -> None:
    """torch.ops.lmstack.qlinear for torch.compile (no graph break); QuantLinear routes through it afterwards."""
    global _op_registered
    if _op_registered:
        return

    @torch.library.custom_op("lmstack::qlinear", mutates_args=())
    def qlinear(x: torch.Tensor, w: torch.Tensor, fmt: int, bias: torch.Tensor | None, path: str) -> torch.Tensor:
        return kernels.qlinear(x, w, fmt, bias, path)

    @qlinear.register_fake
    def _(x, w, fmt, bias, path):
        from .qformats import code_rows
        return x.new_empty(*x.shape[:-1], code_rows(fmt, w.shape[0]))

    @torch.library.custom_op("lmstack::qdequant", mutates_args=())
    def qdequant(w: torch.Tensor, fmt: int, path: str, dtype: torch.dtype) -> torch.Tensor:
        return kernels.dequantize(w, fmt, path, dtype).clone()

    @qdequant.register_fake
    def _(w, fmt, path, dtype):
        from .qformats import ALL_FORMATS, BLOCK_BYTES, BLOCK_VALUES
        f = ALL_FORMATS[fmt & ~R16]
        return w.new_empty(w.shape[0], w.shape[1] // BLOCK_BYTES[f] * BLOCK_VALUES[f], dtype=dtype)

    _op_registered = True


def _native(x, w, fmt_id, bias, path):
    if _op_registered:
        return torch.ops.lmstack.qlinear(x, w, fmt_id, bias, path)
    return kernels.qlinear(x, w, fmt_id, bias, path)
