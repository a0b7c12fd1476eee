"""Pre-allocated key/value cache: one tensor per layer, written in place as tokens are generated."""
from __future__ import annotations

import torch

from ..errors import LMStackError


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
    def for_model(cls, model, batch: int, max_len: int | None = None, rolling: bool = False,
                  rewind: int = 0) -> "KVCache":
        """A cache of max_len positions (default: the context window) for `model`. rolling=True: a RollingKVCache
        when some layer has a sliding window shorter than max_len (its layers keep only their last window + rewind
        positions), else this full cache. Callers that copy or lay out `k` / `v` slots themselves keep the default
        full cache (every layer holds positions [0, max_len) at slot = position)."""
        cfg = model.config
        p = next(model.parameters())
        L = max_len or cfg.block_size
        if rolling:
            windows = [cfg.layer_window(i) for i in range(cfg.n_layer)]
            if any(w is not None and w + rewind < L for w in windows):
                return RollingKVCache(windows, batch, cfg.kv_heads, L, cfg.head_dim, p.dtype, p.device, rewind)
        return cls(cfg.n_layer, batch, cfg.kv_heads, L, cfg.head_dim, p.dtype, p.device)

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


def _ring(start: int, n: int, size: int) -> list[tuple[int, int, int]]:
    """Ring slots of the n positions from `start`: (slot_from, slot_to, offset into the n) pieces, one or two."""
    s = start % size
    if s + n <= size:
        return [(s, s + n, 0)]
    return [(s, size, 0), (0, s + n - size, size - s)]


class RollingKVCache(KVCache):
    """A KVCache whose sliding-window layers (window w) keep only their last `w + rewind` positions, in a ring
    buffer (position a at slot a % size), so their memory is bounded by the window; full-attention layers (window
    None) keep every position as in KVCache.

    `update` on a sliding layer returns the keys/values of positions [pos - p, pos + T), p = min(pos, w - 1): the
    part of the past any of the T new queries can see (the band pos + i - w < j), read from the ring in order,
    followed by the chunk's own keys; only then are the new keys written (the last `size` of them), so a chunk of
    any length T is exact. The returned tensor is shorter than pos + T: the Transformer's attention uses the last
    columns of its (T, pos + T) mask (models/transformer.py, Attention). Positions stay absolute (RoPE is applied
    before the cache).

    Rewinding (speculative decoding's rollback) works while the positions the band needs are still in the ring:
    a call at pos < the written end drops what follows pos; with rewind=r it may go back r + 1 positions from the
    written end. A call that needs overwritten positions, or one that skips positions, raises. Beam search's row
    reorder (beam.cache_reorder: every row's slots [0, length)) copies whole rings, which is a correct reorder."""

    def __init__(self, windows: list[int | None], batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", rewind: int = 0):
        self.windows, self.max_len = list(windows), max_len
        self.sizes = [max_len if w is None else min(max_len, w + rewind) for w in self.windows]
        self.k = [torch.zeros(batch, n_kv_head, n, head_dim, dtype=dtype, device=device) for n in self.sizes]
        self.v = [torch.zeros(batch, n_kv_head, n, head_dim, dtype=dtype, device=device) for n in self.sizes]
        self.lo = [0] * len(self.windows)  # per layer: the ring holds positions [lo, hi)
        self.hi = [0] * len(self.windows)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.windows[layer]
        if w is None:
            return super().update(layer, k, v, pos)
        T, size = k.shape[2], self.sizes[layer]
        end = pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} exceeds the cache length {self.max_len}")
        p = min(pos, w - 1)
        if pos > self.hi[layer] or pos - p < self.lo[layer]:
            raise LMStackError(f"rolling KV cache (layer {layer}, window {w}) holds positions [{self.lo[layer]}, "
                               f"{self.hi[layer]}); a call at position {pos} needs [{pos - p}, {pos}) (skipping "
                               f"ahead, or rewinding further than the cache's rewind margin)")
        out = []
        for buf, new in ((self.k[layer], k), (self.v[layer], v)):
            new = new.to(buf.dtype)
            past = [buf[:, :, a:b] for a, b, _ in _ring(pos - p, p, size)] if p else []
            out.append(torch.cat(past + [new], dim=2) if past else new)
            n = min(T, size)
            for a, b, off in _ring(end - n, n, size):
                buf[:, :, a:b] = new[:, :, T - n + off:T - n + off + b - a]
        self.lo[layer], self.hi[layer] = max(self.lo[layer], end - size), end
        return out[0], out[1]


class EncoderDecoderCache(KVCache):
    """The decoder cache of an encoder-decoder (models/seq2seq.py): the decoder's self-attention KVCache plus, per
    layer, the cross-attention keys/values of the encoder output, shape (batch, n_head, src_len, head_dim).

    The cross slots start empty (None); the decoder's first forward computes them from the encoder output and stores
    them here, and every later step reads them (the encoder output is projected once per generation, not once per
    token). memory_mask (batch, src_len) bool: the source key-padding mask the cross-attention applies.
    Beam search: `reorder(rows, length)` permutes the self-attention rows; the cross rows are permuted too unless
    `cross=False` (rows that only move within a group of beams of one source share identical cross keys/values)."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 memory_mask: torch.Tensor | None = None):
        super().__init__(n_layer, batch, n_kv_head, max_len, head_dim, dtype, device)
        self.cross_k: list[torch.Tensor | None] = [None] * n_layer
        self.cross_v: list[torch.Tensor | None] = [None] * n_layer
        self.memory_mask = memory_mask

    def reorder(self, rows: torch.Tensor, length: int, cross: bool = True) -> None:
        """Row i becomes a copy of row rows[i] (self-attention positions [0, length), and the cross keys/values)."""
        for layer in range(len(self.k)):
            self.k[layer][:, :, :length] = self.k[layer][rows, :, :length]
            self.v[layer][:, :, :length] = self.v[layer][rows, :, :length]
            if cross and self.cross_k[layer] is not None:
                self.cross_k[layer] = self.cross_k[layer][rows]
                self.cross_v[layer] = self.cross_v[layer][rows]
        if cross and self.memory_mask is not None:
            self.memory_mask = self.memory_mask[rows]

    def nbytes(self) -> int:
        cross = [t for t in self.cross_k + self.cross_v if t is not None]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in cross)


class StateCache:
    """The decoding cache of a model that carries state instead of keys/values: an LSTM/GRU's hidden (and cell)
    state, a gated CNN's rolling receptive-field buffer per layer. `tensors` are batch-first, one row per sequence;
    the model reads and rewrites them in place as tokens arrive, so the memory does not grow with the length.

    The call shape is the Transformer's: `model(idx, cache=c, pos=p)` continues every row from its state. The state
    only moves forward: `pos` must be the number of tokens already fed (`length`), since what came before is not
    kept; a view of some rows of a batch whose rows are at different positions (the continuous batcher) has
    length None and skips that check. What the engine does with a KVCache it does here through methods:
    `reorder` (beam search), `view` / `copy_rows` / `move_row` (continuous batching), `reset`."""

    rewindable = False  # a KVCache can be rewritten from any earlier position; a state cannot go back

    def __init__(self, tensors: list[torch.Tensor], max_len: int, kind: str = "state"):
        self.tensors, self.max_len, self.kind = list(tensors), max_len, kind
        self.length: int | None = 0

    @property
    def batch(self) -> int:
        return self.tensors[0].shape[0]

    def advance(self, pos: int, T: int, arch: str) -> None:
        """Check a forward of T tokens at `pos` against the state, then count them (the models call this)."""
        if self.length is not None:
            if pos != self.length:
                raise LMStackError(f"the {arch} cache holds the state after {self.length} tokens but the call "
                                   f"continues at position {pos}; a {self.kind} cannot rewind or skip (feed the "
                                   f"tokens in order, or start a fresh cache with model.new_cache)")
            if pos + T > self.max_len:
                raise LMStackError(f"{arch} cache overflow: position {pos + T} exceeds the cache length "
                                   f"{self.max_len}")
            self.length = pos + T

    def reset(self) -> None:
        for t in self.tensors:
            t.zero_()
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes a copy of row rows[i] (beam search)."""
        for t in self.tensors:
            t.copy_(t[rows.to(t.device)])

    def view(self, n: int) -> "StateCache":
        """The first n rows, sharing this cache's storage; rows may be at different positions (length None)."""
        v = StateCache([t[:n] for t in self.tensors], self.max_len, self.kind)
        v.length = None
        return v

    def copy_rows(self, dst: list[int], src: "StateCache", src_rows: list[int]) -> None:
        """Rows dst of this cache become copies of rows src_rows of `src`."""
        d = torch.tensor(dst, device=self.tensors[0].device)
        s = torch.tensor(src_rows, device=src.tensors[0].device)
        for t, u in zip(self.tensors, src.tensors):
            t[d] = u[s].to(t.device, t.dtype)

    def move_row(self, src: int, dst: int) -> None:
        for t in self.tensors:
            t[dst] = t[src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def make_cache(model, batch: int, max_len: int | None = None, rolling: bool = True):
    """The cache `model` decodes with: its own (`model.new_cache`: an RNN's state, a CNN's buffers) when it has
    one, else a KVCache of max_len positions (default: the context window) - a RollingKVCache, whose
    sliding-window layers keep only their window, for a sliding-window model unless rolling=False."""
    new = getattr(model, "new_cache", None)
    if new is not None:
        return new(batch, max_len or model.config.block_size)
    return KVCache.for_model(model, batch, max_len, rolling=rolling)


def is_state_cache_model(model) -> bool:
    """Whether `model` decodes with a forward-only StateCache (LSTM, GRU, gated CNN) rather than a KVCache."""
    return getattr(model, "new_cache", None) is not None


def exclude_from_compile() -> None:
    """Make torch.compile run RollingKVCache.update eagerly (its ring offsets are Python ints: tracing them would
    recompile every step). Called by generate.compiled before compiling; not a decorator, because applying
    torch.compiler.disable at import time imports torch._dynamo (~1.5 s of every CLI start)."""
    if not getattr(RollingKVCache.update, "_lmstack_eager", False):
        RollingKVCache.update = torch.compiler.disable(RollingKVCache.update)
        RollingKVCache.update._lmstack_eager = True

