"""BART (BartForConditionalGeneration) -> the lmstack encoder-decoder: its config and its weight map (used by hf.py)."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import LMStackError


def bart_config(hf: dict, ids: dict, act_in: dict[str, str]) -> ModelConfig:
    """BART (BartForConditionalGeneration) as an lmstack encoder-decoder: post-norm blocks, an embedding LayerNorm
    in each stack, learned positions (BART's table has 2 extra leading rows, dropped: its position offset), one
    shared embedding tied to the output head, q/k/v/out biases."""
    act = hf.get("activation_function", "gelu")
    if act not in act_in:
        raise LMStackError(f"BART activation_function {act!r} is not supported; use one of {', '.join(act_in)}")
    if hf.get("encoder_attention_heads") != hf.get("decoder_attention_heads") or \
            hf.get("encoder_ffn_dim") != hf.get("decoder_ffn_dim"):
        raise LMStackError("BART with different encoder/decoder head counts or FFN sizes is not supported")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise LMStackError("pre-norm BART variants (mBART: normalize_before / add_final_layer_norm) are not supported")
    return ModelConfig(arch="encoder-decoder", vocab_size=hf["vocab_size"],
                       block_size=hf.get("max_position_embeddings", 1024), n_layer=hf["decoder_layers"],
                       n_encoder_layer=hf["encoder_layers"], n_head=hf["encoder_attention_heads"],
                       n_embd=hf["d_model"], intermediate_size=hf["encoder_ffn_dim"], pos_emb="learned",
                       norm="layernorm", norm_eps=1e-5, mlp="gelu", activation=act_in[act], bias=True,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)), norm_position="post",
                       embedding_norm=True, scale_embedding=bool(hf.get("scale_embedding", False)),
                       decoder_start_token_id=hf.get("decoder_start_token_id"), **ids)


def map_bart(w, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmstack encoder-decoder weights from BART's; `w` pops weights by name (hf.WeightSource)."""
    out: dict[str, torch.Tensor] = {}
    shared = w.opt("model.shared.weight")
    for side in ("encoder", "decoder"):
        emb = w.opt(f"model.{side}.embed_tokens.weight")
        if side == "encoder":
            out["encoder.tok_emb.weight"] = shared if shared is not None else emb
        out[f"{side}.pos_emb.weight"] = w(f"model.{side}.embed_positions.weight")[2:]  # BART's offset of 2
        out[f"{side}.emb_norm.weight"] = w(f"model.{side}.layernorm_embedding.weight")
        out[f"{side}.emb_norm.bias"] = w(f"model.{side}.layernorm_embedding.bias")
        n = cfg.n_layer if side == "decoder" else (cfg.n_encoder_layer or cfg.n_layer)
        for i in range(n):
            h, o = f"model.{side}.layers.{i}.", f"{side}.blocks.{i}."
            for t in ("weight", "bias"):
                out[o + f"attn.qkv.{t}"] = torch.cat([w(h + f"self_attn.{x}_proj.{t}") for x in "qkv"])
                out[o + f"attn.proj.{t}"] = w(h + f"self_attn.out_proj.{t}")
                out[o + f"norm1.{t}"] = w(h + f"self_attn_layer_norm.{t}")
                out[o + f"mlp.fc.{t}"] = w(h + f"fc1.{t}")
                out[o + f"mlp.proj.{t}"] = w(h + f"fc2.{t}")
                out[o + f"norm2.{t}"] = w(h + f"final_layer_norm.{t}")
                if side == "decoder":
                    out[o + f"cross.q.{t}"] = w(h + f"encoder_attn.q_proj.{t}")
                    out[o + f"cross.kv.{t}"] = torch.cat([w(h + f"encoder_attn.{x}_proj.{t}") for x in "kv"])
                    out[o + f"cross.proj.{t}"] = w(h + f"encoder_attn.out_proj.{t}")
                    out[o + f"cross_norm.{t}"] = w(h + f"encoder_attn_layer_norm.{t}")
    head = w.opt("lm_head.weight")
    if not cfg.tie_embeddings:
        out["decoder.lm_head.weight"] = head
    bias = w.opt("final_logits_bias")
    if bias is not None and bool(bias.abs().max() > 0):
        raise LMStackError("this BART has a non-zero final_logits_bias, which lmstack's output head does not hold")
    return out
