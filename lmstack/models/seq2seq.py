"""The encoder-decoder Transformer (sequence to sequence, "initially used for translation"): two stacks of the one
Transformer (models/transformer.py), nothing copied.

    encoder  Transformer(config.encoder_config()): bidirectional blocks (causal=False), n_encoder_layer of them,
             the source vocabulary; its output head is unused (replaced by an identity).
    decoder  Transformer(config.decoder_config()): causal self-attention -> cross-attention over the encoder
             output -> MLP in every block (cross_attention=True), n_layer of them, the target vocabulary, the output
             head tied to the target embedding when tie_embeddings.

`config.src_vocab_size` None (default): one vocabulary (a shared BPE) and ONE token embedding for the source, the
target and the output head (three-way tying, as in Vaswani et al. and BART). Set it for separate vocabularies (two
embeddings; the head is tied to the target one). Positions (learned / sinusoidal / rope), norm placement (pre, the
default, or post as in the original Transformer and BART), activation, biases and embedding norm/scale are the
usual ModelConfig fields, shared by both stacks.

    model(src, tgt_in, src_mask=None) -> logits (B, T, V)           teacher forcing (training, scoring)
    memory = model.encode(src, src_mask)                            (B, S, d)
    cache = model.new_decoder_cache(batch, max_len, src_mask)      kv_cache.EncoderDecoderCache
    model.decode(tgt, memory, src_mask, cache=cache, pos=p)        incremental decoding: the first call fills the
                                                                   cross-attention keys/values, later calls reuse
                                                                   them (memory may be None then)

Target padding needs no mask: targets are right-padded and the decoder is causal, so a real position never sees a
pad (the loss ignores the pad positions). src_mask (B, S) bool, True = real token, masks the padded source keys in
the encoder's self-attention and in every cross-attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import LMStackError
from .kv_cache import EncoderDecoderCache
from .transformer import Transformer


class Seq2SeqTransformer(nn.Module):
    is_encoder_decoder = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = Transformer(cfg.encoder_config())
        self.encoder.lm_head = nn.Identity()  # the encoder returns hidden states
        self.decoder = Transformer(cfg.decoder_config())
        tied = []
        if cfg.src_vocab_size is None:  # one shared vocabulary: one embedding matrix for source and target
            self.decoder.tok_emb = self.encoder.tok_emb
            tied.append("decoder.tok_emb.weight")
        if cfg.tie_embeddings:
            self.decoder.lm_head.weight = self.decoder.tok_emb.weight
            tied.append("decoder.lm_head.weight")
        self.tied_weight_keys = tuple(tied)  # aliases, stored once (safetensors refuses shared tensors)

    @property
    def decoder_start_id(self) -> int:
        cfg = self.config
        for i in (cfg.decoder_start_token_id, cfg.bos_token_id, cfg.eos_token_id):
            if i is not None:
                return int(i)
        return 0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- weights: the tied aliases are saved once -------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in self.tied_weight_keys:
            sd.pop(prefix + k, None)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if k not in self.tied_weight_keys]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"Seq2SeqTransformer.load_state_dict: missing {missing[:5]}, "
                               f"unexpected {res.unexpected_keys[:5]}")
        res.missing_keys[:] = missing
        return res

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on the linear layers' matrices; none on norms, biases and embeddings."""
        emb = {id(m.weight) for t in (self.encoder, self.decoder) for m in (t.tok_emb, t.pos_emb, t.type_emb)
               if m is not None}
        decay, no_decay, seen = [], [], set()
        for p in self.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---- forward -----------------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) ids -> encoder output (B, S, d)."""
        return self.encoder(src, padding_mask=src_mask, return_hidden=True)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor | None = None,
               cache: EncoderDecoderCache | None = None, pos: int = 0, return_hidden: bool = False) -> torch.Tensor:
        """tgt (B, T) decoder inputs at positions [pos, pos+T) -> logits (B, T, V)."""
        return self.decoder(tgt, cache=cache, pos=pos, memory=memory, memory_mask=src_mask,
                            return_hidden=return_hidden)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor | None = None, src_mask: torch.Tensor | None = None,
                return_hidden: bool = False, **kw) -> torch.Tensor:
        """Teacher forcing: src (B, S), decoder inputs tgt (B, T) (start token + target[:-1]) -> logits (B, T, V)."""
        if tgt is None or kw:  # called like a decoder-only LM (generate / score / eval)
            raise LMStackError("this is an encoder-decoder model: it maps a source to a target (model(src, tgt)); "
                               "generate with lmstack.generate.seq2seq.translate or `lmstack translate`")
        return self.decode(tgt, self.encode(src, src_mask), src_mask, return_hidden=return_hidden)

    def new_decoder_cache(self, batch: int, max_len: int | None = None,
                          src_mask: torch.Tensor | None = None) -> EncoderDecoderCache:
        """An empty decoder cache: self-attention keys/values for max_len target positions, cross slots unset."""
        cfg = self.decoder.config
        p = next(self.parameters())
        return EncoderDecoderCache(cfg.n_layer, batch, cfg.kv_heads, max_len or cfg.block_size, cfg.head_dim,
                                   p.dtype, p.device, memory_mask=src_mask)
