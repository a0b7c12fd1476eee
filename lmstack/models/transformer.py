"""ONE configurable Transformer.

GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied head.
Llama family: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases (qkv bias for Qwen2), tied or untied head.
BERT family: bidirectional (`causal=False`), post-norm blocks, token-type embeddings, LayerNorm after the embeddings,
and the masked-LM head (`mlm_head`: BertForMaskedLM's prediction-head transform before the output projection).
Causal (decoder) or bidirectional (encoder) by `config.causal`. Everything is chosen by ModelConfig fields.
Sliding-window attention (Mistral, Qwen2, Gemma-style alternation): `config.sliding_window` / `layer_types` give each
layer its window; `layer_masks` bands that layer's mask once a sequence is longer than the window (training, full
forward and cached decoding alike). For decoding, kv_cache.RollingKVCache keeps only a sliding layer's window
(make_cache's default for such models) and returns just those keys; the layer then uses the mask's last columns.
Encoder-decoder (models/seq2seq.py): two of these Transformers, the decoder's blocks with a cross-attention sublayer
(`config.cross_attention`) over the encoder's output (`memory`); sinusoidal positions (`pos_emb: sinusoidal`) and
sqrt(d)-scaled token embeddings (`scale_embedding`) as in the original Transformer.
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from . import kernels
from .attention import SDPA_GQA, attend
from .fused_decode import fused_blocks
from .kv_cache import KVCache
from .rope import (ROPE_SCALING_TYPES, apply_rope, rope_frequencies, rope_original_length,  # noqa: F401
                   rope_scaling_type)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, with one native call instead of ~8 ops when decoding on a CPU whose quantized-matmul extension
    is loaded (lmstack/models/kernels.py; inference only, float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = kernels.loaded()
        if ext is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.dtype == torch.float32 and x.is_contiguous() \
                and x.device.type == "cpu" and self.weight is not None and self.weight.dtype == torch.float32:
            return ext.rmsnorm(x, self.weight, torch.finfo(x.dtype).eps if self.eps is None else self.eps)
        return super().forward(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.use_qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual_scale = True
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache: KVCache | None, pos: int, attn_mask: torch.Tensor | None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, pos)
            if attn_mask is not None and attn_mask.shape[-1] > k.shape[2]:  # a rolling cache's sliding layer: only
                attn_mask = attn_mask[..., attn_mask.shape[-1] - k.shape[2]:]  # the last keys (kv_cache.py)
        gqa = {}
        if self.n_kv != self.n_head:
            if SDPA_GQA:  # SDPA broadcasts the kv heads itself: no per-step copy of the whole cache
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_head // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        is_causal = False  # set by a branch, not an expression: under torch.compile the shapes are symbolic
        if self.cfg.causal and attn_mask is None and T > 1 and k.shape[2] == T:
            is_causal = True
        y = attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                   dropout_p=self.dropout if self.training else 0.0, **gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder stream, keys/values from the encoder output `memory`
    (B, S, d); memory_mask (B, S) bool, True = real source token. With a cache that has cross-attention slots
    (kv_cache.EncoderDecoderCache), the keys/values are computed from `memory` once, on the first call, and every
    later decoding step reads them from the cache (memory may then be None)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.hd = layer_idx, cfg.n_head, cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.use_qkv_bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd, bias=cfg.use_qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual_scale = True
        self.dropout = cfg.dropout

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, D) of the encoder output."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_head, self.hd).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, memory, memory_mask, cache):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        slots = getattr(cache, "cross_k", None)
        if slots is not None and slots[self.layer_idx] is not None:
            k, v = slots[self.layer_idx], cache.cross_v[self.layer_idx]
        else:
            if memory is None:
                raise ValueError("cross-attention needs the encoder output (memory) or a cache holding its keys/values")
            k, v = self.memory_kv(memory)
            if slots is not None:
                cache.cross_k[self.layer_idx], cache.cross_v[self.layer_idx] = k, v
        if memory_mask is None and cache is not None:
            memory_mask = getattr(cache, "memory_mask", None)
        mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        y = attend(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The original Transformer's position table (length, dim): sin on even, cos on odd dimensions."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table.float()


def gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU (a named function, so a model pickles: torch.multiprocessing, torch.save)."""
    return F.gelu(t, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu, "relu": F.relu}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        f = cfg.ffn_size
        self.fc = nn.Linear(cfg.n_embd, 2 * f if self.gated else f, bias=cfg.bias)  # swiglu: [gate; up] fused
        self.proj = nn.Linear(f, cfg.n_embd, bias=cfg.bias)
        self.proj.residual_scale = True
        self.act = ACTIVATIONS["silu" if self.gated else cfg.activation]

    def forward(self, x):
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer_idx)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        if cfg.cross_attention:  # decoder of an encoder-decoder: self-attention -> cross-attention -> MLP
            self.cross_norm, self.cross = make_norm(cfg), CrossAttention(cfg, layer_idx)
        self.has_cross = cfg.cross_attention
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"

    def forward(self, x, rope, cache, pos, attn_mask, memory=None, memory_mask=None):
        if self.post_norm:  # BERT, BART: norm(x + f(x))
            x = self.norm1(x + self.drop(self.attn(x, rope, cache, pos, attn_mask)))
            if self.has_cross:
                x = self.cross_norm(x + self.drop(self.cross(x, memory, memory_mask, cache)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, pos, attn_mask))
        if self.has_cross:
            x = x + self.drop(self.cross(self.cross_norm(x), memory, memory_mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class MLMHead(nn.Module):
    """BERT's masked-LM head (`config.mlm_head`): dense -> activation -> norm, then the output projection with a
    bias. It stands in for `lm_head` (same `weight`, tied to the token embedding like BertForMaskedLM's decoder), so
    `model(x)` and `model.lm_head(hidden)` give MLM logits and every `lm_head` caller works unchanged."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation]
        self.norm = make_norm(cfg)
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(h))), self.weight, self.bias)


def _on_meta() -> bool:
    """Inside `with torch.device("meta")`: a loader that fills every tensor from a file builds the model there. Random
    init and computed tables are skipped then: on meta tensors torch runs such ops through torch._refs, which
    imports torch._dynamo (~1.5 s per process)."""
    return torch.empty(0).is_meta


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, without its random init on the meta device (see _on_meta)."""
    if _on_meta():
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = _embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = _embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.type_emb = _embedding(cfg.type_vocab_size, cfg.n_embd) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()  # post-norm blocks end normed
        self.lm_head = MLMHead(cfg) if cfg.mlm_head else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(cfg.block_size, cfg.n_embd), persistent=False)
        self.emb_scale = math.sqrt(cfg.n_embd) if cfg.scale_embedding else 1.0
        if cfg.pos_emb == "rope":
            if _on_meta():  # the loader computes the real tables after giving the model storage
                cos = sin = torch.empty(cfg.block_size, cfg.head_dim)
            else:
                cos, sin = rope_frequencies(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # training switch (TrainConfig.activation_checkpointing), not config
        self.apply(self._init_weights)
        for block in self.blocks:  # hidden weight matrices: the ones Muon may orthogonalise
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    m.weight.muon_ok = True

    def _init_weights(self, m: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer); zero biases."""
        std = self.config.init_std
        if any(p.is_meta for p in m.parameters(recurse=False)):
            return  # built on the meta device to be filled from a file: nothing to initialise
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * self.config.n_layer) if getattr(m, "residual_scale", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, MLMHead) and not self.config.tie_embeddings:
            nn.init.normal_(m.weight, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                attn_mask: torch.Tensor | None = None, return_hidden: bool = False,
                padding_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids at absolute positions [pos, pos+T) -> logits (B, T, vocab).

        With a cache, keys/values are written into it and attention covers positions [0, pos+T).
        padding_mask (B, pos+T) bool, True = real token: keys where it is False are not attended to (batches of
        right-padded sequences; combined with the causal mask for decoders). token_type_ids (B, T): segment ids
        for models with token-type embeddings (default 0). positions (B, T): each row's own position ids for the
        position embeddings (learned or RoPE), for left-padded batches where a row's first real token sits at a
        later slot; default pos..pos+T-1 for every row. Cache slots and masks still use `pos`.
        memory (B, S, d) / memory_mask (B, S): the encoder output and its key-padding mask for the cross-attention
        of a decoder stack (`config.cross_attention`; see models/seq2seq.py).
        """
        B, T = idx.shape
        end = pos + T
        if end > self.config.block_size and self.config.pos_emb in ("learned", "sinusoidal"):
            raise ValueError(f"sequence of length {end} exceeds the context window block_size={self.config.block_size}")
        x = self.tok_emb(idx)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions if positions is not None else torch.arange(pos, end, device=idx.device))
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.pos_table[positions if positions is not None else slice(pos, end)].to(x.dtype)
        if self.type_emb is not None:
            x = x + (self.type_emb(token_type_ids) if token_type_ids is not None else self.type_emb.weight[0])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        rope = None
        if self.config.pos_emb == "rope":
            cos_t, sin_t = self.rope_cos, self.rope_sin
            if rope_scaling_type(self.config) == "dynamic" and end > rope_original_length(self.config):
                # dynamic NTK: the base depends on the length reached so far (transformers' dynamic update)
                seen = end if positions is None else int(positions.max()) + 1
                cos_t, sin_t = (t.to(idx.device) for t in rope_frequencies(self.config, end, seq_len=seen))
            elif end > self.rope_cos.shape[0]:
                cos, sin = rope_frequencies(self.config, end)
                self.rope_cos, self.rope_sin = cos_t, sin_t = cos.to(idx.device), sin.to(idx.device)
            if positions is not None:  # (B, T) -> (B, 1, T, D), broadcast over heads
                rope = (cos_t[positions][:, None].to(x.dtype), sin_t[positions][:, None].to(x.dtype))
            else:
                rope = (cos_t[pos:end].to(x.dtype), sin_t[pos:end].to(x.dtype))
        if T < kernels.MAX_GEMM_MIN_ROWS and cache is not None and attn_mask is None:  # a packed Llama-style model
            fused = fused_blocks(self, x, rope, cache, pos, padding_mask)  # decoding: one native call per layer
            if fused is not None:
                x = self.norm_f(fused)
                return x if return_hidden else self.lm_head(x)
        if attn_mask is None and cache is not None and self.config.causal and T > 1 and pos > 0:
            # chunk after a cached prefix: query i (absolute pos+i) sees keys 0..pos+i
            attn_mask = torch.ones(T, end, dtype=torch.bool, device=idx.device).tril(diagonal=pos)
        if padding_mask is not None:
            attn_mask = _with_padding(attn_mask, padding_mask.bool(), T, end, pos, self.config.causal)
        masks = layer_masks(self.config, attn_mask, T, end, pos, idx.device)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block, mask in zip(self.blocks, masks):
            if recompute:  # keep only each block's input; rebuild the rest in backward (same dropout masks)
                x = torch.utils.checkpoint.checkpoint(block, x, rope, cache, pos, mask, memory, memory_mask,
                                                      use_reentrant=False)
            else:
                x = block(x, rope, cache, pos, mask, memory, memory_mask)
        x = self.norm_f(x)
        return x if return_hidden else self.lm_head(x)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices of linear layers only; no decay on norms, biases, embeddings."""
        decay, no_decay, seen = [], [], set()
        emb_ids = {id(m.weight) for m in (self.tok_emb, self.pos_emb, self.type_emb) if m is not None}
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in emb_ids else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_masks(cfg: ModelConfig, attn_mask: torch.Tensor | None, T: int, end: int, pos: int,
                device: torch.device) -> list[torch.Tensor | None]:
    """The attention mask of each layer: `attn_mask` (None = plain causal) for full-attention layers; for sliding
    layers (cfg.layer_window) the same AND the band "key j within the last `window` positions of query i"
    (pos + i - window < j <= pos + i, slot positions: left padding keeps distances), once the sequence reaches
    past the window (before that the band changes nothing)."""
    out: list[torch.Tensor | None] = []
    made: dict[int, torch.Tensor] = {}
    for i in range(cfg.n_layer):
        w = cfg.layer_window(i)
        if w is None or end <= w:
            out.append(attn_mask)
            continue
        if w not in made:
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                raise ValueError("sliding-window layers combine only with a boolean attn_mask")
            q = torch.arange(pos, end, device=device)[:, None]
            k = torch.arange(end, device=device)[None, :]
            m = (k <= q) & (k > q - w)
            if attn_mask is not None:
                m = attn_mask & m
            made[w] = m | ~m.any(dim=-1, keepdim=True) if m.dim() == 4 else m  # a padded query keeps some key
        out.append(made[w])
    return out


def _with_padding(attn_mask: torch.Tensor | None, padding_mask: torch.Tensor, T: int, end: int, pos: int,
                  causal: bool) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, end): the given/causal mask AND the key-padding mask, broadcast per batch row.
    A query row left with no visible key (a padded position) attends everywhere instead of producing NaN."""
    if padding_mask.shape[-1] != end:
        raise ValueError(f"padding_mask covers {padding_mask.shape[-1]} positions, expected {end} (cache + input)")
    mask = padding_mask[:, None, None, :]
    if attn_mask is None and causal:
        attn_mask = torch.ones(T, end, dtype=torch.bool, device=padding_mask.device).tril(diagonal=pos)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError("padding_mask combines only with a boolean attn_mask")
        mask = mask & attn_mask
    mask = mask.expand(padding_mask.shape[0], 1, T, end)
    return mask | ~mask.any(dim=-1, keepdim=True)
