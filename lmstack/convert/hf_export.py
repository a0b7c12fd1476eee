"""lmstack -> Hugging Face model directories: `export_hf(model, tokenizer, dir)` writes config.json,
generation_config.json, model.safetensors and the tokenizer files that `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load (LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel / BertModel / BertForMaskedLM),
atomically. The weight
layout conversions mirror hf.py's import mappings."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir
from ..config import ModelConfig
from ..errors import LMStackError
from ..models.transformer import Transformer, rope_original_length, rope_scaling_type
from ..tokenizer import Tokenizer
from .hf import ACT_OUT
from .hf_positions import ROPE_KEYS

# transformers always loads a qwen2 directory's tokenizer as Qwen2Tokenizer, which replaces tokenizer.json's
# pre-tokenizer with this regex (+ NFC); other tokenizers are exported under the Llama architecture instead
_QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _is_qwen2_tokenizer(tok: Tokenizer | None) -> bool:
    if tok is None:
        return True
    d = json.loads(tok.hf.to_str())
    pre, norm = d.get("pre_tokenizer") or {}, d.get("normalizer") or {}
    pats = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    return pats == [_QWEN2_REGEX] and norm.get("type") == "NFC"


def _export_kind(cfg: ModelConfig, tok: Tokenizer | None = None) -> str:
    common = cfg.causal and cfg.norm_position == "pre" and not cfg.type_vocab_size and not cfg.embedding_norm
    if common and cfg.pos_emb == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.bias:
        kind = rope_scaling_type(cfg)
        if kind is not None and kind not in ROPE_KEYS:
            raise LMStackError(f"RoPE scaling {cfg.rope_scaling} cannot be exported")
        if cfg.sliding_window is not None and not cfg.use_qkv_bias:
            if cfg.layer_types is not None and "full" in cfg.layer_types:
                raise LMStackError("a Llama-family model with both full and sliding layers has no Hugging Face class "
                                   "lmstack writes (Mistral slides on every layer; Qwen2 needs q/k/v biases)")
            return "mistral"
        if not cfg.use_qkv_bias:
            return "llama"
        # q/k/v bias: Qwen2 when its tokenizer survives transformers' Qwen2Tokenizer, else Llama with
        # attention_bias=true and a zero o_proj bias (exactly the same function)
        if cfg.sliding_window is not None:  # Qwen2's layer_types carry the window
            if not _is_qwen2_tokenizer(tok):
                raise LMStackError("a sliding-window model with q/k/v biases exports as Qwen2, but transformers "
                                   "would replace this tokenizer's pre-tokenizer with Qwen2's")
            return "qwen2"
        return "qwen2" if _is_qwen2_tokenizer(tok) else "llama_qkv_bias"
    if (common and cfg.pos_emb == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias
            and cfg.use_qkv_bias and cfg.kv_heads == cfg.n_head and cfg.activation in ACT_OUT):
        return "gpt2"
    if (not cfg.causal and cfg.norm_position == "post" and cfg.embedding_norm and cfg.pos_emb == "learned"
            and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias and cfg.use_qkv_bias
            and cfg.kv_heads == cfg.n_head and cfg.activation in ACT_OUT):
        return "bert_mlm" if cfg.mlm_head else "bert"
    raise LMStackError(
        "this model has no Hugging Face equivalent lmstack can write: export supports the Llama family "
        "(pos_emb=rope, norm=rmsnorm, mlp=swiglu, bias=false; qkv_bias=true -> Qwen2) and the GPT-2 family "
        "(pos_emb=learned, norm=layernorm, mlp=gelu, bias=true, no grouped-query attention), causal and pre-norm, "
        "and BERT (the same but causal=false, norm_position=post, embedding_norm=true; mlm_head -> BertForMaskedLM); "
        f"got pos_emb={cfg.pos_emb}, norm={cfg.norm}, mlp={cfg.mlp}, bias={cfg.bias}, causal={cfg.causal}, "
        f"norm_position={cfg.norm_position}")


def _special_ids(cfg: ModelConfig, tok: Tokenizer | None) -> dict[str, int | None]:
    pick = lambda a, b: a if a is not None else b  # noqa: E731
    return {"bos_token_id": pick(cfg.bos_token_id, tok.bos_id if tok else None),
            "eos_token_id": pick(cfg.eos_token_id, tok.eos_id if tok else None),
            "pad_token_id": pick(cfg.pad_token_id, tok.pad_id if tok else None)}


def _export_state(model: Transformer, kind: str) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if kind == "gpt2":
        t = "transformer."
        out[t + "wte.weight"], out[t + "wpe.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        out[t + "ln_f.weight"], out[t + "ln_f.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
        for i in range(cfg.n_layer):
            h, b = f"{t}h.{i}.", f"blocks.{i}."
            for dst, src in (("ln_1", "norm1"), ("ln_2", "norm2")):
                out[h + dst + ".weight"], out[h + dst + ".bias"] = sd[b + src + ".weight"], sd[b + src + ".bias"]
            for dst, src in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                             ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                out[h + dst + ".weight"] = sd[b + src + ".weight"].t()
                out[h + dst + ".bias"] = sd[b + src + ".bias"]
    elif kind in ("bert", "bert_mlm"):
        out = _export_bert(sd, cfg, "bert." if kind == "bert_mlm" else "")
    else:
        out["model.embed_tokens.weight"], out["model.norm.weight"] = sd["tok_emb.weight"], sd["norm_f.weight"]
        q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            a, m = h + "self_attn.", h + "mlp."
            out[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
            for p in ("weight", "bias") if cfg.use_qkv_bias else ("weight",):
                qw, kw, vw = sd[f"{b}attn.qkv.{p}"].split([q, kv, kv])
                out[f"{a}q_proj.{p}"], out[f"{a}k_proj.{p}"], out[f"{a}v_proj.{p}"] = qw, kw, vw
            out[a + "o_proj.weight"] = sd[b + "attn.proj.weight"]
            if kind == "llama_qkv_bias":
                out[a + "o_proj.bias"] = torch.zeros_like(sd[b + "attn.proj.weight"][:, 0])
            gate, up = sd[b + "mlp.fc.weight"].chunk(2)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
            out[m + "down_proj.weight"] = sd[b + "mlp.proj.weight"]
    if not cfg.tie_embeddings and kind not in ("bert", "bert_mlm"):
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _export_bert(sd: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str) -> dict[str, torch.Tensor]:
    """BertModel weights (under `prefix`: "bert." for BertForMaskedLM) + cls.predictions.* of the MLM head.
    A model without token-type embeddings gets one zero type embedding (adding it changes nothing)."""
    e = prefix + "embeddings."
    types = sd.get("type_emb.weight")
    out = {e + "word_embeddings.weight": sd["tok_emb.weight"], e + "position_embeddings.weight": sd["pos_emb.weight"],
           e + "token_type_embeddings.weight": types if types is not None else torch.zeros(1, cfg.n_embd,
                                                                                           dtype=sd["tok_emb.weight"].dtype),
           e + "LayerNorm.weight": sd["emb_norm.weight"], e + "LayerNorm.bias": sd["emb_norm.bias"]}
    q = cfg.n_embd
    for i in range(cfg.n_layer):
        h, b = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        s = h + "attention.self."
        for p in ("weight", "bias"):
            out[f"{s}query.{p}"], out[f"{s}key.{p}"], out[f"{s}value.{p}"] = sd[f"{b}attn.qkv.{p}"].split([q, q, q])
            out[f"{h}attention.output.dense.{p}"] = sd[f"{b}attn.proj.{p}"]
            out[f"{h}attention.output.LayerNorm.{p}"] = sd[f"{b}norm1.{p}"]
            out[f"{h}intermediate.dense.{p}"] = sd[f"{b}mlp.fc.{p}"]
            out[f"{h}output.dense.{p}"] = sd[f"{b}mlp.proj.{p}"]
            out[f"{h}output.LayerNorm.{p}"] = sd[f"{b}norm2.{p}"]
    if cfg.mlm_head:
        c = "cls.predictions."
        for p in ("weight", "bias"):
            out[f"{c}transform.dense.{p}"] = sd[f"lm_head.dense.{p}"]
            out[f"{c}transform.LayerNorm.{p}"] = sd[f"lm_head.norm.{p}"]
        out[c + "bias"] = sd["lm_head.bias"]
        if not cfg.tie_embeddings:  # untied, transformers keeps the decoder's own weight and bias (the one it adds)
            out[c + "decoder.weight"], out[c + "decoder.bias"] = sd["lm_head.weight"], sd["lm_head.bias"]
    return out


def _export_config(cfg: ModelConfig, kind: str, ids: dict, dtype: torch.dtype) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    if kind == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.intermediate_size,
                "activation_function": ACT_OUT[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
                "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype_name, "use_cache": True, **ids}
    if kind in ("bert", "bert_mlm"):
        return {"architectures": ["BertForMaskedLM" if kind == "bert_mlm" else "BertModel"], "model_type": "bert",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ffn_size,
                "hidden_act": ACT_OUT[cfg.activation], "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.block_size,
                "type_vocab_size": max(1, cfg.type_vocab_size), "layer_norm_eps": cfg.norm_eps,
                "initializer_range": cfg.init_std, "position_embedding_type": "absolute", "is_decoder": False,
                "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype_name, **ids}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling, max_pos = None, cfg.block_size
    kind_ = rope_scaling_type(cfg)
    if kind_ is not None:
        params = {k: cfg.rope_scaling[k] for k in ROPE_KEYS[kind_] if cfg.rope_scaling.get(k) is not None}
        if kind_ == "dynamic":  # transformers' dynamic NTK scales past max_position_embeddings
            max_pos = rope_original_length(cfg)
            params.pop("original_max_position_embeddings", None)
        elif kind_ in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = rope_original_length(cfg)
        rope = {"rope_type": kind_, **params, "rope_theta": cfg.rope_theta}
        legacy_scaling = {"rope_type": kind_, "type": kind_, **params}
    arch = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "mistral": ("MistralForCausalLM", "mistral")}.get(
        kind, ("LlamaForCausalLM", "llama"))
    out = {"architectures": [arch[0]], "model_type": arch[1],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_size,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_dim, "max_position_embeddings": max_pos, "hidden_act": "silu",
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
           "rope_scaling": legacy_scaling,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
           "dtype": dtype_name, "use_cache": True, **ids}
    if kind == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    elif kind != "qwen2":
        out.update(attention_bias=kind == "llama_qkv_bias", mlp_bias=False)
    elif cfg.sliding_window is not None:
        types = cfg.layer_types or ["sliding"] * cfg.n_layer
        out.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0,
                   layer_types=[f"{t}_attention" for t in types])
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return out


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write `model` (+ tokenizer) as a Hugging Face directory loadable by AutoModelForCausalLM / AutoTokenizer.
    Atomic: the files are written to a temp directory and swapped in (other files already in `out_dir` stay)."""
    cfg = model.config
    kind = _export_kind(cfg, tokenizer)
    out = Path(out_dir)
    with atomic_dir(out, keep_others=True) as tmp:  # a crash never leaves a half-exported directory
        _write_hf_files(tmp, model, tokenizer, cfg, kind)
    return out


def _write_hf_files(out: Path, model: Transformer, tokenizer: Tokenizer | None, cfg: ModelConfig, kind: str) -> None:
    from safetensors.torch import save_file
    ids = _special_ids(cfg, tokenizer)
    dtype = next(model.parameters()).dtype
    (out / "config.json").write_text(json.dumps(_export_config(cfg, kind, ids, dtype), indent=2) + "\n")
    gen = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(_export_state(model, kind), str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.hf.save(str(out / "tokenizer.json"))
        meta: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                                "clean_up_tokenization_spaces": False}
        for key in ("bos_token", "eos_token", "pad_token", "mask_token"):
            if getattr(tokenizer, key):
                meta[key] = getattr(tokenizer, key)
        if tokenizer.chat_template:
            meta["chat_template"] = tokenizer.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        smap = {k: v for k, v in meta.items() if k in ("bos_token", "eos_token", "pad_token", "mask_token")}
        (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
