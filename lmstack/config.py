"""Model configuration: one dataclass, serialised to JSON, plus named presets (presets are data)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

ARCHS = ("transformer", "lstm", "gru", "gcnn", "encoder-decoder")
ZOO_ARCHS = ("lstm", "gru", "gcnn")  # the non-attention language models (models/rnn.py, models/cnn.py)

_CHOICES = {
    "arch": ARCHS,
    "pos_emb": ("learned", "rope", "sinusoidal", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "activation": ("gelu", "gelu_tanh", "silu", "relu"),
    "norm_position": ("pre", "post"),
}


@dataclass
class ModelConfig:
    """Everything needed to build a model. GPT-2 and Llama families differ only in these fields; `arch` picks the
    Transformer (default) or one of the earlier language models: stacked LSTM / GRU (models/rnn.py) or the gated
    dilated causal CNN (models/cnn.py). Those read vocab_size, block_size (the context window generation and eval
    keep to), n_layer, n_embd, dropout, bias, norm / norm_eps (gcnn), tie_embeddings, init_std and the token ids,
    plus the rnn_* / conv_* fields below; the attention fields are ignored."""

    arch: str = "transformer"       # transformer | lstm | gru | gcnn | encoder-decoder (models/seq2seq.py)
    vocab_size: int = 50304
    block_size: int = 1024          # context window (max positions)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None    # grouped-query attention; None = n_head (plain multi-head)
    n_embd: int = 768
    intermediate_size: int | None = None  # feed-forward hidden size; None = 4*n_embd (gelu) or ~8/3*n_embd (swiglu)
    pos_emb: str = "learned"        # learned | rope | none
    norm: str = "layernorm"         # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"               # gelu (fc -> act -> proj) | swiglu (gated)
    activation: str = "gelu"        # gelu | gelu_tanh | silu | relu (for mlp=gelu)
    bias: bool = True               # biases in linear layers and norms
    qkv_bias: bool | None = None    # bias on q/k/v only (Qwen2); None = same as `bias`
    tie_embeddings: bool = True     # share token embedding and output head weights
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    dropout: float = 0.0
    causal: bool = True             # decoder (True) or bidirectional encoder (False)
    norm_position: str = "pre"      # pre: x + f(norm(x)), final norm (GPT-2/Llama) | post: norm(x + f(x)), no final norm (BERT)
    type_vocab_size: int = 0        # >0: token-type (segment) embeddings added to the input (BERT); type 0 unless given
    embedding_norm: bool = False    # norm right after the embeddings (BERT)
    mlm_head: bool = False          # BERT masked-LM head: dense -> activation -> norm before the (tied) output
                                    # projection, which then has a bias (BertForMaskedLM's cls.predictions)
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rnn_hidden: int | None = None   # lstm/gru hidden size; None = n_embd (a projection to n_embd when they differ)
    conv_kernel: int = 3            # gcnn kernel width k
    conv_dilations: list[int] | None = None  # gcnn dilation per layer, cycled over the layers; None = 1, 2, 4, 8, ...
    # encoder-decoder (arch: encoder-decoder, models/seq2seq.py): the attention fields above describe both stacks;
    # n_layer is the decoder's depth, n_encoder_layer the encoder's. The decoder's blocks add a cross-attention
    # sublayer (cross_attention, set on the decoder stack's own config). vocab_size is the target vocabulary;
    # src_vocab_size a separate source vocabulary (None: one shared embedding for source, target and output head).
    n_encoder_layer: int | None = None
    src_vocab_size: int | None = None
    cross_attention: bool = False   # blocks attend to an encoder's output after self-attention (a decoder stack)
    scale_embedding: bool = False   # token embeddings * sqrt(n_embd) (the original Transformer, Marian; not BART)
    decoder_start_token_id: int | None = None  # the first decoder input (None: bos, else eos)
    # sliding-window attention (Mistral, Qwen2, Gemma-2/3): a "sliding" layer attends to the last sliding_window
    # positions only (query i sees keys j with i - sliding_window < j <= i); layer_types: "full" | "sliding" per
    # layer (None: every layer slides when sliding_window is set)
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":  # Llama convention: 2/3 * 4d rounded up to a multiple of 64
            return 64 * math.ceil(int(8 * self.n_embd / 3) / 64)
        return 4 * self.n_embd

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def hidden_size(self) -> int:
        """The LSTM/GRU hidden (state) size."""
        return self.rnn_hidden or self.n_embd

    def dilations(self) -> list[int]:
        """gcnn: the dilation of each of the n_layer convolutions (conv_dilations cycled; default 1, 2, 4, 8, 1, ...)."""
        cycle = list(self.conv_dilations) if self.conv_dilations else [1, 2, 4, 8]
        return [int(cycle[i % len(cycle)]) for i in range(self.n_layer)]

    @property
    def receptive_field(self) -> int | None:
        """Tokens a gcnn's last-position output depends on: 1 + sum over layers of (k - 1) * dilation
        (k=3, dilations 1,2,4,8 cycling: 31 for 4 layers, 61 for 8). None for the other architectures (an RNN's
        reaches back to the first token, a Transformer's to the context window)."""
        if self.arch != "gcnn":
            return None
        return 1 + sum((self.conv_kernel - 1) * d for d in self.dilations())

    def layer_window(self, i: int) -> int | None:
        """The attention window of layer i: sliding_window for a sliding layer, None for full attention."""
        if self.sliding_window is None or (self.layer_types is not None and self.layer_types[i] != "sliding"):
            return None
        return self.sliding_window

    def _validate_window(self) -> None:
        w, types = self.sliding_window, self.layer_types
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ConfigError(f"model.sliding_window must be a positive integer (or null), got {w!r}")
        if w is not None and not self.causal:
            raise ConfigError("model.sliding_window is for causal decoders; drop it or set causal: true")
        if types is None:
            return
        if not isinstance(types, (list, tuple)) or len(types) != self.n_layer or \
                any(t not in ("full", "sliding") for t in types):
            raise ConfigError(f"model.layer_types must list 'full' or 'sliding' for each of the {self.n_layer} layers, "
                              f"got {types!r}")
        self.layer_types = list(types)
        if "sliding" in self.layer_types and w is None:
            raise ConfigError("model.layer_types has sliding layers but model.sliding_window is not set")

    def validate(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is not supported; choose one of {', '.join(allowed)}")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.arch in ZOO_ARCHS:
            self._validate_zoo()
            return
        for key in ("n_encoder_layer", "src_vocab_size"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ConfigError(f"model.{key} must be a positive integer (or null), got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"pick n_head from the divisors of n_embd (e.g. {_divisors_near(self.n_embd, self.n_head)})")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size, got n_embd/n_head={self.head_dim}")
        self._validate_window()
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ConfigError(f"model.type_vocab_size must be a non-negative integer, got {self.type_vocab_size!r}")

    def _validate_zoo(self) -> None:
        """The LSTM / GRU / gated-CNN fields (the attention ones are not used by these architectures)."""
        if self.rnn_hidden is not None and (not isinstance(self.rnn_hidden, int) or self.rnn_hidden <= 0):
            raise ConfigError(f"model.rnn_hidden must be a positive integer (or null for n_embd), got {self.rnn_hidden!r}")
        if self.arch == "gcnn":
            if not isinstance(self.conv_kernel, int) or self.conv_kernel < 1:
                raise ConfigError(f"model.conv_kernel must be a positive integer, got {self.conv_kernel!r}")
            if self.conv_dilations is not None and (
                    not isinstance(self.conv_dilations, (list, tuple)) or not self.conv_dilations
                    or not all(isinstance(d, int) and d >= 1 for d in self.conv_dilations)):
                raise ConfigError(f"model.conv_dilations must be a non-empty list of positive integers (cycled over "
                                  f"the layers), got {self.conv_dilations!r}")
            if self.conv_dilations is not None:
                self.conv_dilations = list(self.conv_dilations)

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- accounting (used by `lmstack info` and the scaling maths) ------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        if self.arch in ZOO_ARCHS:
            return self._zoo_params(include_embeddings)
        if self.arch == "encoder-decoder":  # the two stacks (models/seq2seq.py), the shared parts counted once
            enc, dec = self.encoder_config(), self.decoder_config()
            n = enc.num_params(include_embeddings) + dec.num_params(include_embeddings)
            d = self.n_embd
            n -= (0 if enc.tie_embeddings else enc.vocab_size * d)  # the encoder has no output head
            if include_embeddings and self.src_vocab_size is None:
                n -= self.vocab_size * d  # one shared token embedding
            return n
        d, L, V, f = self.n_embd, self.n_layer, self.vocab_size, self.ffn_size
        kv = self.kv_heads * self.head_dim
        attn = d * (d + 2 * kv) + d * d
        if self.use_qkv_bias:
            attn += d + 2 * kv
        if self.bias:
            attn += d
        if self.cross_attention:  # a second attention (q, kv, proj) and its norm per block
            attn *= 2
            attn += d * (2 if self.norm == "layernorm" and self.bias else 1)
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f + ((2 * f if self.mlp == "swiglu" else f) + d if self.bias else 0)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        total = L * (attn + mlp + 2 * norm) + (norm if self.norm_position == "pre" else 0)
        emb = V * d + (self.block_size * d if self.pos_emb == "learned" else 0) + self.type_vocab_size * d
        emb += norm if self.embedding_norm else 0
        head = 0 if self.tie_embeddings else V * d
        if self.mlm_head:  # transform dense (d*d + d) + its norm + the output bias
            head += d * d + d + norm + V
        return total + head + (emb if include_embeddings else 0)

    def encoder_config(self) -> "ModelConfig":
        """encoder-decoder: the encoder stack's config (bidirectional, n_encoder_layer blocks, source vocabulary)."""
        return dataclasses.replace(self, arch="transformer", causal=False, cross_attention=False,
                                   n_layer=self.n_encoder_layer or self.n_layer,
                                   vocab_size=self.src_vocab_size or self.vocab_size,
                                   n_encoder_layer=None, src_vocab_size=None)

    def decoder_config(self) -> "ModelConfig":
        """encoder-decoder: the decoder stack's config (causal, cross-attention in every block)."""
        return dataclasses.replace(self, arch="transformer", causal=True, cross_attention=True,
                                   n_encoder_layer=None, src_vocab_size=None)

    def _zoo_params(self, include_embeddings: bool) -> int:
        d, L, V = self.n_embd, self.n_layer, self.vocab_size
        if self.arch in ("lstm", "gru"):
            H, gates = self.hidden_size, 4 if self.arch == "lstm" else 3
            total = sum(gates * H * ((d if i == 0 else H) + H) + (2 * gates * H if self.bias else 0) for i in range(L))
            total += H * d if H != d else 0  # projection back to the embedding width
        else:  # gcnn: per layer a norm and a (d -> 2d, kernel k) convolution; a final norm
            norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
            conv = 2 * d * d * self.conv_kernel + (2 * d if self.bias else 0)
            total = L * (norm + conv) + norm
        head = 0 if self.tie_embeddings else V * d
        return total + head + (V * d if include_embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), Kaplan/Chinchilla style:
        6 * non-embedding params (+ output head) + attention scores 6 * L * T * d (Transformer only: an RNN's or a
        CNN's cost per token does not grow with the context)."""
        T = seq_len or self.block_size
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.n_embd
        return 6 * n + (6 * self.n_layer * T * self.n_embd if self.arch == "transformer" else 0)

    def kv_cache_bytes(self, seq_len: int | None = None, batch: int = 1, bytes_per_elem: int = 4) -> int:
        """Decoding-state memory: the KV cache at seq_len tokens; for lstm/gru the hidden (and cell) state, for gcnn
        the per-layer receptive-field buffers (both independent of seq_len)."""
        if self.arch in ("lstm", "gru"):
            return (2 if self.arch == "lstm" else 1) * self.n_layer * batch * self.hidden_size * bytes_per_elem
        if self.arch == "gcnn":
            return batch * sum((self.conv_kernel - 1) * d for d in self.dilations()) * self.n_embd * bytes_per_elem
        T = seq_len or self.block_size
        return 2 * self.n_layer * batch * T * self.kv_heads * self.head_dim * bytes_per_elem


def human_bytes(n: float, unit: str = "B") -> str:
    """1536 -> '1.5 KB' (binary prefixes)."""
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:,.1f} {prefix}{unit}" if prefix else f"{n:,.0f} {unit}"
        n /= 1024
    return str(n)


def describe(cfg: ModelConfig, seq_len: int | None = None) -> list[tuple[str, str]]:
    """(label, value) rows: architecture, parameters, FLOPs per token, weight and KV-cache memory (`lmstack info`)."""
    T = seq_len or cfg.block_size
    n = cfg.num_params()
    kv32, kv16 = cfg.kv_cache_bytes(T), cfg.kv_cache_bytes(T, bytes_per_elem=2)
    if cfg.arch in ("lstm", "gru"):
        arch = (f"{cfg.arch.upper()}, {cfg.n_layer} layers, hidden {cfg.hidden_size}, {cfg.n_embd}-wide embeddings"
                f"{' (tied head)' if cfg.tie_embeddings else ''}")
        state = ("recurrent state", f"{human_bytes(kv32)} fp32, {human_bytes(kv16)} bf16 (any length)")
    elif cfg.arch == "gcnn":
        arch = (f"gated CNN, {cfg.n_layer} layers, {cfg.n_embd} wide, kernel {cfg.conv_kernel}, dilations "
                f"{','.join(map(str, cfg.dilations()))}, receptive field {cfg.receptive_field} tokens, {cfg.norm}")
        state = ("conv buffers", f"{human_bytes(kv32)} fp32, {human_bytes(kv16)} bf16 (any length)")
    elif cfg.arch == "encoder-decoder":
        arch = (f"encoder-decoder, {cfg.n_encoder_layer or cfg.n_layer} + {cfg.n_layer} layers, {cfg.n_head} heads, "
                f"{cfg.n_embd} wide, ffn {cfg.ffn_size}, {cfg.pos_emb}/{cfg.norm}/{cfg.mlp}, {cfg.norm_position}-norm, "
                + ("shared vocabulary" if cfg.src_vocab_size is None else f"source vocabulary {cfg.src_vocab_size:,}"))
        state = (f"decoder KV cache @ {T} tokens", f"{human_bytes(kv32)} fp32, {human_bytes(kv16)} bf16 "
                                                   "(+ cross-attention K/V of the source)")
    else:
        arch = (f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} kv), {cfg.n_embd} wide, "
                f"ffn {cfg.ffn_size}, {cfg.pos_emb}/{cfg.norm}/{cfg.mlp}")
        state = (f"KV cache @ {T} tokens", f"{human_bytes(kv32)} fp32, {human_bytes(kv16)} bf16")
    return [
        ("architecture", arch),
        ("vocab / context", f"{cfg.vocab_size:,} / {cfg.block_size:,}"),
        ("parameters", f"{n:,} ({cfg.num_params(include_embeddings=False):,} non-embedding)"),
        ("training FLOPs/token", f"{cfg.flops_per_token(T):,} "
                                 + (f"(~6N + 6·L·T·d at T={T})" if cfg.arch == "transformer" else "(~6N, any length)")),
        ("inference FLOPs/token", f"{cfg.flops_per_token(T) // 3:,}"),
        ("weights fp32 / bf16", f"{human_bytes(4 * n)} / {human_bytes(2 * n)}"),
        state,
    ]


def _divisors_near(n: int, target: int) -> str:
    divs = [k for k in range(1, n + 1) if n % k == 0]
    divs.sort(key=lambda k: abs(k - target))
    return ", ".join(str(k) for k in sorted(divs[:4]))


_GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", activation="gelu_tanh", bias=True, tie_embeddings=True)
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    # the CPU "baby GPT" of char-level Shakespeare
    "tiny-char": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=384, activation="gelu"),
    "gpt2-tiny": dict(_GPT2, n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
    "gpt2-small": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    "llama-tiny": dict(_LLAMA, n_layer=4, n_head=8, n_kv_head=2, n_embd=256, block_size=256, vocab_size=8192,
                       tie_embeddings=True),
    "smollm2-135m": dict(_LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         block_size=8192, vocab_size=49152, rope_theta=100000.0, tie_embeddings=True),
    # the earlier language models (arch: lstm | gru | gcnn), sized like tiny-char
    "lstm-char": dict(arch="lstm", n_layer=2, n_embd=256, block_size=64, vocab_size=384, dropout=0.0,
                      tie_embeddings=True, bias=True),
    "gru-char": dict(arch="gru", n_layer=2, n_embd=256, block_size=64, vocab_size=384, dropout=0.0,
                     tie_embeddings=True, bias=True),
    "gcnn-char": dict(arch="gcnn", n_layer=6, n_embd=128, block_size=64, vocab_size=384, conv_kernel=3,
                      conv_dilations=[1, 2, 4, 8], norm="layernorm", bias=True, tie_embeddings=True),
    "llama2-7b": dict(_LLAMA, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, block_size=4096,
                      vocab_size=32000, tie_embeddings=False, norm_eps=1e-5),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    d.update({k: v for k, v in overrides.items() if v is not None})
    d.setdefault("name", name)
    return ModelConfig.from_dict(d)
