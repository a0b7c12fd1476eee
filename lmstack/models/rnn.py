"""Recurrent language models: a stacked LSTM or GRU (`ModelConfig.arch = "lstm" | "gru"`).

    tokens -> embedding -> dropout -> n_layer LSTM/GRU layers (dropout between layers) -> [projection] -> dropout
           -> output head (tied to the embedding by default)

The hidden size is `rnn_hidden` (default n_embd); when it differs from n_embd a bias-free projection brings the last
layer's output back to n_embd, so the head can still share the embedding matrix. The layers are torch's own
nn.LSTM / nn.GRU (fused kernels, cuDNN on a GPU), so the maths is exactly theirs.

Decoding carries the state instead of a KV cache: `new_cache(batch)` gives a StateCache holding h (and c for the
LSTM) per layer, and `model(idx, cache=c, pos=p)` continues from it, so one step costs the same at any length. The
call shape is the Transformer's, which is all the engine (generate / stream / beam search / continuous batching)
relies on. There are no position embeddings: a token's position is implicit in the state.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import LMStackError
from .kv_cache import StateCache


def check_unpadded_left(padding_mask: torch.Tensor | None, arch: str) -> None:
    """A causal model without attention can take right-padded batches (a row never sees what follows it) but not
    left-padded ones (a pad before a token would enter its state / receptive field)."""
    if padding_mask is None:
        return
    m = padding_mask.bool()
    if m.shape[-1] > 1 and bool((~m[:, :-1] & m[:, 1:]).any()):
        raise LMStackError(f"{arch} models take right-padded batches only (a pad before a real token would enter "
                           "its state); right-pad the rows or run them one at a time")


def check_call(arch: str, attn_mask, token_type_ids) -> None:
    if attn_mask is not None:
        raise LMStackError(f"{arch} models have no attention, so they take no attn_mask (they are causal by "
                           "construction)")
    if token_type_ids is not None:
        raise LMStackError(f"{arch} models have no token-type embeddings; drop token_type_ids")


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the Transformer's: decay weight matrices (>= 2-D) only, never the token embedding (nor the
    output head tied to it), norms or biases."""
    emb = id(model.tok_emb.weight)
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) != emb else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class RNNLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch not in ("lstm", "gru"):
            raise LMStackError(f"RNNLM builds arch lstm or gru, got {config.arch!r}")
        self.config = cfg = config
        d, H = cfg.n_embd, cfg.hidden_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.LSTM if cfg.arch == "lstm" else nn.GRU
        self.rnn = layer(d, H, num_layers=cfg.n_layer, bias=cfg.bias, batch_first=True,
                         dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.proj = nn.Linear(H, d, bias=False) if H != d else None
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        # unit-scale inputs: N(0, 1/sqrt(d)) embeddings (||x|| ~ 1) and a 1/sqrt(H) projection. An RNN has no norm
        # to rescale a small input: at the Transformer's 0.02 the gates barely see the tokens and a GRU stays at the
        # unigram loss for hundreds of steps (measured on Tiny Shakespeare: 3.42 vs 1.85 after 300 steps)
        nn.init.normal_(self.tok_emb.weight, 0.0, d ** -0.5)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, 0.0, d ** -0.5)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, 0.0, H ** -0.5)
        # the recurrent weights keep torch's init (uniform +-1/sqrt(H)); an LSTM's forget gates start open (bias 1)
        if cfg.arch == "lstm" and cfg.bias:
            with torch.no_grad():
                for i in range(cfg.n_layer):
                    getattr(self.rnn, f"bias_ih_l{i}")[H:2 * H].fill_(1.0)
                    getattr(self.rnn, f"bias_hh_l{i}")[H:2 * H].zero_()

    @property
    def is_lstm(self) -> bool:
        return self.config.arch == "lstm"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> StateCache:
        """Zero state for `batch` rows: h (and c) per layer, (batch, n_layer, hidden) each."""
        p = next(self.parameters())
        shape = (batch, self.config.n_layer, self.config.hidden_size)
        n = 2 if self.is_lstm else 1
        tensors = [torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device) for _ in range(n)]
        return StateCache(tensors, max_len or self.config.block_size, kind="recurrent state")

    def forward(self, idx: torch.Tensor, cache: StateCache | None = None, pos: int = 0,
                attn_mask: torch.Tensor | None = None, return_hidden: bool = False,
                padding_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab) (return_hidden: the n_embd-wide features before the head).

        With a cache, every row continues from its state (pos: the tokens already fed, checked) and the cache
        holds the state after these T tokens. padding_mask: right padding only (checked); positions: ignored, a
        recurrent model has no position embeddings."""
        check_call(self.config.arch, attn_mask, token_type_ids)
        check_unpadded_left(padding_mask, self.config.arch)
        if cache is not None and not isinstance(cache, StateCache):
            raise LMStackError(f"{self.config.arch} models decode with their own state cache (model.new_cache), "
                               f"not a {type(cache).__name__}")
        x = self.drop(self.tok_emb(idx))
        state = None
        if cache is not None:
            cache.advance(pos, idx.shape[1], self.config.arch)
            state = tuple(t.transpose(0, 1).contiguous() for t in cache.tensors)  # (n_layer, B, H)
            if not self.is_lstm:
                state = state[0]
        y, new = self.rnn(x, state)
        if cache is not None:
            for t, s in zip(cache.tensors, new if self.is_lstm else (new,)):
                t.copy_(s.transpose(0, 1))
        if self.proj is not None:
            y = self.proj(y)
        y = self.drop(y)
        return y if return_hidden else self.lm_head(y)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self, weight_decay)
