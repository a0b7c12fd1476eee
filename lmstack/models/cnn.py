"""The gated convolutional language model (`ModelConfig.arch = "gcnn"`), after Dauphin et al. 2017, "Language
Modeling with Gated Convolutional Networks".

    tokens -> embedding -> dropout -> n_layer gated blocks -> norm -> output head (tied to the embedding by default)

    block:  x + dropout(GLU(causal_conv(norm(x))))      GLU(a; b) = a * sigmoid(b)

Each convolution maps n_embd -> 2 * n_embd channels (the GLU halves them back) with kernel k = conv_kernel and the
layer's dilation (conv_dilations cycled over the layers; default 1, 2, 4, 8, 1, 2, ...). It is causal: the input is
padded with k - 1 dilated steps of zeros on the left only, so position t sees positions t - (k-1)*d .. t of its
input. Receptive field of the whole stack (what the last logits depend on): 1 + sum_l (k - 1) * d_l tokens,
`ModelConfig.receptive_field` (kernel 3, dilations 1,2,4,8: 31 tokens per 4 layers, 61 for 8).

Decoding keeps a rolling receptive-field buffer per layer: the last (k-1)*d_l normed inputs of layer l (zeros at
the start, the same zeros as the causal padding), so one step costs one column of each convolution whatever the
length. `new_cache(batch)` gives that StateCache; the call shape is the Transformer's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import LMStackError
from .kv_cache import StateCache
from .rnn import check_call, check_unpadded_left, optimizer_groups
from .transformer import make_norm


class GatedConvBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dilation: int):
        super().__init__()
        self.norm = make_norm(cfg)
        self.conv = nn.Conv1d(cfg.n_embd, 2 * cfg.n_embd, cfg.conv_kernel, dilation=dilation, bias=cfg.bias)
        self.span = (cfg.conv_kernel - 1) * dilation  # past inputs each output needs
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). buf (B, span, C): this layer's last `span` normed inputs, read and replaced
        in place (None: start of the sequence, zeros)."""
        h = self.norm(x)
        ctx = F.pad(h, (0, 0, self.span, 0)) if buf is None else torch.cat([buf.to(h.dtype), h], dim=1)
        if buf is not None and self.span:
            buf.copy_(ctx[:, -self.span:])
        y = self.conv(ctx.transpose(1, 2)).transpose(1, 2)  # valid convolution over span + T inputs: T outputs
        return x + self.drop(F.glu(y, dim=-1))


class GatedCNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "gcnn":
            raise LMStackError(f"GatedCNN builds arch gcnn, got {config.arch!r}")
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GatedConvBlock(cfg, d) for d in cfg.dilations())
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, 0.0, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    @property
    def receptive_field(self) -> int:
        return 1 + sum(b.span for b in self.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> StateCache:
        """Zero receptive-field buffers for `batch` rows, (batch, (k-1)*d_l, n_embd) for layer l."""
        p = next(self.parameters())
        tensors = [torch.zeros(batch, b.span, self.config.n_embd, dtype=dtype or p.dtype, device=device or p.device)
                   for b in self.blocks]
        return StateCache(tensors, max_len or self.config.block_size, kind="rolling convolution buffer")

    def forward(self, idx: torch.Tensor, cache: StateCache | None = None, pos: int = 0,
                attn_mask: torch.Tensor | None = None, return_hidden: bool = False,
                padding_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab) (return_hidden: the normed features before the head).

        With a cache, every row continues from its buffers (pos: the tokens already fed, checked). padding_mask:
        right padding only (checked); positions: ignored (no position embeddings: convolutions are
        translation-equivariant)."""
        check_call("gcnn", attn_mask, token_type_ids)
        check_unpadded_left(padding_mask, "gcnn")
        if cache is not None and not isinstance(cache, StateCache):
            raise LMStackError(f"gcnn models decode with their own buffer cache (model.new_cache), not a "
                               f"{type(cache).__name__}")
        if cache is not None:
            cache.advance(pos, idx.shape[1], "gcnn")
        x = self.drop(self.tok_emb(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.tensors[i])
        x = self.norm_f(x)
        return x if return_hidden else self.lm_head(x)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self, weight_decay)
