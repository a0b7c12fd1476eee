"""Prefix caching: keys/values of prompt prefixes already computed, reused by later prompts that start the same way.

Servers see many prompts that share a long beginning (a system prompt, few-shot examples, a RAG context). The
keys/values of a position depend only on the tokens up to it (causal attention), so a prompt's first n positions
can be copied from any earlier prompt with the same first n tokens instead of being recomputed; only the rest of the
prompt is prefilled (ContinuousBatcher(prefix_cache=...), generate/batching.py).

The cache holds whole blocks of `block_tokens` tokens. A block's key is the chained hash of (its parent block's key,
its token ids), so one key names the whole prefix up to the end of that block; each entry also keeps its parent key
and its tokens and a lookup compares them, so a hash collision is a miss, never a wrong prefix. Entries are kept in
LRU order under a byte budget. A lookup or insert touches a prompt's chain from its deepest block up to its first,
so a parent is always more recently used than each of its cached children and eviction (from the LRU end) always
takes a block with no cached descendants: no block is left unreachable.

Only plain Transformer KV caches qualify: a sliding-window layer's keys/values are not the slot = position layout
the copy assumes, and stateful models (LSTM, GRU, gated CNN) carry a state, not per-position keys/values
(`prefix_cache_unsupported` says why a model does not qualify; ContinuousBatcher raises with that reason).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import LMStackError
from ..models.kv_cache import KVCache, is_state_cache_model
from .engine import prefill_logits

_ROOT = 0  # the parent key of a prompt's first block


@dataclass
class _Block:
    parent: int
    tokens: tuple[int, ...]
    k: list[torch.Tensor]  # per layer (n_kv_head, block_tokens, head_dim)
    v: list[torch.Tensor]
    nbytes: int


def prefix_cache_unsupported(model) -> str | None:
    """Why `model` cannot use a prefix cache (None when it can): only causal Transformers with full attention in
    every layer keep keys/values at slot = position that a later prompt can copy."""
    cfg = model.config
    if is_state_cache_model(model):
        return f"a {cfg.arch} model carries a recurrent/convolution state, not per-position keys and values"
    if getattr(cfg, "arch", "transformer") != "transformer" or not getattr(cfg, "causal", True):
        return f"only causal decoder Transformers have reusable prefix keys/values (this is arch={cfg.arch!r})"
    if any(cfg.layer_window(i) is not None for i in range(cfg.n_layer)):
        return f"the model has sliding-window layers (sliding_window={cfg.sliding_window})"
    return None


def check_prefix_cache_model(model) -> None:
    """Raise a clear LMStackError when `model` cannot use a prefix cache."""
    why = prefix_cache_unsupported(model)
    if why is not None:
        raise LMStackError(f"prefix caching is not supported for this model: {why}; build the batcher without "
                           "prefix_cache (lmstack serve --no-prefix-cache)")


class PrefixCache:
    """Whole-block prefix keys/values in LRU order under `budget_bytes` (see the module docstring). The batcher's
    thread calls `lookup` / `insert`; `stats()` may be read from any thread (a lock guards every access)."""

    def __init__(self, block_tokens: int = 16, budget_bytes: int = 256 * 1024 * 1024):
        if block_tokens < 1:
            raise LMStackError(f"block_tokens must be >= 1, got {block_tokens}")
        if budget_bytes < 0:
            raise LMStackError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.block_tokens, self.budget_bytes = block_tokens, budget_bytes
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # oldest (least recently used) first
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.lookup_tokens = 0   # prompt tokens looked up
        self.hit_tokens = 0      # of those, served from the cache
        self.lookups = 0
        self.inserted_blocks = 0
        self.evictions = 0       # blocks evicted to stay under the budget

    # ---- public -----------------------------------------------------------------------------------
    def lookup(self, prompt_ids: list[int]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """(n, k_layers, v_layers): the longest cached prefix of whole blocks, n tokens, with per layer its keys and
        values (n_kv_head, n, head_dim); (0, [], []) on a miss. At least one prompt token is always left uncached:
        the logits of the last position have to be computed."""
        bt = self.block_tokens
        with self._lock:
            self.lookups += 1
            self.lookup_tokens += len(prompt_ids)
            chain = self._chain(prompt_ids, (len(prompt_ids) - 1) // bt)
            n = len(chain) * bt
            self.hit_tokens += n
            self._touch(chain)
            blocks = [self._blocks[key] for key in chain]
        if not blocks:
            return 0, [], []
        n_layer = len(blocks[0].k)
        ks = [torch.cat([b.k[layer] for b in blocks], dim=1) for layer in range(n_layer)]
        vs = [torch.cat([b.v[layer] for b in blocks], dim=1) for layer in range(n_layer)]
        return n, ks, vs

    def match_len(self, prompt_ids: list[int]) -> int:
        """How many tokens `lookup(prompt_ids)` would serve (whole blocks, at least one token left over), without
        copying anything or counting a lookup: callers group prompts by their cached prefix and look each up once."""
        with self._lock:
            return len(self._chain(prompt_ids, (len(prompt_ids) - 1) // self.block_tokens)) * self.block_tokens

    def insert(self, prompt_ids: list[int], cache_k_layers: list[torch.Tensor],
               cache_v_layers: list[torch.Tensor], start: int = 0, offset: int = 0) -> int:
        """Store the prompt's full blocks from its prefilled cache: per layer (n_kv_head, slots, head_dim), position
        q at slot q - start + offset for q >= start (default: slot = position). The first `start` positions (whole
        blocks: what `lookup` served) need not be in the tensors: those blocks are only touched. Blocks already
        cached are only touched. Returns the number of blocks newly stored."""
        bt, n_full = self.block_tokens, len(prompt_ids) // self.block_tokens
        if start % bt:
            raise LMStackError(f"insert: start={start} is not a whole number of {bt}-token blocks")
        if n_full * bt > start and cache_k_layers[0].shape[1] < n_full * bt - start + offset:
            raise LMStackError(f"insert: the cache holds {cache_k_layers[0].shape[1]} positions, fewer than the "
                               f"prompt's {n_full * bt} block tokens; insert after the whole prompt is prefilled")
        added = 0
        with self._lock:
            chain, parent = [], _ROOT
            for i in range(n_full):
                toks = tuple(prompt_ids[i * bt:(i + 1) * bt])
                key = hash((parent, toks))
                old = self._blocks.get(key)
                if old is not None and (old.parent != parent or old.tokens != toks):
                    break  # a hash collision with another prefix: keep the cached one, store no deeper block
                if old is None and i * bt < start:
                    break  # evicted since it was looked up, and its keys/values are not in the tensors
                if old is None:
                    sl = slice(i * bt - start + offset, (i + 1) * bt - start + offset)
                    k = [t[:, sl].clone() for t in cache_k_layers]
                    v = [t[:, sl].clone() for t in cache_v_layers]
                    nbytes = sum(t.numel() * t.element_size() for t in k + v)
                    if nbytes > self.budget_bytes:
                        break
                    self._blocks[key] = _Block(parent, toks, k, v, nbytes)
                    self.bytes_used += nbytes
                    added += 1
                chain.append(key)
                parent = key
            self.inserted_blocks += added
            self._touch(chain)
            self._evict()
        return added

    def prefill(self, model, prompt_ids: list[int], ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prefill one prompt (ids (1, L) on the model's device) into a fresh full `cache` (slot = position) and
        return its last position's logits (1, vocab): the longest cached prefix p is copied into slots [0, p) and
        only ids[:, p:] run, at pos=p; then the prompt's blocks are stored for later prompts."""
        p, ks, vs = self.lookup(prompt_ids)
        for layer in range(len(ks)):
            cache.k[layer][0, :, :p] = ks[layer]
            cache.v[layer][0, :, :p] = vs[layer]
        logits = prefill_logits(model, ids[:, p:], cache, pos=p)
        self.insert(prompt_ids, [k[0] for k in cache.k], [v[0] for v in cache.v])
        return logits

    def stats(self) -> dict:
        """A consistent snapshot of the counters (hit_rate = hit_tokens / lookup_tokens)."""
        with self._lock:
            return {"lookups": self.lookups, "lookup_tokens": self.lookup_tokens, "hit_tokens": self.hit_tokens,
                    "hit_rate": self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0,
                    "bytes": self.bytes_used, "budget_bytes": self.budget_bytes, "blocks": len(self._blocks),
                    "inserted_blocks": self.inserted_blocks, "evictions": self.evictions,
                    "block_tokens": self.block_tokens}

    def clear(self) -> None:
        """Drop every block (e.g. after the model's weights changed: cached keys/values would be stale)."""
        with self._lock:
            self._blocks.clear()
            self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._blocks)

    # ---- internals (called with the lock held) ------------------------------------------------------
    def _chain(self, prompt_ids: list[int], max_blocks: int) -> list[int]:
        """Keys of the cached blocks that prefix the prompt, first block first, at most max_blocks."""
        bt, parent, chain = self.block_tokens, _ROOT, []
        for i in range(max_blocks):
            toks = tuple(prompt_ids[i * bt:(i + 1) * bt])
            key = hash((parent, toks))
            b = self._blocks.get(key)
            if b is None or b.parent != parent or b.tokens != toks:
                break
            chain.append(key)
            parent = key
        return chain

    def _touch(self, chain: list[int]) -> None:
        """Mark a chain most recently used, deepest block first: every parent ends up newer than its children."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)

    def _evict(self) -> None:
        """Drop least recently used blocks until the budget holds. The oldest block never has a cached child (see
        `_touch`), so no cached block is ever cut off from the root; a just-inserted chain too long for the whole
        budget loses its deepest blocks."""
        while self.bytes_used > self.budget_bytes and self._blocks:
            _, b = self._blocks.popitem(last=False)
            self.bytes_used -= b.nbytes
            self.evictions += 1
