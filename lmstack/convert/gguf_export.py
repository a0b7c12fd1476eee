"""lmstack -> GGUF (llama.cpp's file format), with the `gguf` package's writer:

    export_gguf(model, tokenizer, "model.q8_0.gguf", quant="q8_0")

What it writes (the mirror image of gguf.py's reader):
- architecture `llama`: a causal Transformer with RoPE (none or linear scaling), RMSNorm, SwiGLU, no biases, any
  grouped-query attention, tied or untied head. Metadata `llama.*` (context, widths, heads, eps, rope base).
- tensors in llama.cpp's names; q/k rows permuted to llama.cpp's interleaved RoPE layout (gguf.py undoes it);
  lmstack's fused qkv and gate/up split. `quant`: f32 | f16 | q8_0 | q4_0 | q4_1 for every 2-D matrix whose rows are
  a whole number of 32-value blocks (token embedding and output head included, as llama.cpp's converter does for
  q8_0); norms and any other tensor stay float32.
- the tokenizer (byte-level BPE only: `tokenizer.ggml.model = gpt2`, tokens, types, merges, the pre-tokenizer name
  for the regexes gguf.py knows), bos/eos/pad ids and the chat template. A model vocabulary padded beyond the
  tokenizer's gets placeholder tokens (type unused) so token count == embedding rows, as llama.cpp requires.
The file is written to a temporary name beside the target, fsync'ed and renamed: never half a file at `out`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import ModelConfig
from ..errors import LMStackError
from ..tokenizer import Tokenizer
from .gguf import SPLITS

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_BLOCK = 32
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5


def check_exportable(cfg: ModelConfig) -> None:
    problems = []
    if getattr(cfg, "arch", "transformer") != "transformer" or not cfg.causal or cfg.cross_attention:
        problems.append(f"arch={cfg.arch}, causal={cfg.causal}")
    for key, want in (("pos_emb", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"), ("norm_position", "pre")):
        if getattr(cfg, key) != want:
            problems.append(f"{key}={getattr(cfg, key)}")
    if cfg.bias or cfg.use_qkv_bias:
        problems.append("biases (bias / qkv_bias)")
    if cfg.rope_scaling and (cfg.rope_scaling.get("rope_type") or cfg.rope_scaling.get("type")) != "linear":
        problems.append(f"rope_scaling={cfg.rope_scaling}")
    if cfg.sliding_window is not None:
        problems.append(f"sliding-window attention (window {cfg.sliding_window}; GGUF's llama has none)")
    if cfg.type_vocab_size or cfg.embedding_norm or cfg.mlm_head:
        problems.append("BERT parts (token types / embedding norm / MLM head)")
    if problems:
        raise LMStackError("GGUF export writes llama-architecture models (causal, pos_emb=rope, norm=rmsnorm, "
                           "mlp=swiglu, no biases, rope scaling none or linear); this model has "
                           + ", ".join(problems) + ". Export it as a Hugging Face directory instead "
                           "(lmstack export M --format hf)")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows -> llama.cpp's interleaved RoPE rows (the inverse of gguf.py's _unpermute)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _tensor(writer, name: str, w: np.ndarray, quant: str) -> None:
    import gguf
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2 or quant == "f32" or w.shape[-1] % _BLOCK:
        writer.add_tensor(name, w)
    elif quant == "f16":
        writer.add_tensor(name, w.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[quant.upper()]
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)  # shape from the bytes


def _weights(model, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    H, KV, hd, f = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_size
    out = [("token_embd.weight", sd["tok_emb.weight"])]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        qkv = sd[b + "attn.qkv.weight"]
        out += [(g + "attn_norm.weight", sd[b + "norm1.weight"]),
                (g + "attn_q.weight", _permute(qkv[:H * hd], H)),
                (g + "attn_k.weight", _permute(qkv[H * hd:(H + KV) * hd], KV)),
                (g + "attn_v.weight", qkv[(H + KV) * hd:]),
                (g + "attn_output.weight", sd[b + "attn.proj.weight"]),
                (g + "ffn_norm.weight", sd[b + "norm2.weight"]),
                (g + "ffn_gate.weight", sd[b + "mlp.fc.weight"][:f]),
                (g + "ffn_up.weight", sd[b + "mlp.fc.weight"][f:]),
                (g + "ffn_down.weight", sd[b + "mlp.proj.weight"])]
    out.append(("output_norm.weight", sd["norm_f.weight"]))
    if not cfg.tie_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    return out


def _pre_name(spec: dict) -> str:
    """`tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer: gpt-2 (ByteLevel's own regex) or a named Split."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # llama.cpp's name for the GPT-2 regex (it rejects "gpt2")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(parts) == 2 and len(splits) == 1 and len(byte) == 1 and not byte[0].get("use_regex", True):
        for name in ("llama-bpe", "qwen2"):
            if SPLITS[name] == splits[0]:
                return name
    raise LMStackError("GGUF export needs a byte-level BPE tokenizer whose pre-tokenizer llama.cpp knows (GPT-2's "
                       "ByteLevel regex, Llama-3's or Qwen2's split); this tokenizer's pre-tokenizer is "
                       f"{json.dumps(pre)[:160]}")


def _add_tokenizer(writer, tok: Tokenizer, vocab_rows: int) -> None:
    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LMStackError("GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model = gpt2); this one is "
                           f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')} (a char or "
                           "byte-fallback tokenizer): train a BPE one (tokenizer: bpe) or export --format hf")
    pre = _pre_name(spec)
    n = tok.vocab_size
    if n > vocab_rows:
        raise LMStackError(f"the tokenizer has {n} tokens but the model only {vocab_rows} embedding rows")
    tokens = [tok.hf.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise LMStackError("the tokenizer's ids are not contiguous from 0; GGUF needs one token per id")
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = [_TOKEN_CONTROL if i in special else _TOKEN_NORMAL for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_rows)]
    types += [_TOKEN_UNUSED] * (vocab_rows - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("pad_id", writer.add_pad_token_id)):
        if getattr(tok, key) is not None:
            add(int(getattr(tok, key)))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _add_metadata(writer, cfg: ModelConfig, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling:
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def export_gguf(model, tokenizer: Tokenizer | None, out: str | Path, quant: str = "f32", name: str | None = None) -> Path:
    """Write `model` (+ its tokenizer) as a llama-architecture GGUF file at `out` (atomically)."""
    import gguf
    quant = quant.lower()
    if quant not in QUANTS:
        raise LMStackError(f"--quant {quant!r} is not supported for GGUF export; choose one of {', '.join(QUANTS)}")
    cfg = model.config
    check_exportable(cfg)
    if tokenizer is None:
        raise LMStackError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        raise LMStackError(f"GGUF llama models need n_head x head_dim = n_embd ({cfg.n_head} x {cfg.head_dim} != "
                           f"{cfg.n_embd})")
    out = Path(out)
    with atomic_path(out) as tmp:  # never half a file at `out`
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_metadata(writer, cfg, name or cfg.name or out.stem)
        writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}[quant])
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for tname, w in _weights(model, cfg):
            _tensor(writer, tname, w, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
