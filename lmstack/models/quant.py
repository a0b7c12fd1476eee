"""Int8 weight-only quantization for fast CPU decoding.

`Int8Linear` stores an (out, in) int8 weight with one symmetric float32 scale per output channel
(w ~= w8 * scale[:, None]). Decoding at batch 1 is a stream of matrix-vector products whose speed is set by the bytes
read per token, so int8 weights (1 byte each) are ~4x faster than float32 when the kernel streams at memory
bandwidth. The fast path is a small AVX2/FMA C++ kernel built on first use with torch.utils.cpp_extension
(cached afterwards); if it cannot be built (no compiler, no AVX2, not x86, LMSTACK_NO_EXT=1) the pure-PyTorch path
(dequantize, then a float matmul) gives the same results, only slower.

`quantize_model(model, "int8")` swaps every nn.Linear inside the transformer blocks for an Int8Linear, and the
language-model head too (a tied head gets its own quantized copy; the embedding table stays float).
"""
from __future__ import annotations

import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import cpu_flags

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 cvt8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] for MT rows of x at once (each weight row read once per MT rows)
template <int MT>
static void rows(const float* x, const int8_t* w, const float* scale, const float* bias, float* y,
                 int64_t K, int64_t N, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* wr = w + n * K;
        __m256 acc[MT][2];
        for (int m = 0; m < MT; ++m) { acc[m][0] = _mm256_setzero_ps(); acc[m][1] = _mm256_setzero_ps(); }
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256 w0 = cvt8(wr + k), w1 = cvt8(wr + k + 8);
            for (int m = 0; m < MT; ++m) {
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
            }
        }
        for (int m = 0; m < MT; ++m) {
            float s = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
            for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * (float)wr[kk];
            y[m * N + n] = s * scale[n] + (bias ? bias[n] : 0.f);
        }
    }
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
    // x (M, K) float32 contiguous, w (N, K) int8 contiguous, scale (N,) float32 -> (M, N) float32
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) rows<4>(xp + m * K, wp, sp, bp, yp + m * N, K, N, n0, n1);
        for (; m + 2 <= M; m += 2) rows<2>(xp + m * K, wp, sp, bp, yp + m * N, K, N, n0, n1);
        for (; m < M; ++m) rows<1>(xp + m * K, wp, sp, bp, yp + m * N, K, N, n0, n1);
    });
    return y;
}
"""

_ext = None
_ext_error: str | None = None
_lock = threading.Lock()
# Above this many rows (prefill) a float matmul on the dequantized weight wins: it is compute-bound, not memory-bound.
KERNEL_MAX_ROWS = 16


def _has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def extension():
    """The compiled kernel module, or None (pure-PyTorch fallback). Built once per machine, then cached."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        if os.environ.get("LMSTACK_NO_EXT", "") not in ("", "0"):
            _ext_error = "disabled by LMSTACK_NO_EXT"
        elif not _has_avx2():
            _ext_error = "CPU lacks AVX2/FMA"
        else:
            try:
                from torch.utils.cpp_extension import load_inline
                _ext = load_inline("lmstack_int8_v1", cpp_sources=_CPP, functions=["int8_linear"],
                                   extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                   verbose=False)
            except Exception as e:  # no compiler, no headers, ...: fall back cleanly
                _ext_error = f"{type(e).__name__}: {e}"[:500]
        return _ext


def kernel_status() -> str:
    extension()
    return "avx2" if _ext is not None else f"pytorch fallback ({_ext_error})"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w (N, K) -> (w8 int8 (N, K), scale float32 (N,)), w ~= w8 * scale[:, None]."""
    w = w.detach()
    w8 = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], 4096):  # in row blocks: no full-size float temporaries (a 49k-row head)
        blk = w[i:i + 4096].float()
        s = blk.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        w8[i:i + 4096] = torch.round(blk / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[i:i + 4096] = s
    return w8, scale


class Int8Linear(nn.Module):
    """Weight-only int8 Linear (inference only). Activations, bias and output keep the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.use_kernel = True

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        q.weight_int8, q.scale = quantize_int8(lin.weight)
        if lin.bias is not None:
            q.bias = lin.bias.detach().float().clone()
        return q.to(lin.weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_int8.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ext = extension() if self.use_kernel and x.device.type == "cpu" else None
        if ext is not None and x2.shape[0] <= KERNEL_MAX_ROWS:
            y = _kernel(x2.float().contiguous(), self.weight_int8, self.scale, self.bias)
        else:
            y = F.linear(x2.float(), self.dequantize(torch.float32), self.bias)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


QUANT_MODES = ("int8", "q8_0", "q4_0", "q4_1")


def quantize_model(model: nn.Module, mode: str = "int8", head: bool = True) -> nn.Module:
    """Replace the transformer blocks' nn.Linear layers (and the LM head, unless head=False), in place, by
    Int8Linear (mode 'int8': per-channel int8, the embedding stays float) or by QuantLinear in a GGUF block format
    ('q8_0' | 'q4_0' | 'q4_1'; the embedding too, shared with a tied head). Layers whose rows are not a multiple of
    32 values stay float in the block formats."""
    if mode not in QUANT_MODES:
        from ..errors import LMStackError
        raise LMStackError(f"unknown quantization {mode!r}; supported: {', '.join(QUANT_MODES)}")
    from .qlinear import QuantEmbedding, QuantLinear, is_packable

    def convert(lin: nn.Linear) -> nn.Module:
        if mode == "int8":
            return Int8Linear.from_linear(lin)
        return QuantLinear.from_linear(lin, mode) if is_packable(lin) else lin
    targets = [m for m in getattr(model, "blocks", model).modules()]
    for parent in targets:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, convert(child))
    lm_head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    tied = isinstance(lm_head, nn.Linear) and isinstance(emb, nn.Embedding) and lm_head.weight is emb.weight
    if mode != "int8" and isinstance(emb, nn.Embedding) and is_packable(emb) and (tied or head):
        model.tok_emb = QuantEmbedding.from_embedding(emb, mode)
        if tied and head:
            model.lm_head = QuantLinear(lm_head.in_features, lm_head.out_features, mode,
                                        qweight=model.tok_emb.qweight)
            return _mark(model, mode)
    if head and isinstance(lm_head, nn.Linear):
        model.lm_head = convert(lm_head)
    return _mark(model, mode)


def _mark(model: nn.Module, mode: str) -> nn.Module:
    model.quantization = mode
    if mode != "int8":
        from .qlinear import native_layout
        native_layout(model)
    return model


_op_registered = False


def register_custom_op() -> None:
    """Expose the kernel as torch.ops.lmstack.int8_linear (for torch.compile: no graph break) and route Int8Linear
    through it. The fake (meta) implementation gives the output shape; without the extension nothing is registered."""
    global _op_registered
    if _op_registered or extension() is None:
        return

    @torch.library.custom_op("lmstack::int8_linear", mutates_args=())
    def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return extension().int8_linear(x, w, scale, bias)

    @int8_linear.register_fake
    def _(x, w, scale, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    _op_registered = True


def _kernel(x, w, scale, bias):
    if _op_registered:
        return torch.ops.lmstack.int8_linear(x, w, scale, bias)
    return extension().int8_linear(x, w, scale, bias)


# ---- quantized checkpoints: which layers are quantized, and how -------------------------------------------------
def quant_layout(model: nn.Module) -> dict[str, str]:
    """{layer name: 'int8' | 'q8_0' | 'q4_0' | 'q4_1'} for every quantized layer (empty for a float model)."""
    from .qlinear import QuantEmbedding, QuantLinear
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            out[name] = "int8"
        elif isinstance(m, (QuantLinear, QuantEmbedding)):
            out[name] = m.fmt
    return out


def apply_layout(model: nn.Module, layout: dict[str, str]) -> nn.Module:
    """Swap the layers `layout` names for empty quantized ones of the same shape (then load_state_dict fills them);
    a tied head shares the packed embedding."""
    from .qlinear import QuantEmbedding, QuantLinear
    for name, fmt in layout.items():
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, dtype=old.weight.dtype)
        elif fmt == "int8":
            new = Int8Linear(old.in_features, old.out_features, bias=old.bias is not None)
        else:
            new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    tie_packed(model)
    if layout:
        model.quantization = ",".join(sorted(set(layout.values())))
    return model


def tie_packed(model: nn.Module) -> None:
    """Point a packed tied head at the packed embedding's bytes (one copy)."""
    from .qlinear import QuantEmbedding, QuantLinear
    cfg = getattr(model, "config", None)
    emb, head = getattr(model, "tok_emb", None), getattr(model, "lm_head", None)
    if getattr(cfg, "tie_embeddings", False) and isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear):
        head.qweight = emb.qweight


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap quantized layers back to float nn.Linear / nn.Embedding (for export and fine-tuning), keeping ties."""
    from .qlinear import QuantEmbedding, QuantLinear
    for name in list(quant_layout(model)):
        q = model.get_submodule(name)
        if isinstance(q, QuantEmbedding):
            new = nn.Embedding(q.num_embeddings, q.embedding_dim)
            new.weight = nn.Parameter(q.dequantize(q.out_dtype))
        else:
            new = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            new.weight = nn.Parameter(q.dequantize(torch.float32))
            if q.bias is not None:
                new.bias = nn.Parameter(q.bias.float().clone())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.tok_emb.weight
    model.quantization = None
    return model
