"""Pre-allocated key/value cache: one tensor per layer, written in place as tokens are generated."""
from __future__ import annotations

import torch


class KVCache:
    """Holds keys and values for `n_layer` layers, shape (batch, n_kv_head, max_len, head_dim) each.

    Allocated once for the whole generation, so decoding never reallocates or concatenates.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, batch, cfg.kv_heads, max_len or cfg.block_size, cfg.head_dim, p.dtype, p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at positions [pos, pos+T) and return the cache up to pos+T."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} exceeds the cache length {self.max_len}")
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
