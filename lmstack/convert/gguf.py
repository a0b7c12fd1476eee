"""GGUF files (llama.cpp) -> lmstack: read metadata and tensors, dequantize to float32, build Transformer + Tokenizer.

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Supported: architecture `llama` (RoPE, RMSNorm, SwiGLU, GQA, tied or untied head); tokenizer `gpt2` (byte-level
BPE); tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K (dequantized with the
numpy dequantizers of the `gguf` package; Q8_0/Q4_0/Q4_1/F16/BF16 also have a built-in numpy fallback).

Layout notes
- GGUF lists ggml dimensions `ne` innermost first; the numpy view the reader gives has them reversed, so a linear
  weight arrives as (out_features, in_features), the torch layout.
- llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE rotates adjacent pairs (interleaved
  layout). lmstack, like Hugging Face, rotates the two halves of each head (rotate-half layout): we undo the
  permutation per head: reshape(n_head, head_dim // 2, 2, in).swapaxes(1, 2).
- lmstack fuses q/k/v (`attn.qkv` = rows [q; k; v]) and the SwiGLU gate/up (`mlp.fc` = rows [gate; up]).
- Tensors are dequantized one at a time (large ones in row chunks) straight into the model's parameters, so load
  memory stays near one float32 copy of the weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import LMStackError
from ..models.qformats import base_formats
from ..models.qlinear import native_layout
from ..models.transformer import Transformer, rope_frequencies
from ..models.utils import materialize
from ..tokenizer import Tokenizer, bytes_to_unicode
from . import gguf_packed
from .gguf_reader import LeanReader

MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TOKENIZERS = ("gpt2",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
_CHUNK_ROWS = 4096  # rows dequantized at once for big tensors (bounds the numpy dequantizers' temporaries)


def is_gguf(path: str | Path) -> bool:
    """True if `path` is a file starting with the GGUF magic bytes."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == MAGIC
    except OSError:
        return False


# ---- dequantization -------------------------------------------------------------------------------------------
def _np_dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Built-in numpy dequantizers for the simple block formats (used when the gguf package has none, and as an
    independent reference in the tests). `data`: uint8 rows of blocks -> float32 (rows, n_values)."""
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    raw = np.ascontiguousarray(rows).view(np.uint8)
    n = raw.shape[0]
    if qtype == "F32":
        out = raw.view(np.float32)
    elif qtype == "F16":
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == "BF16":
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype == "Q8_0":  # block of 32: f16 scale d, int8 q[32]; x = d * q
        b = raw.reshape(n, -1, 34)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        out = d * b[..., 2:].view(np.int8).astype(np.float32)
    elif qtype in ("Q4_0", "Q4_1"):  # block of 32: f16 d (+ f16 min m), 16 bytes: low nibbles = 0..15, high = 16..31
        size = 18 if qtype == "Q4_0" else 20
        b = raw.reshape(n, -1, size)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        qs = b[..., size - 16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
        if qtype == "Q4_0":
            out = d * (q - 8.0)
        else:
            m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
            out = d * q + m
    else:
        raise LMStackError(f"no built-in dequantizer for GGUF tensor type {qtype}; upgrade the `gguf` package "
                           f"(pip install -U gguf) for {', '.join(SUPPORTED_TYPES)}")
    out = out.reshape(n, -1).astype(np.float32, copy=False)
    return out.reshape(*data.shape[:-1], -1) if data.ndim > 1 else out.reshape(-1)


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """Dequantize raw GGUF tensor data (as gguf.GGUFReader gives it) to float32 with the torch-layout shape."""
    import gguf
    name = qtype.name if hasattr(qtype, "name") else str(qtype)
    if name not in SUPPORTED_TYPES:
        raise LMStackError(f"GGUF tensor type {name} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    if name == "F32":
        return np.array(data, dtype=np.float32)  # a copy: the reader's memory map is read-only
    if name == "F16" and data.dtype == np.float16:
        return data.astype(np.float32)
    fn = getattr(getattr(gguf, "quants", None), "dequantize", None)
    if fn is not None:
        try:
            return np.asarray(fn(data, gguf.GGMLQuantizationType[name]), dtype=np.float32)
        except NotImplementedError:  # the gguf package has no dequantizer for this type: use ours below
            pass
    return _np_dequantize(data, name)


# ---- metadata -------------------------------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config_from_metadata(reader, tensor_names: set[str], path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LMStackError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_ARCHS)}")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise LMStackError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete or not a "
                               "llama.cpp model")
        return v

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != n_embd // n_head:
        raise LMStackError(f"{path}: partial rotary embeddings (rope.dimension_count={rope_dim}, head size "
                           f"{n_embd // n_head}) are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise LMStackError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 style rope scaling) "
                           "are not supported; supported rope scaling: none, linear")
    rope_scaling = None
    stype = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if stype not in (None, "none") or (stype is None and factor not in (None, 1.0)):
        if (stype or "linear") != "linear":
            raise LMStackError(f"{path}: rope scaling type {stype!r} is not supported; supported: none, linear")
        if factor not in (None, 1.0):
            rope_scaling = {"type": "linear", "factor": float(factor)}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else int(reader.get_tensor(0).shape[-1])
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return ModelConfig(
        vocab_size=int(vocab), block_size=int(_field(reader, f"{arch}.context_length", 2048)),
        n_layer=int(need("block_count")), n_head=n_head, n_kv_head=n_kv if n_kv != n_head else None, n_embd=n_embd,
        intermediate_size=int(need("feed_forward_length")), pos_emb="rope", norm="rmsnorm",
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), mlp="swiglu",
        activation="silu", bias=False, tie_embeddings="output.weight" not in tensor_names,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        bos_token_id=None if ids["bos"] is None else int(ids["bos"]),
        eos_token_id=None if ids["eos"] is None else int(ids["eos"]),
        pad_token_id=None if ids["padding"] is None else int(ids["padding"]),
        name=str(_field(reader, "general.name", path.stem)))


# ---- tokenizer ------------------------------------------------------------------------------------------------
SPLITS = {  # pre-tokenizer regexes for `tokenizer.ggml.pre` values whose merges were learned on another split
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
}
SPLITS["llama-bpe"] = SPLITS["llama-v3"] = SPLITS["llama3"]


def tokenizer_from_reader(reader, path: Path | str = "<gguf>") -> Tokenizer:
    """Byte-level BPE from `tokenizer.ggml.*` metadata, as transformers' GGUF converter builds it: GPT-2 byte
    alphabet, ByteLevel pre-tokenizer (no prefix space) and decoder, control tokens (type 3) added as special."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise LMStackError(f"{path}: GGUF tokenizer {kind!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise LMStackError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    to_char = bytes_to_unicode()
    alphabet = {c: b for b, c in to_char.items()}
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):  # tokens outside the byte alphabet are respelled from their UTF-8 bytes
        key = t if set(t) <= alphabet.keys() else "".join(to_char[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    if split:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == 3 and set(t) <= alphabet.keys()]
    if control:
        hf.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    if user:
        hf.add_tokens(user)

    def tok(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
    return Tokenizer(hf, eos_token=tok("eos"), bos_token=tok("bos"), pad_token=tok("padding"),
                     chat_template=_field(reader, "tokenizer.chat_template"))


# ---- weights --------------------------------------------------------------------------------------------------
def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _copy_into(dst: torch.Tensor, t, path: Path, n_head: int | None = None) -> None:
    """Dequantize GGUF tensor `t` into `dst` (a float32 view of a parameter), in row chunks when possible."""
    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise LMStackError(f"{path}: tensor {t.name} has type {qtype}, which is not supported; supported: "
                           f"{', '.join(SUPPORTED_TYPES)}")
    data = t.data
    rows = data.shape[0] if data.ndim > 1 else 1
    expect = tuple(dst.shape)
    if n_head is not None:  # permuted rows: whole tensor at once (small: q/k only)
        w = dequantize(data, t.tensor_type)
        if w.shape != expect:
            raise LMStackError(f"{path}: tensor {t.name} has shape {w.shape}, expected {expect}")
        dst.copy_(torch.from_numpy(np.ascontiguousarray(_unpermute(w, n_head))))
        return
    if data.ndim == 1 or rows <= _CHUNK_ROWS:
        w = dequantize(data, t.tensor_type)
        if w.shape != expect:
            raise LMStackError(f"{path}: tensor {t.name} has shape {w.shape}, expected {expect}")
        dst.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        return
    if rows != expect[0]:
        raise LMStackError(f"{path}: tensor {t.name} has {rows} rows, expected shape {expect}")
    for s in range(0, rows, _CHUNK_ROWS):
        w = dequantize(data[s:s + _CHUNK_ROWS], t.tensor_type)
        if w.shape[1:] != expect[1:]:
            raise LMStackError(f"{path}: tensor {t.name} has rows of {w.shape[1:]}, expected {expect[1:]}")
        dst[s:s + w.shape[0]].copy_(torch.from_numpy(np.ascontiguousarray(w)))


def load_gguf(path: str | Path, dtype: torch.dtype | None = None,
              packed: bool = False) -> tuple[Transformer, Tokenizer]:
    """Load a llama-architecture GGUF file as (Transformer in eval mode, Tokenizer); weights dequantized to
    float32 (then cast to `dtype` if given), or with packed=True its quantized tensors kept packed in QuantLinear /
    QuantEmbedding layers (lmstack/convert/gguf_packed.py; inference only)."""
    path = Path(path)
    if not is_gguf(path):
        raise LMStackError(f"{path} is not a GGUF file (no 'GGUF' magic at its start); pass a .gguf file made by "
                           "llama.cpp, or a Hugging Face / lmstack checkpoint directory")
    try:
        reader = LeanReader(path)
    except LMStackError:
        raise
    except Exception as e:  # struct/UTF-8 errors on a corrupt header
        raise LMStackError(f"cannot read GGUF file {path}: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config_from_metadata(reader, set(tensors), path)
    tokenizer = tokenizer_from_reader(reader, path)
    reader.fields.clear()  # the metadata is read: drop the vocabulary lists

    # Build without random init (meta device), then give it real (uninitialised) storage and fill every tensor.
    with torch.device("meta"):
        model = Transformer(cfg)
    plan = gguf_packed.install(model, cfg, tensors, cfg.tie_embeddings) if packed else {}
    if cfg.tie_embeddings and "lm_head" not in plan:  # unregister the shared head: no second embedding matrix
        model.lm_head._parameters["weight"] = None
    model = materialize(model, "cpu")
    if cfg.tie_embeddings and "lm_head" not in plan:  # materialize gives each module its own storage: tie again
        model.lm_head.weight = model.tok_emb.weight
    cos, sin = rope_frequencies(cfg, cfg.block_size)
    model.rope_cos, model.rope_sin = cos, sin

    filled: set[str] = set()
    params = dict(model.named_parameters(remove_duplicate=False))

    def put(name: str, gguf_name: str, rows: slice | None = None, n_head: int | None = None) -> None:
        if name.rpartition(".")[0] in plan:  # a packed layer: gguf_packed.fill reads it
            filled.add(name)
            return
        if gguf_name not in tensors:
            raise LMStackError(f"{path}: tensor {gguf_name} is missing; is this a complete llama GGUF file?")
        p = params[name].data
        _copy_into(p if rows is None else p[rows], tensors[gguf_name], path, n_head)
        filled.add(name)

    H, KV, hd, f = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_size
    with torch.no_grad():
        put("tok_emb.weight", "token_embd.weight")
        for i in range(cfg.n_layer):
            b, g = f"blocks.{i}.", f"blk.{i}."
            put(b + "norm1.weight", g + "attn_norm.weight")
            put(b + "attn.qkv.weight", g + "attn_q.weight", slice(0, H * hd), n_head=H)
            put(b + "attn.qkv.weight", g + "attn_k.weight", slice(H * hd, (H + KV) * hd), n_head=KV)
            put(b + "attn.qkv.weight", g + "attn_v.weight", slice((H + KV) * hd, (H + 2 * KV) * hd))
            put(b + "attn.proj.weight", g + "attn_output.weight")
            put(b + "norm2.weight", g + "ffn_norm.weight")
            put(b + "mlp.fc.weight", g + "ffn_gate.weight", slice(0, f))
            put(b + "mlp.fc.weight", g + "ffn_up.weight", slice(f, 2 * f))
            put(b + "mlp.proj.weight", g + "ffn_down.weight")
        put("norm_f.weight", "output_norm.weight")
        if cfg.tie_embeddings:
            filled.add("lm_head.weight")
        else:
            put("lm_head.weight", "output.weight")
        gguf_packed.fill(model, plan, cfg, tensors, path, dequantize)
        native_layout(model)
    missing = sorted(set(params) - filled)
    if missing:  # a Transformer parameter this converter does not know how to fill (e.g. a new config feature)
        raise LMStackError(f"{path}: no GGUF tensor for lmstack parameter(s) {', '.join(missing[:5])}")
    del reader, tensors  # drop the memory map
    if dtype is not None:
        model = model.to(dtype)
    fmts = sorted({f for v in plan.values() for f in base_formats(v)})
    model.quantization = "gguf:" + ",".join(fmts) if plan else None
    return model.eval(), tokenizer
