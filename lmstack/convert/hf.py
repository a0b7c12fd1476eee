"""Hugging Face model directories <-> lmstack.

In:  `load_hf(dir)` reads config.json + weights (*.safetensors, sharded or not, or pytorch_model.bin) of a GPT-2,
     Llama (SmolLM, TinyLlama, ...), Mistral, Qwen2 or BERT model into the one lmstack Transformer, and the
     directory's tokenizer.json into a lmstack Tokenizer.
Out: `export_hf(model, tokenizer, dir)` (hf_export.py, re-exported here) writes a directory that
     `transformers.AutoModelForCausalLM` (LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel) or, for BERT
     encoders, `AutoModelForMaskedLM` / `AutoModel` (BertForMaskedLM / BertModel) and `AutoTokenizer` load.
A BERT checkpoint with an MLM head (`cls.predictions.*`: BertForMaskedLM, BertForPreTraining) loads with it
(ModelConfig.mlm_head); the pooler and next-sentence head are dropped.

Weight layouts. lmstack fuses attention q/k/v into `attn.qkv` (rows [q; k; v]) and the SwiGLU gate/up into
`mlp.fc` (rows [gate; up]); GPT-2's Conv1D stores weights as (in, out), so they are transposed both ways.
RoPE uses the same rotate-half layout as Hugging Face, so q/k need no permutation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import LMStackError
from ..models.transformer import Transformer
from ..models.utils import build_model
from ..tokenizer import Tokenizer
from .hf_bart import bart_config, map_bart
from .hf_positions import ROPE_KEYS, rope_settings, window_settings

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "bert", "bart")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
           "relu": "relu", "silu": "silu", "swish": "silu"}
ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _supported_msg() -> str:
    return f"supported model types: {', '.join(SUPPORTED)}"


# ---- detection ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LMStackError(f"cannot read {path}: {e}") from e


# ---- config -------------------------------------------------------------------------------------------------
def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return v[0] if v else None
    return v


def hf_config_to_model_config(hf_cfg: dict) -> ModelConfig:
    """Map a Hugging Face config.json dict onto ModelConfig; LMStackError for what lmstack cannot express."""
    hf = hf_cfg
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise LMStackError(f"model_type {mt!r} is not supported for conversion; {_supported_msg()}")
    def tid(key: str) -> int | None:  # special token id, dropped when outside the vocabulary (e.g. tiny GPT-2s)
        v = _first_id(hf.get(key))
        return v if isinstance(v, int) and 0 <= v < hf.get("vocab_size", 0) else None
    ids = dict(bos_token_id=tid("bos_token_id"), eos_token_id=tid("eos_token_id"), pad_token_id=tid("pad_token_id"),
               name=hf.get("_name_or_path") or mt)
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ACT_IN:
            raise LMStackError(f"GPT-2 activation_function {act!r} is not supported; use one of {', '.join(ACT_IN)}")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") \
                or hf.get("scale_attn_weights", True) is False:
            raise LMStackError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                               "scale_attn_weights=false) are not supported")
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           intermediate_size=hf.get("n_inner"), pos_emb="learned", norm="layernorm",
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", activation=ACT_IN[act],
                           bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), **ids)
    if mt == "bart":
        return bart_config(hf, ids, ACT_IN)
    if mt == "bert":
        act = hf.get("hidden_act", "gelu")
        if act not in ACT_IN:
            raise LMStackError(f"BERT hidden_act {act!r} is not supported; use one of {', '.join(ACT_IN)}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise LMStackError(f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported "
                               "(only 'absolute')")
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 512),
                           n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                           intermediate_size=hf.get("intermediate_size"), pos_emb="learned", norm="layernorm",
                           norm_eps=hf.get("layer_norm_eps", 1e-12), mlp="gelu", activation=ACT_IN[act], bias=True,
                           tie_embeddings=True, causal=False, norm_position="post",
                           type_vocab_size=hf.get("type_vocab_size", 2), embedding_norm=True, **ids)
    # llama / mistral / qwen2
    d, nh = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // nh) or d % nh:
        raise LMStackError(f"head_dim={hf.get('head_dim')} differs from hidden_size/num_attention_heads={d}/{nh}; "
                           "lmstack needs head_dim = hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise LMStackError(f"{mt} hidden_act {hf['hidden_act']!r} is not supported (lmstack's SwiGLU uses silu)")
    block = hf.get("max_position_embeddings", 2048)
    window, types = window_settings(hf, mt)
    theta, scaling = rope_settings(hf)
    if scaling and scaling["type"] == "dynamic":  # dynamic NTK is meant to run up to factor x the trained length
        block = max(block, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if mt == "qwen2" or (attn_bias and not mlp_bias):
        bias, qkv_bias = False, True  # o_proj bias (Llama attention_bias) must then be zero: checked on load
    elif mlp_bias and not attn_bias:
        raise LMStackError(f"{mt} with attention_bias=false and mlp_bias=true is not supported "
                           "(lmstack biases attention and MLP together)")
    else:
        bias, qkv_bias = attn_bias, None
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=block, n_layer=hf["num_hidden_layers"], n_head=nh,
                       n_kv_head=hf.get("num_key_value_heads") or None, n_embd=d,
                       intermediate_size=hf.get("intermediate_size"), pos_emb="rope", norm="rmsnorm",
                       norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=bias, qkv_bias=qkv_bias,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta,
                       rope_scaling=scaling, sliding_window=window, layer_types=types, **ids)


# ---- weights ------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise LMStackError(f"{index} lists shard(s) that are missing: {', '.join(missing[:3])}")
            return [path / f for f in files]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    if (path / "pytorch_model.bin").exists():
        return [path / "pytorch_model.bin"]
    raise LMStackError(f"no weights in {path}: expected model.safetensors (or shards with "
                       "model.safetensors.index.json) or pytorch_model.bin")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # pickle errors surface as many types
                raise LMStackError(f"cannot read {f} (torch.load, weights_only=True): {e}") from e
    return sd


def _strip_prefix(sd: dict[str, torch.Tensor], marker: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix ('transformer.', 'bert.', ...) so keys start at `marker` level."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p) and k[len(p):].split(".")[0] in marker.split():
                k = k[len(p):]
                break
        out[k] = v
    return out


class WeightSource:
    """Pops weights by name, so whatever is left over can be reported."""

    def __init__(self, sd: dict[str, torch.Tensor], where: Path):
        self.sd, self.where = sd, where

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.sd:
            raise LMStackError(f"{self.where}: weight {name!r} is missing (the checkpoint does not match config.json)")
        return self.sd.pop(name)

    def opt(self, name: str) -> torch.Tensor | None:
        return self.sd.pop(name, None)


def _map_gpt2(w: WeightSource, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": w("wte.weight"), "pos_emb.weight": w("wpe.weight"),
           "norm_f.weight": w("ln_f.weight"), "norm_f.bias": w("ln_f.bias")}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[b + dst + ".weight"], out[b + dst + ".bias"] = w(h + src + ".weight"), w(h + src + ".bias")
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                         ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            out[b + dst + ".weight"] = w(h + src + ".weight").t()  # Conv1D: (in, out)
            out[b + dst + ".bias"] = w(h + src + ".bias")
        w.opt(h + "attn.bias"), w.opt(h + "attn.masked_bias")  # causal-mask buffers of old checkpoints
    head = w.opt("lm_head.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = head if head is not None else w("lm_head.weight")
    return out


def _map_llama(w: WeightSource, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": w("model.embed_tokens.weight"), "norm_f.weight": w("model.norm.weight")}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        out[b + "norm1.weight"] = w(h + "input_layernorm.weight")
        out[b + "norm2.weight"] = w(h + "post_attention_layernorm.weight")
        out[b + "attn.qkv.weight"] = torch.cat([w(a + "q_proj.weight"), w(a + "k_proj.weight"), w(a + "v_proj.weight")])
        if cfg.use_qkv_bias:
            out[b + "attn.qkv.bias"] = torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")])
        out[b + "attn.proj.weight"] = w(a + "o_proj.weight")
        if not cfg.bias and (ob := w.opt(a + "o_proj.bias")) is not None and ob.abs().max() > 0:
            raise LMStackError(f"{w.where}: o_proj has a non-zero bias while the MLP has none; lmstack cannot "
                               "express that combination")
        m = h + "mlp."
        out[b + "mlp.fc.weight"] = torch.cat([w(m + "gate_proj.weight"), w(m + "up_proj.weight")])
        out[b + "mlp.proj.weight"] = w(m + "down_proj.weight")
        if cfg.bias:
            out[b + "attn.proj.bias"] = w(a + "o_proj.bias")
            out[b + "mlp.fc.bias"] = torch.cat([w(m + "gate_proj.bias"), w(m + "up_proj.bias")])
            out[b + "mlp.proj.bias"] = w(m + "down_proj.bias")
        w.opt(a + "rotary_emb.inv_freq")
    head = w.opt("lm_head.weight")
    if not cfg.tie_embeddings:
        if head is None:
            raise LMStackError(f"{w.where}: lm_head.weight is missing but config.json has tie_word_embeddings=false")
        out["lm_head.weight"] = head
    return out


def _map_bert(w: WeightSource, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    e = "embeddings."
    out = {"tok_emb.weight": w(e + "word_embeddings.weight"), "pos_emb.weight": w(e + "position_embeddings.weight"),
           "type_emb.weight": w(e + "token_type_embeddings.weight"),
           "emb_norm.weight": w(e + "LayerNorm.weight"), "emb_norm.bias": w(e + "LayerNorm.bias")}
    w.opt(e + "position_ids"), w.opt(e + "token_type_ids")
    for i in range(cfg.n_layer):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        s = h + "attention.self."
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = torch.cat([w(f"{s}query.{p}"), w(f"{s}key.{p}"), w(f"{s}value.{p}")])
            out[f"{b}attn.proj.{p}"] = w(f"{h}attention.output.dense.{p}")
            out[f"{b}norm1.{p}"] = w(f"{h}attention.output.LayerNorm.{p}")
            out[f"{b}mlp.fc.{p}"] = w(f"{h}intermediate.dense.{p}")
            out[f"{b}mlp.proj.{p}"] = w(f"{h}output.dense.{p}")
            out[f"{b}norm2.{p}"] = w(f"{h}output.LayerNorm.{p}")
    if cfg.mlm_head:  # BertForMaskedLM / BertForPreTraining: cls.predictions.{transform.*, bias, decoder.*}
        c = "cls.predictions."
        for p in ("weight", "bias"):
            out[f"lm_head.dense.{p}"] = w(f"{c}transform.dense.{p}")
            out[f"lm_head.norm.{p}"] = w(f"{c}transform.LayerNorm.{p}")
        # the decoder's bias is the one its forward adds; tied models tie it to `bias` and often save that only
        bias, dec_bias = w.opt(c + "bias"), w.opt(c + "decoder.bias")
        out["lm_head.bias"] = dec_bias if dec_bias is not None else bias if bias is not None else w(c + "bias")
        decoder = w.opt(c + "decoder.weight")  # tied checkpoints may store the embedding again here
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = decoder if decoder is not None else w(c + "decoder.weight")
    for k in [k for k in w.sd if k.startswith(("pooler.", "cls."))]:  # pooler / next-sentence head: not used
        w.sd.pop(k)
    return out


def _hf_to_lmstack_state(sd: dict[str, torch.Tensor], mt: str, cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    if mt == "gpt2":
        sd = _strip_prefix(sd, "wte wpe h ln_f", ("transformer.",))
        mapper: Callable = _map_gpt2
    elif mt == "bert":
        sd = _strip_prefix(sd, "embeddings encoder pooler", ("bert.", "model."))
        mapper = _map_bert
    elif mt == "bart":
        sd = {k if k.startswith(("model.", "lm_head", "final_logits_bias")) else "model." + k: v for k, v in sd.items()}
        mapper = map_bart
    else:
        mapper = _map_llama
    src = WeightSource(dict(sd), where)
    out = mapper(src, cfg)
    if src.sd:  # weights nobody consumed mean the architecture has something lmstack would silently drop
        raise LMStackError(f"{where}: {len(src.sd)} weight(s) have no place in the lmstack model, e.g. "
                           f"{', '.join(sorted(src.sd)[:3])}")
    return out


# ---- load ---------------------------------------------------------------------------------------------------
def load_hf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """A Hugging Face model directory -> (lmstack Transformer in eval mode, Tokenizer or None)."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LMStackError(f"{path} is not a Hugging Face model directory (no config.json); {_supported_msg()}")
    hf = _read_json(path / "config.json")
    if "model_type" not in hf:
        raise LMStackError(f"{path}/config.json has no model_type, so it is not a Hugging Face config; "
                           f"{_supported_msg()}")
    mt = hf["model_type"]
    cfg = hf_config_to_model_config(hf)
    weights = _read_weights(path)
    if mt == "bert" and "cls.predictions.transform.dense.weight" in weights:  # a masked-LM checkpoint: keep its head
        cfg = dataclasses.replace(cfg, mlm_head=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    state = _hf_to_lmstack_state(weights, mt, cfg, path)
    model = build_model(cfg, state, f"{path} (converted weights)")
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return model, load_hf_tokenizer(path, cfg)


def load_hf_tokenizer(path: str | Path, cfg: ModelConfig | None = None) -> Tokenizer | None:
    """The directory's tokenizer.json as a lmstack Tokenizer (None without one), with eos/bos/pad from
    tokenizer_config.json / special_tokens_map.json, falling back to config.json's token ids, and the encoder's
    max_seq_length from sentence_bert_config.json."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        return None
    tok = Tokenizer.load(path)
    # tokenizer.json may carry fixed padding/truncation settings; transformers ignores them unless asked, so do we
    tok.hf.no_padding()
    tok.hf.no_truncation()
    if cfg is not None:
        for attr, tid in (("eos_token", cfg.eos_token_id), ("bos_token", cfg.bos_token_id),
                          ("pad_token", cfg.pad_token_id)):
            if getattr(tok, attr) is None and tid is not None and (t := tok.hf.id_to_token(tid)) is not None:
                setattr(tok, attr, t)
    st = path / "sentence_bert_config.json"
    if st.exists() and isinstance(msl := _read_json(st).get("max_seq_length"), int):
        tok.model_max_length = min(msl, tok.model_max_length or msl)
    return tok


from .hf_export import export_hf  # noqa: E402  (the other direction; imports this module's tables)

__all__ = ["load_hf", "load_hf_tokenizer", "hf_config_to_model_config", "export_hf", "SUPPORTED", "ROPE_KEYS",
           "ACT_OUT"]
