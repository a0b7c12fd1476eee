"""Native CPU kernels for quantized matmul, chosen at run time for the CPU you have.

Paths, best first (`LMSTACK_KERNEL=amx|avx512|avx2|torch` forces one; `kernel_path()` says which is in use):
- amx     avx512 for decode-sized batches; batches of GEMM_MIN_ROWS rows or more (prefill) unpack the weight to
          bfloat16 natively and run PyTorch's oneDNN matmul, which uses the AMX tiles (needs amx_bf16): ~2x the
          float32 prefill here.
- avx512  kernels/qmatmul.cpp built with AVX-512 (F/BW/VL/VNNI): dpbusd on two blocks of 32 per 512-bit register
          for one row of x (decode), one block per 256-bit dpbusd in register tiles for a few rows; prefill-sized
          batches unpack the weight natively and run PyTorch's GEMM, in bfloat16 where the CPU has AVX512-BF16
          (AMD Zen 4, Intel Cooper Lake: ~2.8x the float32 GEMM on Zen 4), float32 otherwise.
- avx2    the same source built for AVX2 + FMA + F16C: maddubs + madd per block (the matvec takes two blocks per step
          with both blocks' scales converted at once, as the 512-bit tile); float32 GEMM for prefill.
Q8_0 / Q4_0 / Q4_1 layers loaded for a native path are interleaved in place, 16 rows per group (kernels/
interleaved.cpp, models/qlinear.py `native_layout`): one vector load holds the same 4 quant bytes of 8 rows, so a
dot product leaves one row per lane and a block's scales for 8 rows are one vector — ~4x fewer instructions per
weight byte than the row-at-a-time tiles below, and decode runs at memory speed (Zen 5: 1.12x -> 1.5x llama.cpp).
The K-quants (Q4_K / Q5_K / Q6_K, kernels/kquants.cpp) have 256-bit register tiles in every build (dpbusd on
256-bit registers with AVX-512 VNNI, maddubs + madd on AVX2); Q5_0 / Q5_1 share the Q4 kernels (+ the 5th bit).
Every register tile prefetches the weight rows of a tile ahead (rows of a few hundred bytes are too short for the
hardware prefetcher): the next tile into L1 on Intel (measured 1.6x on decode), two tiles ahead into L2 on AMD
(Zen 4: 1.23x over the Intel setting); see _prefetch_flags.
- torch   unpack the blocks to float and call F.linear: any CPU or GPU, exact float math (the reference).
The native decode kernels quantize x per block of 32 to int8 as llama.cpp does: they agree with `torch` to ~1e-2
relative per matmul, and like llama.cpp they are not batch-invariant (a rounding of x that flips changes later
layers: a prompt scored alone or inside a batch can differ by ~0.1-1 in the logits). Comparisons that must be exact
load the model with dtype=float32 (or run LMSTACK_KERNEL=torch). Extensions are compiled on first use with
torch.utils.cpp_extension (a progress line on stderr; cached under ~/.cache/torch_extensions afterwards). A path the
CPU or toolchain cannot run falls back to the next one with a one-line message, never a crash.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from ..errors import LMStackError

PATHS = ("amx", "avx512", "avx2", "torch")
GEMM_MIN_ROWS = 32  # from this many rows of x (prefill), unpack the weight natively and run a float GEMM
MAX_GEMM_MIN_ROWS = 256  # the largest gemm_min_rows


def gemm_min_rows(path: str, interleaved: bool) -> int:
    """From how many rows of x a layer unpacks its weight for a float GEMM instead of running the integer kernel.
    The interleaved (r16) kernels stay ahead of unpack + GEMM for longer (SmolLM2's layers + head on Zen 5, 2 threads,
    512-bit r16 tiles: 88 vs 112 ms at 256 rows against the bfloat16 GEMM, 193 vs 182 at 512; the avx2 path's
    256-bit tiles: 301 vs 423 ms at 256 rows against its float32 GEMM); on AMX the bf16 tiles win early, as for the
    row-at-a-time kernels."""
    return GEMM_MIN_ROWS if not interleaved or path == "amx" else MAX_GEMM_MIN_ROWS


# the extension's sources (common.h is included by all); bump the _v<N> name below when any of them changes, since
# torch's build cache looks at the .cpp files only
_SOURCES = [Path(__file__).with_name("kernels") / f
            for f in ("qmatmul.cpp", "kquants.cpp", "decode_layer.cpp", "interleaved.cpp", "unpack.cpp")]
_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mavx512vnni"],
}
_NEEDS = {"avx2": {"avx2", "fma", "f16c"},
          "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
          "amx": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "amx_bf16",
                  "amx_tile"}}
_lock = threading.Lock()
_built: dict[str, object] = {}
_errors: dict[str, str] = {}
_selected: str | None = None


@functools.lru_cache(maxsize=None)
def cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ('' off Linux/x86 or where missing), read once per process:
    prefill asks for the flags on every layer call."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux/x86)."""
    return set(cpuinfo("flags").split())


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ('GenuineIntel', 'AuthenticAMD', ...; '' where unknown)."""
    return cpuinfo("vendor_id")


def _prefetch_flags() -> list[str]:
    """How far ahead the register tiles prefetch weight rows, per CPU vendor (measured end to end on SmolLM2 Q4_1
    decode, 2 threads): Intel Xeon (AMX VM) 1 tile ahead into L1 (1.6x over none); AMD EPYC Zen 4 2 tiles ahead into
    L2, 114 vs 93 tok/s for the Intel setting (1 tile into L1 was no better than none there)."""
    if cpu_vendor() == "AuthenticAMD":
        return ["-DPF_TILES=2", "-DPF_HINT=_MM_HINT_T1"]
    return []


def native_bf16(flags: set[str] | None = None) -> list[str]:
    """The CPU flags that give a native bf16 matmul (AMX-BF16 tiles, AVX512-BF16 dot products); empty on CPUs where
    PyTorch would emulate bf16 (slower than float32 there)."""
    return sorted((cpu_flags() if flags is None else flags) & {"amx_bf16", "avx512_bf16"})


def prefill_dtype(path: str) -> torch.dtype:
    """The dtype of the unpacked-weight GEMMs a native path runs for prefill-sized batches: bfloat16 where the CPU
    multiplies it natively (the avx2 path stands for an AVX2-only CPU and stays float32), float32 otherwise.
    LMSTACK_PREFILL_DTYPE=float32 keeps float32 everywhere."""
    if path not in ("amx", "avx512") or os.environ.get("LMSTACK_PREFILL_DTYPE", "").strip().lower() in ("float32",
                                                                                                     "fp32"):
        return torch.float32
    return torch.bfloat16 if native_bf16() else torch.float32


def supported_paths(flags: set[str] | None = None) -> list[str]:
    """Paths this CPU can run, best first (always ends with 'torch')."""
    flags = cpu_flags() if flags is None else flags
    return [p for p in PATHS if p == "torch" or _NEEDS[p] <= flags]


def extension(isa: str):
    """The compiled module for 'avx2' or 'avx512', or None (with the reason in build_error(isa))."""
    if isa in _built or isa in _errors:
        return _built.get(isa)
    with _lock:
        if isa in _built or isa in _errors:
            return _built.get(isa)
        try:
            from torch.utils.cpp_extension import get_default_build_root, load
            tuning = _prefetch_flags()
            name = f"lmstack_qmatmul_{isa}{'_amd' if tuning else ''}_v32"
            root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
            if not any(root.glob(f"{name}/*.so")) and not any(root.glob(f"*/{name}/*.so")):
                print(f"lmstack: compiling the {isa} quantized-matmul kernels (first use, about a minute; cached "
                      "afterwards)...", file=sys.stderr, flush=True)
            _built[isa] = load(name, [str(f) for f in _SOURCES],
                               extra_cflags=["-O3", "-fopenmp", *_FLAGS[isa], *tuning], extra_ldflags=["-fopenmp"],
                               verbose=False)
        except Exception as e:  # no compiler, no headers, an assembler without these instructions, ...
            _errors[isa] = f"{type(e).__name__}: {e}"[:400]
        return _built.get(isa)


def build_error(isa: str) -> str | None:
    return _errors.get(isa)


def _resolve(requested: str | None) -> str:
    disabled = os.environ.get("LMSTACK_NO_EXT", "") not in ("", "0")
    ok = ["torch"] if disabled else supported_paths()
    if requested:
        if requested not in PATHS:
            raise LMStackError(f"LMSTACK_KERNEL={requested!r} is not a kernel path; use one of {', '.join(PATHS)}")
        if requested not in ok:
            why = "LMSTACK_NO_EXT is set" if disabled else f"this CPU lacks {', '.join(sorted(_NEEDS[requested] - cpu_flags()))}"
            print(f"lmstack: LMSTACK_KERNEL={requested} cannot run here ({why}); using {ok[0]}", file=sys.stderr)
            requested = None
        else:
            ok = ok[ok.index(requested):]
    for path in ok:
        if path == "torch":
            return path
        if extension("avx2" if path == "avx2" else "avx512") is not None:
            return path
        print(f"lmstack: the {path} kernels did not build ({build_error('avx2' if path == 'avx2' else 'avx512')});"
              " trying the next path", file=sys.stderr)
    return "torch"


def kernel_path() -> str:
    """The path quantized layers use in this process (decided once, from LMSTACK_KERNEL and the CPU)."""
    global _selected
    if _selected is None:
        _selected = _resolve(os.environ.get("LMSTACK_KERNEL", "").strip().lower() or None)
    return _selected


def set_kernel_path(path: str | None) -> str:
    """Choose the path again (None: from LMSTACK_KERNEL and the CPU); for tests and benchmarks."""
    global _selected
    _selected = _resolve(path)
    return _selected


def qlinear(x: torch.Tensor, packed: torch.Tensor, fmt_id: int, bias: torch.Tensor | None, path: str):
    """(M, K) float32 contiguous @ packed (N, bytes)^T -> (M, N) float32 on a native path."""
    ext = _built["avx2" if path == "avx2" else "avx512"]
    return ext.qlinear(x, packed, fmt_id, bias)


def loaded():
    """The extension of the path in use if it is already built and loaded in this process, else None: float models
    use its fused norm / SwiGLU only once a quantized model has brought it in (no compile for float-only users)."""
    if _selected is None or _selected == "torch":
        return None
    return _built.get("avx2" if _selected == "avx2" else "avx512")


_scratch = threading.local()


def dequantize(packed: torch.Tensor, fmt_id: int, path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed blocks -> float32 / bfloat16 weight with the native unpacker, for float GEMMs on prefill-sized
    batches. The result lives in a per-thread scratch buffer reused by the next call (use it at once): a fresh
    allocation each call costs more in page faults than the unpacking."""
    from .qformats import ALL_FORMATS, BLOCK_BYTES, BLOCK_VALUES, R16
    fmt = ALL_FORMATS[fmt_id & ~R16]
    n, k = packed.shape[0], packed.shape[1] // BLOCK_BYTES[fmt] * BLOCK_VALUES[fmt]
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n * k:
        buf = bufs[dtype] = torch.empty(n * k, dtype=dtype)
    out = buf[:n * k].view(n, k)
    _built["avx2" if path == "avx2" else "avx512"].dequantize(packed, fmt_id, out)
    return out


if __name__ == "__main__":  # python -m lmstack.models.kernels: build what this CPU can run, say what is in use
    print(f"CPU flags: {' '.join(sorted(f for f in cpu_flags() if f.startswith(('avx', 'amx', 'fma', 'f16c'))))}")
    print(f"supported paths: {', '.join(supported_paths())}")
    print(f"in use: {kernel_path()}")
