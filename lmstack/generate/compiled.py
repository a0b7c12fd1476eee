"""Optional torch.compile of the model's forward for decoding (`compile=True` in the bench / load helpers).

The quantized kernels are registered as torch custom ops (lmstack::int8_linear, lmstack::qlinear) so the compiled
graph calls them without a graph break. Decoding steps differ only in `pos`; dynamic shapes keep that to one or two compiled graphs."""
from __future__ import annotations

import torch


def compile_decode(model, mode: str | None = None):
    """Replace model.forward by a torch.compile'd version (in place); returns the model."""
    from ..models import kernels, kv_cache, qlinear, quant
    kernels.kernel_path()  # decide the kernel path (reads /proc/cpuinfo) before tracing, not inside the graph
    kv_cache.exclude_from_compile()
    quant.register_custom_op()
    qlinear.register_custom_op()
    model.forward = torch.compile(model.forward, mode=mode, dynamic=True)
    return model
